"""The names of the files in OUT, read and written by the whole bundle."""

MANIFEST = "manifest.json"
README = "README.md"
PLAN = "plan.json"
CHECKPOINT = "model"  # the resized PyTorch checkpoint inside OUT
