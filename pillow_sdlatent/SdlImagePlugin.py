"""The Pillow face of the codec: ``_accept``, the ``ImageFile`` subclass, the save handlers.

Opening parses the header only (no torch, no numpy work); ``load()`` runs the
decoder. All real work lives in :mod:`pillow_sdlatent.pipeline` (and
:mod:`pillow_sdlatent.preview` for ``draft``). Registering the format changes
nothing else in Pillow.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import IO, Any

from PIL import Image, ImageFile

from ._atomic import atomic_write
from .core import container
from .options import DecodeOptions

FORMAT = "SDL"
MIME = "image/x-sdl"
EXTENSION = ".sdl"


def _accept(prefix: bytes) -> bool:
    return container.check_signature(prefix)


def thumbnail_size(size: tuple[int, int], bound: tuple[float, float]) -> tuple[int, int] | None:
    """The size ``Image.thumbnail`` makes an image of ``size`` to fit ``bound``; None when it keeps its size.

    Pillow's own rule, which it does not expose: a thumbnail from the smaller
    latent preview must still get the size Pillow gives the whole image.
    """
    bound_width, bound_height = (math.floor(side) for side in bound)
    width, height = size
    if bound_width >= width and bound_height >= height:
        return None

    def round_aspect(number: float, key: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    aspect = width / height
    if bound_width / bound_height >= aspect:
        return round_aspect(bound_height * aspect, key=lambda n: abs(aspect - n / bound_height)), bound_height
    return bound_width, round_aspect(bound_width / aspect,
                                     key=lambda n: 0 if n == 0 else abs(aspect - bound_width / n))


class SdlImageFile(ImageFile.ImageFile):
    """An ``.sdl`` image. Set ``decode_options`` (a dict or ``DecodeOptions``) before ``load()`` to choose the decoder.

    The options are checked when set: ``ValueError`` names an unknown or bad one.
    """

    format = FORMAT
    format_description = "Stable Diffusion latent"
    _decode_options = DecodeOptions()

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
        self.preview = False
        self.tile = [ImageFile._Tile(FORMAT, (0, 0, *self._size), 0, (self,))]

    @property
    def decode_options(self) -> DecodeOptions:
        return self._decode_options

    @decode_options.setter
    def decode_options(self, options: DecodeOptions | Mapping[str, Any]) -> None:
        self._decode_options = DecodeOptions.coerce(options)

    def __getstate__(self) -> list[Any]:
        """Pillow's state (which loads the pixels), then the header and options, so a copy behaves as this image."""
        return [*super().__getstate__(), self.layout, self.preview, self.decode_options]

    def __setstate__(self, state: list[Any]) -> None:
        super().__setstate__(state)
        self.layout, self.preview, self.decode_options = state[-3:]

    def load_prepare(self) -> None:
        """Pillow's pixel limit once more before the image memory is allocated.

        ``Image.open`` checked it already, but an ``SdlImageFile`` built directly
        was never checked.
        """
        container.check_pixel_limit(*self.size, warn=False)
        super().load_prepare()

    def draft(self, mode: str | None, size: tuple[int, int] | None) -> tuple[str, tuple[int, int, float, float]] | None:
        """At 1/8 scale or smaller, decode a preview straight from the latent, without the decoder.

        As JPEG's draft: the image becomes the smallest size Pillow can make
        cheaply that is still at least ``size``, and the box returned is the
        original's area within it, ready for ``resize(size, box=box)``.
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
        scale = container.LATENT_FACTOR
        return self.mode, (0, 0, header.width / scale, header.height / scale)

    def thumbnail(self, size: tuple[float, float], resample: Image.Resampling = Image.Resampling.BICUBIC,
                  reducing_gap: float | None = 2.0) -> None:
        """A thumbnail at 1/8 scale or smaller starts from the latent preview, without the decoder.

        Pillow's own ``thumbnail`` asks ``draft`` for ``reducing_gap`` times the
        size, which would rule out the preview for thumbnails between 1/16 and
        1/8. The size is Pillow's; ``reducing_gap=None`` means an exact resize of
        the full decode, as in Pillow.
        """
        final = thumbnail_size(self.size, size)
        small = container.latent_size(*self.size)
        if (reducing_gap is None or final is None or not self.tile or self.preview
                or final[0] > small[0] or final[1] > small[1]):
            super().thumbnail(size, resample, reducing_gap)
            return
        drafted = self.draft(None, small)
        assert drafted is not None, "a fresh image at 1/8 scale always drafts"
        thumbnail = self.resize(final, resample, box=drafted[1], reducing_gap=reducing_gap)
        self.im = thumbnail.im
        self._size = final
        self._mode = thumbnail.mode
        self.readonly = 0

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
        fp, layout = self.fd, image_file.layout
        if fp is None:  # ImageFile.Parser pushes the file from its first byte: decode once all of it is there
            fp = io.BytesIO(bytes(buffer))
            layout = container.read_layout(fp)
            if not layout.complete:
                return 0, 0
        truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
        if image_file.preview:
            decoded = preview.preview_layout(fp, layout, allow_truncated=truncated_ok)
        else:
            decoded = pipeline.decode_layout(fp, layout, image_file.decode_options, allow_truncated=truncated_ok)
        self.set_as_raw(decoded.tobytes(), decoded.mode)
        return -1, 0


def _save(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    from . import pipeline

    fp.write(pipeline.encode_image(im, im.encoderinfo))


def _save_all(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    """``save_all=True``: an SDL file holds one frame, so the first is written (with a warning if there are more)."""
    frames = getattr(im, "n_frames", 1) + len(im.encoderinfo.get("append_images", ()))
    if frames > 1:
        warnings.warn(f"an SDL file holds one frame: writing the first of {frames}", UserWarning, stacklevel=3)
    current = im.tell()
    im.seek(0)
    try:
        _save(im, fp, filename)
    finally:
        im.seek(current)


def save(image: Image.Image, path: str | os.PathLike[str], **options: Any) -> None:
    """Write ``image`` to ``path`` as an SDL file atomically: a failed save leaves no partial file and
    an existing one as it was.

    The file is encoded in memory, written beside ``path`` and renamed into place.
    ``image.save(path)`` goes through Pillow, which opens (and so empties) an
    existing file before the encoder runs, as for any format: a failed encode
    there leaves that file truncated.
    """
    buffer = io.BytesIO()
    image.save(buffer, format=FORMAT, **options)
    atomic_write(path, buffer.getvalue())


def register() -> None:
    """Register the SDL format with Pillow (idempotent); importing the package does it too."""
    Image.register_open(FORMAT, SdlImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_save_all(FORMAT, _save_all)
    Image.register_extension(FORMAT, EXTENSION)
    Image.register_mime(FORMAT, MIME)
    Image.register_decoder(FORMAT, _SdlDecoder)
