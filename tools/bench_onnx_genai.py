"""Our ONNX export against ONNX Runtime GenAI's model builder, and against llama.cpp, in one run.

    python tools/bench_onnx_genai.py --builder-python /tmp/bvenv/bin/python --out bench/onnx_genai \
        [--model MODEL] [--dtypes fp32 int4] [--rounds 5] [--measure-time 60] [--precision 0.05] \
        [--threads 2] [--eval-windows 16]

1. The builder: the dense model is saved as a transformers folder and given, offline, to
   `python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p DTYPE -e cpu` (its defaults).
   The builder needs a newer transformers than this project pins, so it runs in its own venv
   (--builder-python; `pip install torch==2.13.0 transformers onnxruntime-genai onnx onnx-ir`).
2. Ours: the same model exported by mosaic-export's ONNX target at the same dtype.
3. Both folders run in ONNX Runtime GenAI (targets/onnx_genai.py) in interleaved rounds
   (mosaic_export.measure.rounds.interleaved, the builder's folder the reference), each run in a
   fresh process: load, prefill of a 512-token prompt, 128 greedy decode steps.
4. With --gguf Q4_K_M (default): our int4 folder in ONNX Runtime (targets/onnx_runner.py) against
   llama.cpp's Q4_K_M of the same model, in interleaved rounds (mosaic_export.decide.benchmarks.measure,
   llama.cpp the reference): decode tokens/s and peak RSS, and perplexity on the first
   --eval-windows windows of 512 tokens of --eval-text, scored in the first round.

Each round runs every candidate once, in turn and in the reverse order on the next round, so that
machine noise hits them alike. Every speed and memory figure is the median over the rounds with
its 95% order-statistic interval, "median [low, high]"; each ratio (ours / builder, ours /
llama.cpp) is taken within each round, its median and interval over the rounds. The rounds go on
past --rounds until every interval is within --precision of its median, or until --measure-time
would be passed. Writes OUT/results.json and OUT/table.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from mosaic_export.cli.arguments import add_measurement, measurement_policy
from mosaic_export.core.units import format_bytes
from mosaic_export.decide import benchmarks
from mosaic_export.decide.costmodel import Format
from mosaic_export.measure.rounds import BENCH_POLICY, Measurement, Policy, interleaved
from mosaic_export.model.load import load_model
from mosaic_export.targets.base import Evaluation
from mosaic_export.targets.onnx import genai as onnx_genai
from mosaic_export.targets.onnx import writer as onnx

OURS_INT4 = "ours int4 (ONNX Runtime)"


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


def genai_run(name: str, folder: Path, threads: int | None) -> Callable[[int], dict]:
    """A candidate of the rounds: round r runs the folder once in ONNX Runtime GenAI (a fresh process)."""
    def run(r: int) -> dict:
        d = onnx_genai.benchmark(folder, threads=threads)
        print(f"  round {r + 1} {name}: decode {d['decode']['tokens_per_s']:.1f} tok/s, prefill "
              f"{d['prefill']['tokens_per_s']:.0f} tok/s, RSS {format_bytes(d['peak_rss_bytes'])}",
              flush=True)
        return d

    return run


def one(v: float) -> str:
    return f"{v:.1f}"


def mib(v: float) -> str:
    return f"{v / 2**20:.1f}"


def three(v: float) -> str:
    return f"{v:.3f}"


def builder_rows(dtype: str, m: Measurement) -> list[str]:
    """The table's rows of one dtype: our figures and the builder's (medians and intervals) and
    ours / builder (the per-round ratio's median and interval); the files' sizes (fixed)."""
    rows = []
    for figure, metric, show in (("decode tokens/s", "decode", one),
                                 ("prefill tokens/s (512)", "prefill", lambda v: f"{v:.0f}"),
                                 ("peak RSS (MiB)", "memory", mib)):
        ours, theirs = m.figure("ours", metric), m.figure("builder", metric)
        rows.append(f"| {dtype} | {figure} | {ours.text(show)} | {theirs.text(show)} | "
                    f"{m.ratio('ours', metric).text(three)} |")
    ours, theirs = (m.runs[k][0]["file_bytes"] for k in ("ours", "builder"))
    rows.append(f"| {dtype} | files | {format_bytes(ours)} | {format_bytes(theirs)} | {ours / theirs:.3f} |")
    return rows


def vs_llama(loaded, work: Path, ours: Path, quant: str, policy: Policy, threads: int | None,
             eval_text: str, windows: int) -> tuple[Measurement, list[str]]:
    """Our int4 folder in ONNX Runtime against llama.cpp's ``quant`` of the model, in interleaved
    rounds (llama.cpp the reference; the first round also scores the perplexity)."""
    fmt, theirs = Format("gguf", quant), f"llama.cpp {quant}"
    files = {OURS_INT4: (Format("onnx", "int4"), ours),
             theirs: (fmt, benchmarks.export_format(loaded, fmt, work / f"llama-{quant}"))}
    m = benchmarks.measure(files, policy, None, threads, reference=theirs,
                           first=Evaluation(eval_text, windows, threads=threads), log=print)
    rows = [f"| | decode tokens/s | peak RSS (MiB) | files | perplexity | decode / {theirs} |",
            "|---|---|---|---|---|---|"]
    for name, rs in m.runs.items():
        ratio = "-" if name == theirs else m.ratio(name, "decode").text(three)
        rows.append(f"| {name} | {m.figure(name, 'decode').text(one)} | "
                    f"{m.figure(name, 'memory').text(mib)} | {format_bytes(rs[0]['file_bytes'])} | "
                    f"{rs[0]['perplexity']['perplexity']:.3f} | {ratio} |")
    return m, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builder-python", required=True, help="a python with onnxruntime-genai's builder")
    p.add_argument("--model", default=None, help="the dense model (default: the built-in SmolLM2)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gguf", default="Q4_K_M", help="llama.cpp type to hold our int4 against ('' : skip)")
    p.add_argument("--eval-text", default="../shared/data/wikitext-2/test.txt")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    add_measurement(p, BENCH_POLICY)
    a = p.parse_args(argv)
    policy = measurement_policy(a, BENCH_POLICY)

    if not onnx_genai.available():
        raise SystemExit("onnxruntime-genai is not installed here (pip install onnxruntime-genai)")
    loaded = load_model(a.model)
    results: dict = {"model": loaded.source, "threads": a.threads, "rounds": policy.least,
                     "policy": asdict(policy), "builder": {}}
    rows = ["Median [95% interval] over interleaved rounds; ratios taken within each round.", "",
            "| dtype | figure | ours | builder | ours / builder |", "|---|---|---|---|---|"]
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
            print(f"{dtype}: ours and the builder's in ONNX Runtime GenAI, in interleaved rounds", flush=True)
            m = interleaved({name: genai_run(name, f, a.threads) for name, f in folders[dtype].items()},
                            policy, reference="builder", log=print)
            results["builder"][dtype] = {"runs": m.runs, "nbits": {k: nbits_settings(f) for k, f in
                                                                   folders[dtype].items()},
                                         "measured": {k: m.to_dict(k) for k in m.runs}}
            rows += builder_rows(dtype, m)
        table = "\n".join(rows)
        if a.gguf and "int4" in a.dtypes:
            print(f"our int4 against llama.cpp {a.gguf}, in interleaved rounds", flush=True)
            m, llama_rows = vs_llama(loaded, work, folders["int4"]["ours"], a.gguf, policy, a.threads,
                                     a.eval_text, a.eval_windows)
            results["llama"] = m.runs
            results["llama_measured"] = {k: m.to_dict(k) for k in m.runs}
            table += "\n\n" + "\n".join(llama_rows)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (a.out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
