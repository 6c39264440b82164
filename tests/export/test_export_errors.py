"""Unsupported inputs fail early with messages that say what is supported; HF config variants
(transformers-5 rope_parameters, bf16 / fp16 weights, shards) are read correctly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from alignfed import manifest as mf
from alignfed.errors import ExportError
from export.bundle import export_bundle
from export.hf_source import read_hf_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_unsupported_model_type_names_the_supported_ones(tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dir, tmp_path / "m")
    _edit_config(model, model_type="gpt2")
    with pytest.raises(ExportError, match=r"model_type 'gpt2' is not supported; supported: llama"):
        export_bundle(model, tmp_path / "out", write_gguf=None)
    assert not (tmp_path / "out" / mf.MANIFEST_NAME).exists()


def test_unknown_lora_target_names_the_supported_ones(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"unsupported LoRA target.*'attn'.*supported: q, k, v, o, gate, up, down"):
        export_bundle(tiny_dir, tmp_path / "out", targets=("q", "attn"), write_gguf=None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope type 'llama3' is not supported"),
        ({"hidden_act": "gelu"}, r"hidden_act is 'gelu', only 'silu' is supported"),
        ({"head_dim": 32}, r"head_dim 32 differs"),
        ({"num_hidden_layers": None}, r"missing field 'num_hidden_layers'"),
        ({"vocab_size": 999}, r"model.embed_tokens.weight' has shape \(320, 64\), expected \(999, 64\)"),
    ],
)
def test_config_problems_name_the_field(
    tiny_dir: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    model = _copy(tiny_dir, tmp_path / "m")
    _edit_config(model, **changes)
    with pytest.raises(ExportError, match=message):
        read_hf_model(model)


def test_transformers5_rope_parameters_and_half_precision_shards(tiny_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file as save_torch

    model = _copy(tiny_dir, tmp_path / "m")
    _edit_config(model, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    weights = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    bf16 = {n: torch.from_numpy(weights[n]).to(torch.bfloat16) for n in names[: len(names) // 2]}
    fp16 = {n: weights[n].astype(np.float16) for n in names[len(names) // 2 :]}
    save_torch(bf16, str(model / "model-00001-of-00002.safetensors"))
    save_file(fp16, str(model / "model-00002-of-00002.safetensors"))
    index = {
        "weight_map": {
            **{n: "model-00001-of-00002.safetensors" for n in bf16},
            **{n: "model-00002-of-00002.safetensors" for n in fp16},
        }
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))

    arch, got = read_hf_model(model)
    assert arch.rope_theta == 5e5
    assert all(v.dtype == np.float32 for v in got.values())
    for n in bf16:
        np.testing.assert_array_equal(got[n], bf16[n].float().numpy())
    for n in fp16:
        np.testing.assert_array_equal(got[n], fp16[n].astype(np.float32))
