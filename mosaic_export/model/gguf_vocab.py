"""A SentencePiece-BPE tokenizer rebuilt from a GGUF file's vocabulary (Gemma's).

transformers turns a GGUF ``llama``-model vocabulary of Gemma into a Unigram model scored by the
file's scores; but those scores are merge ranks (-rank) of a BPE model, so Unigram splits words
into fragments of one or two characters (" capital" became " c", "ap", "it", "al"), and every
count, perplexity and calibration window would be wrong. llama.cpp's tokenizer merges, at each
step, the adjacent pair whose joined piece scores highest. That is a BPE model whose merges are
every split of a piece into two pieces of the vocabulary, ranked by the joined piece's score:
built here, with spaces as "▁", no prefix space and byte fallback, and the user-defined pieces
(runs of newlines and spaces) matched in the raw text first, as llama.cpp does.
"""

from __future__ import annotations

from pathlib import Path

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


def merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces of the vocabulary, the joined piece's score
    first (ties: the earlier left piece, then the earlier right piece)."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score, kind in zip(tokens, scores, types, strict=True):
        if kind != NORMAL:
            continue
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in index and right in index:
                found.append((-score, index[left], index[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def fix(gguf_file: Path, tokenizer):
    """The tokenizer transformers made from the GGUF: as it is, or, for a Gemma SentencePiece
    vocabulary (model ``llama``, no merges), with its model replaced by the BPE above (its
    special tokens, post-processor and settings kept)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    fields = GGUFReader(gguf_file).fields
    model = fields.get("tokenizer.ggml.model")
    if not (str(fields["general.architecture"].contents()).startswith("gemma") and model is not None
            and model.contents() == "llama" and "tokenizer.ggml.merges" not in fields):
        return tokenizer
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    old = tokenizer.backend_tokenizer
    new = Tokenizer(BPE(vocab, merges(tokens, scores, types), byte_fallback=True, fuse_unk=True,
                        unk_token=tokens[unk.contents()] if unk is not None else None))
    new.normalizer = normalizers.Replace(" ", "▁")
    new.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    new.post_processor = old.post_processor
    new.add_special_tokens([*tokenizer.added_tokens_decoder.values(),
                            *(AddedToken(t, special=True, normalized=False)
                              for t, kind in zip(tokens, types, strict=True) if kind == CONTROL)])
    # llama.cpp matches user-defined pieces (runs of newlines or spaces) in the raw text first
    new.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED])
    tokenizer._tokenizer = new
    return tokenizer
