"""Save options as one validated object: every bad value is a ``ValueError`` before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .core import coders, container, quantize
from .core.registry import DEFAULT_MODEL, get_spec
from .enhance.effort import ITERATIONS, MAX_EFFORT


@dataclass(frozen=True)
class EncodeOptions:
    """Validated save options; ``ValueError`` for a bad value.

    At most one rate setting: ``quality`` (1..100), ``bpp`` (bits per pixel of
    the whole file) or ``max_bytes``; ``quality`` 75 when none is given.
    """

    quality: int | None = None
    bpp: float | None = None
    max_bytes: int | None = None
    model: str = DEFAULT_MODEL
    model_fixed: bool = False
    effort: int = 0
    coder: str | None = None  # None: the model's default (coders.default_coder)
    device: str | None = None
    weights: str | None = None
    scale: float | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EncodeOptions:
        quality, bpp, max_bytes = info.get("quality"), info.get("bpp"), info.get("max_bytes")
        if sum(value is not None for value in (quality, bpp, max_bytes)) > 1:
            raise ValueError("give at most one of quality, bpp and max_bytes")
        if quality is not None:
            quantize.step_for_quality(quality)
        if bpp is not None and (isinstance(bpp, bool) or not isinstance(bpp, (int, float)) or not 0 < bpp <= 64):
            raise ValueError(f"bpp must be a number in (0, 64], not {bpp!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive integer, not {max_bytes!r}")
        if bpp is None and max_bytes is None and quality is None:
            quality = quantize.DEFAULT_QUALITY
        model = info.get("model")
        get_spec(model or DEFAULT_MODEL)
        effort = info.get("effort", 0)
        if isinstance(effort, bool) or not isinstance(effort, int) or effort not in ITERATIONS:
            raise ValueError(f"effort must be an integer in 0..{MAX_EFFORT}, not {effort!r}")
        coder = info.get("coder") or None
        if coder is not None:
            coders.get_coder(coder)
        device = info.get("device")
        if device is not None and not isinstance(device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda', not {device!r}")
        weights = info.get("weights")
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise ValueError(f"weights must be a path, not {weights!r}")
        scale = info.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not 0 < scale <= 1):
            raise ValueError(f"scale must be a number in (0, 1], not {scale!r}")
        return cls(quality, None if bpp is None else float(bpp), max_bytes, model or DEFAULT_MODEL,
                   model is not None, effort, coder, device, os.fspath(weights) if weights else None,
                   None if scale is None else float(scale))


def metadata_from(image: Image.Image, info: dict[str, Any]) -> dict[str, bytes]:
    """EXIF, ICC and XMP from the save options, else kept from ``image.info``."""
    metadata: dict[str, bytes] = {}
    for key in container.METADATA_CHUNKS.values():
        value = info[key] if key in info else image.info.get(key)
        if value is None or value == b"" or value == "":
            continue
        if isinstance(value, Image.Exif):
            value = value.tobytes()
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"{key} must be bytes, not {type(value).__name__}")
        metadata[key] = bytes(value)
    return metadata
