"""What a run tells the user: the summary table, the plan table and the POD heat map."""

from __future__ import annotations

from pathlib import Path

from .arch import PROJECTIONS
from .plan import Plan
from .search import LABELS, OPS, format_value
from .units import format_bytes


def plan_table(plan: Plan) -> str:
    """Per layer: heads, KV heads, MLP channels, unstructured ratio per projection."""
    head = f"{'layer':>5} {'heads':>5} {'kv':>3} {'mlp':>6}  " + " ".join(f"{p:>5}" for p in PROJECTIONS)
    rows = [head, "-" * len(head)]
    for i, lp in enumerate(plan.layers):
        d = lp.dims
        rows.append(f"{i:>5} {d.n_head:>5} {d.n_kv:>3} {d.n_ff:>6}  "
                    + " ".join(f"{lp.ratios[p]:>5.3f}" for p in PROJECTIONS))
    params = plan.params()
    dense = params["decoder_dense"]
    rows += ["", f"decoder parameters: dense {dense:,}; resized {params['decoder_resized']:,} "
             f"({1 - params['decoder_resized'] / dense:.1%} removed by structure); "
             f"expected non-zero {params['decoder_nonzero']:,} "
             f"({1 - params['decoder_nonzero'] / dense:.1%} removed in all)"]
    return "\n".join(rows)


