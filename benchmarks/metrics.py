"""Full-reference image quality metrics shared by the benchmarks.

All functions take ``(H, W, 3)`` uint8 RGB arrays. :class:`ReferenceMetrics`
holds one reference image and scores many distorted versions of it, so the
reference's ST-LPIPS features are computed once instead of once per codec point.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

#: smallest side MS-SSIM accepts with its 5 scales and 11-pixel window
MSSSIM_MIN_SIDE = 161


def psnr(reference: np.ndarray, distorted: np.ndarray) -> float:
    """PSNR in dB over all RGB samples at 8 bits (inf for identical images)."""
    mse = np.mean((reference.astype(np.float64) - distorted.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) float 0..255; copies, because decoded arrays are often read-only views."""
    return torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None]


def ms_ssim(reference: np.ndarray, distorted: np.ndarray) -> float:
    """MS-SSIM on 0..255 RGB; NaN for images too small for its five scales."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    if min(reference.shape[:2]) < MSSSIM_MIN_SIDE:
        return float("nan")
    with torch.inference_mode():
        return float(_ms_ssim(_to_tensor(reference), _to_tensor(distorted), data_range=255))


def msssim_db(value: float) -> float:
    """MS-SSIM as -10 log10(1 - MS-SSIM): spreads out the crowded range near 1."""
    return float("inf") if value >= 1 else float(-10 * np.log10(1 - value))


def _import_stlpips() -> types.ModuleType:
    """``stlpips_pytorch.stlpips``, imported with stand-ins for the modules it needs only by name.

    ``stlpips.py`` imports ``torchsummary.summary`` (only for a debug print),
    ``pretrained_networks``/``invariant_networks`` import ``torchvision.models``
    (only for the non-shift-tolerant and SqueezeNet/ResNet trunks) and
    ``models_lpf.downsample``/``invariant_networks`` import ``IPython.embed``.
    A real module is used when it imports. Stand-ins raise if anything calls
    them, and leave ``sys.modules`` right after the import, so that later
    ``find_spec`` checks (diffusers probes for torchvision) see no fake package.
    """

    def unusable(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("stand-in from benchmarks/metrics.py; this stlpips path is not supported")

    stubs: dict[str, types.ModuleType] = {}
    for name, attr in (("torchsummary", "summary"), ("IPython", "embed"), ("torchvision", "models")):
        try:
            importlib.import_module(name)
            continue
        except Exception:  # missing, or e.g. a torchvision wheel built for another torch
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
        stubs[name] = types.ModuleType(name)
        setattr(stubs[name], attr, unusable)
    if "torchvision" in stubs:
        stubs["torchvision.models"] = stubs["torchvision"].models = types.ModuleType("torchvision.models")
    sys.modules.update(stubs)
    try:
        return importlib.import_module("stlpips_pytorch.stlpips")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


class STLPIPS:
    """Shift-tolerant LPIPS (Ghildyal & Liu 2022), lower is better.

    ``trunk="alex"`` is the benchmark's metric. ``"vgg"`` (the package ships that whole
    network too) is a second, independent perceptual network: training uses it, so that
    the benchmark does not score with the network a model was trained against.

    The package loads its weights with ``strict=False``, which would silently
    leave a random trunk if the file did not match; we load them again strictly
    (apart from ``lins.*``, which alias ``lin0..lin4``) to be sure.
    """

    def __init__(self, trunk: str = "alex") -> None:
        stlpips = _import_stlpips()
        self.net = stlpips.LPIPS(net=trunk, variant="shift_tolerant", verbose=False).eval()
        weights = Path(stlpips.__file__).parent / "weights" / "vST0.0" / f"{trunk}_shift_tolerant.pth"
        state = torch.load(weights, map_location="cpu", weights_only=True)
        result = self.net.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("lins.")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"ST-LPIPS weights do not match the network: {missing} {result.unexpected_keys}")
        # channels-last runs the full-resolution stride-1 first convolution about 30% faster on CPU
        self.net.requires_grad_(False).to(memory_format=torch.channels_last)

    def features(self, rgb: np.ndarray) -> list[torch.Tensor]:
        """Unit-normalised trunk activations of one image (what the distance compares)."""
        from stlpips_pytorch import utils

        with torch.inference_mode():
            x = self.net.scaling_layer(_to_tensor(rgb) / 127.5 - 1).contiguous(memory_format=torch.channels_last)
            return [utils.normalize_tensor(f) for f in self.net.net(x)]

    def distance(self, reference: list[torch.Tensor], rgb: np.ndarray) -> float:
        """Distance from precomputed reference features (same formula as ``LPIPS.forward``)."""
        with torch.inference_mode():
            total = 0.0
            for lin, ref, feat in zip(self.net.lins, reference, self.features(rgb), strict=True):
                total += float(lin((ref - feat) ** 2).mean())
            return total

    def __call__(self, reference: np.ndarray, distorted: np.ndarray) -> float:
        return self.distance(self.features(reference), distorted)


class ReferenceMetrics:
    """PSNR, MS-SSIM and ST-LPIPS of distorted images against one fixed reference."""

    def __init__(self, stlpips: STLPIPS, reference: np.ndarray) -> None:
        self.stlpips = stlpips
        self.reference = reference
        self.reference_features = stlpips.features(reference)

    def __call__(self, distorted: np.ndarray) -> dict[str, float]:
        if distorted.shape != self.reference.shape:
            raise ValueError(f"decoded shape {distorted.shape} != reference {self.reference.shape}")
        value = ms_ssim(self.reference, distorted)
        return {
            "psnr": psnr(self.reference, distorted),
            "msssim": value,
            "msssim_db": msssim_db(value),
            "stlpips": self.stlpips.distance(self.reference_features, distorted),
        }
