"""What a run tells the user: the summary table, the plan table and the POD heat map."""

from __future__ import annotations

from pathlib import Path

from mosaic_export import targets
from mosaic_export.core.units import format_bytes
from mosaic_export.decide.search import LABELS, OPS, format_value
from mosaic_export.method.plan import Plan
from mosaic_export.model.names import PROJECTIONS
from mosaic_export.targets import Target


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
    rows.append(("peak RSS (whole run" + (", streamed)" if rss.get("streamed") else ")"), "",
                 f"{format_bytes(rss['peak_rss_bytes'])} ({rss['peak_rss_over_fp32_model']:.2f}x "
                 "the float32 model)"))
    rows.append(("float32 model size", format_bytes(rss["dense_fp32_bytes"]),
                 format_bytes(rss["pruned_fp32_bytes"])))
    built = runtime_section(report)
    if built:
        rows += built[0].summary_rows(built[1])
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join([f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows] + notes)


def runtime_section(report: dict) -> tuple[Target, dict] | None:
    """The target the run exported to (the report's format) and its section of the report;
    None for --target none."""
    name = (report.get("format") or {}).get("target")
    if name not in report:
        return None
    return targets.get(name), report[name]


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
    """Each budget: its limit, the predicted figure and, when measured here, the measured median
    with its interval (and the ratio to the dense model measured beside it, for a relative budget)
    and the verdict: met, MISSED or undecided (the interval straddles the budget)."""
    local = cost["profile_local"]
    measured = {v["name"]: v for v in (cost.get("measured") or {}).get("verdicts", [])}
    basis = basis_text(cost["basis"], short=True)
    rounds = (cost.get("measured") or {}).get("rounds")
    rows = [("budget", f"predicted ({basis})",
             (f"measured here over {rounds} rounds: median [interval] (its confidence)" if rounds
              else "measured here")
             + ("" if local else " (not the profile's device)"), "verdict")]
    for c in cost["predicted_budgets"]:
        m = measured.get(c["name"])
        if m is not None and local:
            verdict = {"met": "met", "missed": "MISSED", "undecided": "undecided"}[m["status"]]
        else:
            verdict = ("met" if c["met"] else "MISSED") + " (predicted)"
        budget = f"{LABELS[c['name']]} {OPS[c['name']]} {format_value(c['name'], c['limit'])}"
        if m is not None and m["factor"] is not None and m["ratio"] is not None:
            budget += f" ({m['factor']:g}x the dense model's)"
        rows.append((budget, format_value(c["name"], c["value"]), _measured_text(c["name"], m), verdict))
    if len(rows) == 1:
        return "no budgets set"
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d:<{w[3]}}" for a, b, c, d in rows)


def _measured_text(name: str, verdict: dict | None) -> str:
    """'145.7 tokens/s [140.1 tokens/s, 150.2 tokens/s] (94%)', with ' = 1.21x [1.18, 1.26] dense'
    for a relative budget (the interval its verdict is judged on, with its confidence)."""
    if verdict is None:
        return "-"
    iv, r = verdict["figure"], verdict.get("ratio")
    text = (f"{format_value(name, iv['median'])} [{format_value(name, iv['low'])}, "
            f"{format_value(name, iv['high'])}]")
    if r is not None:
        return text + f" = {r['median']:.3f}x [{r['low']:.3f}, {r['high']:.3f}] dense ({r['confidence']:.0%})"
    return text + f" ({iv['confidence']:.0%})"


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
              "| type | dense probe perplexity (runtime) | change | file (MiB) | decode tokens/s "
              "(median of its rounds) |", "|---|---|---|---|---|"]
    for t, d in q["type_deltas"].items():
        r = probe["dense_runs"][t]
        lines.append(f"| {t} | {r['perplexity']:.3f} | {d:+.4f} | {r['file_bytes'] / 2**20:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} ({r.get('rounds', 1)}) |")
    machines = sorted({r["machine"] for r in probe["dense_runs"].values() if "machine" in r})
    if machines:
        lines += ["", "Where the dense runs were measured: " + "; ".join(
            f"{', '.join(t for t, r in probe['dense_runs'].items() if r.get('machine') == m)} on {m}"
            for m in machines) + "."]
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


