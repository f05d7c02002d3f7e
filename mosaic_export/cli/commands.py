"""The subcommands that do not prune: profiles, profile detect, bench, verify and run (cli.py
dispatches to them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mosaic_export.bundle.verify import verify
from mosaic_export.cli.arguments import add_measurement, measurement_policy
from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import HELDOUT
from mosaic_export.core.units import format_bytes
from mosaic_export.decide.benchmarks import runner
from mosaic_export.decide.costmodel import Format
from mosaic_export.decide.profile import builtin_names, load_profile
from mosaic_export.measure import rounds
from mosaic_export.measure.rounds import interleaved
from mosaic_export.run.detect import POLICY, DetectRequest, detect
from mosaic_export.run.generate import generate
from mosaic_export.targets import get, names, registered
from mosaic_export.targets.base import Evaluation


def cmd_profiles() -> int:
    for name in builtin_names():
        pr = load_profile(name)
        fmt = f"{pr.runtime.target} {pr.runtime.format.name}"
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
                                            "ONNX Runtime in interleaved rounds, each run in a fresh "
                                            "process: prefill and decode tokens/s, time to first token "
                                            "and peak RSS as medians with 95% intervals, file size, "
                                            "perplexity (scored once). With --against, both models in "
                                            "the same rounds, and their ratios.")
    p.add_argument("model", type=Path, help="a .gguf file, or a folder written by --target onnx (or "
                                            "its model.onnx); dense ones too, for comparison")
    p.add_argument("--against", type=Path, default=None, metavar="MODEL",
                   help="a second model measured in the same rounds: the ratios model / this one")
    p.add_argument("--eval-text", default=HELDOUT,
                   help="perplexity text: 'builtin-heldout' or a file (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=16,
                   help="512-token windows to score; 0 skips, -1 all (default: %(default)s)")
    p.add_argument("--context", type=int, default=None,
                   help="the KV cache sized and filled to this many tokens before peak RSS is read "
                        "(default: the prompt and the generated tokens)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default=None,
                   help="ONNX Runtime execution provider (default: CPUExecutionProvider)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    add_measurement(p, rounds.BENCH_POLICY)
    a = p.parse_args(argv)
    policy = measurement_policy(a, rounds.BENCH_POLICY)
    models = {"model": _bench_target(a.model)} | ({"against": _bench_target(a.against)} if a.against else {})
    m = _bench_rounds(models, a, policy)
    rows = _bench_rows(m, models, "against" if a.against else None)
    for k, v in rows:
        print(f"{k:<22} {v}")
    print(m.summary())
    if a.json:
        a.json.write_text(json.dumps({name: m.to_dict(name) | {"first_run": m.runs[name][0]}
                                      for name in models}, indent=1) + "\n")
    return 0


def _bench_target(path: Path):
    """(the target that reads path, the artifact to run)."""

    found = [(t, artifact) for t in registered() if (artifact := t.reads(path)) is not None]
    if not found:
        raise UserError(f"{path}: expected a .gguf file or an ONNX folder written by mosaic-export")
    return found[0]


def _bench_rounds(models: dict, a: argparse.Namespace, policy):
    """The models in interleaved rounds (benchmarks.runner: the first --rounds rounds fill the
    context when --context is given, the first scores the perplexity)."""

    first = Evaluation(a.eval_text if a.eval_windows else None, a.eval_windows, threads=a.threads)
    runs = {}
    for name, (target, path) in models.items():
        kw = dict(prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens)
        if "execution_provider" in target.profile_keys:  # only a runtime with execution providers
            kw["provider"] = a.provider
        runs[name] = runner(Format(target.name, target.default_type), path, a.context, a.threads, first,
                            policy.least, **kw)
    return interleaved(runs, policy, "against" if "against" in models else None)


def _bench_rows(m, models: dict, reference: str | None) -> list[tuple[str, str]]:
    """The printed table: each model's figures (median [interval]), and the ratios."""
    def iv(name, metric, fmt):
        return m.figure(name, metric).text(fmt)

    rows = []
    for name, (_, path) in models.items():
        first = m.runs[name][0]
        rows += [(f"{name}", f"{path} ({first['file_bytes'] / 2**20:.1f} MiB)"),
                 ("  prefill tokens/s", iv(name, "prefill", lambda v: f"{v:.1f}")),
                 ("  decode tokens/s", iv(name, "decode", lambda v: f"{v:.1f}")),
                 ("  time to first token", iv(name, "ttft", lambda v: f"{v * 1e3:.0f} ms")),
                 ("  peak RSS", iv(name, "memory", lambda v: f"{v / 2**20:.1f} MiB")
                  + f" at {first['context']} tokens")]
        if "perplexity" in first:
            pp = first["perplexity"]
            rows.append(("  perplexity",
                         f"{pp['perplexity']:.3f} ({pp['text']}, {pp['n_predicted']} tokens)"))
    if reference is not None:
        for metric in ("decode", "prefill", "ttft", "memory"):
            rows.append((f"model / against {metric}", m.ratio("model", metric).text(lambda v: f"{v:.3f}")))
    return rows


