"""Serving on the device: llama.cpp on the GGUF base plus the current global LoRA adapter.

The only module that imports `llama_cpp`. The base is loaded once; a new global adapter is
swapped in at run time through llama.cpp's adapter API (`llama_adapter_lora_init` +
`llama_set_adapters_lora`), so a new version costs one small file read, not a base reload.
Adapter files are written by `alignfed.gguf_adapter.write_lora_gguf` as
`adapter-{version:08d}.gguf` (see `adapter_path`) and pruned with `prune_adapters`.

One `Generator` serves one caller at a time; a lock makes an adapter swap from the MQTT side wait
for a running generation instead of changing weights under it.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import llama_cpp
import numpy as np

from alignfed.errors import BundleError

ADAPTER_PREFIX = "adapter-"
ADAPTER_SUFFIX = ".gguf"
_ADAPTER_NAME = re.compile(r"^adapter-(\d+)\.gguf$")
_ADAPTER_TMP = re.compile(r"^\.adapter-\d+\.gguf\.(\d+)\.tmp$")  # write_lora_gguf's temp names


def adapter_path(directory: Path, version: int) -> Path:
    """Where the GGUF of global adapter `version` lives: `adapter-00000042.gguf`."""
    if version < 0:
        raise ValueError(f"adapter version expected >= 0, got {version}")
    return Path(directory) / f"{ADAPTER_PREFIX}{version:08d}{ADAPTER_SUFFIX}"


def prune_adapters(directory: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest `adapter-*.gguf` files; return what was removed.

    Also removes temp files that a crashed writer (another pid) left behind. llama.cpp copies an
    adapter's tensors into its own buffers when loading, so deleting a loaded file is safe.
    """
    if keep < 1:
        raise ValueError(f"keep expected >= 1, got {keep}")
    directory = Path(directory)
    if not directory.is_dir():
        return []
    versions: list[tuple[int, Path]] = []
    stale: list[Path] = []
    for p in directory.iterdir():
        if m := _ADAPTER_NAME.match(p.name):
            versions.append((int(m.group(1)), p))
        elif (t := _ADAPTER_TMP.match(p.name)) and int(t.group(1)) != os.getpid():
            stale.append(p)
    versions.sort()
    doomed = [p for _, p in versions[: max(0, len(versions) - keep)]] + stale
    removed: list[Path] = []
    for p in doomed:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