def summary_table(report: dict) -> str:
    p, rss = report["params"], report["memory"]
    rows = [("", "dense", "pruned")]
    rows.append(("decoder parameters", f"{p['dense']['decoder']:,}", f"{p['pruned']['decoder']:,}"))
    rows.append(("decoder non-zero", f"{p['dense']['decoder_nonzero']:,}",
                 f"{p['pruned']['decoder_nonzero']:,}"))
    rows.append(("all parameters", f"{p['dense']['total']:,}", f"{p['pruned']['total']:,}"))
    rows.append(("removed (decoder non-zero)", "",
                 f"{1 - p['pruned']['decoder_nonzero'] / p['dense']['decoder']:.1%}"))
    ev = report.get("perplexity")
    if ev:
        rows.append((f"perplexity ({Path(ev['dense']['text']).name}, "
                     f"{ev['dense']['n_predicted']:,} tokens)",
                     f"{ev['dense']['perplexity']:.3f}", f"{ev['pruned']['perplexity']:.3f}"))
        if "before_recovery" in ev:
            rows.append(("perplexity before recovery", "", f"{ev['before_recovery']['perplexity']:.3f}"))
    rec, notes = report.get("recovery"), []  # notes: too long for a column, printed below it
    if rec:
        rows.append(("recovery (distillation) wall time", "", f"{rec['seconds']:.0f} s"))
        notes.append(f"recovery: {rec['tokens']:,} tokens of {rec['text']}, {rec['steps']} steps, "
                     f"loss {rec['first_loss']:.3f} -> {rec['final_loss']:.3f}")
    if "joint_s" in report["timing"]:
        rows.append(("joint search wall time (dense runs, probes)", "",
                     f"{report['timing']['joint_s']:.1f} s"))
    rows.append(("pruning wall time", "", f"{report['timing']['prune_s']:.1f} s"))
    if "peak_rss_after_prune_bytes" in rss:
        rows.append(("peak RSS after pruning", "", format_bytes(rss["peak_rss_after_prune_bytes"])))
    rows.append(("peak RSS (whole run)", "", format_bytes(rss["peak_rss_bytes"])))
    rows.append(("float32 model size", format_bytes(rss["dense_fp32_bytes"]),
                 format_bytes(rss["pruned_fp32_bytes"])))
    g = report.get("gguf")
    if g:
        b = g["benchmark"]
        rows.append((f"GGUF {g['type']} ({g['arch']}) file", "", format_bytes(b["file_bytes"])))
        rows.append(("GGUF greedy agreement with PyTorch", "",
                     f"{g['parity']['top1_agreement']:.1%} of {g['parity']['positions']}"))
        rows.append(("GGUF fallback tensors", "", str(len(g["fallbacks"]))))
        rows.append(("llama.cpp prefill / decode tokens/s", "",
                     f"{b['prefill']['tokens_per_s']:.1f} / {b['decode']['tokens_per_s']:.1f}"))
        rows.append(("llama.cpp peak RSS", "", format_bytes(b["peak_rss_bytes"])))
        if "perplexity" in b:
            rows.append(("llama.cpp perplexity", "", f"{b['perplexity']['perplexity']:.3f}"))
    o = report.get("onnx")
    if o:
        b, par = o["benchmark"], o["parity"]
        rows.append((f"ONNX {o['dtype']} files ({o['folder']}/)", "", format_bytes(b["file_bytes"])))
        rows.append(("ONNX vs PyTorch: max |logit diff|", "", f"{par['max_abs_logit_diff']:.2e}"))
        rows.append(("ONNX greedy agreement / generation", "",
                     f"{par['top1_agreement']:.1%} / "
                     + ("identical" if par["greedy_identical"] else
                        f"differs at token {par['greedy_first_difference']}")
                     + f" ({par['greedy_tokens']} tokens)"))
        rows.append((f"ONNX Runtime prefill / decode tokens/s ({o['provider']})", "",
                     f"{b['prefill']['tokens_per_s']:.1f} / {b['decode']['tokens_per_s']:.1f}"))
        rows.append(("ONNX Runtime peak RSS", "", format_bytes(b["peak_rss_bytes"])))
        if "perplexity" in b:
            rows.append(("ONNX Runtime perplexity", "", f"{b['perplexity']['perplexity']:.3f}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join([f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows] + notes)


def basis_text(basis: str, short: bool = False) -> str:
    """What a prediction's calibration is, in words (costmodel.Calibration.basis)."""
    if ", anchored" in basis:
        return (f"{basis_text(basis.split(',')[0], short)}, anchored at this type's dense run here"
                if short else f"{basis_text(basis.split(',')[0])}, then moved to predict this "
                "type's dense run here exactly (memory base, bandwidth, compute)")
    if basis == "measured":
        return "calibrated here" if short else "calibrated here by `mosaic-export profile detect`"
    if basis.startswith("transferred"):
        other = basis.split()[-1]
        return (f"calibrated here for {other}" if short else
                f"with the terms `profile detect` measured here for {other} (this type was not measured)")
    return "nominal" if short else "with the profile's datasheet figures (nominal, not measured)"


def budget_table(cost: dict) -> str:
    """Each budget: its limit, the predicted figure and, when measured here, the measured one."""
    local = cost["profile_local"]
    measured = {c["name"]: c for c in cost.get("measured_budgets", [])}
    basis = basis_text(cost["basis"], short=True)
    rows = [("budget", f"predicted ({basis})",
             "measured here" + ("" if local else " (not the profile's device)"), "verdict")]
    for c in cost["predicted_budgets"]:
        m = measured.get(c["name"])
        if local and m is not None:
            verdict = "met" if m["met"] else "MISSED"
        else:
            verdict = ("met" if c["met"] else "MISSED") + " (predicted)"
        rows.append((f"{LABELS[c['name']]} {OPS[c['name']]} {format_value(c['name'], c['limit'])}",
                     format_value(c["name"], c["value"]),
                     format_value(c["name"], m["value"]) if m else "-", verdict))
    if len(rows) == 1:
        return "no budgets set"
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d:<{w[3]}}" for a, b, c, d in rows)


def pareto(points: list[tuple[float, float]], larger_is_better: bool) -> list[int]:
    """Indices of the points not dominated in (cost x, perplexity y): lower y, and lower x (or
    higher x when larger_is_better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (y2 <= y and (x2 >= x if larger_is_better else x2 <= x)) and (y2 < y or x2 != x)
            for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


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
        if "measured" in cost:
            m = cost["measured"]["memory_bytes" if key == "memory_bytes" else key]
            ax.plot([chosen], [m / scale], "*", color="tab:red", ms=12, label="this plan, measured here")
        n = cost.get("neighbour_measured")
        if n:
            ax.plot([n["removed"]], [n[key] / scale], "*", color="tab:orange", ms=10,
                    label="5% less pruning, measured here")
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


def front_points(joint: dict) -> list[dict]:
    """The options with a predicted quality, with flags: on the memory front, on the speed front."""
    pts = [dict(o) for o in joint["options"] if o["predicted_perplexity"] is not None]
    for key, larger in (("memory_bytes", False), ("decode_tokens_per_s", True)):
        front = set(pareto([(p["predicted"][key], p["predicted_perplexity"]) for p in pts], larger))
        for i, p in enumerate(pts):
            p[f"front_{key}"] = i in front
    return pts


def _recovery_text(share) -> str:
    """The recovered shares for report.md: a list of [removed, share] points, or None."""
    if not share:
        return ""
    return "; recovery closed " + ", ".join(f"{s:.0%} of it at {r:.1%} removed" for r, s in share)


def joint_section(joint: dict) -> list[str]:
    """report.md: the joint search's choice, why, the quality model's inputs, every candidate."""
    q, c = joint["quality"], joint["chosen"]
    probe = q["probe"]
    lines = ["## Joint search: type, structure, recovery", "",
             f"Chosen: **{_option_label(c)}**. {joint['reason'][0].upper()}{joint['reason'][1:]}.", ""]
    m = joint.get("measured")
    if m:
        lines += [f"Predicted perplexity on {Path(m['text']).name}: {m['predicted_perplexity']:.2f}; "
                  f"measured in the runtime: {m['measured_perplexity']:.2f} (log error "
                  f"{m['log_error']:.3f}).", ""]
    lines += [f"Quality model (`mosaic_export/quality.py`): log perplexity = dense float32 + the "
              f"type's change + the structural change x (1 - the share recovery closes), each "
              f"measured on {probe['windows']} windows from the end of {Path(probe['text']).name} (dense, "
              f"PyTorch float32: {q['reference']:.3f}).", "",
              "| type | dense probe perplexity (runtime) | change | file (MiB) | decode tokens/s |",
              "|---|---|---|---|---|"]
    for t, d in q["type_deltas"].items():
        r = probe["dense_runs"][t]
        lines.append(f"| {t} | {r['perplexity']:.3f} | {d:+.4f} | {r['file_bytes'] / 2**20:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} |")
    lines.append("")
    if q["structure"]:
        lines += ["Structural change measured at " + ", ".join(
            f"{r:.1%} removed: {d:+.3f}" for r, d in q["structure"])
                  + f" (plans at alignment {probe['structure_alignment']}, after compensation)"
                  + _recovery_text(q["recovered_share"])
                  + ".", ""]
    else:
        lines += ["No structural probe: no type that needs pruning to meet the budgets can beat the "
                  "best dense type that meets them without pruning.", ""]
    if joint["infeasible_types"]:
        lines += ["Types that no plan fits: " + "; ".join(
            f"{t} ({s})" for t, s in joint["infeasible_types"].items()), ""]
    lines += ["Every candidate with a predicted quality (predictions; `front`: not dominated):", "",
              "| candidate | predicted perplexity | memory (MiB) | decode tokens/s | budgets | front |",
              "|---|---|---|---|---|---|"]
    for p in sorted(front_points(joint), key=lambda p: p["predicted"]["memory_bytes"]):
        fronts = [name for name, key in (("memory", "memory_bytes"), ("speed", "decode_tokens_per_s"))
                  if p[f"front_{key}"]]
        lines.append(f"| {_option_label(p)} | {p['predicted_perplexity']:.2f} | "
                     f"{p['predicted']['memory_bytes'] / 2**20:.1f} | "
                     f"{p['predicted']['decode_tokens_per_s']:.1f} | "
                     f"{'met' if p['feasible'] else 'missed'} | {', '.join(fronts)} |")
    return lines + ["", "![front](front.png)", ""]


def _option_label(o: dict) -> str:
    if o["removed"] < 1e-9:
        return f"dense {o['type']}"
    return f"{o['type']}, {o['removed']:.1%} removed" + (", recovered" if o["recovered"] else "")


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


def write_markdown(report: dict, folder: Path) -> None:
    """OUT/report.md: the summary, the budgets, the search, and the plots beside it."""
    lines = ["# mosaic-export report", "",
             f"Model `{report['model']['source']}`, profile `{report['profile']['name']}` "
             f"({report['profile']['description']}).", "", "## Summary", "", "```",
             summary_table(report), "```", ""]
    cost = report.get("cost")
    if cost:
        local = cost["profile_local"]
        lines += ["## Budgets", "",
                  "Measured on this machine, which " + ("is" if local else "is not") +
                  " the profile's device" + ("" if local else ": the verdicts are the predictions'")
                  + ". Predictions come from the cost model " + basis_text(cost["basis"]) + ".", "",
                  "```",
                  budget_table(cost), "```", ""]
        found = cost.get("search")
        if found:
            c, n = found["chosen"], found["neighbour"]
            lines += ["## Search", "",
                      f"{found['plans_evaluated']} plans priced on a grid of {found['step']:.0%}. "
                      f"Chosen: {c['removed']:.1%} of the decoder removed by structure, the least "
                      f"whose predicted cost meets every budget with a {cost.get('margin', 0):.0%} "
                      "margin for the cost model's error."]
            if n:
                lines += ["", f"With 5% less pruning ({n['removed']:.1%} removed), predicted:", ""]
                lines += [f"- {b['text']}: {'met' if b['met'] else '**missed**'}" for b in n["budgets"]]
                m = cost.get("neighbour_measured")
                if m:
                    lines += ["", "That plan built and run here (`--check-neighbour`), measured:", ""]
                    lines += [f"- {b['text']}: {'met' if b['met'] else '**missed**'}"
                              for b in m["budgets"]]
            else:
                lines += ["", "The dense model already meets every budget: nothing was pruned."]
            lines.append("")
        lines += ["![cost](cost.png)", ""]
    setup = ((report.get("gguf") or {}).get("benchmark") or {}).get("llama_setup") or {}
    if setup.get("fallback_after"):
        lines += ["## Runtime set-up", "",
                  f"{setup['fallback_after']}; the runs were repeated with llama.cpp's extra buffer "
                  "types off (no AMX matmul, no weight repacking), and the figures above are from "
                  "those runs.", ""]
    relative = (report.get("budgets") or {}).get("relative") or {}
    if relative:
        lines += ["Budgets given relative to the dense model's predicted figures: "
                  + ", ".join(f"{name} {factor:g}x" for name, factor in relative.items()) + ".", ""]
    rec = report.get("recovery")
    if rec:
        s = rec["settings"]
        ev = report.get("perplexity") or {}
        change = ""
        if "before_recovery" in ev:
            change = (f" Perplexity on {Path(ev['dense']['text']).name}: "
                      f"{ev['before_recovery']['perplexity']:.2f} after pruning, "
                      f"{ev['pruned']['perplexity']:.2f} after recovery "
                      f"(dense {ev['dense']['perplexity']:.2f}).")
        lines += ["## Recovery", "",
                  f"Distilled from the dense model (KL divergence of the next-token distributions "
                  f"at temperature {s['temperature']:g}"
                  + (f", plus {s['hidden_weight']:g} x the hidden-state MSE" if s["hidden_weight"] else "")
                  + f") on {rec['tokens']:,} tokens of {rec['text']}: {rec['steps']} steps of "
                  f"{s['batch']} windows of {s['seq_len']} tokens, AdamW at {s['lr']:g} with warm-up "
                  f"and cosine decay, seed {s['seed']}, on {rec.get('device', 'cpu')}; "
                  f"{rec['seconds']:.0f} s, peak RSS {format_bytes(rec.get('peak_rss_bytes', 0))}. "
                  f"Distillation loss {rec['first_loss']:.3f} (first step) -> {rec['final_loss']:.3f} "
                  f"(last step)." + change, "", "![recovery](recovery.png)", ""]
    if report.get("joint"):
        lines += joint_section(report["joint"])
    lines += ["## Plan", "", "Per-projection outlier ratio and fraction removed:", "",
              "![POD heat map](pod.png)", ""]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")
