"""`mosaic-export profile detect`: measure this machine and write a profile for it.

Device figures: memory (MemTotal), memory bandwidth (a large array copy), matmul throughput
(float32 GEMM), threads. Runtime calibration, per format: the model at a few widths (every layer
keeps its first heads and MLP channels: a stand-in for pruned models, the same tensors a real
plan would have), exported and run in the runtime with the context full; the cost model's
efficiency terms are fitted to those runs (costmodel.fit). The profile is marked ``local``: the
main command then checks the measured figures against its budgets.

Trust: each width runs ROUNDS to MAX_ROUNDS times and the fit takes the fastest run (the least
disturbed); every width's runs go into the file as comments. A narrower model measured slower
than a wider one, runs that disagree, or a machine busy with other work (other processes' share
of the CPU time, the hypervisor's steal) make the figures untrustworthy: detect then refuses to
write them unless forced, and a forced file carries ``# WARNING:`` lines.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .arch import LayerDims, ModelShape
from .costmodel import Calibration, Format, Observation, fit
from .errors import UserError
from .model_io import LoadedModel, load_model
from .process import proc_bytes
from .profile import Budgets, load_profile
from .resize import leading, resize_model
from .trust import (
    WidthRuns,
    machine_check,
    rate_text,
    read_cpu_times,
    sanity_problems,
    settled,
    spread,
    width_text,
)
from .units import format_bytes

WIDTHS = (1.0, 0.7, 0.4)  # stand-in model sizes, as a fraction of each layer's heads and channels
ROUNDS = 3  # runs per size at least; the calibration fits the fastest (the least disturbed)
MAX_ROUNDS = 5  # runs per size at most, while the two fastest decode or prefill figures disagree

QUIET_S = 2.0


def memory_total() -> int:
    total = proc_bytes("/proc/meminfo", "MemTotal")
    if total is not None:
        return total
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_bandwidth(size: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large copy (read + write), best of ``repeats``."""
    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * size / best


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul in torch, best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def standin_dims(shape: ModelShape, width: float, align: int) -> LayerDims:
    """Uniform layer sizes at ``width`` of the dense ones (whole KV groups, aligned channels)."""
    per = shape.n_head // shape.n_kv
    n_kv = max(1, round(shape.n_kv * width))
    n_ff = max(align, round(shape.n_ff * width / align) * align)
    return LayerDims(n_kv * per, n_kv, min(n_ff, shape.n_ff))


def shrink(loaded: LoadedModel, dims: LayerDims) -> None:
    """Resize every layer in place to ``dims``, keeping its first KV groups and channels."""
    resize_model(loaded, [leading(now, dims) for now in loaded.layer_dims])


def run_format(loaded: LoadedModel, fmt: Format, work: Path, context: int,
               threads: int | None, rounds: int = 1) -> dict:
    """Export the model in the format and benchmark it with the context full; with rounds > 1,
    the run with the fastest decode (the least disturbed by other load on a shared machine)."""
    runs = run_rounds(loaded, fmt, work, context, threads, rounds, rounds)
    return max(runs, key=lambda r: r["decode"]["tokens_per_s"])


def export_format(loaded: LoadedModel, fmt: Format, work: Path) -> tuple[Path, Callable[..., dict]]:
    """Export the model in the format into work; the file (or folder) and its runtime's benchmark."""
    target = fmt.spec
    path = work / target.artifact_name(fmt.name)
    work.mkdir(parents=True, exist_ok=True)
    target.export(loaded, path, fmt.name)
    return path, target.benchmark


def interleaved_rounds(runs: dict[Hashable, Callable[[], dict]], least: int = ROUNDS,
                       most: int = MAX_ROUNDS) -> dict[Hashable, list[dict]]:
    """Run every benchmark once per round, round after round, so that a slow spell of a shared
    machine hits every size alike instead of one; a benchmark stops after ``least`` rounds once
    its two fastest decode figures agree and its two fastest prefill figures too (``settled``):
    both are fitted and both are judged; after ``most`` rounds in any case."""
    results: dict[Hashable, list[dict]] = {key: [] for key in runs}
    for _ in range(most):
        for key, run in runs.items():
            done = results[key]
            if len(done) >= least and all(settled([r[m]["tokens_per_s"] for r in done])
                                          for m in ("decode", "prefill")):
                continue
            done.append(run())
    return results


