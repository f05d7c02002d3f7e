"""`mosaic-export profile detect`: measure this machine and write a profile for it.

Device figures: memory (MemTotal), memory bandwidth (a large array copy), matmul throughput
(float32 GEMM), threads. Runtime calibration, per format: the model at a few widths (every layer
keeps its first heads and MLP channels: a stand-in for pruned models, the same tensors a real
plan would have), exported and run in the runtime with the context full; the cost model's
efficiency terms are fitted to those runs (costmodel.fit). The profile is marked ``local``: the
main command then checks the measured figures against its budgets.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arch import LayerDims, ModelShape
from .costmodel import Calibration, Format, Observation, fit
from .errors import UserError
from .model_io import LoadedModel, load_model
from .process import proc_bytes
from .profile import Budgets, load_profile
from .prune.structured import resize_layer
from .units import format_bytes

WIDTHS = (1.0, 0.7, 0.4)  # stand-in model sizes, as a fraction of each layer's heads and channels
ROUNDS = 2  # runs per size; the calibration keeps the fastest


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
    for i, layer in enumerate(loaded.spec.layer_list(loaded.model)):
        if loaded.layer_dims[i] != dims:
            resize_layer(layer, loaded.spec, loaded.shape.head_dim, q_heads=list(range(dims.n_head)),
                         kv_heads=list(range(dims.n_kv)), channels=list(range(dims.n_ff)))
    loaded.layer_dims = [dims] * loaded.shape.n_layers


def run_format(loaded: LoadedModel, fmt: Format, work: Path, context: int,
               threads: int | None, rounds: int = 1) -> dict:
    """Export the model in the format and benchmark it with the context full; with rounds > 1,
    the run with the fastest decode (the least disturbed by other load on a shared machine)."""
    if fmt.target == "gguf":
        from .targets.gguf import export
        from .targets.gguf_runner import benchmark

        path = work / f"model-{fmt.name}.gguf"
        export(loaded, path, fmt.name)
    else:
        from .targets.onnx import export
        from .targets.onnx_runner import benchmark

        path = work / f"onnx-{fmt.name}"
        export(loaded, path, fmt.name)
    try:
        runs = [benchmark(path, threads=threads, eval_text=None, eval_windows=0, context=context)
                for _ in range(rounds)]
        return max(runs, key=lambda r: r["decode"]["tokens_per_s"])
    finally:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@dataclass
class FormatCalibration:
    fmt: Format
    calibration: Calibration
    observations: list[Observation]


def calibrate(model: str | None, formats: list[Format], context: int, threads: int | None = None,
              log=print) -> list[FormatCalibration]:
    """Run each format at each width of WIDTHS and fit its cost-model terms."""
    from .targets import exporter

    loaded = load_model(model)
    shape = loaded.shape
    for fmt in formats:
        exporter(fmt.target).check_exportable(loaded)
    align = max(_alignment(f) for f in formats)
    types = {f.key: _gguf_types(loaded, f) for f in formats}
    runs: dict[str, list[Observation]] = {f.key: [] for f in formats}
    with tempfile.TemporaryDirectory(prefix="mosaic-detect-") as tmp:
        for width in WIDTHS:
            dims = standin_dims(shape, width, align)
            shrink(loaded, dims)
            for fmt in formats:
                t0 = time.perf_counter()
                r = run_format(loaded, fmt, Path(tmp), context, threads, rounds=ROUNDS)
                runs[fmt.key].append(Observation([dims] * shape.n_layers,
                                                 r["decode"]["tokens_per_s"],
                                                 r["prefill"]["tokens_per_s"],
                                                 r["peak_rss_bytes"], r["context"]))
                log(f"  {fmt.key:<12} width {width:.1f} ({dims.n_head} heads, {dims.n_ff} channels):"
                    f" decode {r['decode']['tokens_per_s']:.1f} tokens/s, prefill "
                    f"{r['prefill']['tokens_per_s']:.0f} tokens/s, peak RSS "
                    f"{format_bytes(r['peak_rss_bytes'])} at {r['context']} tokens "
                    f"({time.perf_counter() - t0:.0f} s)")
    return [FormatCalibration(f, fit(shape, f, runs[f.key], types[f.key]), runs[f.key])
            for f in formats]


def _alignment(fmt: Format) -> int:
    if fmt.target != "gguf":
        return 1
    from .targets.gguf import alignment

    return alignment(fmt.name)


def _gguf_types(loaded: LoadedModel, fmt: Format) -> dict[str, str] | None:
    if fmt.target != "gguf":
        return None
    from .targets.gguf import intended_types

    return intended_types(loaded, fmt.name)


def profile_toml(name: str, runtime: Format, budgets: Budgets, bandwidth: float, flops: float,
                 calibrations: list[FormatCalibration], note: str) -> str:
    """The profile file: this machine's figures, its runtime, budgets, and the calibration."""
    rt = (f'quant = "{runtime.name}"' if runtime.target == "gguf" else f'dtype = "{runtime.name}"')
    lines = [
        f"# Written by `mosaic-export profile detect` on {platform.node() or 'this machine'}"
        f" ({platform.machine()}).",
        f"# {note}",
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
            f"# fitted to {len(c.observations)} runs: decode tokens/s "
            + ", ".join(f"{o.decode_tokens_per_s:.1f}" for o in c.observations)
            + "; peak RSS " + ", ".join(format_bytes(o.peak_rss_bytes) for o in c.observations),
            f'[calibration."{c.fmt.key}"]',
            f'decode_overhead = "{k.decode_overhead_s * 1e3:.4f}ms"',
            f'bandwidth = "{k.bandwidth / 1e9:.3f}GB/s"',
            f'prefill_overhead = "{k.prefill_overhead_s * 1e3:.4f}ms"',
            f'prefill_compute = "{k.prefill_flops / 1e9:.2f}GFLOPS"',
            f'memory_base = "{int(k.memory_base)}B"',
            f"memory_per_weight_byte = {k.memory_per_weight_byte:.4f}",
        ]
    return "\n".join(lines) + "\n"


def detect(out: Path, formats: list[Format], runtime: Format, budgets_from: str,
           model: str | None = None, context: int | None = None, threads: int | None = None,
           force: bool = False, log=print) -> str:
    """Measure this machine and write the profile to ``out``; returns its text."""
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    if not out.resolve().parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.resolve().parent} does not exist")
    base = load_profile(budgets_from)
    budgets = base.budgets if context is None else Budgets(
        base.budgets.max_memory_bytes, context, base.budgets.min_tokens_per_s, base.budgets.max_ttft_s)
    log("measuring memory bandwidth and matmul throughput")
    bandwidth, flops = memory_bandwidth(), matmul_flops()
    log(f"  memory bandwidth {bandwidth / 1e9:.2f} GB/s, float32 matmul {flops / 1e9:.1f} GFLOPS")
    log(f"calibrating {', '.join(f.key for f in formats)} at widths {', '.join(map(str, WIDTHS))}, "
        f"context {budgets.context}")
    calibrations = calibrate(model, formats, budgets.context, threads, log)
    text = profile_toml(out.stem, runtime, budgets, bandwidth, flops, calibrations,
                        f"Budgets from profile '{base.name}'.")
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
