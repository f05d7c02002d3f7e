"""lm-evaluation-harness on a model in memory: a local task runs, a task without offline data is
skipped with its reason."""

from __future__ import annotations

import json

from zero_shot import zero_shot

from mosaic_export.model.load import load_model

# Each item's choices are one text repeated, so their log-likelihoods tie whatever the model, and
# the harness picks the first (argmax): an item is right exactly when its label is 0. Three of the
# four are: the accuracy must be 0.75, which only holds if the data, the labels and the scoring
# are wired through as they should be.
ITEMS = [("The sky is", [" blue", " blue"], 0), ("Two plus two is", [" four", " four"], 1),
         ("Water is", [" wet", " wet", " wet"], 0), ("Fire is", [" hot", " hot"], 0)]


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
    assert acc == 0.75
    assert remote["status"] == "skipped" and "not available offline" in remote["reason"]