def cmd_profile(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mosaic-export profile detect",
        description="Measure this machine (memory bandwidth, matmul throughput, and the runtime's "
                    "decode, prefill and memory on the model at a few widths) and write a profile "
                    "for it. The main command, given that profile, checks its measured figures "
                    "against the budgets. The widths run in interleaved rounds, each in a fresh "
                    "process; every figure is written as a median with its 95% interval and the "
                    "number of rounds. A noisy or busy machine gives wider intervals and a warning, "
                    "never a refusal; figures no fit can use (a narrower model slower beyond the "
                    "intervals) are refused.")
    p.add_argument("action", choices=("detect",))
    p.add_argument("--out", type=Path, required=True, help="the profile file to write (.toml)")
    p.add_argument("--model", default=None, help="model to calibrate on (default: SmolLM2-135M)")
    p.add_argument("--target", choices=names(), default=names()[0],
                   help="the profile's runtime (default: %(default)s)")
    p.add_argument("--quant", default="Q8_0", help="its GGUF type (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", help="its ONNX dtype (default: %(default)s)")
    p.add_argument("--also", nargs="*", default=[], metavar="FORMAT",
                   help="more formats to calibrate, as target:type (gguf:Q4_K_M onnx:fp32)")
    p.add_argument("--budgets-from", default="laptop-cpu",
                   help="profile whose budgets the new one starts with (default: %(default)s)")
    p.add_argument("--context", type=int, default=None, help="the budget's context length")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    add_measurement(p, POLICY)
    a = p.parse_args(argv)
    runtime = Format(a.target, getattr(a, get(a.target).option))
    formats = [runtime]
    for spec in a.also:
        target, _, name = spec.partition(":")
        if target not in names() or not name:
            raise UserError(f"--also: expected target:type such as gguf:Q4_K_M, got {spec!r}")
        if Format(target, name) not in formats:
            formats.append(Format(target, name))
    for f in formats:
        f.spec.check_type(f.name)
    if a.context is not None and a.context < 1:
        raise UserError(f"--context: expected a positive number of tokens, got {a.context}")
    detect(DetectRequest(a.out, formats, runtime, a.budgets_from, a.model, a.context, a.threads, a.force,
                         measurement_policy(a, POLICY)))
    print(f"wrote {a.out}; use it with: mosaic-export --profile {a.out}")
    return 0


def cmd_verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mosaic-export verify",
                                description="Re-check an output folder: the sha256 of every file "
                                            "against manifest.json, then parity of the runtime "
                                            "file with the PyTorch checkpoint.")
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stream", action="store_true",
                   help="read the checkpoint a layer at a time (done anyway when it is bigger than half "
                        "the memory available)")
    a = p.parse_args(argv)
    verify(a.out, a.threads, stream=a.stream)
    print(f"{a.out}: OK")
    return 0


def cmd_generate(argv: list[str]) -> int:
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
