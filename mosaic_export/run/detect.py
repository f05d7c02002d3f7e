"""`mosaic-export profile detect`: measure this machine and write a profile for it.

Device figures: memory (MemTotal), memory bandwidth (a large array copy), matmul throughput
(float32 GEMM), threads. Runtime calibration, per format: the model at a few widths (every layer
keeps its first heads and MLP channels: a stand-in for pruned models, the same tensors a real
plan would have), exported and run in the runtime with the context full; the cost model's
efficiency terms are fitted to those runs (costmodel.fit). The profile is marked ``local``: the
main command then checks the measured figures against its budgets.

The widths are measured in interleaved rounds (benchmarks.measure, measure/rounds.py): every
figure is the median over rounds with its confidence interval, written into the file with the
number of rounds, and the fit weighs each figure by its interval. A noisy machine gives wider
intervals, never a refusal: what is refused is a set of figures no fit can use whatever the
noise (a narrower model slower than a wider one beyond their intervals). A busy machine (other
processes' share of the CPU time, the hypervisor's steal) and intervals still wide at the time
cap are warnings, printed and written into the file.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mosaic_export.core.errors import UserError
from mosaic_export.core.units import format_bytes
from mosaic_export.decide.benchmarks import export_format, measure
from mosaic_export.decide.costmodel import Calibration, Format, Observation, fit, predict
from mosaic_export.decide.profile import Budgets, load_profile
from mosaic_export.measure.process import proc_bytes
from mosaic_export.measure.rounds import Measurement, Policy
from mosaic_export.measure.stats import DECIDES, Interval
from mosaic_export.measure.trust import machine_check, rate_text, read_cpu_times, width_text
from mosaic_export.model.arch import LayerDims, ModelShape
from mosaic_export.model.folder import LoadedModel
from mosaic_export.model.load import load_model
from mosaic_export.model.resize import leading, resize_model

WIDTHS = (1.0, 0.7, 0.4)  # stand-in model sizes, as a fraction of each layer's heads and channels
# The rounds: 3 at least (the context filled: memory is measured in them), then speed-only
# rounds until every interval is within +-5% or 90 s have passed.
POLICY = Policy(precision=0.05, max_seconds=90.0, least=3)

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


# --- the widths in interleaved rounds -------------------------------------------------------------


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class WidthFigures:
    """One stand-in size measured in rounds: each figure's median and interval."""

    width: float
    dims: LayerDims
    decode: Interval  # tokens/s
    prefill: Interval  # tokens/s
    memory: Interval  # peak RSS bytes with the context full
    context: int


@dataclass
class FormatCalibration:
    fmt: Format
    calibration: Calibration
    observations: list[Observation]  # the medians at each width, with their intervals: what was fitted
    widths: list[WidthFigures] = field(default_factory=list)
    predicted: list[tuple[float, float, float]] = field(default_factory=list)  # the fit's decode,
    # prefill and memory at each width


