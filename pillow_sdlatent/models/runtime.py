"""Where and how the networks run: the device (CUDA, MPS, CPU) and the runtime (ONNX Runtime or torch).

torch is an extra (``pillow_sdlatent[torch]``): nothing here imports it unless the torch runtime or a
device check needs it, and then a missing torch says which install brings it.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from ..core.registry import ModelSpec

if TYPE_CHECKING:
    import torch


DEVICE_ENV = "PILLOW_SDLATENT_DEVICE"
RUNTIME_ENV = "PILLOW_SDLATENT_RUNTIME"
RUNTIMES = ("torch", "onnxruntime")
TORCH_EXTRA = "pip install 'pillow_sdlatent[torch]'"


def import_torch(purpose: str) -> ModuleType:
    """torch, or an ImportError that says which install brings it."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"{purpose} needs torch: {TORCH_EXTRA}") from exc
    return torch


def resolve_device(device: str | None = None) -> str:
    """The explicit device, else $PILLOW_SDLATENT_DEVICE, else CUDA, MPS, CPU in that order.

    Without torch installed, or on a Linux machine without the NVIDIA driver, only the CPU exists,
    and it is chosen without importing torch.
    """
    choice = device or os.environ.get(DEVICE_ENV) or ""
    if choice == "cpu":
        return choice
    if choice:
        torch = import_torch(f"device {choice!r}")
        try:
            torch.device(choice)
        except RuntimeError:
            raise ValueError(f"unknown device {choice!r}") from None
        return choice
    if not _accelerator_possible():
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _accelerator_possible() -> bool:
    """False where no GPU can exist, known without importing torch (about 4 s on a small CPU): a Linux
    machine with neither the NVIDIA driver nor ROCm's device has no CUDA (and no MPS). Elsewhere only
    torch can tell."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd")


def default_dtype(device: str) -> torch.dtype:
    """Half precision on CUDA, where both the TAESDs and the SD 1.x VAE are stable in it."""
    import torch

    return torch.float16 if device.startswith("cuda") else torch.float32


def resolve_runtime(spec: ModelSpec, device: str, runtime: str | None = None) -> str:
    """The explicit runtime, else $PILLOW_SDLATENT_RUNTIME, else ONNX Runtime where it applies, else torch.

    ONNX Runtime runs the TAESD family on the CPU (measured faster there, see
    ``ort_engine``, and it needs no torch); elsewhere, or when it is not installed,
    torch runs everything. A wish for ``onnxruntime`` where it does not apply falls back to torch.
    """
    choice = runtime or os.environ.get(RUNTIME_ENV) or ""
    if choice and choice not in RUNTIMES:
        raise ValueError(f"unknown runtime {choice!r}; choose one of {RUNTIMES}")
    if choice == "torch" or device != "cpu" or spec.family != "tiny":
        return "torch"
    from . import ort_engine

    if ort_engine.available():
        return "onnxruntime"
    if choice:
        raise ImportError("runtime 'onnxruntime' needs the onnxruntime package: pip install onnxruntime")
    return "torch"
