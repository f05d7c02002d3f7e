"""Our ONNX export against ONNX Runtime GenAI's model builder, and against llama.cpp, in one run.

    python tools/bench_onnx_genai.py --builder-python /tmp/bvenv/bin/python --out bench/onnx_genai \
        [--model MODEL] [--dtypes fp32 int4] [--rounds 3] [--threads 2] [--eval-windows 16]

1. The builder: the dense model is saved as a transformers folder and given, offline, to
   `python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p DTYPE -e cpu` (its defaults).
   The builder needs a newer transformers than this project pins, so it runs in its own venv
   (--builder-python; `pip install torch==2.13.0 transformers onnxruntime-genai onnx onnx-ir`).
2. Ours: the same model exported by mosaic-export's ONNX target at the same dtype.
3. Both folders run in ONNX Runtime GenAI (targets/onnx_genai.py), alternately, each run in a fresh
   process: load, prefill of a 512-token prompt, 128 greedy decode steps; medians of the rounds.
4. With --gguf Q4_K_M (default): our int4 folder in ONNX Runtime (targets/onnx_runner.py) against
   llama.cpp's Q4_K_M of the same model, alternately: decode tokens/s, peak RSS and perplexity on
   the first --eval-windows windows of 512 tokens of --eval-text.

Writes OUT/results.json and OUT/table.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mosaic_export.targets import get, onnx, onnx_genai, onnx_runner

from mosaic_export.model_io import load_model
from mosaic_export.units import format_bytes


def build_with_builder(python: str, checkpoint: Path, out: Path, dtype: str) -> Path:
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", dtype, "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the builder failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    return out


def nbits_settings(folder: Path) -> list:
    """The (bits, block_size, accuracy_level) of the folder's MatMulNBits nodes."""
    import onnx as onnx_py

    graph = onnx_py.load(str(folder / "model.onnx"), load_external_data=False).graph
    found = set()
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx_py.helper.get_attribute_value(x) for x in n.attribute}
            found.add((a.get("bits"), a.get("block_size"), a.get("accuracy_level", 0)))
    return sorted(found)


def median_of(runs: list[dict], *keys: str) -> float:
    def get_key(r):
        for k in keys:
            r = r[k]
        return r
    return statistics.median(get_key(r) for r in runs)


def alternate(measure, folders: dict[str, Path], rounds: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in folders}
    for r in range(rounds):
        for name, folder in folders.items():
            runs[name].append(measure(folder))
            d = runs[name][-1]
            rss = format_bytes(d["peak_rss_bytes"])
            print(f"  round {r + 1} {name}: decode {d['decode']['tokens_per_s']:.1f} tok/s, prefill "
                  f"{d['prefill']['tokens_per_s']:.0f} tok/s, RSS {rss}", flush=True)
    return runs


def builder_rows(dtype: str, runs: dict[str, list[dict]]) -> list[str]:
    rows = []
    for figure, keys, fmt in (("decode tokens/s", ("decode", "tokens_per_s"), "{:.1f}"),
                              ("prefill tokens/s (512)", ("prefill", "tokens_per_s"), "{:.0f}"),
                              ("peak RSS", ("peak_rss_bytes",), None),
                              ("files", ("file_bytes",), None)):
        ours, theirs = median_of(runs["ours"], *keys), median_of(runs["builder"], *keys)
        show = (lambda v: format_bytes(v)) if fmt is None else fmt.format  # noqa: E731
        rows.append(f"| {dtype} | {figure} | {show(ours)} | {show(theirs)} | {ours / theirs:.3f} |")
    return rows


def vs_llama(loaded, work: Path, ours: Path, quant: str, rounds: int, threads: int | None,
             eval_text: str, windows: int) -> tuple[dict, list[str]]:
    gguf = get("gguf")
    path = work / f"model-{quant}.gguf"
    gguf.export(loaded, path, quant)
    options = dict(threads=threads, eval_text=eval_text, eval_windows=windows)
    measures = {"ours int4 (ONNX Runtime)": lambda f: onnx_runner.benchmark(f, **options),
                f"llama.cpp {quant}": lambda f: gguf.benchmark(f, **options)}
    files = {"ours int4 (ONNX Runtime)": ours, f"llama.cpp {quant}": path}
    runs: dict[str, list[dict]] = {name: [] for name in files}
    for r in range(rounds):
        for name in files:
            runs[name].append(measures[name](files[name]))
            d = runs[name][-1]
            print(f"  round {r + 1} {name}: decode {d['decode']['tokens_per_s']:.1f} tok/s, "
                  f"RSS {format_bytes(d['peak_rss_bytes'])}, perplexity {d['perplexity']['perplexity']:.3f}",
                  flush=True)
    rows = ["| | decode tokens/s | peak RSS | files | perplexity |", "|---|---|---|---|---|"]
    for name, rs in runs.items():
        rss, size = format_bytes(median_of(rs, "peak_rss_bytes")), format_bytes(rs[0]["file_bytes"])
        rows.append(f"| {name} | {median_of(rs, 'decode', 'tokens_per_s'):.1f} | {rss} | {size} | "
                    f"{rs[0]['perplexity']['perplexity']:.3f} |")
    return runs, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builder-python", required=True, help="a python with onnxruntime-genai's builder")
    p.add_argument("--model", default=None, help="the dense model (default: the built-in SmolLM2)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gguf", default="Q4_K_M", help="llama.cpp type to hold our int4 against ('' : skip)")
    p.add_argument("--eval-text", default="../shared/data/wikitext-2/test.txt")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    if not onnx_genai.available():
        raise SystemExit("onnxruntime-genai is not installed here (pip install -e '.[genai]')")
    loaded = load_model(a.model)
    results: dict = {"model": loaded.source, "threads": a.threads, "rounds": a.rounds, "builder": {}}
    rows = ["| dtype | figure | ours | builder | ours / builder |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "dense-hf"
        loaded.model.save_pretrained(checkpoint, safe_serialization=True)
        loaded.tokenizer.save_pretrained(checkpoint)
        folders: dict[str, dict[str, Path]] = {}
        for dtype in a.dtypes:
            folders[dtype] = {"ours": onnx.export(loaded, work / f"ours-{dtype}", dtype).parent,
                              "builder": build_with_builder(a.builder_python, checkpoint,
                                                            work / f"builder-{dtype}", dtype)}
            print(f"{dtype}: exported; MatMulNBits ours {nbits_settings(folders[dtype]['ours'])}, "
                  f"builder {nbits_settings(folders[dtype]['builder'])}", flush=True)
        for dtype in a.dtypes:
            print(f"{dtype}: ours and the builder's in ONNX Runtime GenAI", flush=True)
            runs = alternate(lambda f: onnx_genai.benchmark(f, threads=a.threads), folders[dtype], a.rounds)
            results["builder"][dtype] = {"runs": runs, "nbits": {k: nbits_settings(f) for k, f in
                                                                 folders[dtype].items()}}
            rows += builder_rows(dtype, runs)
        table = "\n".join(rows)
        if a.gguf and "int4" in a.dtypes:
            print(f"our int4 against llama.cpp {a.gguf}", flush=True)
            results["llama"], llama_rows = vs_llama(loaded, work, folders["int4"]["ours"], a.gguf, a.rounds,
                                                    a.threads, a.eval_text, a.eval_windows)
            table += "\n\n" + "\n".join(llama_rows)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (a.out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