def write_markdown(report: dict, folder: Path) -> None:
    """OUT/report.md: the summary, the budgets, the search, and the plots beside it."""
    lines = ["# mosaic-export report", "",
             f"Model `{report['model']['source']}`, profile `{report['profile']['name']}` "
             f"({report['profile']['description']}).", "", "## Summary", "", "```",
             summary_table(report), "```", ""]
    if report.get("cost"):
        lines += budgets_section(report["cost"])
    built = runtime_section(report)
    if built:
        lines += built[0].report_notes(built[1])
    relative = (report.get("budgets") or {}).get("relative") or {}
    if relative:
        measured = (report.get("cost") or {}).get("measured") or {}
        judged = (f" They were judged on the ratio to the dense model in {measured['reference_format']}, "
                  "measured in the same rounds as the built model." if measured.get("reference_format")
                  else "")
        lines += ["Budgets given relative to the dense model (the search: to its predicted figures): "
                  + ", ".join(f"{name} {factor:g}x" for name, factor in relative.items()) + "." + judged, ""]
    if report.get("recovery"):
        lines += recovery_section(report["recovery"], report.get("perplexity") or {})
    if report.get("joint"):
        lines += joint_section(report["joint"])
    lines += ["## Plan", "", "Per-projection outlier ratio and fraction removed:", "",
              "![POD heat map](pod.png)", ""]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")


def budgets_section(cost: dict) -> list[str]:
    """The budgets against the prediction (and the measurement), and how the search chose."""
    local = cost["profile_local"]
    lines = ["## Budgets", "",
             "Measured on this machine, which " + ("is" if local else "is not") +
             " the profile's device" + ("" if local else ": the verdicts are the predictions'")
             + ". Predictions come from the cost model " + basis_text(cost["basis"]) + ".", "",
             "```", budget_table(cost), "```", ""]
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
                lines += ["", f"That plan built and run here (`--check-neighbour`), in the same "
                          f"{m['rounds']} rounds as the chosen plan, measured:", ""]
                lines += [f"- {v['text'].replace(': missed', ': **missed**')}" for v in m["verdicts"]]
        else:
            lines += ["", "The dense model already meets every budget: nothing was pruned."]
        lines.append("")
    return lines + ["![cost](cost.png)", ""]


def recovery_section(rec: dict, ev: dict) -> list[str]:
    """How the model was distilled, and its perplexity before and after."""
    s = rec["settings"]
    change = ""
    if "before_recovery" in ev:
        change = (f" Perplexity on {Path(ev['dense']['text']).name}: "
                  f"{ev['before_recovery']['perplexity']:.2f} after pruning, "
                  f"{ev['pruned']['perplexity']:.2f} after recovery "
                  f"(dense {ev['dense']['perplexity']:.2f}).")
    return ["## Recovery", "",
            f"Distilled from the dense model (KL divergence of the next-token distributions "
            f"at temperature {s['temperature']:g}"
            + (f", plus {s['hidden_weight']:g} x the hidden-state MSE" if s["hidden_weight"] else "")
            + f") on {rec['tokens']:,} tokens of {rec['text']}: {rec['steps']} steps of "
            f"{s['batch']} windows of {s['seq_len']} tokens, AdamW at {s['lr']:g} with warm-up "
            f"and cosine decay, seed {s['seed']}, on {rec.get('device', 'cpu')}; "
            f"{rec['seconds']:.0f} s, peak RSS {format_bytes(rec.get('peak_rss_bytes', 0))}. "
            f"Distillation loss {rec['first_loss']:.3f} (first step) -> {rec['final_loss']:.3f} "
            f"(last step)." + change, "", "![recovery](recovery.png)", ""]


def log_summary(report: dict, out: Path, log=print) -> None:
    log(summary_table(report))
    if "cost" in report:
        log(budget_table(report["cost"]))
        n = report["cost"].get("neighbour_measured")
        if n:
            log(f"with 5% less pruning ({n['removed']:.1%} removed), measured in the same rounds: "
                + "; ".join(v["text"] for v in n["verdicts"]))
    log(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