def run_rounds(loaded: LoadedModel, fmt: Format, work: Path, context: int, threads: int | None,
               least: int = ROUNDS, most: int = MAX_ROUNDS) -> list[dict]:
    """Export the model in the format and benchmark it ``least`` to ``most`` times, stopping once
    the two fastest decode figures agree, and the two fastest prefill figures (``settled``);
    every run's result."""
    path, benchmark = export_format(loaded, fmt, work)
    try:
        return interleaved_rounds({fmt.key: lambda: benchmark(
            path, threads=threads, eval_text=None, eval_windows=0, context=context)}, least, most)[fmt.key]
    finally:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# --- trust: repeated runs, plausible figures, an idle machine -----------------------------------


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class FormatCalibration:
    fmt: Format
    calibration: Calibration
    observations: list[Observation]  # the fastest runs at each width: what was fitted
    widths: list[WidthRuns] = field(default_factory=list)  # every run at each width


def calibrate(model: str | None, formats: list[Format], context: int, threads: int | None = None,
              log=print) -> list[FormatCalibration]:
    """Run each format at each width of WIDTHS (ROUNDS to MAX_ROUNDS times) and fit its
    cost-model terms to the fastest decode and prefill at each width."""
    loaded = load_model(model)
    shape = loaded.shape
    for fmt in formats:
        fmt.spec.check_exportable(loaded)
    align = max(f.spec.alignment(f.name) for f in formats)
    types = {f.key: f.spec.tensor_types(loaded, f.name) for f in formats}
    runs: dict[str, list[Observation]] = {f.key: [] for f in formats}
    widths: dict[str, list[WidthRuns]] = {f.key: [] for f in formats}
    with tempfile.TemporaryDirectory(prefix="mosaic-detect-") as tmp:
        sizes, benches = {}, {}
        for width in WIDTHS:  # every size exported first, then measured in interleaved rounds
            sizes[width] = standin_dims(shape, width, align)
            shrink(loaded, sizes[width])
            for fmt in formats:
                path, benchmark = export_format(loaded, fmt, Path(tmp) / f"width-{width}")
                benches[(fmt.key, width)] = functools.partial(
                    benchmark, path, threads=threads, eval_text=None, eval_windows=0, context=context)
        del loaded
        t0 = time.perf_counter()
        log(f"  {len(benches)} sizes, measured in turn, {ROUNDS} to {MAX_ROUNDS} rounds")
        measured = interleaved_rounds(benches)
    for (key, width), rs in measured.items():
        dims = sizes[width]
        w = WidthRuns(width, tuple(r["decode"]["tokens_per_s"] for r in rs),
                      tuple(r["prefill"]["tokens_per_s"] for r in rs))
        r = max(rs, key=lambda r: r["decode"]["tokens_per_s"])
        runs[key].append(Observation([dims] * shape.n_layers, max(w.decode), max(w.prefill),
                                     r["peak_rss_bytes"], r["context"]))
        widths[key].append(w)
        log(f"  {key:<12} width {width:.1f} ({dims.n_head} heads, {dims.n_ff} channels):"
            f" decode {rate_text(max(w.decode))} tokens/s, prefill {rate_text(max(w.prefill))} tokens/s"
            f" (fastest of {len(rs)} runs; spread {spread(w.decode):.0%}, "
            f"{spread(w.prefill):.0%}), peak RSS {format_bytes(r['peak_rss_bytes'])} at "
            f"{r['context']} tokens")
    log(f"  measured in {time.perf_counter() - t0:.0f} s")
    return [FormatCalibration(f, fit(shape, f, runs[f.key], types[f.key]), runs[f.key], widths[f.key])
            for f in formats]


def profile_toml(name: str, runtime: Format, budgets: Budgets, bandwidth: float, flops: float,
                 calibrations: list[FormatCalibration], note: str, problems: Sequence[str] = ()) -> str:
    """The profile file: this machine's figures, its runtime, budgets, and the calibration;
    ``problems`` (why the figures are not trustworthy: written anyway) as ``# WARNING:`` lines."""
    rt = f'{runtime.spec.option} = "{runtime.name}"'
    warning = ["# WARNING: written with --force although the measurements are not trustworthy:",
               *(f"# WARNING: - {p}" for p in problems)] if problems else []
    lines = [
        f"# Written by `mosaic-export profile detect` on {platform.node() or 'this machine'}"
        f" ({platform.machine()}).",
        f"# {note}",
        *warning,
        f'name = "{name}"',
        f'description = "this machine, measured: {os.cpu_count()} threads, '
        f'{format_bytes(memory_total())}"',
        "local = true",
        "",
        "[device]",
        f'memory = "{memory_total() // 2**20}MiB"',
        f'memory_bandwidth = "{bandwidth / 1e9:.2f}GB/s"',
        f'compute = "{flops / 1e9:.1f}GFLOPS"',
        f"threads = {os.cpu_count()}",
        "",
        "[runtime]",
        f'target = "{runtime.target}"',
        rt,
        "",
        "[budgets]",
    ]
    if budgets.max_memory_bytes is not None:
        lines.append(f'max_memory = "{budgets.max_memory_bytes}B"')
    lines.append(f"context = {budgets.context}")
    if budgets.min_tokens_per_s is not None:
        lines.append(f"min_tokens_per_s = {budgets.min_tokens_per_s:g}")
    if budgets.max_ttft_s is not None:
        lines.append(f'max_ttft = "{budgets.max_ttft_s:g}s"')
    for c in calibrations:
        k = c.calibration
        lines += [
            "",
            f"# fitted to the fastest run at each of {len(c.observations)} widths: decode tokens/s "
            + ", ".join(f"{o.decode_tokens_per_s:.1f}" for o in c.observations)
            + "; peak RSS " + ", ".join(format_bytes(o.peak_rss_bytes) for o in c.observations),
            *spread_comments(c.widths),
            f'[calibration."{c.fmt.key}"]',
            f'decode_overhead = "{k.decode_overhead_s * 1e3:.4f}ms"',
            f'bandwidth = "{k.bandwidth / 1e9:.3f}GB/s"',
            f'prefill_overhead = "{k.prefill_overhead_s * 1e3:.4f}ms"',
            f'prefill_compute = "{k.prefill_flops / 1e9:.2f}GFLOPS"',
            f'memory_base = "{int(k.memory_base)}B"',
            f"memory_per_weight_byte = {k.memory_per_weight_byte:.4f}",
        ]
    return "\n".join(lines) + "\n"


