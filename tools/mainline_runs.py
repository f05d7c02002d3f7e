"""The README's main line, run as a new user would: from a clean clone, several times back to
back, each run timed, its artifacts kept under bench/mainline/ (BENCHMARKS.md's tables and the
README's figures are read from there by tools/mainline_table.py).

    python tools/mainline_runs.py --runs 5 --out bench/mainline/idle
    python tools/mainline_runs.py --runs 1 --hog --out bench/mainline/hog    # one CPU-bound process beside it

The line is read from README.md itself (the set-up command that installs and runs the main job),
so what is measured is what the README says. A clean clone of this repository's HEAD is made
once in a temporary folder (--clone, kept with --keep); each run executes the line there with
bash, and keeps of its OUT: report.json, report.md, plan.json, the profile detect wrote, the
console log, and run.json (wall time, exit status, what the rounds took). With --hog, a
`python -c 'while True: pass'` runs beside every run and is stopped after it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEEP = ("report.json", "report.md", "plan.json", "cost.png", "front.png")


def readme_line(readme: Path) -> str:
    """The README's main line: the indented command that creates the venv and runs profile detect."""
    for line in readme.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if line.startswith("    ") and text.startswith("python3 -m venv") and "profile detect" in text:
            return text
    raise SystemExit(f"{readme}: no main line (an indented `python3 -m venv ... profile detect ...`)")


def rounds_cost(keep: Path, report: dict | None) -> dict:
    """Seconds the rounds took: profile detect's (from the profile's note line), the joint search's
    dense runs and the built model's rounds (from the report)."""
    out: dict = {}
    profile = keep / "this-machine.toml"
    if profile.is_file():
        found = re.search(r"measured in (\d+) rounds?, (\d+) s", profile.read_text())
        if found:
            out["detect"] = {"rounds": int(found.group(1)), "seconds": float(found.group(2))}
    runs = ((report or {}).get("joint") or {}).get("quality", {}).get("probe", {}).get("dense_runs", {})
    if runs:
        first = next(iter(runs.values()))
        out["joint_dense_runs"] = {"rounds": first.get("rounds"), "seconds": first.get("rounds_seconds")}
    measured = ((report or {}).get("cost") or {}).get("measured")
    if measured:
        out["verdict"] = {"rounds": measured["rounds"], "seconds": measured["seconds"],
                          "stopped": measured["stopped"]}
    return out


def run_once(line: str, clone: Path, keep: Path, hog: bool) -> dict:
    """The line in the clone (with a CPU-bound process beside it when ``hog``); its artifacts into
    ``keep``; its record."""
    keep.mkdir(parents=True, exist_ok=True)
    beside = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    t0 = time.time()
    try:
        with open(keep / "console.log", "w", encoding="utf-8") as log:
            proc = subprocess.run(["bash", "-c", line], cwd=clone, stdout=log, stderr=subprocess.STDOUT)
    finally:
        if beside is not None:
            beside.kill()
            beside.wait()
    seconds = time.time() - t0
    out = clone / "out"
    for path in [*(out / name for name in KEEP), clone / "this-machine.toml"]:
        if path.is_file() and path.stat().st_mtime >= t0:  # written by this run, not an earlier one
            shutil.copy2(path, keep / path.name)
    report = json.loads((keep / "report.json").read_text()) if (keep / "report.json").is_file() else None
    record = {"line": line, "exit": proc.returncode, "seconds": seconds, "hog": hog,
              "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                                       text=True).stdout.strip(),
              "rounds_cost": rounds_cost(keep, report)}
    (keep / "run.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, required=True, help="where each run's artifacts go (run-1, ...)")
    p.add_argument("--hog", action="store_true", help="a CPU-bound process beside every run")
    p.add_argument("--clone", type=Path, default=None,
                   help="the clean clone to run in (default: a new one in a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    a = p.parse_args(argv)
    clone = a.clone or Path(tempfile.mkdtemp(prefix="mosaic-mainline-")) / "clone"
    if not clone.exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    line = readme_line(clone / "README.md")
    print(f"in {clone}:\n  {line}", flush=True)
    try:
        for i in range(1, a.runs + 1):
            r = run_once(line, clone, a.out / f"run-{i}", a.hog)
            print(f"run {i}: exit {r['exit']}, {r['seconds'] / 60:.1f} min, rounds {r['rounds_cost']}",
                  flush=True)
    finally:
        if a.clone is None and not a.keep:
            shutil.rmtree(clone.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
