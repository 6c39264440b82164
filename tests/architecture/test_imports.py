"""Each heavy dependency is imported by exactly the modules allowed to (DESIGN.md section 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("alignfed", "coordinator", "dashboard", "demo", "edge", "export", "runtime", "simulator")

# dependency -> modules (relative paths) allowed to import it; None = only the packages listed
ALLOWED: dict[str, set[str] | tuple[str, ...]] = {
    # the PyTorch network (aarch64 devices, batched simulator) and its lean pieces
    "torch": ("export/", "edge/torch_network.py", "edge/lean_linear.py", "edge/chunked_loss.py"),
    "transformers": ("export/",),
    "llama_cpp": {"runtime/llama.py", "export/gguf_quant.py"},  # serving; llama.cpp's own quantizer
    "paho": {"alignfed/transport.py"},
    # optimizer hyper-parameters (edge/adamw.py); base weights of the PyTorch backend
    "onnx": ("export/", "edge/adamw.py", "edge/torch_network.py", "edge/onnx_weights.py"),
    "amqtt": {"demo/broker.py"},
    # the dashboard's web stack and metrics stay inside it
    "starlette": {"dashboard/server.py"},
    "uvicorn": {"dashboard/server.py"},
    "prometheus_client": {"dashboard/metrics.py"},
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def allowed(dep: str, rel: str) -> bool:
    rule = ALLOWED[dep]
    if isinstance(rule, set):
        return rel in rule
    return any(rel.startswith(prefix) for prefix in rule)


@pytest.mark.parametrize("dep", sorted(ALLOWED))
def test_dependency_boundaries(dep: str) -> None:
    rels = [str(p.relative_to(ROOT)) for p in sources()]
    offenders = [r for p, r in zip(sources(), rels, strict=True) if dep in imports(p) and not allowed(dep, r)]
    assert not offenders, f"{dep} imported outside its allowed modules: {offenders}"


def training_imports(path: Path) -> bool:
    """Whether a module imports `onnxruntime.training` (absent on aarch64)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        if any(n.startswith("onnxruntime.training") for n in names):
            return True
    return False


def test_coordinator_and_core_need_only_ort_inference() -> None:
    """The coordinator runs on aarch64 gateways, where only plain onnxruntime (inference) exists."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in sources()
        if str(p.relative_to(ROOT)).startswith(("alignfed/", "coordinator/")) and training_imports(p)
    ]
    assert not offenders, offenders
