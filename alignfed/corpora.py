"""Small built-in non-IID corpora, so a federation runs with no dataset on disk.

Three domains with different token statistics: arithmetic Q&A (GSM8K-like), Python snippets
(CodeAlpaca-like) and plain prose. Deterministic for a seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignfed.text import format_record

DOMAINS = ("arithmetic", "code", "prose")

_NOUNS = ["device", "gateway", "adapter", "river", "garden", "sensor", "battery", "window", "teacher", "market"]
_VERBS = ["updates", "watches", "measures", "carries", "follows", "repairs", "collects", "shares"]
_ADJS = ["quiet", "small", "remote", "bright", "careful", "steady", "old", "busy"]
_FUNCS = [("add", "a + b"), ("sub", "a - b"), ("mul", "a * b"), ("biggest", "max(a, b)"), ("smallest", "min(a, b)")]


def _record(domain: str, rng: np.random.Generator) -> dict[str, str]:
    if domain == "arithmetic":
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        op, word, value = [("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b)][int(rng.integers(3))]
        return {"question": f"What is {a} {word} {b}?", "answer": f"{a} {op} {b} = {value}\n#### {value}"}
    if domain == "code":
        name, body = _FUNCS[int(rng.integers(len(_FUNCS)))]
        return {
            "instruction": f"Write a Python function {name} of two numbers.",
            "input": "",
            "output": f"def {name}(a, b):\n    return {body}\n",
        }
    if domain == "prose":

        def pick(xs: Sequence[str]) -> str:
            return xs[int(rng.integers(len(xs)))]

        return {"text": f"The {pick(_ADJS)} {pick(_NOUNS)} {pick(_VERBS)} the {pick(_ADJS)} {pick(_NOUNS)}."}
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def records(domain: str, n: int, seed: int) -> list[dict[str, str]]:
    """`n` records of `domain` in the JSONL shapes users bring (text / instruction / question)."""
    rng = np.random.default_rng(seed)
    return [_record(domain, rng) for _ in range(n)]


def texts(domain: str, n: int, seed: int) -> list[str]:
    """The same records as training texts, formatted as `alignfed.text.load_texts` would read them."""
    return [format_record(rec, f"built-in corpus {domain!r}") for rec in records(domain, n, seed)]


def mixed_texts(per_domain: int, seed: int) -> list[str]:
    """`per_domain` texts of every domain, interleaved (arithmetic, code, prose, arithmetic, ...)."""
    per = [texts(d, per_domain, seed + i) for i, d in enumerate(DOMAINS)]
    return [text for group in zip(*per, strict=True) for text in group]


def write_domain(path: Path, domain: str, n: int, seed: int) -> Path:
    """The records as a JSONL file, for programs that take a data file (devices, the demo)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records(domain, n, seed)))
    return path
