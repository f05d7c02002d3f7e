"""Self text: text the dense model writes itself, for calibration (``--calib-text self``) and
recovery (``--recover-text self``). It needs no download and carries the model's own behaviour,
chat included, which distillation on prose alone does not bring back (BENCHMARKS.md, "Recovery").

Each round generates SELF_BATCH sequences from two kinds of prompt, alternately:

- a continuation: the first SELF_PROMPT_TOKENS tokens of a random window of the built-in text;
- when the model has a chat template, a user's turn that the model writes itself (Magpie: Xu et
  al., 2024): given the template up to the user's message, the model samples the message up to
  its end of turn; that message in the template, with the assistant's header, is the prompt.
  Messages that are one of the chat probe's questions are dropped (``chat_probe.QUESTIONS``), so
  the probe measures what the model keeps, not what it was shown.

After each prompt the model samples (temperature 1) up to SELF_ANSWER_TOKENS tokens, to its end
of text; prompt and answer are kept, joined with the end-of-text token. The same model and seed
give the same tokens; a shorter text is a prefix of a longer one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mosaic_export.core.texts import BUILTIN, corpus
from mosaic_export.method.calibration import tokenize
from mosaic_export.method.chat_probe import QUESTIONS
from mosaic_export.model.device import resolve_device

SELF_BATCH = 32  # sequences generated at once: the batch runs until its longest ends, so wider is faster
SELF_PROMPT_TOKENS = 16  # tokens of built-in text that a continuation starts from
SELF_QUERY_TOKENS = 64  # the longest user's message the model writes
SELF_ANSWER_TOKENS = 256
_MESSAGE = "\x00MESSAGE\x00"  # stands for the user's message when the template is split


@dataclass(frozen=True)
class ChatFrame:
    """The chat template around one user's message: ``before`` (system prompt and user header),
    ``after`` (end of turn and assistant header), as token ids; ``end``: the token that ends a
    turn, when ``after`` starts with a special one (else the end of text ends a turn)."""

    before: list[int]
    after: list[int]
    end: int | None = None

    @classmethod
    def of(cls, tokenizer) -> ChatFrame | None:
        """The frame of the tokenizer's chat template; None without one."""
        if not getattr(tokenizer, "chat_template", None):
            return None
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MESSAGE}],
                                             add_generation_prompt=True, tokenize=False)
        before, _, after = text.partition(_MESSAGE)
        encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        before, after = encode(before), encode(after)
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        return cls(before, after, after[0] if after and after[0] in special else None)


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _probe_questions() -> frozenset[str]:
    return frozenset(_normal(q) for q, _ in QUESTIONS)


def _sample(model, prompts: list[list[int]], pad: int, stop: list[int], max_new: int,
            dev: torch.device, keep: int | None = None) -> list[list[int]]:
    """Sampled continuations (temperature 1, no top-k; the model's generation config may add
    more, such as top-p) of left-padded prompts, each cut before its first stop token, or just
    after it when it is ``keep``."""
    width = max(map(len, prompts))
    batch = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(batch.to(dev), attention_mask=mask.to(dev), do_sample=True,
                         temperature=1.0, top_k=0, max_new_tokens=max_new, pad_token_id=pad,
                         eos_token_id=stop).cpu()
    cut = []
    for row in out:
        new = row[width:].tolist()
        ends = [new.index(t) for t in stop if t in new]
        end = min(ends) if ends else len(new)
        cut.append(new[:end + (end < len(new) and new[end] == keep)])
    return cut


