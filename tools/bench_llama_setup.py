"""What each llama.cpp set-up costs: decode and prefill tokens/s and peak RSS of the default model
in Q8_0 and Q4_K_M, for every set-up in one run, rounds interleaved so that machine noise hits all
alike; the median of the rounds is reported.

    python tools/bench_llama_setup.py [--portable DIR] [--rounds 3] [--out bench/llama_setup]

Set-ups:
- ``native``: llama-cpp-python as pip builds it (GGML_NATIVE, -march=native), extra buffer types
  on (AMX where compiled in, weight repacking). The default, and what runs unless a crash
  forces the fallback.
- ``native, safe``: the same library loaded with ``use_extra_bufts = False``, the fallback the
  runners take after a crash of a llama.cpp child.
- ``portable`` (with ``--portable DIR``): a llama-cpp-python built into DIR with
  ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_BMI2=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"``
  (``pip install --no-deps --target DIR llama-cpp-python==VERSION``), loaded first on PYTHONPATH.

It also says whether each library holds AMX instructions (``ldtilecfg``, ``tdpb*``), read with
objdump, and whether this CPU reports AMX.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mosaic_export.targets import gguf

from mosaic_export.model_io import load_model

QUANTS = ("Q8_0", "Q4_K_M")
AMX_MNEMONICS = ("ldtilecfg", "tdpbssd", "tdpbf16ps", "tileloadd")


def cpu_reports_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def ggml_cpu_library(site: Path) -> Path | None:
    found = sorted(site.glob("llama_cpp/lib/libggml-cpu*.so"))
    return found[0] if found else None


def amx_instructions(library: Path | None) -> dict[str, int] | None:
    """Count of each AMX mnemonic in the library's disassembly (None without objdump or library)."""
    if library is None or shutil.which("objdump") is None:
        return None
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True,
                          text=True).stdout
    return {m: text.count(f"\t{m} ") + text.count(f"\t{m}\n") for m in AMX_MNEMONICS}


def bench(path: Path, safe: bool, pythonpath: Path | None, threads: int | None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "mosaic_export.targets.gguf_runner", str(path), "--job", "bench",
               "--context", "2048", "--eval-windows", "0", "--json", str(out)]
        if safe:
            cmd.append("--safe")
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"}
        return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--portable", type=Path, default=None, help="folder of a portable llama-cpp-python")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/llama_setup"))
    a = p.parse_args()
    import llama_cpp

    native_site = Path(llama_cpp.__file__).parent.parent
    setups = [("native", False, None), ("native, safe (extra buffer types off)", True, None)]
    if a.portable is not None:
        setups.append(("portable build", False, a.portable.resolve()))
    libraries = {name: ggml_cpu_library(site or native_site) for name, _, site in setups}
    a.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(None)
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for quant in QUANTS:
            files[quant] = Path(tmp) / f"dense-{quant}.gguf"
            gguf.export(loaded, files[quant], quant)
        del loaded
        for r in range(a.rounds):
            for quant in QUANTS:
                for name, safe, site in setups:
                    res = bench(files[quant], safe, site, a.threads)
                    results.setdefault((name, quant), []).append(res)
                    shown = res.get("error") or (f"decode {res['decode']['tokens_per_s']:.1f}, prefill "
                                                 f"{res['prefill']['tokens_per_s']:.0f} tokens/s, peak "
                                                 f"{res['peak_rss_bytes'] / 2**20:.1f} MiB")
                    print(f"round {r + 1} {quant:<7} {name:<40} {shown}", flush=True)
    rows = []
    for (name, quant), runs in results.items():
        ok = [x for x in runs if "error" not in x]
        if not ok:
            rows.append({"setup": name, "quant": quant, "error": runs[0]["error"]})
            continue
        rows.append({"setup": name, "quant": quant, "runs": len(ok),
                     "decode_tokens_per_s": statistics.median(x["decode"]["tokens_per_s"] for x in ok),
                     "prefill_tokens_per_s": statistics.median(x["prefill"]["tokens_per_s"] for x in ok),
                     "peak_rss_mib": statistics.median(x["peak_rss_bytes"] for x in ok) / 2**20})
    base = {r["quant"]: r for r in rows if r["setup"] == "native" and "error" not in r}
    lines = [f"CPU reports AMX: {cpu_reports_amx()}; "
             + "; ".join(f"{name}: {libraries[name] and libraries[name].name} AMX instructions "
                         f"{amx_instructions(libraries[name])}" for name, _, _ in setups), "",
             "| set-up | type | decode tokens/s | prefill tokens/s | peak RSS (MiB) | decode vs native "
             "| prefill vs native |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["quant"], r["setup"])):
        if "error" in r:
            lines.append(f"| {r['setup']} | {r['quant']} | {r['error']} | | | | |")
            continue
        b = base[r["quant"]]
        lines.append(f"| {r['setup']} | {r['quant']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.0f} | {r['peak_rss_mib']:.1f} | "
                     f"{r['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f} | "
                     f"{r['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    (a.out / "table.md").write_text(table + "\n")
    (a.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
