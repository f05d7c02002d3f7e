"""Decode speed and memory of a pruned model against the dense one, same target, in one run.

    python tools/bench_speed.py PRUNED_CHECKPOINT [--dense MODEL] --target gguf [--quant Q8_0] [--rounds 3]
    python tools/bench_speed.py PRUNED_CHECKPOINT [--dense MODEL] --target onnx [--dtype fp32] [--rounds 3]

Both models are exported to the same GGUF type or ONNX dtype, then benchmarked alternately (dense,
pruned, dense, ...) in fresh runtime processes (llama.cpp or ONNX Runtime), so machine noise hits
both alike; medians are compared. The ideal speed-up is the ratio of weight bytes read per
generated token: every decoder-layer weight plus the final norm and the output layer (the token
embedding when it is tied), read from the written files themselves; the embedding table is not
counted (one row of it is read per token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from mosaic_export.targets import get, names

from mosaic_export.model_io import load_model


def write(loaded, tmp: Path, name: str, target, type_: str) -> Path:
    """Export one model for the target; returns its path (a file or a folder)."""
    path = tmp / f"{name}-{target.artifact_name(type_)}"
    target.export(loaded, path, type_)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pruned", help="a resized checkpoint folder (OUT/model)")
    p.add_argument("--dense", default=None, help="the dense model (default: the built-in SmolLM2)")
    p.add_argument("--target", choices=names(), default=names()[0])
    p.add_argument("--quant", default="Q8_0", help="GGUF type (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", help="ONNX dtype (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    target = get(a.target)
    type_ = target.check_type(getattr(a, target.option))
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, source in (("dense", a.dense), ("pruned", a.pruned)):
            loaded = load_model(source)
            files[name] = write(loaded, Path(tmp), name, target, type_)
            print(f"{name}: exported, {target.noun} {type_}", flush=True)
            del loaded
        runs: dict[str, list[dict]] = {"dense": [], "pruned": []}
        for r in range(a.rounds):
            for name in ("dense", "pruned"):
                runs[name].append(target.benchmark(files[name], threads=a.threads))
                d = runs[name][-1]
                print(f"round {r + 1} {name}: prefill {d['prefill']['tokens_per_s']:.1f} tok/s, "
                      f"decode {d['decode']['tokens_per_s']:.1f} tok/s, "
                      f"peak RSS {d['peak_rss_bytes'] / 2**20:.1f} MiB", flush=True)
        weights = {name: target.bytes_per_token(files[name]) for name in files}
        sizes = {name: runs[name][0]["file_bytes"] for name in files}  # the runtime's model files

    def med(name: str, *keys: str) -> float:
        values = []
        for run in runs[name]:
            v = run
            for k in keys:
                v = v[k]
            values.append(v)
        return statistics.median(values)

    ideal = weights["dense"] / weights["pruned"]
    decode = med("pruned", "decode", "tokens_per_s") / med("dense", "decode", "tokens_per_s")
    prefill = med("pruned", "prefill", "tokens_per_s") / med("dense", "prefill", "tokens_per_s")
    rss = {n: med(n, "peak_rss_bytes") for n in runs}
    rss_drop, bytes_drop = rss["dense"] - rss["pruned"], sizes["dense"] - sizes["pruned"]
    result = {
        "target": a.target, "format": type_, "rounds": a.rounds,
        "weight_bytes_per_token": weights, "file_bytes": sizes,
        "decode_tokens_per_s": {n: med(n, "decode", "tokens_per_s") for n in runs},
        "prefill_tokens_per_s": {n: med(n, "prefill", "tokens_per_s") for n in runs},
        "peak_rss_bytes": rss,
        "ideal_speedup": ideal, "decode_speedup": decode, "decode_speedup_over_ideal": decode / ideal,
        "prefill_speedup": prefill,
        "rss_drop_bytes": rss_drop, "file_drop_bytes": bytes_drop,
        "rss_drop_over_file_drop": rss_drop / bytes_drop,
        "runs": runs,
    }
    print(f"\nideal speed-up (weight bytes per token, dense/pruned): {ideal:.3f}")
    print(f"decode speed-up: {decode:.3f}  -> {decode / ideal:.2f} of ideal")
    print(f"prefill speed-up: {prefill:.3f}")
    print(f"peak RSS: dense {rss['dense'] / 2**20:.1f} MiB, pruned {rss['pruned'] / 2**20:.1f} MiB; "
          f"drop {rss_drop / 2**20:.1f} MiB = {rss_drop / bytes_drop:.2f} of the weight-bytes drop "
          f"({bytes_drop / 2**20:.1f} MiB)")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
