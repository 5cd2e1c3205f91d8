"""Decode options as one typed, validated value, so that a mistyped option fails where it is given.

Torch-free and cheap: the plugin builds one for every opened image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DecodeOptions:
    """How ``load()`` and ``decode_file`` decode a file; ``ValueError`` for a bad value.

    ``model``: a compatible model instead of the file's own (e.g. ``sd-vae`` for a
    ``taesd`` file); ``device``: ``cpu``, ``cuda``, ``mps`` (default: the best there
    is); ``weights``: a folder or ``.safetensors`` file; ``allow_digest_mismatch``:
    decode with other decoder weights than the file was written with (with a
    warning); ``restore``: the package's latent restorer where it was measured to
    help; ``denoise``: a Stable Diffusion 1.x model whose UNet denoises the latent
    first, with ``seed``.
    """

    model: str | None = None
    device: str | None = None
    weights: str | None = None
    allow_digest_mismatch: bool = False
    restore: bool = True
    denoise: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model is not None:
            from .models import get_spec

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
