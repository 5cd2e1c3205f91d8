"""Pillow plugin for ``.sdl``: photos stored as quantized Stable Diffusion latents.

``import pillow_sdlatent`` registers the format; ``register()`` does it explicitly.
"""

from __future__ import annotations

from typing import Any

from .SdlImagePlugin import register

__all__ = ["clear_cache", "decode_file", "decode_files", "encode_image", "encode_images", "read_latent", "register"]
__version__ = "0.1.0"

register()


def __getattr__(name: str) -> Any:
    """Codec functions load on first use, so that importing the plugin stays cheap."""
    if name in ("read_latent", "encode_image", "encode_images", "decode_file", "decode_files"):
        from . import codec

        return getattr(codec, name)
    if name == "clear_cache":
        from .models import clear_cache

        return clear_cache
    raise AttributeError(f"module 'pillow_sdlatent' has no attribute {name!r}")