def spread_comments(widths: Sequence[WidthRuns]) -> list[str]:
    """Comment lines: each width's runs, fastest / median / spread of decode and prefill tokens/s."""
    def figures(values: Sequence[float]) -> str:
        return f"{rate_text(max(values))} / {rate_text(statistics.median(values))} / {spread(values):.1%}"

    return [f"#   width {width_text(w.width)}, {len(w.decode)} runs: decode {figures(w.decode)}, "
            f"prefill {figures(w.prefill)} (fastest / median / spread)" for w in widths]


@dataclass(frozen=True)
class DetectRequest:
    """What `profile detect` is asked: the file, the formats to calibrate (the profile's runtime
    among them), the profile whose budgets it starts with, the model, context and threads."""

    out: Path
    formats: list[Format]
    runtime: Format
    budgets_from: str = "laptop-cpu"
    model: str | None = None
    context: int | None = None
    threads: int | None = None
    force: bool = False  # replace the file; write figures that are not trustworthy, with warnings


def detect(request: DetectRequest, log=print, warn=_warn) -> str:
    """Measure this machine and write the profile to ``request.out``; returns its text.
    Untrustworthy figures (busy_reasons, sanity_problems) are a UserError, or with ``force`` a
    warning, printed and written into the file."""
    out, force = request.out, request.force
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    if not out.resolve().parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.resolve().parent} does not exist")
    base = load_profile(request.budgets_from)
    budgets = base.budgets if request.context is None else Budgets(
        base.budgets.max_memory_bytes, request.context, base.budgets.min_tokens_per_s,
        base.budgets.max_ttft_s)
    quiet = read_cpu_times()
    time.sleep(QUIET_S)
    start = read_cpu_times()
    problems = machine_check("before measuring", quiet, start)
    if problems and not force:  # nothing measured now could be written
        raise _untrustworthy(problems, warn)
    log("measuring memory bandwidth and matmul throughput")
    bandwidth, flops = memory_bandwidth(), matmul_flops()
    log(f"  memory bandwidth {bandwidth / 1e9:.2f} GB/s, float32 matmul {flops / 1e9:.1f} GFLOPS")
    log(f"calibrating {', '.join(f.key for f in request.formats)} at widths "
        f"{', '.join(map(str, WIDTHS))}, context {budgets.context}")
    calibrations = calibrate(request.model, request.formats, budgets.context, request.threads, log)
    problems += machine_check("while measuring", start, read_cpu_times())
    for c in calibrations:
        problems += sanity_problems(c.widths, c.fmt.key)
    if problems and not force:
        raise _untrustworthy(problems, warn)
    if problems:
        warn("warning: the measurements are not trustworthy; writing them anyway (--force):\n"
             + "\n".join(f"  - {p}" for p in problems))
    text = profile_toml(out.stem, request.runtime, budgets, bandwidth, flops, calibrations,
                        f"Budgets from profile '{base.name}'.", problems)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        load_profile(str(tmp))  # what was written must load
        tmp.replace(out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return text


def _untrustworthy(problems: list[str], warn) -> UserError:
    """Warn with every problem; the error that refuses to write the profile."""
    warn("warning: the measurements are not trustworthy:\n" + "\n".join(f"  - {p}" for p in problems))
    more = f"; and {len(problems) - 1} more, listed above" if len(problems) > 1 else ""
    return UserError(f"profile detect: the measurements are not trustworthy ({problems[0]}{more}); "
                     "rerun on an idle machine, or pass --force to write them anyway")
