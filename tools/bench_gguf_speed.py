"""Decode speed and memory of a pruned model against the dense one, both as GGUF, in one run.

    python tools/bench_gguf_speed.py PRUNED_CHECKPOINT [--dense MODEL] [--quant Q8_0] [--rounds 3]

Both models are exported to the same GGUF type, then benchmarked alternately (dense, pruned,
dense, ...) in fresh llama.cpp processes, so machine noise hits both alike; medians are compared.
The ideal speed-up is the ratio of weight bytes read per generated token: every block tensor plus
the output layer (the token embedding when it is tied), read from the files themselves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from mosaic_export.targets.gguf import export
from mosaic_export.targets.gguf_runner import benchmark

from mosaic_export.model_io import load_model


def bytes_per_token(path: Path) -> int:
    """Bytes of the weights llama.cpp reads to generate one token."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    output = tensors.get("output.weight", tensors["token_embd.weight"])
    return sum(n for name, n in tensors.items() if name.startswith("blk.")) + output + \
        tensors["output_norm.weight"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pruned", help="a resized checkpoint folder (OUT/model)")
    p.add_argument("--dense", default=None, help="the dense model (default: the built-in SmolLM2)")
    p.add_argument("--quant", default="Q8_0")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, source in (("dense", a.dense), ("pruned", a.pruned)):
            loaded = load_model(source)
            files[name] = Path(tmp) / f"{name}-{a.quant}.gguf"
            check = export(loaded, files[name], a.quant)
            print(f"{name}: {files[name].stat().st_size / 2**20:.1f} MiB, types {check.summary()}, "
                  f"{len(check.fallbacks)} fallbacks", flush=True)
            del loaded
        runs: dict[str, list[dict]] = {"dense": [], "pruned": []}
        for r in range(a.rounds):
            for name in ("dense", "pruned"):
                runs[name].append(benchmark(files[name], threads=a.threads))
                d = runs[name][-1]
                print(f"round {r + 1} {name}: prefill {d['prefill']['tokens_per_s']:.1f} tok/s, "
                      f"decode {d['decode']['tokens_per_s']:.1f} tok/s, "
                      f"peak RSS {d['peak_rss_bytes'] / 2**20:.1f} MiB", flush=True)
        weights = {name: bytes_per_token(files[name]) for name in files}
        sizes = {name: files[name].stat().st_size for name in files}

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
        "quant": a.quant, "rounds": a.rounds,
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
