"""Save and decode options as typed, validated values: a bad or unknown option is a ``ValueError`` where it
is given, before any work starts.

Cheap to import (no numpy, no torch): the plugin builds ``DecodeOptions`` for every opened image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from PIL import Image

from .core import container
from .core.registry import DEFAULT_MODEL, get_spec


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
    faces: bool = False  # code the faces OpenCV finds with finer steps (``faces``)

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EncodeOptions:
        from .core import coders, quantize
        from .enhance.effort import ITERATIONS, MAX_EFFORT

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
        from . import faces as face_finder

        faces = info.get("faces")
        if faces is not None and not isinstance(faces, bool):
            raise ValueError(f"faces must be True, False or None (find them where OpenCV is installed), not {faces!r}")
        if faces and not face_finder.available():
            raise ValueError("faces=True needs OpenCV: pip install 'pillow_sdlatent[faces]'")
        return cls(quality, None if bpp is None else float(bpp), max_bytes, model or DEFAULT_MODEL,
                   model is not None, effort, coder, device, os.fspath(weights) if weights else None,
                   None if scale is None else float(scale), face_finder.available() if faces is None else faces)


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


#: the arithmetic of the decoder (``LatentModel.decoding_in``)
PRECISIONS = ("auto", "float32", "int8")


@dataclass(frozen=True)
class DecodeOptions:
    """How ``load()`` and ``decode_file`` decode a file; ``ValueError`` for a bad value.

    ``model``: a compatible model instead of the file's own (e.g. ``sd-vae`` for a
    ``taesd`` file); ``device``: ``cpu``, ``cuda``, ``mps`` (default: the best there
    is); ``weights``: a folder or ``.safetensors`` file; ``allow_digest_mismatch``:
    decode with other decoder weights than the file was written with (with a
    warning); ``restore``: the package's latent restorer where it was measured to
    help; ``denoise``: a Stable Diffusion 1.x model whose UNet denoises the latent
    first, with ``seed``; ``precision``: ``auto`` (the default: the int8 decoder where
    it was measured and the CPU computes it exactly, else float32; about 2.2x faster for
    about 0.03 dB on photos, text read as well: docs/speed/README.md, docs/fidelity/int8),
    ``float32`` or ``int8``.
    """

    model: str | None = None
    device: str | None = None
    weights: str | None = None
    allow_digest_mismatch: bool = False
    restore: bool = True
    denoise: str | None = None
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.model is not None:
            get_spec(self.model)
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda', not {self.device!r}")
        for name in ("weights", "denoise"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path or a model name, not {value!r}")
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        for name in ("allow_digest_mismatch", "restore"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {self.seed!r}")
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> DecodeOptions:
        """The options a dict (or keyword arguments) names; ``ValueError`` for a key that is not one."""
        known = [field.name for field in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown decode option {', '.join(map(repr, unknown))}; the options are {known}")
        return cls(**options)

    @classmethod
    def coerce(cls, options: DecodeOptions | Mapping[str, Any]) -> DecodeOptions:
        """``options`` itself, or the ``DecodeOptions`` a dict names."""
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"decode options are a dict or DecodeOptions, not {type(options).__name__}")
        return cls.from_mapping(options)
