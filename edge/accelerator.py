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

from alignfed.errors import TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Placement:
    device: str  # "cpu" | "cuda"
    compute_dtype: str  # dtype of the frozen base and its products: "float32" | "bfloat16" | "float16"
    reason: str  # why this placement, for the log and the device's status

    def dtype(self, torch: Any) -> Any:
        return getattr(torch, self.compute_dtype)


ACCELERATORS = ("auto", "cpu", "cuda")


def choose(torch: Any, wanted: str, *, half: bool = True, strict: bool = False) -> Placement:
    """The placement for `wanted` ("cpu" | "cuda", a profile's `accelerator`; "auto": CUDA when
    this torch sees a GPU) given what this torch sees.

    `half`: a GPU holds the frozen base in bf16 / fp16 (the daemon); without, in float32 (the
    simulator's batched trainer, whose results must match ORT's). `strict`: CUDA asked for and
    not there is an error instead of a logged fallback to the CPU."""
    if wanted not in ACCELERATORS:
        raise TrainingError(f"accelerator {wanted!r}; expected one of {', '.join(ACCELERATORS)}")
    if wanted == "cpu":
        return Placement("cpu", "float32", "the profile trains on the CPU")
    if not torch.cuda.is_available():
        if wanted == "auto":
            return Placement("cpu", "float32", "no CUDA GPU: training on the CPU")
        built = getattr(torch.version, "cuda", None)
        why = (
            f"torch {torch.__version__} is a CPU build (install JetPack's torch: scripts/setup-device.sh --jetson)"
            if not built
            else f"torch {torch.__version__} (CUDA {built}) finds no usable GPU"
        )
        if strict:
            raise TrainingError(f"CUDA was asked for, but {why}")
        placement = Placement("cpu", "float32", f"the profile asks for CUDA but {why}; training on the CPU")
        log.warning("%s", placement.reason)
        return placement
    name = torch.cuda.get_device_name(0)
    if not half:
        return Placement("cuda", "float32", f"training on {name} (float32)")
    dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return Placement("cuda", dtype, f"training on {name} ({dtype} base, fp32 LoRA and optimizer state)")
