"""The bundle manifest: what a bundle holds and how to check it.

`manifest.json` is written by `export` and read by the edge daemon and the coordinator. Shapes of
every LoRA tensor follow from the architecture and the layout, so they are derived, not stored
twice; the file still lists them so other tools can read a bundle without this package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignfed import atomic, lora
from alignfed.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Relative paths of the files a bundle holds (DESIGN.md section 3).
TOKENIZER = "tokenizer.json"
TRAIN_DIR = "train"
# ORT training artifacts, by their names inside train/ ...
TRAINING_FILE = "training_model.onnx"
EVAL_FILE = "eval_model.onnx"
OPTIMIZER_FILE = "optimizer_model.onnx"
CHECKPOINT_FILE = "checkpoint"
# ... and relative to the bundle
TRAINING_MODEL = f"{TRAIN_DIR}/{TRAINING_FILE}"
EVAL_MODEL = f"{TRAIN_DIR}/{EVAL_FILE}"
OPTIMIZER_MODEL = f"{TRAIN_DIR}/{OPTIMIZER_FILE}"
CHECKPOINT = f"{TRAIN_DIR}/{CHECKPOINT_FILE}"
ADAPTER_INIT = "train/adapter_init.safetensors"  # the LoRA tensors every federation starts from
CALIB_MODEL = "calib/calib_model.onnx"
CALIB_DATA = "calib/calibration.jsonl"  # the calibration set chosen at export: {"text": ...} per line
# the transformers config the network was built from (model_type and its fields): what the PyTorch
# trainer reads for a family's details the manifest's Architecture does not carry (edge/torch_families.py)
MODEL_CONFIG = "calib/model_config.json"

# Frozen base projections inside the bundle's ONNX models (export/onnx_graph.py), by HF weight
# name `hf`: fp32 `{hf}.T` (in, out); int8 `{hf}.T.int8` (in, out) with per-output `{hf}.scale`
# (out,). Every other base tensor keeps its HF name.
BASE_T = ".T"
BASE_INT8 = ".T.int8"
BASE_SCALE = ".scale"
BASE_GGUF = "gguf/base.gguf"


@dataclass(frozen=True, slots=True)
class Architecture:
    """Decoder-only transformer hyper-parameters (Llama naming)."""

    family: str  # "llama", "qwen2"
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    max_seq: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    # q, k and v projections carry a bias (Qwen2); the default keeps manifests without it loading.
    qkv_bias: bool = False
    # Width of one attention head when a family decouples it from hidden / n_heads (Qwen3,
    # Gemma 3); 0 keeps manifests without it loading and means hidden // n_heads.
    attn_head_dim: int = 0

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden // self.n_heads

    def in_out(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target projection."""
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        table = {
            "q": (self.hidden, q),
            "k": (self.hidden, kv),
            "v": (self.hidden, kv),
            "o": (q, self.hidden),
            "gate": (self.hidden, self.intermediate),
            "up": (self.hidden, self.intermediate),
            "down": (self.intermediate, self.hidden),
        }
        return table[module]


@dataclass(frozen=True, slots=True)
class LoraLayout:
    """Which projections carry adapters, with what rank and scale."""

    targets: tuple[str, ...]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, slots=True)
class Manifest:
    base_id: str
    base_sha256: str
    architecture: Architecture
    lora: LoraLayout
    train_quantization: str  # "fp32" | "int8"
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    tokenizer: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids, chat template
    gguf_quantization: str = "F32"
    # the calibration set in the bundle: {"file": CALIB_DATA, "sha256", "source", "examples"}; {} = none
    calibration: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def layer_ids(self) -> list[str]:
        return lora.layer_ids(self.architecture.n_layers, self.lora.targets)

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """Canonical key -> shape; A: (r, in), B: (out, r)."""
        shapes: dict[str, tuple[int, int]] = {}
        for lid in self.layer_ids:
            layer, module = lora.split_layer_id(lid)
            d_in, d_out = self.architecture.in_out(module)
            shapes[lora.key(layer, module, "A")] = (self.lora.rank, d_in)
            shapes[lora.key(layer, module, "B")] = (d_out, self.lora.rank)
        return shapes

    def delta_shapes(self) -> dict[str, tuple[int, int]]:
        """Layer id -> (out, in) of the dense adapter product."""
        out: dict[str, tuple[int, int]] = {}
        for lid in self.layer_ids:
            d_in, d_out = self.architecture.in_out(lora.split_layer_id(lid)[1])
            out[lid] = (d_out, d_in)
        return out

    def to_json(self) -> str:
        body = asdict(self)
        body["lora"]["targets"] = list(self.lora.targets)
        body["lora"]["shapes"] = {k: list(v) for k, v in self.lora_shapes().items()}
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("schema_version") != SCHEMA_VERSION:
                raise BundleError(
                    f"{source}: schema_version is {raw.get('schema_version')!r}, expected {SCHEMA_VERSION}"
                )
            lo = dict(raw["lora"])
            lo.pop("shapes", None)
            return cls(
                base_id=raw["base_id"],
                base_sha256=raw["base_sha256"],
                architecture=Architecture(**raw["architecture"]),
                lora=LoraLayout(
                    targets=lora.check_targets(lo["targets"]),
                    rank=int(lo["rank"]),
                    alpha=float(lo["alpha"]),
                ),
                train_quantization=raw["train_quantization"],
                files=dict(raw.get("files", {})),
                tokenizer=dict(raw.get("tokenizer", {})),
                gguf_quantization=raw.get("gguf_quantization", "F32"),
                calibration=dict(raw.get("calibration", {})),
                schema_version=raw["schema_version"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{source}: malformed manifest ({exc!r})") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load(bundle: Path) -> Manifest:
    path = Path(bundle) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST_NAME}; is this a bundle written by `alignfed export`?")
    return Manifest.from_json(path.read_text(), source=str(path))


def save(bundle: Path, manifest: Manifest) -> Path:
    return atomic.write_text(Path(bundle) / MANIFEST_NAME, manifest.to_json())


def verify(bundle: Path, manifest: Manifest) -> None:
    """Check that every file listed in the manifest exists with its recorded sha256."""
    for rel, digest in sorted(manifest.files.items()):
        path = Path(bundle) / rel
        if not path.is_file():
            raise BundleError(f"{bundle}: missing file {rel} listed in {MANIFEST_NAME}")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(f"{bundle}: {rel} has sha256 {actual[:12]}…, manifest says {digest[:12]}…")


def bundle_digest(manifest: Manifest) -> str:
    """Identity of a bundle: sha256 over its sorted file hashes (goes into every message)."""
    h = hashlib.sha256()
    for rel, digest in sorted(manifest.files.items()):
        h.update(f"{rel}={digest}\n".encode())
    return h.hexdigest()
