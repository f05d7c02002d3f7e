"""Experiment: other per-projection allocation rules than `projection`, at 70% Wanda on SmolLM2.

    python tools/allocation_variants.py [--text ../shared/data/wikitext-2/valid.txt]

The same calibration (16 x 512 tokens of --text, seed 0) and the same 16 evaluation windows of
--text as the tuning stage of tools/bench_quality.py, so its perplexities compare with that
stage's. Rules tried (more outliers, less pruning, always):
- joint: OWL's rule over all layers x projection types together (one normalisation);
- layer+type: OWL's layer vector plus a per-type offset from each type's mean outlier ratio.
Prints the perplexity and the mean ratio per projection type of each.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import mosaic_export.plan as plan_module
from mosaic_export.allocation import allocate, fit_mean, owl_ratios
from mosaic_export.calibration import LayerStream, sample_windows, tokenize
from mosaic_export.evaluate import perplexity, windows
from mosaic_export.model_io import load_model
from mosaic_export.plan import CalibrationSettings, PruneSettings, make_plan
from mosaic_export.prune.apply import apply_plan, measure
from mosaic_export.texts import corpus


def _split(flat: torch.Tensor, names: list[str], n: int) -> dict[str, torch.Tensor]:
    return {p: flat[i * n:(i + 1) * n] for i, p in enumerate(names)}


def joint(target, lam, proj, layer, weights):
    names, n = list(proj), len(layer)
    raw = owl_ratios(torch.cat([proj[p].double() for p in names]), target, lam)
    return _split(fit_mean(raw, torch.cat([weights[p].double() for p in names]), target), names, n)


def layer_plus_type(target, lam, proj, layer, weights):
    names, n = list(proj), len(layer)
    base = owl_ratios(layer, target, lam)
    offset = owl_ratios(torch.stack([proj[p].double().mean() for p in names]), 0.0, lam)
    raw = torch.cat([base + offset[i] for i in range(len(names))])
    return _split(fit_mean(raw, torch.cat([weights[p].double() for p in names]), target), names, n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--sparsity", type=float, default=0.7)
    a = p.parse_args(argv)
    loaded = load_model(None)
    tokens = tokenize(loaded.tokenizer, corpus(a.text))
    calib = sample_windows(tokens, 16, 512, 0, source=a.text)
    eval_ids = windows(tokens, 512, 16, a.text)
    measured = measure(LayerStream(loaded.model, loaded.spec, calib, 1), loaded.spec, loaded.shape, 5.0)
    for name, rule, lam in (("joint", joint, 0.08), ("layer+type", layer_plus_type, 0.08),
                            ("joint", joint, 0.15), ("layer+type", layer_plus_type, 0.04)):
        plan_module.allocate = lambda method, *args, rule=rule: (
            rule(*args) if method == "projection" else allocate(method, *args))
        settings = PruneSettings(sparsity=a.sparsity, outlier_m=5.0, lam=lam, allocation="projection",
                                 calibration=CalibrationSettings(a.text, 16, 512, 0))
        plan = make_plan(loaded.shape, loaded.source, measured, settings)
        model = copy.deepcopy(loaded.model)
        apply_plan(LayerStream(model, loaded.spec, calib, 1), loaded.spec, plan)
        ppl = perplexity(model, eval_ids, a.text)
        means = {q: round(sum(lp.ratios[q] for lp in plan.layers) / len(plan.layers), 3)
                 for q in plan.layers[0].ratios}
        print(f"{name} lambda {lam}: perplexity {ppl.perplexity:.3f}; mean ratio per type {means}",
              flush=True)
    plan_module.allocate = allocate
    return 0


if __name__ == "__main__":
    sys.exit(main())
