"""Zero-shot accuracy with lm-evaluation-harness, on a model already in memory.

    from zero_shot import zero_shot
    results = zero_shot(loaded.model, loaded.tokenizer, ["arc_easy", "hellaswag"], limit=500)

lm_eval is optional (`pip install -e '.[eval]'`). Its tasks read their data through `datasets`;
this never downloads (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set), so a task runs only when its
data is already in the local Hugging Face cache, and is otherwise reported as skipped with the
reason. A task can also be a path to a task YAML file whose data files are local. Each result is
{"task", "status": "ok" | "skipped", "metrics" ({task name: {metric: value}}) or "reason"}.
"""

from __future__ import annotations

import os

from mosaic_export.core.errors import UserError


def zero_shot(model, tokenizer, tasks: list[str], limit: int | None = None,
              batch_size: int = 8) -> list[dict]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("zero-shot tasks need lm-evaluation-harness: pip install -e '.[eval]'") from None
    adapter = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = []
    for task in tasks:
        try:
            out = lm_eval.simple_evaluate(model=adapter, tasks=[task], limit=limit, log_samples=False)
        except Exception as e:  # missing data surfaces as several library-specific errors
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            results.append({"task": task, "status": "skipped",
                            "reason": f"{type(e).__name__}: {reason[:200]} (its data is not available "
                                      f"offline, or the task is unknown)"})
            continue
        metrics = {name: {k: v for k, v in m.items() if isinstance(v, float)}  # a group has several
                   for name, m in out["results"].items()}
        results.append({"task": task, "status": "ok", "metrics": metrics, "limit": limit})
    return results
