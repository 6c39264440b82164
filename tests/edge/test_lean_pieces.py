"""The lean trainer's pieces against their plain PyTorch / onnx counterparts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from edge.chunked_loss import chunked_head_loss
from edge.lean_linear import Int8Rows, Int8Weight, int8_matmul
from edge.onnx_weights import read_initializers


@pytest.mark.parametrize("softcap", [None, 5.0])  # 5: logits here reach ~±15, so the cap bends most
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_and_gradient_match_full_cross_entropy(chunk: int, softcap: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=g, dtype=torch.float32, requires_grad=True)  # (N, H)
    head = torch.randn(50, 16, generator=g)  # (V, H)
    labels = torch.randint(0, 50, (23,), generator=g)
    labels[[2, 9, 10]] = -100
    logits = h @ head.T
    if softcap is not None:  # Gemma's final_logit_softcapping, as transformers writes it
        logits = torch.tanh(logits / softcap) * softcap
    want = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    (want_grad,) = torch.autograd.grad(want * 3.0, h)
    got = chunked_head_loss(h, head, labels, chunk, softcap=softcap)
    (got_grad,) = torch.autograd.grad(got * 3.0, h)  # an upstream factor reaches dh
    # float32, different summation order only: 1e-6 relative on the loss, 1e-6 absolute on dh
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert float(got_grad[[2, 9, 10]].abs().max()) == 0.0  # ignored rows get no gradient


@pytest.mark.parametrize("tile_weights", [1 << 20, 24, 30])  # whole; tiles of 2, 2, 2, 1 columns; of 3, 3, 1
def test_int8_matmul_matches_dequantized_weight_and_keeps_nothing_else(
    tile_weights: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.lean_linear

    monkeypatch.setattr(edge.lean_linear, "TILE_WEIGHTS", tile_weights)
    rng = np.random.default_rng(0)
    q_t = rng.integers(-127, 128, (12, 7)).astype(np.int8)  # (in, out)
    scale = rng.uniform(0.01, 0.1, 7).astype(np.float32)
    w = Int8Weight.from_numpy(q_t, scale)
    dense = torch.from_numpy(q_t.astype(np.float32) * scale)  # DequantizeLinear(axis=1)
    x = torch.randn(3, 5, 12, requires_grad=True)
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = int8_matmul(x, w)
    assert {t.dtype for t in saved} <= {torch.int8, torch.float32} and sum(t.numel() for t in saved) == 12 * 7 + 7
    torch.testing.assert_close(y, x @ dense)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.ones(3, 5, 7) @ dense.T)
    with pytest.raises(ValueError, match="int8 weight expected"):
        Int8Weight.from_numpy(q_t.astype(np.int16), scale)


def test_initializer_reader_matches_onnx_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors: dict[str, np.ndarray] = {
        "w.T.int8": rng.integers(-127, 128, (300, 40)).astype(np.int8),
        "w.scale": rng.random(40).astype(np.float32),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.array(1.5, np.float32),
        "big": rng.standard_normal((64, 64)).astype(np.float32),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    inits.append(helper.make_tensor("listed", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))  # float_data
    tensors["listed"] = np.array([1.0, 2.0, 3.0], np.float32)
    node = helper.make_node("Identity", ["scalar"], ["out"])
    out = helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [])
    model = helper.make_model(helper.make_graph([node], "g", [], [out], initializer=inits))
    inline, external = tmp_path / "inline.onnx", tmp_path / "external.onnx"
    onnx.save_model(model, str(inline))
    onnx.save_model(model, str(external), save_as_external_data=True, location="external.onnx.data", size_threshold=64)
    for path in (inline, external):
        got = dict(read_initializers(path))
        assert sorted(got) == sorted(tensors)
        for name, want in tensors.items():
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            np.testing.assert_array_equal(got[name], want, err_msg=f"{path.name}: {name}")
    assert sorted(dict(read_initializers(inline, lambda n: n.startswith("w.")))) == ["w.T.int8", "w.scale"]


def test_int8_rows_round_each_entry_by_at_most_half_a_step() -> None:
    w = torch.randn(50, 24) * torch.linspace(0.01, 3.0, 50)[:, None]  # rows of very different ranges
    w[7] = 0.0  # an all-zero row stays zero
    t = Int8Rows.quantize(w)
    assert t.q.dtype == torch.int8 and t.nbytes == 50 * 24 + 4 * 50  # a quarter of float32, plus scales
    back = torch.cat([block for _, block in t.blocks()])
    assert torch.all((back - w).abs() <= t.scale[:, None] / 2 + 1e-7)
    assert torch.equal(back[7], torch.zeros(24))
    ids = torch.tensor([[3, 7], [49, 0]])
    assert torch.equal(t.rows(ids), back[ids])  # the lookup is the same dequantization


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_loss_reads_an_int8_head_block_by_block(monkeypatch: pytest.MonkeyPatch, softcap: float | None) -> None:
    """The int8 head gives the loss and gradient of its dequantized float32 table (blocks of 7 rows
    here, so the 50-row vocabulary spans a partial last block)."""
    monkeypatch.setattr(Int8Rows, "BLOCK", 7)
    g = torch.Generator().manual_seed(0)
    head = Int8Rows.quantize(torch.randn(50, 16, generator=g))
    dense = torch.cat([block for _, block in head.blocks()])
    labels = torch.randint(0, 50, (12,), generator=g)
    labels[3] = -100
    h1 = torch.randn(12, 16, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    got = chunked_head_loss(h1, head, labels, 5, softcap=softcap)
    want = chunked_head_loss(h2, dense, labels, 5, softcap=softcap)
    got.backward()
    want.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert h1.grad is not None and h2.grad is not None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
