"""`mosaic-export sweep`: the main job at several removal targets (and, with --types, at several
storage types); the Pareto front of quality against memory and against speed.

Each (type, target) is a full run (structured pruning at that share of the decoder, export,
benchmark on this machine, perplexity) written to OUT/r{target}/ (OUT/{type}-r{target}/ with
--types); OUT/sweep.csv holds one row per run, OUT/pareto.png the two fronts and OUT/report.md
both.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from .errors import UserError
from .outputs import check_output, write_outputs
from .pipeline import RunConfig, run
from .report import pareto
from .targets import get as get_target
from .targets import names as target_names

FIELDS = ["type", "target", "removed", "perplexity", "memory_bytes", "decode_tokens_per_s",
          "prefill_tokens_per_s", "file_bytes", "predicted_memory_bytes",
          "predicted_decode_tokens_per_s"]


def sweep(config: RunConfig, targets: list[float], log=print) -> list[dict]:
    """Run config at each removal target (all structured) into OUT/r{target}/."""
    if config.target is None:
        raise UserError(f"a sweep needs a target format (--target {' or '.join(target_names())})")
    if not targets or any(not 0 <= t <= 0.9 for t in targets):
        raise UserError(f"sweep targets must be in [0, 0.9], got {targets}")
    if config.eval_windows == 0:
        raise UserError("a sweep compares perplexity: --eval-windows cannot be 0")
    out = config.out
    check_output(out, config.force)
    rows: list[dict] = []

    types = config.types or [None]  # None: the one type of --quant / --dtype / the profile
    option = get_target(config.target).option

    def build(folder: Path) -> None:
        for type_ in types:
            for t in sorted(set(targets)):
                log(f"--- sweep: {t:.0%} of the decoder removed by structure"
                    + (f", {type_}" if type_ else ""))
                settings = replace(config.settings, sparsity=t, structured_fraction=1.0 if t else 0.0)
                name = f"{type_}-r{t:.2f}" if type_ else f"r{t:.2f}"
                typed = {option: type_, "alignment": None} if type_ else {}
                r = run(replace(config, settings=settings, search=False, types=None,
                                out=folder / name, force=False, **typed), log=log)
                rows.append(_row(t, r, config.target))
        _write(folder, rows, config.target)

    write_outputs(out, config.force, build)
    log(f"wrote {out}/sweep.csv, {out}/pareto.png, {out}/report.md")
    return rows


def _row(target: float, report: dict, fmt_target: str) -> dict:
    bench = report[fmt_target]["benchmark"]
    p, cost = report["params"], report.get("cost", {})
    return {"type": report["format"]["type"],
            "target": target, "removed": 1 - p["pruned"]["decoder"] / p["dense"]["decoder"],
            "perplexity": report["perplexity"]["pruned"]["perplexity"],
            "memory_bytes": bench["peak_rss_bytes"],
            "decode_tokens_per_s": bench["decode"]["tokens_per_s"],
            "prefill_tokens_per_s": bench["prefill"]["tokens_per_s"],
            "file_bytes": bench["file_bytes"],
            "predicted_memory_bytes": cost.get("predicted", {}).get("memory_bytes"),
            "predicted_decode_tokens_per_s": cost.get("predicted", {}).get("decode_tokens_per_s")}


def _write(folder: Path, rows: list[dict], fmt_target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(folder / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fronts = {}
    for ax, key, scale, label, larger in (
            (axes[0], "memory_bytes", 2**20, "peak memory, context full (MiB)", False),
            (axes[1], "decode_tokens_per_s", 1, "decode tokens/s", True)):
        pts = [(r[key] / scale, r["perplexity"]) for r in rows]
        front = sorted(pareto(pts, larger), key=lambda i: pts[i][0])
        fronts[key] = front
        ax.scatter([x for x, _ in pts], [y for _, y in pts], color="tab:gray", zorder=2)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o-", color="tab:red",
                label="Pareto front", zorder=3)
        typed = len({r["type"] for r in rows}) > 1
        for r, (x, y) in zip(rows, pts, strict=True):
            ax.annotate(f"{r['type']} " * typed + f"{r['removed']:.0%}", (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"quality vs cost across removal targets and types ({fmt_target}, measured here)")
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=110)
    plt.close(fig)
    lines = ["# mosaic-export sweep", "",
             "| type | removed | perplexity | peak memory (MiB) | decode tokens/s | prefill tokens/s | "
             "file (MiB) | on memory front | on speed front |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r['type']} | {r['removed']:.1%} | {r['perplexity']:.3f} | "
                     f"{r['memory_bytes'] / 2**20:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['file_bytes'] / 2**20:.1f} | {'yes' if i in fronts['memory_bytes'] else ''} | "
                     f"{'yes' if i in fronts['decode_tokens_per_s'] else ''} |")
    lines += ["", "![Pareto fronts](pareto.png)", "",
              "Each row is a full run in `r<target>/` (`<type>-r<target>/` with --types) with its "
              "own report."]
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
