"""The figures of report.md: the POD heatmap, the cost against the budgets, the recovery loss
curve and the joint search's front (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mosaic_export.bundle.report import basis_text, front_points
from mosaic_export.model.names import PROJECTIONS

if TYPE_CHECKING:
    from mosaic_export.method.plan import Plan


def pod_heatmap(plan: Plan, path: Path) -> None:
    """Two panels, layers x projections: the outlier ratio (POD) and the fraction of each
    projection's dense weights removed (structured and unstructured together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shape = plan.shape
    pod = np.array([[plan.pod["projection"][p][i] for p in PROJECTIONS]
                    for i in range(shape.n_layers)])
    removed = np.zeros_like(pod)
    for i, lp in enumerate(plan.layers):
        for j, p in enumerate(PROJECTIONS):
            out_d, in_d = shape.projection_shape(p, shape.dense_dims)
            out_k, in_k = shape.projection_shape(p, lp.dims)
            removed[i, j] = 1 - out_k * in_k * (1 - lp.ratios[p]) / (out_d * in_d)
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.22 * shape.n_layers + 2), sharey=True)
    for ax, data, title, cmap in ((axes[0], pod, f"outlier ratio (M={plan.settings.outlier_m})",
                                   "viridis"), (axes[1], removed, "fraction removed", "magma")):
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(PROJECTIONS)), PROJECTIONS)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0].set_ylabel("layer")
    s = plan.settings
    fig.suptitle(f"{s.allocation} allocation, sparsity {s.sparsity}, structured fraction "
                 f"{s.structured_fraction}, {s.method}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_plot(cost: dict, path: Path) -> None:
    """Predicted peak memory and decode speed against the removal target for every plan the
    search priced (or the one plan), budgets as lines, and the measured figures as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = cost.get("search")
    if found:
        plans = [found["dense"], found["chosen"]] + ([found["neighbour"]] if found["neighbour"] else [])
        plans += found.get("priced", [])
    else:
        plans = []
    pred = cost["predicted"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, scale, label, budget in (
            (axes[0], "memory_bytes", 2**20, "peak memory (MiB)", "max_memory"),
            (axes[1], "decode_tokens_per_s", 1, "decode tokens/s", "min_tokens_per_s")):
        pts = sorted({(p["removed"], p["predicted"][key] / scale) for p in plans})
        if pts:
            basis = basis_text(cost["basis"], short=True)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, color="tab:blue",
                    label=f"predicted ({basis})")
        chosen = found["chosen"]["removed"] if found else cost.get("removed", 0.0)
        ax.plot([chosen], [pred[key] / scale], "s", color="tab:blue", ms=8, label="this plan, predicted")
        metric = {"memory_bytes": "memory", "decode_tokens_per_s": "decode"}[key]
        for m, x, color, text in ((cost.get("measured"), chosen, "tab:red", "this plan"),
                                  (cost.get("neighbour_measured"), None, "tab:orange", "5% less pruning")):
            if m:  # the median over rounds, its 95% interval as the bar
                iv = m["figures"][metric]
                x = m["removed"] if x is None else x
                ax.errorbar([x], [iv["median"] / scale], yerr=[[(iv["median"] - iv["low"]) / scale],
                                                               [(iv["high"] - iv["median"]) / scale]],
                            fmt="*", color=color, ms=11, capsize=4,
                            label=f"{text}, measured here ({m['rounds']} rounds)")
        for b in cost["predicted_budgets"]:
            if b["name"] == budget:
                ax.axhline(b["limit"] / scale, color="gray", ls="--", label="budget")
        ax.set_xlabel("decoder parameters removed by structure")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"cost model, {cost['format']}, context {pred['context']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recovery_plot(recovery: dict, path: Path) -> None:
    """The distillation loss of every step (and its running mean) against the tokens trained on,
    with the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = recovery["curve"]
    tokens = [c["tokens"] for c in curve]
    loss = [c["loss"] for c in curve]
    k = max(1, len(loss) // 16)
    mean = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1])
            for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(tokens, loss, ".", ms=3, color="tab:blue", alpha=0.5, label="loss per step")
    ax.plot(tokens, mean, "-", color="tab:blue", label=f"running mean of {k} steps")
    ax.set_xlabel("tokens trained on")
    ax.set_ylabel("distillation loss (KL, nats per token)")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(tokens, [c["lr"] for c in curve], "-", color="gray", lw=1, label="learning rate")
    lr.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(f"recovery on {Path(str(recovery['text'])).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def front_plot(joint: dict, path: Path) -> None:
    """Predicted perplexity against predicted memory and decode speed of every candidate: dense
    types, pruned plans, recovered plans; the fronts as lines, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = front_points(joint)
    c = joint["chosen"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"dense": ("o", "tab:green"), "pruned": ("^", "tab:gray"), "recovered": ("v", "tab:blue")}
    for ax, key, scale, label in ((axes[0], "memory_bytes", 2**20, "predicted peak memory (MiB)"),
                                  (axes[1], "decode_tokens_per_s", 1, "predicted decode tokens/s")):
        for kind, (marker, color) in styles.items():
            sel = [p for p in pts if (p["removed"] < 1e-9) == (kind == "dense")
                   and (kind != "recovered" or p["recovered"]) and (kind != "pruned" or not p["recovered"])]
            ax.scatter([p["predicted"][key] / scale for p in sel], [p["predicted_perplexity"] for p in sel],
                       marker=marker, color=color, label=kind, zorder=2,
                       alpha=[1.0 if p["feasible"] else 0.35 for p in sel] if sel else None)
        for p in pts:
            if p["removed"] < 1e-9:
                ax.annotate(p["type"], (p["predicted"][key] / scale, p["predicted_perplexity"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = sorted((p for p in pts if p[f"front_{key}"]), key=lambda p: p["predicted"][key])
        ax.plot([p["predicted"][key] / scale for p in front], [p["predicted_perplexity"] for p in front],
                "-", color="tab:red", lw=1, label="front", zorder=1)
        ax.plot([c["predicted"][key] / scale], [c["predicted_perplexity"]], "*", color="tab:red", ms=14,
                label="chosen", zorder=3)
        ax.set_xlabel(label)
        ax.set_ylabel("predicted perplexity (probe)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("joint search: every candidate (faded: misses a budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
