"""lm-evaluation-harness on a model in memory: a local task runs, a task without offline data is
skipped with its reason."""

from __future__ import annotations

import json

from zero_shot import zero_shot

from mosaic_export.model.load import load_model

ITEMS = [("The sky is", [" blue", " green"], 0), ("Two plus two is", [" five", " four"], 1),
         ("Water is", [" wet", " dry", " loud"], 0), ("Fire is", [" cold", " hot"], 1)]


def test_local_task_runs_and_missing_data_is_skipped(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                            for q, c, y in ITEMS))
    task = tmp_path / "local_mc.yaml"
    task.write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    loaded = load_model(str(tiny_model_dir))
    local, remote = zero_shot(loaded.model, loaded.tokenizer, [str(task), "arc_easy"])
    assert local["status"] == "ok"
    acc = local["metrics"]["local_mc"]["acc,none"]
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert remote["status"] == "skipped" and "not available offline" in remote["reason"]
