"""OUT/README.md: what an app developer needs to know about the folder, written from the
manifest: the files, each layer's sizes, the budgets against the predicted and measured figures,
how to run the model (the target's own section) and how to check it."""

from __future__ import annotations

from pathlib import Path

from mosaic_export import targets
from mosaic_export.bundle.files import CHECKPOINT, PLAN, README
from mosaic_export.core.units import format_bytes


def write_app_readme(folder: Path, manifest: dict) -> None:
    """Write OUT/README.md from the manifest (its file table is not needed: sizes are read
    from the folder)."""
    (folder / README).write_text(app_readme(folder, manifest), encoding="utf-8")


# (cost key, label, budget key, budget direction, formatter)
FIGURES = (("memory_bytes", "peak memory", "max_memory_bytes", "<=", format_bytes),
           ("decode_tokens_per_s", "decode tokens/s", "min_tokens_per_s", ">=", "{:.1f}".format),
           ("prefill_tokens_per_s", "prefill tokens/s", None, None, "{:.1f}".format),
           ("ttft_s", "time to first token", "max_ttft_s", "<=", "{:.2f} s".format))


METRIC = {"memory_bytes": "memory", "decode_tokens_per_s": "decode", "prefill_tokens_per_s": "prefill",
          "ttft_s": "ttft"}  # a FIGURES key -> the measurement's figure (measure/rounds.py)


def is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def layer_table(layers: list[dict]) -> list[str]:
    """Runs of consecutive layers of the same sizes, one table row each."""
    rows, start = [], 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            d, span = layers[start], str(start) if i - 1 == start else f"{start}-{i - 1}"
            rows.append(f"| {span} | {d['n_head']} | {d['n_kv']} | {d['n_ff']} |")
            start = i
    return ["| layers | query heads | KV heads | MLP channels |", "|---|---|---|---|", *rows]


def figures_table(budgets, cost) -> list[str]:
    """Budget, predicted and measured figures; only rows with a number in them."""
    budgets = budgets if isinstance(budgets, dict) else {}
    cost = cost if isinstance(cost, dict) else {}
    predicted, measured = ({} if not isinstance(cost.get(k), dict) else cost[k]
                           for k in ("predicted", "measured"))
    intervals = measured.get("figures") if isinstance(measured.get("figures"), dict) else {}
    rows = []
    for key, label, budget_key, op, fmt in FIGURES:
        budget = budgets.get(budget_key) if budget_key else None
        seen = fmt(measured[key]) if is_number(measured.get(key)) else "-"
        iv = intervals.get(METRIC[key])
        if seen != "-" and isinstance(iv, dict) and is_number(iv.get("low")) and is_number(iv.get("high")):
            seen += f" [{fmt(iv['low'])}, {fmt(iv['high'])}]"
        cells = [f"{op} {fmt(budget)}" if is_number(budget) else "-",
                 fmt(predicted[key]) if is_number(predicted.get(key)) else "-", seen]
        if any(c != "-" for c in cells):
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    context = predicted.get("context") or budgets.get("context")
    note = [f"Peak memory with {context} tokens of context.", ""] if is_number(context) else []
    rounds = measured.get("rounds")
    where = (f"measured on the build machine (median [interval], {rounds} rounds)"
             if is_number(rounds) else "measured on the build machine")
    return ["## Budgets and figures", "", *note,
            f"| figure | budget | predicted | {where} |", "|---|---|---|---|", *rows, ""]


def run_section(fmt: dict) -> list[str]:
    if fmt["target"] is not None:
        return targets.get(fmt["target"]).readme_run(fmt)
    return ["## Run it", "", "Built with `--target none`: only the PyTorch checkpoint `model/`, no "
            "runtime file.", ""]


def app_readme(folder: Path, manifest: dict) -> str:
    """A short README for the app developer."""
    fmt, layers = manifest["format"], manifest.get("layers") or []
    model = manifest.get("model") or {}
    profile = manifest.get("profile") or {}
    name = Path(model["source"]).stem if model.get("source") else "model"
    files = [f"`{CHECKPOINT}/`: the resized PyTorch checkpoint, "
             f"{format_bytes(tree_bytes(folder / CHECKPOINT))} "
             "(load it with `mosaic_export.model.load.load_model`)"]
    if fmt["target"] is not None:
        runtime = Path(fmt["model_path"]).parts[0]  # the GGUF file, or the ONNX folder
        engine = targets.get(fmt["target"]).engine
        slash = "/" if (folder / runtime).is_dir() else ""
        files.insert(0, f"`{runtime}{slash}`: the model for {engine}, "
                        f"{format_bytes(tree_bytes(folder / runtime))}")
    records = [f"`{n}`" for n in (PLAN, "report.json", "report.md") if (folder / n).is_file()]
    if records:
        files.append(", ".join(records) + ": how it was pruned and measured")
    files += ["`manifest.json`: every file's sha256 and size, the format, layer sizes, budgets, "
              "figures, parity check and versions"]
    lines = [f"# {name}, pruned by mosaic-export", ""]
    if profile.get("name"):
        lines += [f"Built for profile `{profile['name']}`"
                  + (f" ({profile['description']})" if profile.get("description") else "") + ".", ""]
    rec = manifest.get("recovery")
    if rec:
        lines += [f"After pruning it was distilled from the dense model on {rec['tokens']:,} tokens "
                  f"of {rec['text']} ({rec['steps']} steps, {rec['seconds']:.0f} s; distillation "
                  f"loss {rec['first_loss']:.3f} -> {rec['final_loss']:.3f}).", ""]
    lines += ["## Files", "", *(f"- {f}" for f in files), ""]
    if layers:
        lines += ["## Layers", "", f"{len(layers)} decoder layers and their sizes:", "",
                  *layer_table(layers), ""]
    lines += figures_table(manifest.get("budgets"), manifest.get("cost"))
    lines += run_section(fmt)
    checks = [("mosaic-export verify .", "every file's sha256, and parity with PyTorch")]
    if fmt["target"]:
        checks.insert(0, ('mosaic-export run . --prompt "Hello"', "generate with the runtime"))
    lines += ["## Check it", "", *(f"    {c:<38}# {what}" for c, what in checks), ""]
    return "\n".join(lines)
