"""Perplexity of saved adapters on a held-out text, through llama.cpp, next to the bare base.

What a device would serve: the bundle's `gguf/base.gguf` with the adapter's GGUF LoRA attached at
run time (`runtime.llama.Generator`). The text is read as training data is (`alignfed.text`:
JSONL / JSON / plain text in paragraphs); each example is tokenized by llama.cpp and cut into
windows of `window` tokens; every position after a window's first is scored (predicting the next
token from those before it in its window). Perplexity = exp(token-weighted mean negative log-likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignfed import manifest as mf
from alignfed.text import load_texts, windows

BASE = "base model"


@dataclass(frozen=True, slots=True)
class Perplexity:
    model: str  # "base model" or a variant
    tokens: int  # positions scored
    loss: float  # mean negative log-likelihood, nats per token

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def token_windows(
    texts: Sequence[str], tokenize: Callable[[str], list[int]], window: int, max_tokens: int
) -> list[list[int]]:
    """Windows of llama.cpp tokens, in text order, until `max_tokens` positions are held."""
    out: list[list[int]] = []
    held = 0
    for text in texts:
        for w in windows(tokenize(text), window):
            if held >= max_tokens:
                return out
            w = w[: max_tokens - held + 1]
            if len(w) >= 2:
                out.append(w)
                held += len(w) - 1
    return out


def nll(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """(T−1,) negative log-likelihood of ids[1:] from logits (T, V) of ids."""
    z = logits[:-1].astype(np.float64)  # (T−1, V)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return np.asarray(log_norm - z[np.arange(len(ids) - 1), np.asarray(ids[1:])])


def score_adapters(
    bundle: Path,
    text: Path,
    adapters: Mapping[str, Path],
    *,
    window: int = 256,
    max_tokens: int = 4096,
    threads: int = 2,
) -> list[Perplexity]:
    """The base model first, then each adapter GGUF (variant -> path), on the same windows."""
    from runtime.llama import Generator

    with Generator(Path(bundle) / mf.BASE_GGUF, n_ctx=window, n_threads=threads, kv_f32=True) as gen:
        wins = token_windows(load_texts(Path(text)), gen.tokenize, window, max_tokens)
        out = []
        for name, path in [(BASE, None), *adapters.items()]:
            gen.set_adapter(path)
            losses = np.concatenate([nll(gen.logits(w), w) for w in wins]) if wins else np.zeros(0)
            out.append(Perplexity(name, int(losses.size), float(losses.mean()) if losses.size else math.nan))
        return out


def markdown(rows: Sequence[Perplexity], text: Path) -> str:
    lines = [
        f"# Perplexity on {Path(text).name} (llama.cpp, bundle GGUF base + adapter)",
        "",
        "| model | tokens | loss (nats/token) | perplexity |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.model} | {r.tokens} | {r.loss:.4f} | {r.perplexity:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"
