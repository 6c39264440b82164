"""ORT's AdamW update in numpy, with its state held by the caller.

In onnxruntime-training 1.19 the AdamW moments and step count live in the `CheckpointState`, and
the Python API cannot reset them, so whoever needs to own optimizer state (the simulator's shared
session; the PyTorch backend, which must step exactly like the ORT one) applies this update to
gradients computed elsewhere. Hyper-parameters come from the bundle's `optimizer_model.onnx`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignfed.errors import BundleError


@dataclass(frozen=True, slots=True)
class AdamW:
    """ORT's `AdamWOptimizer` (com.microsoft) update, float32 like the CPU kernel.

    adam_mode 1 (Hugging Face): m ← αm + (1−α)g, v ← βv + (1−β)g², w ← w − lr_c·m/(√v + ε),
    w ← w − lr·wd·w, with lr_c = lr·√(1−βᵗ)/(1−αᵗ). adam_mode 0 (PyTorch): weight decay first,
    then w ← w − lr·m / ((1−αᵗ)(√(v/(1−βᵗ)) + ε)).
    """

    alpha: float = 0.9  # β₁
    beta: float = 0.999  # β₂
    epsilon: float = 1e-6
    weight_decay: float = 0.0
    adam_mode: int = 1
    correct_bias: bool = True

    @classmethod
    def from_model(cls, path: Path) -> AdamW:
        """Hyper-parameters of the bundle's optimizer model; ORT's generate_artifacts defaults
        (those above) when the `onnx` package is not installed."""
        try:
            import onnx
            from onnx import helper
        except ImportError:
            return cls()
        if not Path(path).is_file():
            raise BundleError(f"{path}: missing optimizer model; re-export the bundle with `alignfed export`")
        nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "AdamWOptimizer"]
        if len(nodes) != 1:
            ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
            raise BundleError(f"{path}: expected one AdamWOptimizer node, found ops {ops}")
        attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
        return cls(
            alpha=float(attrs.get("alpha", 0.9)),
            beta=float(attrs.get("beta", 0.999)),
            epsilon=float(attrs.get("epsilon", 1e-8)),
            weight_decay=float(attrs.get("weight_decay", 0.0)),
            adam_mode=int(attrs.get("adam_mode", 0)),
            correct_bias=bool(attrs.get("correct_bias", 1)),
        )

    def update(
        self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], moments: Moments, lr: float
    ) -> dict[str, np.ndarray]:
        """One step: new parameters; `moments` advance in place."""
        f = np.float32
        moments.step += 1
        a, b, eps, wd, lr32 = f(self.alpha), f(self.beta), f(self.epsilon), f(self.weight_decay), f(lr)
        a_corr = b_corr = f(1.0)
        lr_corr = lr32
        if self.correct_bias:  # the kernel computes std::pow in double, then casts to float
            a_corr = f(1.0) - f(math.pow(float(a), moments.step))
            b_corr = f(1.0) - f(math.pow(float(b), moments.step))
            lr_corr = lr32 * f(np.sqrt(b_corr)) / a_corr
        out: dict[str, np.ndarray] = {}
        for name, w in params.items():
            g = grads[name]
            w = np.asarray(w, dtype=np.float32)
            if self.adam_mode == 0:
                w = w - w * lr32 * wd
            m1 = moments.m1[name] = a * moments.m1[name] + (f(1.0) - a) * g
            m2 = moments.m2[name] = b * moments.m2[name] + (f(1.0) - b) * g * g
            if self.adam_mode == 0:
                w = w - (lr32 * m1) / (a_corr * (np.sqrt(m2 / b_corr) + eps))
            else:
                w = w - lr_corr * m1 / (np.sqrt(m2) + eps)
                w = w - lr32 * wd * w
            out[name] = w.astype(np.float32, copy=False)
        return out


@dataclass(slots=True)
class Moments:
    """AdamW state: first/second moments per LoRA tensor and the step count."""

    m1: dict[str, np.ndarray] = field(default_factory=dict)
    m2: dict[str, np.ndarray] = field(default_factory=dict)
    step: int = 0

    @classmethod
    def zeros(cls, shapes: Mapping[str, tuple[int, ...]]) -> Moments:
        return cls(
            m1={n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()},
            m2={n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()},
        )
