"""`alignfed simulate --save-adapters --save-every N --perplexity FILE` on the tiny model.

Real llama.cpp: the saved GGUF LoRA on the bundle's F32 GGUF base must give the perplexity the
PyTorch network (the bundle's training network) gives with the same adapter on the same tokens.
Tolerance rel 2e-3: llama.cpp's F32 matmuls sum in another order and its softmax/RMSNorm differ
in the last bits (DESIGN.md section 10: ~1e-6 on logits with an F32 KV cache); the adapter moves
the loss by far more than that (checked), so a wrong or unapplied adapter fails.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from alignfed import manifest as mf
from alignfed.gguf_adapter import gguf_tensors
from simulator.cli import add_simulate_parser

HELD_OUT = "\n\n".join(
    f"The {w} sensor at station {i} reports {i * 7} readings every hour." for i, w in enumerate(["quiet", "remote"] * 6)
)


@pytest.fixture(scope="module")
def run(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    from simulator import report

    patch = pytest.MonkeyPatch()  # no PNG plots: tested with the report, slow to draw
    patch.setattr(report, "write_plots", lambda *_: [])
    work = tmp_path_factory.mktemp("saved")
    text = work / "held_out.txt"
    text.write_text(HELD_OUT)
    parser = argparse.ArgumentParser(prog="alignfed")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    out = work / "report"
    args = parser.parse_args(
        [
            *("simulate", "--bundle", str(tiny_bundle), "--devices", "3", "--classes", "2", "--local-steps", "2"),
            *("--batch", "2", "--seq-len", "16", "--lr", "0.05", "--strategies", "fedbuff,fedasync", "--horizon", "8"),
            *("--max-versions", "4", "--eval-examples", "3", "--train-examples", "12", "--eval-seq-len", "24"),
            *("--trainer", "batched", "--no-progress", "--out", str(out), "--save-adapters", "--save-every", "2"),
            *("--perplexity", str(text)),
        ]
    )
    try:
        assert args.fn(args) == 0
    finally:
        patch.undo()
    yield out, text


def test_final_and_every_nth_adapter_are_saved(run: tuple[Path, Path], tiny_bundle: Path) -> None:
    out, _ = run
    m = mf.load(tiny_bundle)
    for variant in ("fedbuff", "fedasync"):
        folder = out / "adapters" / variant
        assert sorted(p.name for p in folder.iterdir()) == [
            "final.gguf",
            "final.safetensors",
            "v00002.gguf",
            "v00002.safetensors",
            "v00004.gguf",
            "v00004.safetensors",
        ]
        with safe_open(str(folder / "final.safetensors"), "np") as f:
            meta = f.metadata()
            final = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        assert meta["version"] == "4" and meta["variant"] == variant and meta["bundle"] == mf.bundle_digest(m)
        assert set(final) == set(m.lora_shapes())
        assert any(np.abs(final[k]).max() > 0 for k in final if k.endswith(".B"))  # trained away from B = 0
        import gguf

        reader = gguf.GGUFReader(str(folder / "final.gguf"))
        written = {t.name: np.asarray(t.data) for t in reader.tensors}
        for name, t in gguf_tensors(final, m.architecture, m.lora).items():
            np.testing.assert_array_equal(written[name].reshape(t.shape), t)


def test_perplexity_through_llama_cpp_matches_the_network(run: tuple[Path, Path], tiny_bundle: Path) -> None:
    from edge.torch_network import TorchNetwork, import_torch
    from runtime.llama import Generator
    from simulator.perplexity import token_windows

    out, _ = run
    table = (out / "perplexity.md").read_text()
    row = r"^\| (base model|fedbuff|fedasync) \| \d+ \| [\d.]+ \| ([\d.]+) \|"
    got = {m[0]: float(m[1]) for m in re.findall(row, table, re.M)}
    assert set(got) == {"base model", "fedbuff", "fedasync"}
    torch = import_torch()
    m = mf.load(tiny_bundle)
    net = TorchNetwork(tiny_bundle, m)
    with Generator(tiny_bundle / mf.BASE_GGUF, n_ctx=256) as gen:
        wins = token_windows([p for p in HELD_OUT.split("\n\n")], gen.tokenize, 256, 4096)

    def ppl(tensors: dict[str, np.ndarray]) -> float:
        params = {k: torch.from_numpy(np.asarray(v, np.float32))[None] for k, v in tensors.items()}
        with torch.no_grad():
            losses = [float(net.losses(np.array([w]), np.array([w]), params)[0]) for w in wins]
        weights = np.array([len(w) - 1 for w in wins], dtype=np.float64)
        return float(np.exp(np.dot(losses, weights) / weights.sum()))

    zero = {k: np.zeros(s, np.float32) for k, s in m.lora_shapes().items()}
    assert got["base model"] == pytest.approx(ppl(zero), rel=2e-3)
    with safe_open(str(out / "adapters" / "fedbuff" / "final.safetensors"), "np") as f:
        final = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert got["fedbuff"] == pytest.approx(ppl(final), rel=2e-3)
    assert abs(got["fedbuff"] - got["base model"]) > 10 * 2e-3 * got["base model"]  # the adapter mattered