class _Writer:
    """One model's self text, round after round."""

    def __init__(self, teacher, frame: ChatFrame | None, builtin: str, dev: torch.device):
        self.model, self.tok, self.dev = teacher.model, teacher.tokenizer, dev
        self.eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        self.builtin = tokenize(self.tok, builtin)
        self.frame = frame
        self.turn_end = frame.end if frame is not None else None
        self.stops = [self.eos] + ([self.turn_end] if self.turn_end not in (None, self.eos) else [])
        self.probe = _probe_questions()
        self.messages = self.dropped = 0

    def prompts(self, g: torch.Generator) -> list[list[int]]:
        """SELF_BATCH prompts: continuations, alternating with user's turns when there is a
        chat template."""
        n_chat = SELF_BATCH // 2 if self.frame is not None else 0
        starts = torch.randint(self.builtin.numel() - SELF_PROMPT_TOKENS, (SELF_BATCH - n_chat,),
                               generator=g).tolist()
        prompts = [self.builtin[s:s + SELF_PROMPT_TOKENS].tolist() for s in starts]
        if not n_chat:
            return prompts
        f = self.frame
        messages = _sample(self.model, [f.before] * n_chat, self.eos, self.stops,
                           SELF_QUERY_TOKENS, self.dev)
        turns = [f.before + m + f.after for m in messages
                 if self.accept(self.tok.decode(m, skip_special_tokens=True))]
        return [p for pair in zip_longest(prompts, turns) for p in pair if p is not None]

    def accept(self, message: str) -> bool:
        """Whether a user's message the model wrote is kept: not empty, not a chat-probe question."""
        if not message.strip():
            return False
        if _normal(message) in self.probe:
            self.dropped += 1
            return False
        self.messages += 1
        return True

    def round(self, g: torch.Generator) -> list[int]:
        prompts = self.prompts(g)
        # an answer ends at the end of its turn (kept: the student learns to end it) or of text
        answers = _sample(self.model, prompts, self.eos, self.stops, SELF_ANSWER_TOKENS, self.dev,
                          keep=self.turn_end)
        return [t for p, a in zip(prompts, answers, strict=True) for t in (*p, *a, self.eos)]


@torch.no_grad()
def self_text(teacher, n_tokens: int, seed: int, cache_dir: Path | None = None, log=print,
              device: str | None = "cpu") -> torch.Tensor:
    """n_tokens of text the teacher writes itself (see the module's docstring). Cached in
    cache_dir by what it is written from (_stem) and its length, and read from any longer cached
    text written from the same."""

    dev = resolve_device(device)

    frame, builtin = ChatFrame.of(teacher.tokenizer), corpus(BUILTIN)
    stem = _stem(teacher, frame, builtin, seed, dev)
    cached = _cached(stem, n_tokens, cache_dir)
    if cached is not None:
        path, ids = cached
        log(f"self text: {n_tokens} tokens from {path}")
        return torch.tensor(ids[:n_tokens], dtype=torch.long)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    teacher.model.to(dev)
    writer = _Writer(teacher, frame, builtin, dev)
    t0 = time.perf_counter()
    stream: list[int] = []
    with tqdm(total=n_tokens, desc="self text", unit="token", leave=False) as bar:
        while len(stream) < n_tokens:
            piece = writer.round(g)
            stream += piece
            bar.update(min(len(piece), n_tokens - bar.n))
    teacher.model.to("cpu")
    ids = stream[:n_tokens]
    chat = (f"; {writer.messages} user's messages written by the model, {writer.dropped} dropped "
            f"as chat-probe questions" if writer.frame is not None else "")
    log(f"self text: {n_tokens} tokens generated in {time.perf_counter() - t0:.0f} s{chat}")
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{stem}-{n_tokens}.json"
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        tmp.write_text(json.dumps(ids))
        tmp.replace(cache)
    return torch.tensor(ids, dtype=torch.long)


def _stem(teacher, frame: ChatFrame | None, builtin: str, seed: int, dev: torch.device) -> str:
    """The cache name of a self text, without its length: what it is written from (the model,
    its chat frame as rendered, the built-in text, the probe questions dropped, the sizes), the
    seed and the device type (a GPU samples other numbers than the CPU)."""
    key_parts = ["magpie-2", teacher.source, sum(p.numel() for p in teacher.model.parameters()),
                 None if frame is None else [frame.before, frame.after, frame.end],
                 hashlib.sha256(builtin.encode()).hexdigest(), sorted(_probe_questions()),
                 [SELF_BATCH, SELF_PROMPT_TOKENS, SELF_QUERY_TOKENS, SELF_ANSWER_TOKENS], seed]
    if dev.type != "cpu":
        key_parts.append(dev.type)
    return "self-text-" + hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]


def _cached(stem: str, n_tokens: int, cache_dir: Path | None) -> tuple[Path, list[int]] | None:
    """The shortest cached self text of at least n_tokens for this model and seed. The text is
    written in whole rounds from the seed, so a shorter text is a prefix of a longer one: a
    calibration text (--calib-text self) is read from a longer recovery text, and the reverse."""
    if cache_dir is None:
        return None
    found = []
    for path in Path(cache_dir).glob(f"{stem}-*.json"):
        length = path.stem.rsplit("-", 1)[1]
        if length.isdigit() and int(length) >= n_tokens:
            found.append((int(length), path))
    if not found:
        return None
    path = min(found)[1]
    return path, json.loads(path.read_text())
