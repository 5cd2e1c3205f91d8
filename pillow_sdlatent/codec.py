"""image <-> latent <-> symbols <-> bytes: the one pipeline the plugin and the CLI share."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import zstandard
from PIL import Image

from . import container, entropy, quantize
from .container import DamagedFileError, Header, Layout
from .models import DEFAULT_MODEL, REGISTRY, get_spec

#: given mode -> (working mode fed to the model, mode stored and decoded to)
MODE_RULES: dict[str, tuple[str, str]] = {
    "RGB": ("RGB", "RGB"),
    "L": ("L", "L"),
    "RGBA": ("RGBA", "RGBA"),
    "LA": ("LA", "LA"),
    "1": ("L", "1"),
    "RGBX": ("RGB", "RGB"),
    "CMYK": ("RGB", "RGB"),
    "YCbCr": ("RGB", "RGB"),
    "LAB": ("RGB", "RGB"),
    "HSV": ("RGB", "RGB"),
    "RGBa": ("RGBA", "RGBA"),
    "La": ("LA", "LA"),
    "PA": ("RGBA", "RGBA"),
}
DECODED_MODES = {"RGB", "L", "RGBA", "LA", "1"}
ALPHA_ZSTD = 0


class DigestMismatchError(OSError):
    """The decoder weights at hand are not the ones the file was written with."""


@dataclass(frozen=True)
class EncodeOptions:
    """Validated save options; ``ValueError`` for a bad value."""

    quality: int = quantize.DEFAULT_QUALITY
    model: str = DEFAULT_MODEL
    device: str | None = None
    weights: str | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EncodeOptions:
        quality = info.get("quality")
        quality = quantize.DEFAULT_QUALITY if quality is None else quality
        quantize.step_for_quality(quality)
        model = info.get("model") or DEFAULT_MODEL
        get_spec(model)
        device = info.get("device")
        if device is not None and not isinstance(device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda', not {device!r}")
        weights = info.get("weights")
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise ValueError(f"weights must be a path, not {weights!r}")
        return cls(int(quality), model, device, os.fspath(weights) if weights else None)


def working_image(image: Image.Image) -> tuple[Image.Image, str]:
    """The image converted to what the model sees, and the mode it will decode to.

    ``OSError`` naming the mode when it cannot be stored without silent loss.
    """
    if image.mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if has_alpha else "RGB"), "RGBA" if has_alpha else "RGB"
    try:
        work_mode, stored_mode = MODE_RULES[image.mode]
    except KeyError:
        raise OSError(
            f"cannot write mode {image.mode} as SDL: its samples have more than 8 bits "
            "and would be lost silently; convert to 'L' or 'RGB' first"
        ) from None
    return (image if image.mode == work_mode else image.convert(work_mode)), stored_mode


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


def encode_image(image: Image.Image, info: dict[str, Any] | None = None) -> bytes:
    """A whole ``.sdl`` file for ``image``; ``info`` holds the save options."""
    info = dict(info or {})
    options = EncodeOptions.from_info(info)
    metadata = metadata_from(image, info)
    work, stored_mode = working_image(image)
    width, height = work.size
    if width * height == 0:
        raise ValueError("cannot save an empty image")
    if max(width, height) > container.MAX_SIDE:
        raise ValueError(f"SDL images are at most {container.MAX_SIDE} pixels a side")

    from .models import load_model

    model = load_model(options.model, weights=options.weights, device=options.device)
    latent = encode_latent(model, rgb_array(work))
    quantizer = quantize.UniformQuantizer.for_quality(options.quality, latent.shape[0])
    symbols = quantizer.quantize(latent)
    coder = entropy.get_coder(entropy.DEFAULT_CODER)
    coder_params, payload = coder.encode(symbols)
    alpha = None
    if stored_mode in ("RGBA", "LA"):
        alpha_plane = np.asarray(work.getchannel("A"), dtype=np.uint8).tobytes()
        alpha = bytes([ALPHA_ZSTD]) + zstandard.ZstdCompressor(level=19).compress(alpha_plane)
    header = Header(
        width=width, height=height, original_mode=image.mode, mode=stored_mode,
        model=options.model, decoder_digest=model.decoder_digest, latent_shape=symbols.shape,
        quantizer=quantizer.name, quantizer_params=quantizer.to_params(),
        coder=coder.name, coder_params=coder_params, payload_length=len(payload),
    )
    return container.serialize(header, payload, metadata, alpha)


def rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 colour of an L/LA/RGB/RGBA image (grey replicated)."""
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    return np.asarray(rgb, dtype=np.uint8)


