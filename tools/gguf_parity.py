"""Parity of a model's F32 GGUF (written by mosaic-export) with PyTorch, and a chat sample.

    python tools/gguf_parity.py [MODEL] [--text FILE] [--positions 512]

MODEL: a resized checkpoint folder, a HF folder or a GGUF source (default: the built-in SmolLM2).
Greedy next-token agreement of stock llama.cpp (llama-cpp-python) with PyTorch at every position
of the first --positions tokens of --text, then a short greedy chat answer from llama.cpp.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mosaic_export.core.texts import corpus
from mosaic_export.method.calibration import tokenize
from mosaic_export.model.load import load_model
from mosaic_export.targets.gguf.runner import _llama, next_token_agreement
from mosaic_export.targets.gguf.writer import export, gguf_arch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--text", default="builtin-heldout")
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    a = p.parse_args(argv)
    loaded = load_model(a.model)
    ids = tokenize(loaded.tokenizer, corpus(a.text))[: a.positions]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model-F32.gguf"
        export(loaded, path, "F32")
        r = next_token_agreement(loaded.model, path, ids)
        print(f"{loaded.source} as {gguf_arch(loaded)} F32: greedy next token agrees at "
              f"{r['top1_agreement']:.2%} of {r['positions']} positions of {a.text}; "
              f"max |logit difference| {r['max_abs_logit_diff']:.4f}")
        llm = _llama(path, 512, None, logits_all=False)
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": a.prompt}],
                                           max_tokens=48, temperature=0.0)
        print(f"chat: {a.prompt!r} -> {reply['choices'][0]['message']['content']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
