"""What each llama.cpp set-up costs: decode and prefill tokens/s and peak RSS of the default model
in Q8_0 and Q4_K_M, for every set-up in one run. For each type the set-ups are measured in
interleaved rounds (mosaic_export.measure.rounds.interleaved, ``native`` the reference): each round
runs every set-up once, each run in a fresh process with its own environment and flags (2048-token
context filled), in turn and in the reverse order on the next round, so that machine noise hits all
alike. Every figure is the median over the rounds with its 95% order-statistic interval; each
"vs native" figure is the ratio to the native set-up taken within each round, its median and
interval over the rounds. The rounds go on past --rounds until every interval is within
--precision of its median, or until --measure-time would be passed. A set-up that fails is
reported with its error and the rounds start again without it.

    python tools/bench_llama_setup.py [--portable DIR] [--rounds 5] [--measure-time 60] [--precision 0.05] \\
        [--out bench/llama_setup]

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
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from mosaic_export.cli.arguments import add_measurement, measurement_policy
from mosaic_export.measure.rounds import BENCH_POLICY, Measurement, Policy, interleaved
from mosaic_export.model.load import load_model
from mosaic_export.targets.gguf import writer as gguf

QUANTS = ("Q8_0", "Q4_K_M")
AMX_MNEMONICS = ("ldtilecfg", "tdpbssd", "tdpbf16ps", "tileloadd")
BASELINE = "native"
# result key -> (the Measurement's metric, format, scale)
FIGURES = {"decode_tokens_per_s": ("decode", "{:.1f}", 1.0),
           "prefill_tokens_per_s": ("prefill", "{:.0f}", 1.0),
           "peak_rss_mib": ("memory", "{:.1f}", 2**20)}


class SetupFailed(Exception):
    """A set-up's run failed: it leaves the rounds."""

    def __init__(self, setup: str, message: str):
        super().__init__(f"{setup}: {message}")
        self.setup, self.message = setup, message


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
    """One run of the set-up: the GGUF runner in a fresh process, with ``pythonpath`` first on
    PYTHONPATH (the portable build) and ``--safe`` (extra buffer types off) when asked."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "mosaic_export.targets.gguf.runner", str(path), "--job", "bench",
               "--context", "2048", "--eval-windows", "0", "--json", str(out)]
        if safe:
            cmd.append("--safe")
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"}
        return json.loads(out.read_text())


def candidate(name: str, quant: str, path: Path, safe: bool, site: Path | None,
              threads: int | None) -> Callable[[int], dict]:
    """A candidate of the rounds: round r runs the set-up once (bench), or raises SetupFailed."""
    def run(r: int) -> dict:
        res = bench(path, safe, site, threads)
        if "error" in res:
            raise SetupFailed(name, res["error"])
        print(f"round {r + 1} {quant:<7} {name:<40} decode {res['decode']['tokens_per_s']:.1f}, prefill "
              f"{res['prefill']['tokens_per_s']:.0f} tokens/s, peak {res['peak_rss_bytes'] / 2**20:.1f} MiB",
              flush=True)
        return res

    return run


def measure_setups(quant: str, path: Path, setups: list, policy: Policy,
                   threads: int | None) -> tuple[Measurement | None, dict[str, str]]:
    """The set-ups on one file in interleaved rounds, ratios against the native one; a set-up
    that fails is dropped and the rounds start again without it. Returns the measurement (None
    when every set-up failed) and each failed set-up's error."""
    errors: dict[str, str] = {}
    while True:
        runs = {name: candidate(name, quant, path, safe, site, threads)
                for name, safe, site in setups if name not in errors}
        if not runs:
            return None, errors
        try:
            return interleaved(runs, policy, BASELINE if BASELINE in runs else None, log=print), errors
        except SetupFailed as e:
            errors[e.setup] = e.message
            print(f"{quant} {e.setup} failed ({e.message}); measuring the others again without it",
                  flush=True)


def row(m: Measurement, name: str, quant: str) -> dict:
    """A set-up's figures: medians over the rounds (their intervals under "intervals") and, beside
    the native set-up, the per-round ratios to it (median and interval, under "ratios")."""
    out = {"setup": name, "quant": quant, "runs": m.rounds, "intervals": {}}
    for key, (metric, _, scale) in FIGURES.items():
        iv = m.figure(name, metric).scaled(1 / scale)
        out[key] = iv.median
        out["intervals"][key] = iv.to_dict()
    if m.reference is not None:
        out["ratios"] = {metric: m.ratio(name, metric).to_dict()
                         for metric in ("decode", "prefill", "memory")}
    out["measured"] = m.to_dict(name)
    return out


def cell(iv: dict, fmt: str) -> str:
    """'92.1 [90.3, 93.0]': a median and its interval (the median alone for one run)."""
    show = fmt.format(iv["median"])
    return show if iv["n"] == 1 else f"{show} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--portable", type=Path, default=None, help="folder of a portable llama-cpp-python")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/llama_setup"))
    add_measurement(p, BENCH_POLICY)
    a = p.parse_args()
    policy = measurement_policy(a, BENCH_POLICY)
    import llama_cpp

    native_site = Path(llama_cpp.__file__).parent.parent
    setups = [(BASELINE, False, None), ("native, safe (extra buffer types off)", True, None)]
    if a.portable is not None:
        setups.append(("portable build", False, a.portable.resolve()))
    libraries = {name: ggml_cpu_library(site or native_site) for name, _, site in setups}
    a.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(None)
    rows = []
    summaries = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for quant in QUANTS:
            files[quant] = Path(tmp) / f"dense-{quant}.gguf"
            gguf.export(loaded, files[quant], quant)
        del loaded
        for quant in QUANTS:
            print(f"{quant}: the set-ups in interleaved rounds", flush=True)
            m, errors = measure_setups(quant, files[quant], setups, policy, a.threads)
            for name, _, _ in setups:
                if name in errors:
                    rows.append({"setup": name, "quant": quant, "error": errors[name]})
                else:
                    rows.append(row(m, name, quant))
            if m is not None:
                summaries.append(f"{quant}: {m.summary()}")
    lines = [f"CPU reports AMX: {cpu_reports_amx()}; "
             + "; ".join(f"{name}: {libraries[name] and libraries[name].name} AMX instructions "
                         f"{amx_instructions(libraries[name])}" for name, _, _ in setups), "",
             "Median and 95% interval over the interleaved rounds; vs native: the ratio within each "
             "round, its median and interval. " + "; ".join(summaries), "",
             "| set-up | type | decode tokens/s | prefill tokens/s | peak RSS (MiB) | decode vs native "
             "| prefill vs native |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["quant"], r["setup"])):
        if "error" in r:
            lines.append(f"| {r['setup']} | {r['quant']} | {r['error']} | | | | |")
            continue
        figures = " | ".join(cell(r["intervals"][key], fmt) for key, (_, fmt, _) in FIGURES.items())
        ratios = " | ".join(cell(r["ratios"][metric], "{:.2f}") if "ratios" in r else "-"
                            for metric in ("decode", "prefill"))
        lines.append(f"| {r['setup']} | {r['quant']} | {figures} | {ratios} |")
    table = "\n".join(lines)
    print(table)
    (a.out / "table.md").write_text(table + "\n")
    (a.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