def encode_latent(model: Any, rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (C, ceil(H/8), ceil(W/8)) float32 latent; edges replicated to a multiple of 8.

    (A margin of extra context around the image was measured: it costs 0.3-4 dB.)
    """
    import torch

    height, width = rgb.shape[:2]
    pad_h, pad_w = (-height) % 8, (-width) % 8
    padded = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    pixels = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return model.encode(pixels)[0].numpy()


def decode_latent(model: Any, latent: np.ndarray, width: int, height: int) -> np.ndarray:
    """(C, h, w) latent -> (height, width, 3) uint8, cropped back to the true size."""
    import torch

    pixels = model.decode(torch.from_numpy(np.ascontiguousarray(latent))[None])[0]
    rgb = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(rgb[:height, :width])


def read_symbols(layout: Layout, payload: bytes) -> np.ndarray:
    """Entropy-decode the payload; ``DamagedFileError`` when it does not decode."""
    header = layout.header
    try:
        coder = entropy.get_coder(header.coder)
    except ValueError as exc:
        raise DamagedFileError(f"{exc}; upgrade pillow_sdlatent") from None
    try:
        return coder.decode(header.coder_params, payload, header.latent_shape)
    except ValueError as exc:
        raise DamagedFileError(f"damaged SDL payload: {exc}") from None


def dequantize(layout: Layout, symbols: np.ndarray) -> np.ndarray:
    header = layout.header
    try:
        quantizer = quantize.quantizer_from_params(
            header.quantizer, header.quantizer_params, header.latent_shape[0])
    except ValueError as exc:
        raise DamagedFileError(f"SDL quantizer: {exc}") from None
    return quantizer.dequantize(symbols)


def read_payload(fp: IO[bytes], layout: Layout, allow_truncated: bool) -> bytes:
    """The payload bytes; a truncated one is zero-padded only when ``allow_truncated``."""
    try:
        return container.read_payload(fp, layout)
    except container.TruncatedPayloadError as exc:
        if not allow_truncated:
            raise
        return exc.partial


def latent_from_layout(fp: IO[bytes], layout: Layout, allow_truncated: bool = False) -> np.ndarray:
    """The dequantized (C, H, W) float32 latent of an opened file."""
    payload = read_payload(fp, layout, allow_truncated)
    if len(payload) < layout.header.payload_length:
        try:
            symbols = read_symbols(layout, payload)
        except DamagedFileError:
            symbols = np.zeros(layout.header.latent_shape, dtype=np.int32)
    else:
        symbols = read_symbols(layout, payload)
    return dequantize(layout, symbols)


def read_latent(source: str | os.PathLike | IO[bytes] | bytes) -> np.ndarray:
    """The dequantized latent of an ``.sdl`` file as (C, H, W) float32, without any decoder.

    For pipelines that train on latents: no torch and no weights are needed.
    """
    with _open_binary(source) as fp:
        return latent_from_layout(fp, container.read_layout(fp))


def decoder_for(layout: Layout, model: str | None = None, *, device: str | None = None,
                weights: str | None = None, allow_digest_mismatch: bool = False) -> Any:
    """Load the decoder a file needs (or the compatible one asked for) and check its digest."""
    header = layout.header
    if header.model not in REGISTRY and model is None:
        raise DamagedFileError(
            f"SDL file was written with model {header.model!r}, which this build does not know "
            f"(it knows {sorted(REGISTRY)}); pass a compatible model to decode it"
        )
    name = model or header.model
    spec = get_spec(name)
    file_spec = REGISTRY.get(header.model)
    if spec.channels != header.latent_shape[0] or (file_spec and file_spec.latent_space != spec.latent_space):
        raise ValueError(
            f"model {name!r} cannot decode a {header.model!r} latent: different latent space"
        )
    from .models import load_model

    decoder = load_model(name, weights=weights, device=device)
    if name == header.model and decoder.decoder_digest != header.decoder_digest:
        message = (
            f"the {name!r} decoder weights found ({decoder.decoder_digest.hex()[:12]}) are not the "
            f"ones this file was written with ({header.decoder_digest.hex()[:12]}); the image may "
            "look wrong. Pass allow_digest_mismatch=True to decode anyway."
        )
        if not allow_digest_mismatch:
            raise DigestMismatchError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return decoder


def decode_layout(fp: IO[bytes], layout: Layout, *, allow_truncated: bool = False,
                  **decoder_options: Any) -> Image.Image:
    """Decode an opened file into a Pillow image of the header's mode."""
    header = layout.header
    if header.mode not in DECODED_MODES:
        raise DamagedFileError(f"SDL file declares unsupported image mode {header.mode!r}")
    latent = latent_from_layout(fp, layout, allow_truncated)
    decoder = decoder_for(layout, **decoder_options)
    rgb = Image.fromarray(decode_latent(decoder, latent, header.width, header.height), "RGB")
    return finish_mode(rgb, layout)


def finish_mode(rgb: Image.Image, layout: Layout) -> Image.Image:
    """Turn the decoded colour into the header's mode, restoring alpha losslessly."""
    mode = layout.header.mode
    if mode == "RGB":
        return rgb
    grey = rgb.convert("L")
    if mode == "L":
        return grey
    if mode == "1":
        return grey.convert("1", dither=Image.Dither.NONE)
    alpha = Image.frombytes("L", rgb.size, alpha_plane(layout))
    base = grey if mode == "LA" else rgb
    return Image.merge(mode, (*base.split(), alpha))


def alpha_plane(layout: Layout) -> bytes:
    header = layout.header
    data = layout.alpha or b""
    expected = header.width * header.height
    if data[:1] != bytes([ALPHA_ZSTD]):
        raise DamagedFileError("unknown alpha coding method")
    try:
        plane = zstandard.ZstdDecompressor().decompress(data[1:], max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise DamagedFileError(f"damaged alpha plane: {exc}") from None
    if len(plane) != expected:
        raise DamagedFileError("alpha plane does not match the image size")
    return plane


def decode_file(source: str | os.PathLike | IO[bytes] | bytes, **decoder_options: Any) -> Image.Image:
    """Decode a whole file (path, file object or bytes) to a loaded Pillow image."""
    with _open_binary(source) as fp:
        layout = container.read_layout(fp)
        image = decode_layout(fp, layout, **decoder_options)
    image.info.update(layout.metadata)
    return image


class _open_binary:
    """Context manager: a readable binary file for a path, bytes or an open file (left open)."""

    def __init__(self, source: str | os.PathLike | IO[bytes] | bytes) -> None:
        self.source = source
        self.owned: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        if isinstance(self.source, (bytes, bytearray, memoryview)):
            return io.BytesIO(bytes(self.source))
        if isinstance(self.source, (str, os.PathLike)):
            self.owned = open(self.source, "rb")
            return self.owned
        return self.source

    def __exit__(self, *exc: object) -> None:
        if self.owned is not None:
            self.owned.close()
