"""Experiment: other per-projection allocation rules than `projection`, at 70% Wanda on SmolLM2.

    python tools/allocation_variants.py [--text ../shared/data/wikitext-2/valid.txt]

The same calibration (16 x 512 tokens of --text, seed 0) and the same 16 evaluation windows of
--text as the tuning stage of tools/bench_quality.py, so its perplexities compare with that
stage's. Rules tried (more outliers, less pruning, always), registered in mosaic_export/allocation.py:
- joint: OWL's rule over all layers x projection types together (one normalisation);
- layer+type: OWL's layer vector plus a per-type offset from each type's mean outlier ratio.
Prints the perplexity and the mean ratio per projection type of each.
"""

from __future__ import annotations

import argparse
import copy
import sys

from mosaic_export.core.texts import corpus
from mosaic_export.method.calibration import sample_windows, tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.method.passes import apply_to_model, measure_model
from mosaic_export.method.plan import CalibrationSettings, PruneSettings
from mosaic_export.method.planner import make_plan
from mosaic_export.model.load import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--sparsity", type=float, default=0.7)
    a = p.parse_args(argv)
    loaded = load_model(None)
    tokens = tokenize(loaded.tokenizer, corpus(a.text))
    calib = sample_windows(tokens, 16, 512, 0, source=a.text)
    eval_ids = windows(tokens, 512, 16, a.text)
    measured = measure_model(loaded, calib, PruneSettings(outlier_m=5.0), error_kinds=frozenset())
    for name, lam in (("joint", 0.08), ("layer+type", 0.08), ("joint", 0.15), ("layer+type", 0.04)):
        settings = PruneSettings(sparsity=a.sparsity, outlier_m=5.0, lam=lam, allocation=name,
                                 calibration=CalibrationSettings(a.text, 16, 512, 0))
        plan = make_plan(loaded.shape, loaded.source, measured, settings)
        student = copy.deepcopy(loaded)
        apply_to_model(student, plan, calib)
        ppl = perplexity(student.model, eval_ids, a.text)
        means = {q: round(sum(lp.ratios[q] for lp in plan.layers) / len(plan.layers), 3)
                 for q in plan.layers[0].ratios}
        print(f"{name} lambda {lam}: perplexity {ppl.perplexity:.3f}; mean ratio per type {means}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
