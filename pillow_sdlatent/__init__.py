"""Pillow plugin for ``.sdl``: photos stored as quantized Stable Diffusion latents.

``import pillow_sdlatent`` registers the format (and changes nothing else in Pillow);
``register()`` does it explicitly. ``save(image, path)`` writes a file atomically.
"""

from __future__ import annotations

from typing import Any

from .SdlImagePlugin import register, save

__all__ = ["clear_cache", "decode_file", "decode_files", "encode_image", "encode_images", "read_latent", "register",
           "save"]
__version__ = "0.2.0"

register()


def __getattr__(name: str) -> Any:
    """The codec functions load on first use, so that importing the plugin stays cheap."""
    if name == "read_latent":
        from .core.read import read_latent

        return read_latent
    if name in ("encode_image", "encode_images", "decode_file", "decode_files"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "clear_cache":
        from .models import clear_cache

        return clear_cache
    raise AttributeError(f"module 'pillow_sdlatent' has no attribute {name!r}")