class Generator:
    """llama.cpp text generation on a GGUF base with an optional runtime LoRA adapter."""

    def __init__(
        self,
        base_gguf: Path,
        *,
        n_ctx: int = 512,
        n_threads: int | None = None,
        seed: int = 0,
        n_batch: int = 512,
        kv_f32: bool = False,
    ) -> None:
        """kv_f32: keep the KV cache in F32 instead of llama.cpp's default F16 (twice the cache
        memory; makes an F32 base agree with a float32 reference to ~1e-6 instead of ~1e-3)."""
        base_gguf = Path(base_gguf)
        kv_type = llama_cpp.GGML_TYPE_F32 if kv_f32 else llama_cpp.GGML_TYPE_F16
        if not base_gguf.is_file():
            raise BundleError(f"{base_gguf}: base GGUF not found")
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(base_gguf),
                n_ctx=n_ctx,
                n_batch=min(n_batch, n_ctx),
                n_threads=n_threads or os.cpu_count() or 1,
                seed=seed,
                logits_all=False,  # `logits` decodes its own batch; no (n_ctx, vocab) buffer kept
                type_k=kv_type,
                type_v=kv_type,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"{base_gguf}: llama.cpp cannot load the base GGUF ({exc})") from exc
        self._n_vocab = self._llm.n_vocab()
        self._n_batch = min(n_batch, n_ctx)
        self._lock = threading.Lock()
        self._adapter: llama_cpp.llama_adapter_lora_p | None = None
        self._adapter_path: Path | None = None

    # -- adapters -------------------------------------------------------------------------

    @property
    def adapter(self) -> Path | None:
        """Path of the adapter now applied, or None for the bare base."""
        return self._adapter_path

    def set_adapter(self, path: Path | None, scale: float = 1.0) -> None:
        """Apply the LoRA GGUF at `path` (replacing the current one), or none for None.

        The new adapter is attached before the old one is freed, so the context never points at a
        freed adapter; the KV cache is dropped because it was computed with the old weights.
        """
        with self._lock:
            old = self._adapter
            if path is None:
                llama_cpp.llama_set_adapters_lora(self._llm.ctx, None, 0, None)
                self._adapter, self._adapter_path = None, None
            else:
                path = Path(path)
                if not path.is_file():
                    raise BundleError(f"{path}: adapter GGUF not found")
                new = llama_cpp.llama_adapter_lora_init(self._llm.model, str(path).encode())
                if not new:
                    raise BundleError(
                        f"{path}: llama.cpp refused the LoRA adapter (expected a GGUF with "
                        "general.type=adapter matching the base's architecture and shapes)"
                    )
                adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(new)
                scales = (ctypes.c_float * 1)(scale)
                if llama_cpp.llama_set_adapters_lora(self._llm.ctx, adapters, 1, scales) != 0:
                    llama_cpp.llama_adapter_lora_free(new)
                    raise BundleError(f"{path}: llama.cpp could not attach the LoRA adapter")
                self._adapter, self._adapter_path = new, path
            if old is not None:
                llama_cpp.llama_adapter_lora_free(old)
            self._forget_cache()

    # -- inference ------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def generate(self, prompt: str, max_tokens: int, temperature: float = 0.0, *, ignore_eos: bool = False) -> str:
        """Complete `prompt`; temperature 0 is greedy (deterministic).

        `ignore_eos` keeps generating past end-of-sequence, so exactly `max_tokens` tokens are made
        (for throughput measurements)."""
        bias = {self._llm.token_eos(): float("-inf")} if ignore_eos else None
        with self._lock:
            out = self._llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, logit_bias=bias)
            return str(out["choices"][0]["text"])  # type: ignore[index]

    def complete(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> tuple[str, str, dict[str, int]]:
        """(text, finish_reason, usage) for a prompt, or for chat `messages` rendered in the
        model's chat format (the GGUF's `tokenizer.chat_template`; llama-cpp-python's default
        format when the GGUF has none). Greedy at temperature 0."""
        with self._lock:
            if messages is not None:
                out: Any = self._llm.create_chat_completion(
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=max_tokens,
                    temperature=temperature,
                    stop=stop,
                )
                choice = out["choices"][0]
                text = choice["message"]["content"] or ""
            else:
                out = self._llm.create_completion(
                    prompt or "", max_tokens=max_tokens, temperature=temperature, stop=stop
                )
                choice = out["choices"][0]
                text = choice["text"]
            usage = {k: int(v) for k, v in out["usage"].items()}
            return str(text), str(choice.get("finish_reason") or "stop"), usage

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits of every position for `token_ids` from an empty cache: (T, vocab) float32."""
        n = len(token_ids)
        if n == 0 or n > self._llm.n_ctx():
            raise ValueError(f"token_ids expected 1..{self._llm.n_ctx()} tokens, got {n}")
        bad = [t for t in token_ids if not 0 <= t < self._n_vocab]
        if bad:
            raise ValueError(f"token ids expected in [0, {self._n_vocab}), got {bad[:4]}")
        out = np.empty((n, self._n_vocab), dtype=np.float32)  # (T, vocab)
        with self._lock:
            self._forget_cache()
            batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
            try:
                for start in range(0, n, self._n_batch):
                    chunk = token_ids[start : start + self._n_batch]
                    batch.n_tokens = len(chunk)
                    for i, tok in enumerate(chunk):
                        batch.token[i] = tok
                        batch.pos[i] = start + i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = 1
                    rc = llama_cpp.llama_decode(self._llm.ctx, batch)
                    if rc != 0:
                        raise RuntimeError(f"llama_decode expected 0, got {rc}")
                    rows = np.ctypeslib.as_array(
                        llama_cpp.llama_get_logits(self._llm.ctx), shape=(len(chunk) * self._n_vocab,)
                    )
                    out[start : start + len(chunk)] = rows.reshape(len(chunk), self._n_vocab)
            finally:
                llama_cpp.llama_batch_free(batch)
                self._forget_cache()
        return out

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the adapter, then the model (llama.cpp frees leftovers with the model)."""
        with self._lock:
            if self._adapter is not None:
                llama_cpp.llama_set_adapters_lora(self._llm.ctx, None, 0, None)
                llama_cpp.llama_adapter_lora_free(self._adapter)
                self._adapter, self._adapter_path = None, None
            self._llm.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _forget_cache(self) -> None:
        """Drop the KV cache and llama-cpp-python's prefix bookkeeping (no prompt reuse)."""
        memory = llama_cpp.llama_get_memory(self._llm.ctx)
        if memory is not None:
            llama_cpp.llama_memory_clear(memory, True)
        self._llm.reset()  # type: ignore[no-untyped-call]
