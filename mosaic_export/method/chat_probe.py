"""The chat probe: 20 short questions, each with one expected word, asked to a model through its
runtime with the chat template. It tells whether a pruned (or recovered) model still chats, which
perplexity on prose does not: the 30% structured SmolLM2 answered a chat question with an
immediate end of turn at twice the dense perplexity.

An answer counts when the expected word (or one of its spellings: "4" or "four") appears in the
reply as a whole word, case ignored. Greedy decoding, so the same file gives the same count.
"""

from __future__ import annotations

import re

MAX_TOKENS = 32

# (question, accepted answers)
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What is 3 + 5?", ("8", "eight")),
    ("What is 10 minus 3?", ("7", "seven")),
    ("What is 6 times 7?", ("42", "forty-two", "forty two")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("What colour is grass?", ("green",)),
    ("What colour are ripe bananas?", ("yellow",)),
    ("What colour is snow?", ("white",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("What do we call water when it is frozen?", ("ice",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the opposite of hot?", ("cold",)),
    ("Which gas do plants take in from the air to make food?", ("carbon dioxide", "co2")),
)


def answered(reply: str, accepted: tuple[str, ...]) -> bool:
    """Whether one of the accepted answers is a whole word (or words) of the reply."""
    text = reply.lower()
    return any(re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", text) for a in accepted)


def score(replies: list[str]) -> dict:
    """The count of questions answered, of replies that say anything at all (a broken model
    ends its turn at once), and, per question, the reply and whether it counts."""
    rows = [{"question": q, "expected": accepted[0], "reply": reply, "answered": answered(reply, accepted)}
            for (q, accepted), reply in zip(QUESTIONS, replies, strict=True)]
    return {"answered": sum(r["answered"] for r in rows),
            "replied": sum(bool(r["reply"].strip()) for r in rows), "questions": len(rows), "rows": rows}