def calibrate(model: str | None, formats: list[Format], context: int, threads: int | None = None,
              policy: Policy = POLICY, log=print) -> tuple[list[FormatCalibration], Measurement]:
    """Run each format at each width of WIDTHS in interleaved rounds (benchmarks.measure) and fit
    its cost-model terms to the median decode, prefill and peak memory at each width, each
    weighed by its interval. Also the rounds themselves (for the checks on them)."""
    loaded = load_model(model)
    shape = loaded.shape
    for fmt in formats:
        fmt.spec.check_exportable(loaded)
    align = max(f.spec.alignment(f.name) for f in formats)
    types = {f.key: f.spec.tensor_types(loaded, f.name) for f in formats}
    sizes = {width: standin_dims(shape, width, align) for width in WIDTHS}
    with tempfile.TemporaryDirectory(prefix="mosaic-detect-") as tmp:
        files = {}
        for width in WIDTHS:  # every size exported first, then measured in interleaved rounds
            shrink(loaded, sizes[width])
            for fmt in formats:
                files[key(fmt, width)] = (fmt, export_format(loaded, fmt, Path(tmp) / f"width-{width}"))
        del loaded
        log(f"  {len(files)} sizes, measured in interleaved rounds ({policy.least} at least, until "
            f"every interval is within +-{policy.precision:.0%} or {policy.max_seconds:.0f} s)")
        m = measure(files, policy, context, threads, reference=key(formats[0], WIDTHS[0]), log=log)
    out = []
    for f in formats:
        widths = [WidthFigures(w, sizes[w], m.figure(key(f, w), "decode"), m.figure(key(f, w), "prefill"),
                               m.figure(key(f, w), "memory"), m.runs[key(f, w)][0]["context"])
                  for w in WIDTHS]
        for w in widths:
            log(f"  {f.key:<12} {width_line(w)}")
        observations = [Observation([w.dims] * shape.n_layers, w.decode.median, w.prefill.median,
                                    w.memory.median, w.context,
                                    (w.decode.half_width, w.prefill.half_width, w.memory.half_width))
                        for w in widths]
        calibration = fit(shape, f, observations, types[f.key])
        predicted = [predict(shape, o.dims, f, calibration, o.context, types[f.key]) for o in observations]
        out.append(FormatCalibration(f, calibration, observations, widths, [
            (p.decode_tokens_per_s, p.prefill_tokens_per_s, p.memory_bytes) for p in predicted]))
    return out, m


def key(fmt: Format, width: float) -> str:
    """A width's name in the rounds: 'gguf:Q8_0 at 0.7'."""
    return f"{fmt.key} at {width_text(width)}"


def width_line(w: WidthFigures) -> str:
    """'width 0.7 (6 heads, 1088 channels), 4 rounds: decode 150 [145, 156] tokens/s, ...'."""
    def rate(iv: Interval) -> str:
        return f"{iv.text(rate_text)} ({iv.confidence:.0%})"

    return (f"width {width_text(w.width)} ({w.dims.n_head} heads, {w.dims.n_ff} channels), "
            f"{w.decode.n} rounds: decode {rate(w.decode)} tokens/s, prefill {rate(w.prefill)} "
            f"tokens/s, peak RSS {w.memory.text(lambda v: f'{v / 2**20:.1f}')} MiB "
            f"({w.memory.confidence:.0%}, {w.memory.n} rounds) at {w.context} tokens")


def unusable(m: Measurement, formats: list[Format]) -> list[str]:
    """Figures no fit can use, beyond their intervals: a narrower model slower than a wider one
    (their ratio, taken within each round, below 1 over its whole interval, an interval that can
    decide: stats.DECIDES, 5 rounds), decode and prefill."""
    problems = []
    for f in formats:
        for i, wide in enumerate(WIDTHS):
            for narrow in WIDTHS[i + 1:]:
                for metric in ("decode", "prefill"):
                    r = m.ratio(key(f, narrow), metric, against=key(f, wide))
                    if r.high < 1 and r.confidence >= DECIDES:
                        problems.append(
                            f"{f.key} {metric} at width {width_text(narrow)} is slower than at width "
                            f"{width_text(wide)} beyond the interval: their ratio is "
                            f"{r.text(lambda v: f'{v:.3f}')} over {r.n} rounds, and a narrower model "
                            "reads fewer weights")
    return problems


def wide_warning(m: Measurement) -> str | None:
    """One line when some intervals stayed wider than the precision at the time cap."""
    wide = m.wide()
    if not wide or m.stopped == "precise":
        return None
    widest = max(wide, key=lambda name: m.intervals()[name].half_width)
    return (f"after {m.rounds} rounds ({m.seconds:.0f} s, the time cap) {len(wide)} of "
            f"{len(m.intervals())} intervals are wider than +-{m.precision:.0%} (the widest, {widest}: "
            f"+-{m.intervals()[widest].half_width:.0%}); the fit weighs each figure by its interval: "
            "a quieter machine or a longer --measure-time narrows them")


