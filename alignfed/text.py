"""Local training data: JSONL / JSON / plain text in, fixed-shape token batches out.

Accepted records: `{"text": ...}`, instruction data `{"instruction", "input", "output"}` (Alpaca,
CodeAlpaca) and `{"question", "answer"}` (GSM8K). Plain text in its usual raw form (WikiText,
books, notes) holds one example per paragraph: lines holding only whitespace separate paragraphs.
Tokenization uses the bundle's tokenizer.json through the `tokenizers` package, so devices never
need transformers; an example longer than the sequence length is cut into windows of that length
(a whole raw document in one paragraph becomes many rows, not one truncated row).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignfed.errors import TrainingError

IGNORE = -100  # label value the loss skips (padding)
PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n")  # a line holding only whitespace (or nothing)


def format_record(rec: dict[str, Any], where: str) -> str:
    if isinstance(text := rec.get("text"), str):
        return text
    if "instruction" in rec and "output" in rec:
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return f"### Instruction:\n{prompt}\n\n### Response:\n{rec['output']}"
    if "question" in rec and "answer" in rec:
        return f"Question: {rec['question']}\nAnswer: {rec['answer']}"
    raise TrainingError(
        f"{where}: record has fields {sorted(rec)}; expected 'text', "
        "'instruction'/'input'/'output' or 'question'/'answer'"
    )


def load_texts(path: Path) -> list[str]:
    """Read training texts from a .jsonl, .json (array) or plain-text file (one text per paragraph)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"training data {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainingError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            out.append(format_record(rec, f"{path}:{n}"))
    elif path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{path}: not valid JSON ({exc.msg})") from exc
        if not isinstance(records, list):
            raise TrainingError(f"{path}: expected a JSON array of records")
        out = [format_record(r, f"{path}[{i}]") for i, r in enumerate(records)]
    else:
        out = paragraphs(text)
    if not out:
        raise TrainingError(f"{path}: no training examples found")
    return out


def paragraphs(text: str) -> list[str]:
    """The paragraphs of a plain text: runs of lines between lines holding only whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in PARAGRAPH_BREAK.split(text) if p.strip()]


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """`ids` cut into consecutive windows of `seq_len` tokens; a last window of one token is dropped
    (it predicts nothing)."""
    return [ids[s : s + seq_len] for s in range(0, len(ids), seq_len) if len(ids[s : s + seq_len]) >= 2]


def split_indices(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held, rest): a seeded permutation of range(n), its first k indices and the others, both in
    the permutation's order. The one draw behind every held-out split (a device's, a simulated domain's)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:k], order[k:]


def hold_out(texts: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): n examples drawn (seeded) to measure global adapters on.

    At most a fifth of the distinct examples is held out, so a device with little data still trains
    on most of it; a device with fewer than 5 holds out none. Every copy of a held-out example
    leaves the training set, so a duplicate cannot leak it back.
    """
    distinct = list(dict.fromkeys(texts))  # first-seen order
    k = min(n, len(distinct) // 5)
    if k <= 0:
        return list(texts), []
    picked, _ = split_indices(len(distinct), k, seed)
    held = [distinct[i] for i in sorted(picked.tolist())]
    out = set(held)
    return [t for t in texts if t not in out], held


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: np.ndarray  # (B, T) int64
    labels: np.ndarray  # (B, T) int64, IGNORE on padding

    @property
    def tokens(self) -> int:
        return int(np.sum(self.labels != IGNORE))


class Batcher:
    """Tokenizes once (each example plus EOS, cut into `seq_len` windows: one row each), then yields
    random fixed-shape batches forever (seeded)."""

    def __init__(
        self, texts: list[str], tokenizer_path: Path, *, batch: int, seq_len: int, eos_id: int, seed: int
    ) -> None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_path))
        self.batch, self.seq_len = batch, seq_len
        self.rows: list[np.ndarray] = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            self.rows.extend(np.asarray(w, dtype=np.int64) for w in windows([*enc.ids, eos_id], seq_len))
        if not self.rows:
            raise TrainingError("no example has at least 2 tokens")
        self.eos_id = eos_id
        self.rng = np.random.default_rng(seed)

    @property
    def samples(self) -> int:
        return len(self.rows)

    def make(self, rows: list[np.ndarray]) -> Batch:
        ids = np.full((len(rows), self.seq_len), self.eos_id, dtype=np.int64)
        labels = np.full((len(rows), self.seq_len), IGNORE, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : r.size] = r
            labels[i, : r.size] = r
        return Batch(ids, labels)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            idx = self.rng.choice(len(self.rows), size=self.batch, replace=len(self.rows) < self.batch)
            yield self.make([self.rows[i] for i in idx])

    def fixed(self, n: int) -> Batch:
        """The first `n` examples as one batch (deterministic evaluation)."""
        return self.make(self.rows[:n])
