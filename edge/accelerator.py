"""Where the torch trainer backend trains: the CPU, or a CUDA GPU (Jetson) when the profile allows it.

On the GPU the frozen base is stored and multiplied in half precision (bf16 where the GPU has it,
i.e. Ampere and newer such as the Orin; fp16 on the Nano's Maxwell), which halves its memory in the
board's shared RAM; the LoRA factors, their gradients and the AdamW state stay fp32 so updates keep
the precision the coordinator aggregates in. Anything else falls back to the CPU in fp32 with the
reason logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Placement:
    device: str  # "cpu" | "cuda"
    compute_dtype: str  # dtype of the frozen base and its products: "float32" | "bfloat16" | "float16"
    reason: str  # why this placement, for the log and the device's status

    def dtype(self, torch: Any) -> Any:
        return getattr(torch, self.compute_dtype)


def choose(torch: Any, wanted: str) -> Placement:
    """The placement for a profile's `accelerator` ("cpu" | "cuda") given what this torch sees."""
    if wanted == "cpu":
        return Placement("cpu", "float32", "the profile trains on the CPU")
    if wanted != "cuda":
        raise ValueError(f"accelerator {wanted!r}; expected 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        built = getattr(torch.version, "cuda", None)
        why = (
            f"torch {torch.__version__} is a CPU build (install JetPack's torch: scripts/setup-device.sh --jetson)"
            if not built
            else f"torch {torch.__version__} (CUDA {built}) finds no usable GPU"
        )
        placement = Placement("cpu", "float32", f"the profile asks for CUDA but {why}; training on the CPU")
        log.warning("%s", placement.reason)
        return placement
    name = torch.cuda.get_device_name(0)
    half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return Placement("cuda", half, f"training on {name} ({half} base, fp32 LoRA and optimizer state)")
