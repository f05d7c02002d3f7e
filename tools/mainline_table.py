"""The main line's runs as tables (BENCHMARKS.md, "The main line through noise"), from the artifacts
tools/mainline_runs.py keeps under bench/mainline/.

    python tools/mainline_table.py bench/mainline/idle bench/mainline/hog

One row per run: its wall time and exit status, what the rounds cost (profile detect's, the joint
search's dense runs', the built model's), the plan chosen, and each budget's verdict with the
measured median and 95% interval (for a relative budget, the ratio to the dense model measured in
the same rounds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAMES = {"max_memory": "memory", "min_tokens_per_s": "decode", "max_ttft": "TTFT"}


def plan_text(report: dict) -> str:
    fmt = report.get("format") or {}
    p = report["params"]
    removed = 1 - p["pruned"]["decoder"] / p["dense"]["decoder"]
    kind = fmt.get("type", "-")
    return f"{kind}, {removed:.1%} removed" if removed > 1e-9 else f"dense {kind}"


def verdict_text(v: dict) -> str:
    """'met: 0.861x [0.860, 0.862]' for a relative budget, 'met: 145.7 [140.1, 150.2]' otherwise."""
    iv = v["ratio"] or v["figure"]
    scale, unit = (1, "x") if v["ratio"] else ((2**20, " MiB") if v["name"] == "max_memory" else (1, ""))
    digits = 3 if v["ratio"] else 1
    values = [f"{iv[k] / scale:.{digits}f}" for k in ("median", "low", "high")]
    return f"{v['status']}: {values[0]}{unit} [{values[1]}, {values[2]}]"


def row(name: str, run: dict, report: dict | None) -> str:
    cost = run.get("rounds_cost") or {}
    spent = " / ".join(f"{cost[k]['seconds']:.0f}" if cost.get(k, {}).get("seconds") is not None else "-"
                       for k in ("detect", "joint_dense_runs", "verdict"))
    rounds = " / ".join(str(cost.get(k, {}).get("rounds", "-"))
                        for k in ("detect", "joint_dense_runs", "verdict"))
    if report is None:
        return f"| {name} | {run['seconds'] / 60:.1f} | {run['exit']} | {spent} | {rounds} | - | - | - |"
    measured = (report.get("cost") or {}).get("measured") or {}
    verdicts = {v["name"]: verdict_text(v) for v in measured.get("verdicts", [])}
    budgets = report["budgets"]
    limits = "; ".join(f"{NAMES[n]} {f:g}x" for n, f in (budgets.get("relative") or {}).items())
    cells = [verdicts.get(n, "-") for n in ("max_memory", "min_tokens_per_s")]
    return (f"| {name} | {run['seconds'] / 60:.1f} | {run['exit']} | {spent} | {rounds} | "
            f"{plan_text(report)} ({limits}) | {cells[0]} | {cells[1]} |")


def table(folder: Path) -> list[str]:
    lines = [f"`{folder}`:", "",
             "| run | minutes | exit | rounds' seconds: detect / joint / verdict | rounds | plan (budgets) | "
             "memory verdict | decode verdict |", "|---|---|---|---|---|---|---|---|"]
    for run_dir in sorted(folder.glob("run-*"), key=lambda p: int(p.name.split("-")[1])):
        if not (run_dir / "run.json").is_file():
            lines.append(f"| {run_dir.name} | stopped before it ended (no run.json) | | | | | | |")
            continue
        run = json.loads((run_dir / "run.json").read_text())
        report_file = run_dir / "report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else None
        lines.append(row(run_dir.name, run, report))
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    a = p.parse_args(argv)
    for folder in a.folders:
        print("\n".join(table(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
