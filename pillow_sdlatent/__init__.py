"""Pillow plugin for ``.sdl``: photos stored as quantized Stable Diffusion latents.

``import pillow_sdlatent`` registers the format (and changes nothing else in Pillow);
``register()`` does it explicitly. ``save(image, path)`` writes a file atomically.
"""

from __future__ import annotations

from typing import Any

from .SdlImagePlugin import register, save

__all__ = ["decode_file", "decode_files", "encode_image", "encode_images", "read_latent", "register", "save"]
__version__ = "0.1.0"

register()


def __getattr__(name: str) -> Any:
    """Codec functions load on first use, so that importing the plugin stays cheap."""
    if name in ("read_latent", "encode_image", "encode_images", "decode_file", "decode_files"):
        from . import codec

        return getattr(codec, name)
    raise AttributeError(f"module 'pillow_sdlatent' has no attribute {name!r}")
