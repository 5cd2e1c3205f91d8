"""The Pillow face of the codec: ``_accept``, the ``ImageFile`` subclass, the save handler.

Opening parses the header only (no torch, no numpy work); ``load()`` runs the
decoder. All real work lives in :mod:`pillow_sdlatent.pipeline`
(and :mod:`pillow_sdlatent.preview` for ``draft``).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable
from typing import IO, Any

from PIL import Image, ImageFile

from ._atomic import atomic_write
from .core import container

FORMAT = "SDL"
MIME = "image/x-sdl"
EXTENSION = ".sdl"


def _accept(prefix: bytes) -> bool:
    return container.check_signature(prefix)


class SdlImageFile(ImageFile.ImageFile):
    """An ``.sdl`` image. Set ``decode_options`` before ``load()`` to choose the decoder.

    ``decode_options`` takes ``model`` (a compatible model, e.g. ``sd-vae`` for a
    ``taesd`` file), ``device``, ``weights``, ``allow_digest_mismatch``, ``restore``
    (default True: the package's restorer where it helps) and ``denoise`` (a Stable
    Diffusion 1.x model whose UNet denoises the latent first, with ``seed``).
    """

    format = FORMAT
    format_description = "Stable Diffusion latent"

    def _open(self) -> None:
        self.layout = container.read_layout(self.fp)
        header = self.layout.header
        self._size = (header.width, header.height)
        self._mode = header.mode
        self.info.update(self.layout.metadata)
        self.info["sdl"] = {
            "version": "{}.{}".format(*self.layout.version),
            "model": header.model,
            "original_mode": header.original_mode,
            "latent_shape": header.latent_shape,
            "coded_size": header.coded,
            "quantizer": header.quantizer,
            "coder": header.coder,
        }
        self.decode_options: dict[str, Any] = {}
        self.preview = False
        self.tile = [ImageFile._Tile(FORMAT, (0, 0, *self._size), 0, (self,))]

    def load_prepare(self) -> None:
        """Pillow's pixel limit once more before the image memory is allocated.

        ``Image.open`` checked it already, but an ``SdlImageFile`` built directly
        was never checked.
        """
        container.check_pixel_limit(*self.size, warn=False)
        super().load_prepare()

    def draft(self, mode: str | None, size: tuple[int, int] | None) -> tuple[str, tuple[int, int, int, int]] | None:
        """At 1/8 scale or smaller, decode a preview straight from the latent, without the decoder.

        As JPEG's draft: the image becomes the smallest size Pillow can make
        cheaply that is still at least ``size``; ``thumbnail()`` calls this.
        """
        if not self.tile or size is None or self.preview:
            return None
        header = self.layout.header
        small = container.latent_size(header.width, header.height)
        if size[0] > small[0] or size[1] > small[1]:
            return None
        self.preview = True
        self._size = small
        self.tile = [ImageFile._Tile(FORMAT, (0, 0, *small), 0, (self,))]
        return self.mode, (0, 0, header.width, header.height)

    def thumbnail(self, size: tuple[float, float], resample: Image.Resampling = Image.Resampling.BICUBIC,
                  reducing_gap: float | None = 2.0) -> None:
        """A thumbnail at 1/8 scale or smaller starts from the latent preview, without the decoder.

        (Pillow's own ``thumbnail`` asks ``draft`` for ``reducing_gap`` times the
        size, which would rule out the 1/8 preview for thumbnails between 1/16 and 1/8.)
        """
        header = self.layout.header
        if self.tile and min(size[0] / header.width, size[1] / header.height) <= 1 / container.LATENT_FACTOR:
            self.draft(None, container.latent_size(header.width, header.height))
        super().thumbnail(size, resample, reducing_gap)

    @property
    def n_frames(self) -> int:
        return 1

    @property
    def is_animated(self) -> bool:
        return False

    def verify(self) -> None:
        """Check every CRC and the payload's presence without running the decoder."""
        if self.fp is None:
            raise RuntimeError("verify must be called directly after open")
        if not self.layout.complete or self.layout.payload_crc is None:
            raise container.DamagedFileError("SDL file is truncated")
        container.read_payload(self.fp, self.layout)
        super().verify()


class _SdlDecoder(ImageFile.PyDecoder):
    _pulls_fd = True

    def decode(self, buffer: bytes | Image.SupportsArrayInterface) -> tuple[int, int]:
        from . import pipeline, preview

        image_file: SdlImageFile = self.args[0]
        assert self.fd is not None
        truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
        if image_file.preview:
            decoded = preview.preview_layout(self.fd, image_file.layout, allow_truncated=truncated_ok)
        else:
            decoded = pipeline.decode_layout(
                self.fd, image_file.layout, allow_truncated=truncated_ok, **image_file.decode_options
            )
        self.set_as_raw(decoded.tobytes(), decoded.mode)
        return -1, 0


def _save(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    from . import pipeline

    fp.write(pipeline.encode_image(im, im.encoderinfo))


def _is_sdl_target(fp: str | bytes | os.PathLike[Any], format: str | None) -> bool:
    if format:
        return format.upper() == FORMAT
    return Image.EXTENSION.get(os.path.splitext(os.fsdecode(fp))[1].lower()) == FORMAT


def _atomic_sdl_save(save: Callable[..., None]) -> Callable[..., None]:
    """``Image.Image.save``, except that an SDL file named by a path is encoded in memory, then renamed into place.

    Pillow opens (and truncates) a target path before it calls the save handler,
    so a failed encode would leave an existing file empty. Every other save,
    and an SDL save to a file object, goes to Pillow unchanged.
    """

    @functools.wraps(save)
    def save_atomically(self: Image.Image, fp: Any, format: str | None = None, **params: Any) -> None:
        if isinstance(fp, (str, bytes, os.PathLike)) and _is_sdl_target(fp, format):
            buffer = io.BytesIO()
            save(self, buffer, FORMAT, **params)
            atomic_write(os.fsdecode(fp), buffer.getvalue())
        else:
            save(self, fp, format, **params)

    save_atomically.sdl_atomic = True  # type: ignore[attr-defined]
    return save_atomically


def register() -> None:
    """Register the SDL format with Pillow (idempotent); importing the package does it too.

    Also makes ``Image.save`` to an ``.sdl`` path atomic (see ``_atomic_sdl_save``).
    """
    if not getattr(Image.Image.save, "sdl_atomic", False):
        Image.Image.save = _atomic_sdl_save(Image.Image.save)  # type: ignore[method-assign]
    Image.register_open(FORMAT, SdlImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extension(FORMAT, EXTENSION)
    Image.register_mime(FORMAT, MIME)
    Image.register_decoder(FORMAT, _SdlDecoder)
