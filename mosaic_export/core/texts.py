"""Text sources, without heavy imports (the llama.cpp runner process uses them too).

``builtin``: Python's own documentation topics (``pydoc_data.topics``), real English prose and
code, first 90%: for calibration. ``builtin-heldout``: the last 10%, never used for calibration:
the default perplexity text. Anything else is a path: a plain text file, or a JSONL file with a
string field ``text`` per line. ``self`` (calibration and recovery only) is text the dense model
generates (``mosaic_export.method.self_text``).
"""

from __future__ import annotations

import json
from pathlib import Path

from mosaic_export.core.errors import UserError

BUILTIN = "builtin"
HELDOUT = "builtin-heldout"
SELF = "self"  # text the dense model writes itself (mosaic_export.method.self_text)
BUILTIN_SPLIT = 0.9  # the built-in corpus: first 90% for calibration, the rest held out


def builtin_text() -> str:
    """Python's own documentation topics (``pydoc_data.topics``): real English prose and code."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(source: str) -> str:
    """Text from ``builtin``, a plain text file, or a JSONL file (a "text" field per line)."""
    if source == BUILTIN:
        return builtin_text()
    path = Path(source)
    if not path.is_file():
        raise UserError(f"text file not found: {source}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read text file {source}: {e}") from None
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}:{n}: not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{source}:{n}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def corpus(source: str) -> str:
    """The text of a source: 'builtin' (calibration part), 'builtin-heldout', or a file."""
    if source in (BUILTIN, HELDOUT):
        text = read_text(BUILTIN)
        cut = int(len(text) * BUILTIN_SPLIT)
        return text[:cut] if source == BUILTIN else text[cut:]
    return read_text(source)
