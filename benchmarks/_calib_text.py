"""Calibration text for the sentence encoder that is neither the evaluation set nor tuned to it.

Sentences of Python's own documentation (``pydoc_data.topics``, shipped with CPython, offline): plain English prose
of varied length. ``benchmarks/data/calibration.txt`` (32 sentences) is too few for error-compensating rounding:
a layer with ``d`` input columns needs well over ``d`` input rows for ``H = E[x xᵀ]`` to generalise (measured on
all-MiniLM-L6-v2: with 544 token rows, compensated rounding *raised* the held-out output error of the attention
output and FFN output layers 1.1–3x; with ~20k rows it lowered it to 0.3–0.6x of plain rounding).
"""

from __future__ import annotations

import re


def python_doc_sentences(limit: int = 480, exclude: set[str] | frozenset = frozenset()) -> list[str]:
    """Up to ``limit`` prose sentences (40–200 characters, no code punctuation) in a fixed order."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = s.strip()
        if 40 < len(s) < 200 and s[0].isupper() and not any(c in s for c in "*`=()[]{}>") and s not in exclude:
            out.append(s)
            if len(out) == limit:
                break
    return out


def batches(tokenizer, sentences: list[str], size: int = 32) -> list[dict]:
    """Tokenized batches of similar-length sentences (sorted by length: little padding in ``H``)."""
    ordered = sorted(sentences, key=len)
    return [dict(tokenizer(ordered[i : i + size], padding=True, truncation=True, max_length=256, return_tensors="pt"))
            for i in range(0, len(ordered), size)]
