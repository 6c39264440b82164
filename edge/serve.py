"""`alignfed generate`: answer a prompt with the base GGUF plus the device's current global adapter."""

from __future__ import annotations

from pathlib import Path

from alignfed import manifest as mf
from alignfed import protocol
from alignfed.errors import ConfigError
from edge.config import DeviceConfig


def current_adapter_path(cfg: DeviceConfig) -> Path | None:
    """Newest llama.cpp LoRA written by the daemon; rebuilt from the stored global if missing."""
    from runtime.llama import ADAPTER_PREFIX, adapter_path

    adapters = sorted((cfg.state_dir / "adapters").glob(f"{ADAPTER_PREFIX}*.gguf"))
    if adapters:
        return adapters[-1]
    stored = cfg.state_dir / "global.adapter"
    if not stored.exists():
        return None
    from alignfed.gguf_adapter import write_lora_gguf

    g = protocol.decode_global(stored.read_bytes(), 1 << 30)
    m = mf.load(cfg.bundle)
    (cfg.state_dir / "adapters").mkdir(parents=True, exist_ok=True)
    return write_lora_gguf(adapter_path(cfg.state_dir / "adapters", g.version), g.tensors, m.architecture, m.lora)


def generate(cfg: DeviceConfig, prompt: str, *, max_tokens: int = 64) -> str:
    from runtime.llama import Generator

    base = cfg.bundle / mf.BASE_GGUF
    if not base.exists():
        raise ConfigError(f"{cfg.bundle}: no {mf.BASE_GGUF}; re-export the bundle")
    gen = Generator(base, n_ctx=512, n_threads=cfg.profile.threads, seed=cfg.seed)
    adapter = current_adapter_path(cfg)
    gen.set_adapter(adapter)
    return gen.generate(prompt, max_tokens=max_tokens)
