"""Recovery against its token budget: perplexity after distillation at several budgets, one plan.

    python tools/bench_recovery.py --plan OUT/plan.json --calib-text ../shared/data/wikitext-2/valid.txt \
        --recover-text ../shared/data/wikitext-2/valid.txt --eval-text ../shared/data/wikitext-2/test.txt \
        --eval-windows 128 --tokens 0 8192 16384 32768 131072 --json bench/recovery/curve.json

The model is pruned once by the plan (as ``mosaic-export --plan`` does); each budget then starts
again from a copy of that pruned model and distils it from the dense one with the default
settings (``mosaic_export.method.recover``), the learning-rate schedule sized to that budget: each point
is what ``--recover --recover-tokens N`` gives, not a checkpoint of one long run. Budget 0 is the
pruned model. Wall time is the distillation's alone (not the evaluation's), on this machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mosaic_export.core.texts import corpus
from mosaic_export.measure.process import peak_rss_bytes
from mosaic_export.method.calibration import tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.method.passes import apply_to_model
from mosaic_export.method.plan import Plan
from mosaic_export.method.recover import RecoverSettings, distill, training_windows
from mosaic_export.method.windows import calibration_ids
from mosaic_export.model.load import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--plan", required=True)
    p.add_argument("--calib-text", default=None, help="the text the plan was made with "
                                                      "(default: the plan's own)")
    p.add_argument("--recover-text", default="builtin")
    p.add_argument("--tokens", type=int, nargs="+", default=[0, 8192, 16384, 32768, 65536])
    p.add_argument("--eval-text", default="builtin-heldout")
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    plan = Plan.load(a.plan)
    settings = plan.settings
    if a.calib_text:
        settings = replace(settings, calibration=replace(settings.calibration, source=a.calib_text))
    student = load_model(a.model)
    teacher = load_model(a.model)
    eval_ids = windows(tokenize(student.tokenizer, corpus(a.eval_text)), 512, a.eval_windows, a.eval_text)
    dense = perplexity(teacher.model, eval_ids, a.eval_text, desc="perplexity (dense)")
    print(f"dense: perplexity {dense.perplexity:.2f}", flush=True)
    apply_to_model(student, plan, calibration_ids(student, settings), batch_size=4)
    pruned = student.model
    rows = []
    for tokens in sorted(set(a.tokens)):
        row = {"tokens": tokens, "seconds": 0.0, "steps": 0, "first_loss": None, "final_loss": None}
        model = pruned
        if tokens > 0:
            rs = RecoverSettings(tokens=tokens, text=a.recover_text, seed=a.seed).validate()
            ids, _ = training_windows(rs, teacher, Path(a.json).parent if a.json else None)
            model = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            result = distill(model, teacher.model, ids, rs)
            row.update(seconds=time.perf_counter() - t0, steps=result.steps, tokens=result.tokens,
                       first_loss=result.first_loss, final_loss=result.final_loss)
        ppl = perplexity(model, eval_ids, a.eval_text, desc=f"perplexity ({tokens} tokens)")
        row.update(perplexity=ppl.perplexity, top1=ppl.top1)
        rows.append(row)
        print(f"{row['tokens']:>8} tokens  {row['steps']:>4} steps  {row['seconds']:7.0f} s  "
              f"perplexity {ppl.perplexity:7.2f}", flush=True)
        if model is not pruned:
            del model
    out = {"plan": str(a.plan), "calib_text": settings.calibration.source,
           "recover_text": a.recover_text, "eval_text": a.eval_text, "eval_windows": eval_ids.shape[0],
           "dense_perplexity": dense.perplexity, "threads": torch.get_num_threads(),
           "peak_rss_bytes": peak_rss_bytes(), "points": rows}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
