"""The tokenizer in a GGUF file: the metadata llama.cpp rebuilds it from (its pre-tokenizer name
among them), and the probe text whose ids llama.cpp and the source tokenizer must agree on."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import HELDOUT, corpus

if TYPE_CHECKING:
    from mosaic_export.model.folder import LoadedModel

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for the Hugging Face pre-tokenizers they
# implement, by signature: each step's type and the setting that changes the split.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def pre_tokenizer_signature(pre: dict | None) -> tuple:
    """A tokenizer.json ``pre_tokenizer`` as ((type, setting), ...)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    out = []
    for step in steps:
        kind = (step or {}).get("type")
        setting = {"ByteLevel": lambda s: s.get("use_regex", True),
                   "Digits": lambda s: s.get("individual_digits", False),
                   "Split": lambda s: (s.get("pattern") or {}).get("Regex")}.get(kind, lambda s: None)
        out.append((kind, setting(step or {})))
    return tuple(out)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a Hugging Face pre-tokenizer; a UserError for one it does not have
    (a wrong name would split text differently in llama.cpp, silently)."""
    signature = pre_tokenizer_signature(pre)
    if signature not in PRE_TOKENIZERS:
        raise UserError(f"GGUF export: the tokenizer's pre-tokenizer {signature} is not one of those "
                        f"mapped to llama.cpp's ({', '.join(sorted(set(PRE_TOKENIZERS.values())))})")
    return PRE_TOKENIZERS[signature]


def tokenizer_fields(loaded: LoadedModel, writer) -> None:
    """Tokenizer metadata: copied as it was from a source GGUF (transformers' rebuilt tokenizer
    is not a faithful round trip), else built from a byte-level BPE tokenizer."""
    import gguf

    if loaded.gguf_file is not None:
        reader = gguf.GGUFReader(loaded.gguf_file)
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
            else:
                writer.add_key_value(key, field.contents(), field.types[0])
        return
    tok = loaded.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise UserError("GGUF export needs the source GGUF or a byte-level BPE tokenizer; "
                        f"this tokenizer is {type(tok).__name__} ({model.get('type')})")
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise UserError("GGUF export needs a tokenizer whose ids are 0..n-1 without gaps")
    special = set(tok.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(json.loads(backend.to_str()).get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        writer.add_eos_token_id(tok.eos_token_id)
    writer.add_add_bos_token(False)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)


# Text whose token ids llama.cpp and the source tokenizer must agree on: prose, code, numbers,
# runs of spaces and newlines, accents, CJK and an emoji (pre-tokenizers differ on exactly these).
TOKENIZER_PROBE = ("The quick brown fox, 1234567 and 3.14159!\n\n  def f(x):\n\treturn x ** 2  # ok\n"
                   "Don't, we'll, they're: I'M SURE.   Naïve café, Zürich, 東京, 🚀 — done.\n")


def tokenizer_probe() -> str:
    return TOKENIZER_PROBE + corpus(HELDOUT)[:3000]


def source_token_ids(loaded: LoadedModel, text: str) -> list[int]:
    """The source tokenizer's ids of text (transformers' tokenizer of the model folder)."""
    return [int(t) for t in loaded.tokenizer(text, add_special_tokens=False,
                                             split_special_tokens=True)["input_ids"]]


def tokenizer_check(loaded: LoadedModel, parity: dict, probe: str) -> dict:
    """The reference ids for the probe text and where they come from: for a model read from a GGUF
    file, that file's own tokenization in llama.cpp (the exporter copies its tokenizer; the
    tokenizer transformers rebuilds from a GGUF is not always faithful to it), else the source
    tokenizer's. Recorded in the manifest, so `verify` needs neither source."""
    from_gguf = parity.get("source_text_ids") is not None
    ids = parity["source_text_ids"] if from_gguf else source_token_ids(loaded, probe)
    return {"reference": "source GGUF in llama.cpp" if from_gguf else "source tokenizer",
            "text": probe, "ids": ids, "tokens": len(ids)}
