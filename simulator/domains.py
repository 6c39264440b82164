"""Where a simulation's text comes from: named domains, each split into training and held-out examples.

A domain is one dataset a user brings (`name=path`, JSONL/JSON/text in any format `alignfed.text`
reads: `text`, `instruction`/`input`/`output`, `question`/`answer`) or one of the built-in
corpora (`alignfed.corpora`). Each domain's examples are shuffled with the seed; the first
`eval_examples` are held out for evaluation, the rest (at most `train_examples`) are for training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alignfed import corpora
from alignfed.errors import ConfigError
from alignfed.text import load_texts, split_indices


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    train: tuple[str, ...]
    eval: tuple[str, ...]


def parse_spec(spec: str) -> tuple[str, Path]:
    """`name=path` -> (name, path); a bare path is named after its file stem."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    name = name.strip()
    if not name or not path.strip():
        raise ConfigError(f"--data {spec!r}: expected NAME=PATH (e.g. gsm8k=data/gsm8k.jsonl)")
    return name, Path(path.strip())


def split(name: str, texts: Sequence[str], *, eval_examples: int, train_examples: int, seed: int) -> Domain:
    if eval_examples < 1:
        raise ConfigError(f"domain {name!r}: eval_examples must be ≥ 1, got {eval_examples}")
    if len(texts) < eval_examples + 1:
        raise ConfigError(
            f"domain {name!r}: {len(texts)} examples, need more than eval_examples={eval_examples} "
            "(held out for evaluation); lower --eval-examples or bring more data"
        )
    first, rest = split_indices(len(texts), eval_examples, seed)  # as a device's hold_out draws
    held = tuple(texts[int(i)] for i in first)
    if train_examples > 0:
        rest = rest[:train_examples]
    return Domain(name=name, train=tuple(texts[int(i)] for i in rest), eval=held)


def load_domains(
    specs: Sequence[tuple[str, Path]], *, eval_examples: int, train_examples: int, seed: int
) -> list[Domain]:
    names = [n for n, _ in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"--data: domain name(s) {dupes} given more than once; names must be unique")
    return [
        split(name, load_texts(path), eval_examples=eval_examples, train_examples=train_examples, seed=seed + i)
        for i, (name, path) in enumerate(specs)
    ]


def builtin_domains(*, eval_examples: int, train_examples: int, seed: int) -> list[Domain]:
    """The built-in corpora (arithmetic, code, prose), `train_examples + eval_examples` each."""
    n = max(train_examples, 1) + eval_examples
    return [
        split(
            d,
            corpora.texts(d, n, seed + 101 * i),
            eval_examples=eval_examples,
            train_examples=train_examples,
            seed=seed + i,
        )
        for i, d in enumerate(corpora.DOMAINS)
    ]
