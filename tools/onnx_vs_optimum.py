"""Cross-check: our ONNX export of a dense model against the one Optimum writes for it.

    # once, in a separate venv (optimum-onnx pins its own transformers):
    python3.11 -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0 && \\
        /tmp/optvenv/bin/pip install "optimum-onnx[onnxruntime]==0.1.0" "transformers==4.57.6" accelerate
    python -c "from pathlib import Path; from mosaic_export.model.load import load_model; \\
        from mosaic_export.model.checkpoint import save_checkpoint; \\
        save_checkpoint(load_model(None), Path('/tmp/dense_hf'))"
    HF_HUB_OFFLINE=1 /tmp/optvenv/bin/optimum-cli export onnx --model /tmp/dense_hf \\
        --task text-generation-with-past /tmp/optimum_onnx
    # then, here:
    python tools/onnx_vs_optimum.py /tmp/optimum_onnx/model.onnx [--model /tmp/dense_hf] [--positions 512]

Both graphs take the same inputs (input_ids, attention_mask, position_ids, past_key_values.{i}.key /
.value) and give logits and present.{i}.key / .value, so they are run by the same code in ONNX
Runtime: a prefill of the first --positions tokens of --text, then --decode greedy steps with the
KV cache. Printed: the largest logit difference and the greedy agreement, prefill and decode.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from mosaic_export.core.texts import corpus
from mosaic_export.method.calibration import tokenize
from mosaic_export.model.load import load_model
from mosaic_export.targets.onnx.runner import OnnxDecoder
from mosaic_export.targets.onnx.writer import export


class ForeignDecoder(OnnxDecoder):
    """An ONNX decoder with the same input / output names, not written by us (e.g. Optimum's)."""

    def __init__(self, path: Path, like: OnnxDecoder):
        import onnxruntime as ort

        self.config, self.folder = like.config, path.parent
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.past_dtype, self.n_layers = like.past_dtype, like.n_layers
        names = [o.name for o in self.session.get_outputs()]
        self._order = [names.index("logits")] + [names.index(f"present.{i}.{kind}")
                                                 for i in range(self.n_layers) for kind in ("key", "value")]

    def forward(self, ids, past):
        logits, present = super().forward(ids, past)
        out = [logits, *present]
        return out[self._order[0]], [out[j] for j in self._order[1:]]


def run(decoder: OnnxDecoder, ids: list[int], steps: int) -> list[np.ndarray]:
    """Logits of the prefill, then of each greedy decode step."""
    logits, past = decoder.forward(np.asarray([ids]), decoder.empty_past())
    out = [logits[0]]
    for _ in range(steps):
        logits, past = decoder.forward(np.asarray([[int(np.argmax(out[-1][-1]))]]), past)
        out.append(logits[0])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("optimum_model", type=Path, help="model.onnx written by optimum-cli")
    p.add_argument("--model", default=None, help="the dense model (default: the built-in SmolLM2)")
    p.add_argument("--text", default="builtin-heldout")
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    a = p.parse_args(argv)
    loaded = load_model(a.model)
    ids = tokenize(loaded.tokenizer, corpus(a.text))[: a.positions].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        ours = OnnxDecoder(export(loaded, Path(tmp) / "ours", "fp32").parent)
        theirs = ForeignDecoder(a.optimum_model, ours)
        x, y = run(ours, ids, a.decode), run(theirs, ids, a.decode)
    prefill = float(np.abs(x[0] - y[0]).max())
    decode = max(float(np.abs(u - v).max()) for u, v in zip(x[1:], y[1:], strict=True))
    agree = float((x[0].argmax(-1) == y[0].argmax(-1)).mean())
    same_tokens = [int(u[-1].argmax()) for u in x[1:]] == [int(v[-1].argmax()) for v in y[1:]]
    print(f"prefill of {len(ids)} tokens: max |logit difference| {prefill:.2e}, greedy agreement "
          f"{agree:.2%}; {a.decode} decode steps with the KV cache: max |logit difference| "
          f"{decode:.2e}, greedy tokens {'identical' if same_tokens else 'different'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