def profile_toml(name: str, runtime: Format, budgets: Budgets, bandwidth: float, flops: float,
                 calibrations: list[FormatCalibration], note: str, warnings: Sequence[str] = ()) -> str:
    """The profile file: this machine's figures, its runtime, budgets, and the calibration with the
    figures it was fitted to (medians and intervals, as comments); ``warnings`` as ``# WARNING:``
    lines."""
    rt = f'{runtime.spec.option} = "{runtime.name}"'
    lines = [
        f"# Written by `mosaic-export profile detect` on {platform.node() or 'this machine'}"
        f" ({platform.machine()}).",
        f"# {note}",
        *(f"# WARNING: {w}" for w in warnings),
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
            f"# fitted to the medians at {len(c.widths)} widths, each weighed by its interval:",
            *(f"#   {width_line(w)}" for w in c.widths),
            *fit_comments(c),
            f'[calibration."{c.fmt.key}"]',
            f'decode_overhead = "{k.decode_overhead_s * 1e3:.4f}ms"',
            f'bandwidth = "{k.bandwidth / 1e9:.3f}GB/s"',
            f'prefill_overhead = "{k.prefill_overhead_s * 1e3:.4f}ms"',
            f'prefill_compute = "{k.prefill_flops / 1e9:.2f}GFLOPS"',
            f'memory_base = "{int(k.memory_base)}B"',
            f"memory_per_weight_byte = {k.memory_per_weight_byte:.4f}",
        ]
    return "\n".join(lines) + "\n"


def fit_comments(c: FormatCalibration) -> list[str]:
    """What the fitted terms predict at each width, and which figures that puts inside their interval."""
    out = []
    for w, (decode, prefill, memory) in zip(c.widths, c.predicted, strict=True):
        inside = [name for name, iv, v in (("decode", w.decode, decode), ("prefill", w.prefill, prefill),
                                           ("memory", w.memory, memory)) if iv.low <= v <= iv.high]
        out.append(f"#   the fit at width {width_text(w.width)}: decode {rate_text(decode)}, prefill "
                   f"{rate_text(prefill)} tokens/s, peak RSS {memory / 2**20:.1f} MiB (inside the "
                   f"interval: {', '.join(inside) or 'none'})")
    return out


@dataclass(frozen=True)
class DetectRequest:
    """What `profile detect` is asked: the file, the formats to calibrate (the profile's runtime
    among them), the profile whose budgets it starts with, the model, context and threads, and
    when the rounds stop."""

    out: Path
    formats: list[Format]
    runtime: Format
    budgets_from: str = "laptop-cpu"
    model: str | None = None
    context: int | None = None
    threads: int | None = None
    force: bool = False  # replace an existing file
    policy: Policy = POLICY


def detect(request: DetectRequest, log=print, warn=_warn) -> str:
    """Measure this machine and write the profile to ``request.out``; returns its text. A busy
    machine and intervals still wide at the time cap are warnings (printed, and written into
    the file); figures no fit can use (unusable) are a UserError."""
    out = request.out
    if out.exists() and not request.force:
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
    warnings = machine_check("before measuring", quiet, start)
    log("measuring memory bandwidth and matmul throughput")
    bandwidth, flops = memory_bandwidth(), matmul_flops()
    log(f"  memory bandwidth {bandwidth / 1e9:.2f} GB/s, float32 matmul {flops / 1e9:.1f} GFLOPS")
    log(f"calibrating {', '.join(f.key for f in request.formats)} at widths "
        f"{', '.join(map(str, WIDTHS))}, context {budgets.context}")
    calibrations, m = calibrate(request.model, request.formats, budgets.context, request.threads,
                                request.policy, log)
    problems = unusable(m, request.formats)
    if problems:
        raise UserError("profile detect: figures no cost model can be fitted to: " + "; ".join(problems)
                        + ". Something other than noise slows the narrower model (a runtime fallback, "
                        "thermal throttling): check it with `mosaic-export bench` on the widths, then "
                        "run detect again")
    warnings += machine_check("while measuring", start, read_cpu_times())
    warnings += [w for w in (wide_warning(m),) if w]
    for w in warnings:
        warn(f"mosaic-export: warning: {w}")
    text = profile_toml(out.stem, request.runtime, budgets, bandwidth, flops, calibrations,
                        f"Budgets from profile '{base.name}'. {m.summary()}.", warnings)
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
