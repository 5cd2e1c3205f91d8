"""Hostile and broken input (issue #4): limits enforced before allocation, forward compatibility, weights safety.

Each damaged file is built from a real one by editing its chunks (CRCs
recomputed, so the parser's deeper checks are what refuses it).
"""

from __future__ import annotations

import io
import pickle
import struct
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from PIL import Image, ImageFile, UnidentifiedImageError

from pillow_sdlatent import models, pipeline
from pillow_sdlatent.core import container, read
from pillow_sdlatent.models import UnsafeWeightsError
from pillow_sdlatent.pipeline import DigestMismatchError
from pillow_sdlatent.SdlImagePlugin import SdlImageFile
from tests.fuzzing import PREFIX_LENGTH, Chunk, build_shdr, join, parse_shdr, split

SMALL_PEAK = 1 << 20  # bytes of Python heap a refusal may use


@pytest.fixture(scope="module")
def rgb_sdl(photo: Image.Image) -> bytes:
    buffer = io.BytesIO()
    photo.crop((0, 0, 24, 16)).save(buffer, format="SDL")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def zstd_sdl(photo: Image.Image) -> bytes:
    buffer = io.BytesIO()
    photo.crop((0, 0, 24, 16)).save(buffer, format="SDL", coder="zstd")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rgba_sdl(photo: Image.Image) -> bytes:
    image = photo.crop((0, 0, 16, 16)).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((16, 16)))
    buffer = io.BytesIO()
    image.save(buffer, format="SDL")
    return buffer.getvalue()


def edited(data: bytes, *, header: dict[str, Any] | None = None,
           chunks: Callable[[list[Chunk]], None] | None = None) -> bytes:
    """``data`` with SHDR fields replaced and/or its chunk list edited; every CRC made right."""
    parts, trailer = split(data)
    if header:
        fields = parse_shdr(parts[0].data)
        fields.update(header)
        parts[0].data = build_shdr(fields)
    if chunks:
        chunks(parts)
    for chunk in parts:
        chunk.crc = None
    return join(data[:PREFIX_LENGTH], parts, trailer)


def payload_replaced(data: bytes, payload: bytes) -> bytes:
    def swap(parts: list[Chunk]) -> None:
        next(c for c in parts if c.type == b"LATD").data = payload

    return edited(data, header={"payload_length": len(payload)}, chunks=swap)


def insert_before(chunk_type: bytes, new: Chunk) -> Callable[[list[Chunk]], None]:
    def insert(parts: list[Chunk]) -> None:
        parts.insert(next(i for i, c in enumerate(parts) if c.type == chunk_type), new)

    return insert


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.copy()


@contextmanager
def peak_heap() -> Iterator[list[int]]:
    """Measures the Python-heap peak (numpy and zstandard allocate there too) of the block."""
    result: list[int] = []
    tracemalloc.start()
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


class ReadSpy(io.BytesIO):
    """Records the largest ``read(n)`` asked for: a lying length field must not become a huge request."""

    largest = 0

    def read(self, size: int | None = -1) -> bytes:
        self.largest = max(self.largest, size if size is not None and size >= 0 else len(self.getbuffer()))
        return super().read(size)


def zstd_frame_claiming(content_size: int) -> bytes:
    """A zstd frame header declaring ``content_size`` bytes, then one tiny RLE block."""
    rle_block = (1 | (1 << 1) | (10 << 3)).to_bytes(3, "little") + b"\0"
    return struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", content_size) + rle_block


# --------------------------------------------------------------------------- limits before allocation

def test_huge_header_is_a_bomb_before_anything_is_allocated(rgb_sdl: bytes, tmp_path: Path) -> None:
    bomb = edited(rgb_sdl, header={"width": 100_000, "height": 100_000,
                                   "latent_width": 12_500, "latent_height": 12_500})
    target = tmp_path / "bomb.sdl"
    target.write_bytes(bomb)
    for source in (io.BytesIO(bomb), target):
        with peak_heap() as peak, pytest.raises(Image.DecompressionBombError):
            Image.open(source)
        assert peak[0] < SMALL_PEAK


def test_every_decode_path_applies_the_pixel_limit(rgb_sdl: bytes) -> None:
    """A directly built image file, decode_file and read_latent do not go through Image.open's check."""
    bomb = edited(rgb_sdl, header={"width": 100_000, "height": 100_000,
                                   "latent_width": 12_500, "latent_height": 12_500})
    image = SdlImageFile(io.BytesIO(bomb))
    assert image.size == (100_000, 100_000)
    with peak_heap() as peak, pytest.raises(Image.DecompressionBombError):
        image.load()
    assert peak[0] < SMALL_PEAK
    for decode in (pipeline.decode_file, read.read_latent):
        with peak_heap() as peak, pytest.raises(Image.DecompressionBombError):
            decode(bomb)
        assert peak[0] < SMALL_PEAK


def test_pixel_limit_warns_like_pillow(rgb_sdl: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 24 * 16 - 1)
    with pytest.warns(Image.DecompressionBombWarning):
        pipeline.decode_file(rgb_sdl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SdlImageFile(io.BytesIO(rgb_sdl)).load()  # Image.open warns; load() only refuses
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 24 * 16 // 2 - 1)
    with pytest.raises(Image.DecompressionBombError):
        SdlImageFile(io.BytesIO(rgb_sdl)).load()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    pipeline.decode_file(rgb_sdl)


@pytest.mark.parametrize(("width", "height"), [(0, 16), (24, 0), ((1 << 20) + 1, 16), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_side_limits(rgb_sdl: bytes, width: int, height: int) -> None:
    damaged = edited(rgb_sdl, header={"width": width, "height": height,
                                      "latent_width": -(-width // 8), "latent_height": -(-height // 8)})
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(damaged))


@pytest.mark.parametrize("field", ["latent_width", "latent_height"])
def test_latent_shape_must_match_the_image_size(rgb_sdl: bytes, field: str) -> None:
    fields = parse_shdr(split(rgb_sdl)[0][0].data)
    with pytest.raises(SyntaxError, match="latent shape"):
        SdlImageFile(io.BytesIO(edited(rgb_sdl, header={field: fields[field] + 1})))


@pytest.fixture(scope="module")
def scaled_sdl(photo: Image.Image) -> bytes:
    """Version 2: a 96x64 image whose latent codes it at 48x32."""
    buffer = io.BytesIO()
    photo.crop((0, 0, 96, 64)).save(buffer, format="SDL", scale=0.5)
    return buffer.getvalue()


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"coded_width": 97}, SyntaxError, "not within"),  # larger than the image
    ({"coded_height": 0, "latent_height": 0}, SyntaxError, "not within"),
    ({"coded_width": 0xFFFFFFFF, "latent_width": 1 << 29}, SyntaxError, "not within"),
    ({"latent_width": 12}, SyntaxError, "latent shape"),  # the latent of the whole image, not the coded one
    ({"resampling": 0}, OSError, "filter 0.*upgrade"),
    ({"resampling": 255}, OSError, "filter 255.*upgrade"),
])
def test_resampled_header_is_checked(scaled_sdl: bytes, change: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        SdlImageFile(io.BytesIO(edited(scaled_sdl, header=change)))


def test_version_and_header_layout_must_agree(rgb_sdl: bytes, scaled_sdl: bytes) -> None:
    """A version-1 header under major 2 lacks the coded size; a version-2 one under major 1 has bytes too many."""
    for data, major in ((rgb_sdl, 2), (scaled_sdl, 1)):
        with pytest.raises(SyntaxError):
            SdlImageFile(io.BytesIO(data[:8] + bytes([major, 0]) + data[10:]))


def test_tiny_coded_image_of_a_huge_one_honours_the_pixel_limit(scaled_sdl: bytes,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder would resize a 48x32 decode up to the header's size: Pillow's limit applies to that size."""
    huge = edited(scaled_sdl, header={"width": 1 << 20, "height": 1 << 20})
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(huge))
    with pytest.raises(Image.DecompressionBombError):
        pipeline.decode_file(huge)


def test_latent_channels_must_match_the_model(photo: Image.Image) -> None:
    buffer = io.BytesIO()
    photo.crop((0, 0, 24, 16)).save(buffer, format="SDL", model="taesd")  # 4 channels, uniform steps
    damaged = edited(buffer.getvalue(), header={"channels": 16, "quantizer_params": struct.pack(">16f", *[0.5] * 16)})
    with pytest.raises(OSError, match="channels"):
        decoded(damaged)
    with pytest.raises(OSError, match="channels"):
        read.read_latent(damaged)


@pytest.mark.parametrize("claim", [4 << 30, 1 << 62])
def test_zstd_payload_claiming_a_huge_size_is_refused_fast(zstd_sdl: bytes, claim: int) -> None:
    damaged = payload_replaced(zstd_sdl, zstd_frame_claiming(claim))
    image = Image.open(io.BytesIO(damaged))
    started = time.perf_counter()
    with peak_heap() as peak, pytest.raises(OSError, match="zstd frame holds"):
        image.load()
    assert peak[0] < SMALL_PEAK and time.perf_counter() - started < 1


@pytest.mark.parametrize("claim", [4 << 30, 1 << 62])
def test_zstd_alpha_claiming_a_huge_size_is_refused_fast(rgba_sdl: bytes, claim: int) -> None:
    def swap(parts: list[Chunk]) -> None:
        next(c for c in parts if c.type == b"ALPH").data = b"\0" + zstd_frame_claiming(claim)

    image = Image.open(io.BytesIO(edited(rgba_sdl, chunks=swap)))
    with peak_heap() as peak, pytest.raises(OSError, match="alpha plane"):
        image.load()
    assert peak[0] < SMALL_PEAK


def test_zstd_output_is_bounded_by_the_header(zstd_sdl: bytes, rgba_sdl: bytes) -> None:
    """A frame without a declared size that inflates past the latent (or alpha) size is cut off there."""
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(16 << 20))  # 527 bytes
    with peak_heap() as peak, pytest.raises(OSError, match="damaged zstd frame"):
        decoded(payload_replaced(zstd_sdl, unsized))
    assert peak[0] < SMALL_PEAK

    def swap(parts: list[Chunk]) -> None:
        next(c for c in parts if c.type == b"ALPH").data = b"\0" + unsized

    with peak_heap() as peak, pytest.raises(OSError, match="alpha plane"):
        decoded(edited(rgba_sdl, chunks=swap))
    assert peak[0] < SMALL_PEAK


def test_a_1gb_length_field_is_refused_without_reading_it(rgb_sdl: bytes) -> None:
    exif = Chunk(b"eXIf", b"Exif\0\0")
    with_exif = edited(rgb_sdl, chunks=insert_before(b"LATD", exif))
    position = with_exif.index(b"eXIf") - 4
    lying = with_exif[:position] + struct.pack(">I", 1 << 30) + with_exif[position + 4 :]
    spy = ReadSpy(lying)
    with pytest.raises(OSError, match="larger than"):
        Image.open(spy)
    assert spy.largest < 1 << 16

    position = rgb_sdl.index(b"LATD") - 4
    spy = ReadSpy(rgb_sdl[:position] + struct.pack(">I", 1 << 30) + rgb_sdl[position + 4 :])
    with pytest.raises(OSError, match="payload chunk length"):
        Image.open(spy)
    assert spy.largest < 1 << 16


def test_a_payload_length_past_the_end_is_not_allocated(rgb_sdl: bytes, tmp_path: Path) -> None:
    """A large image may declare a large payload, but a short file gets no large read (buffered files allocate it)."""
    length = 16 << 20  # within what a 4x1024x1024 latent allows
    big = edited(rgb_sdl, header={"width": 8192, "height": 8192, "latent_width": 1024, "latent_height": 1024,
                                  "payload_length": length})
    position = big.index(b"LATD") - 4
    big = big[:position] + struct.pack(">I", length) + big[position + 4 :]
    target = tmp_path / "short.sdl"
    target.write_bytes(big)
    with peak_heap() as peak:
        with pytest.raises(OSError, match="truncated"):
            Image.open(target).verify()
        with pytest.raises(OSError, match="truncated"):
            read.read_latent(target)
    assert peak[0] < SMALL_PEAK
    spy = ReadSpy(big)
    with pytest.raises(OSError, match="truncated"):
        read.read_latent(spy)
    assert spy.largest < len(big)


@pytest.mark.parametrize("chunk_type", [b"eXIf", b"iCCP", b"xMPd", b"zzzz", b"ALPH"])
def test_chunk_size_caps(rgba_sdl: bytes, chunk_type: bytes) -> None:
    """Metadata, unknown ancillary chunks and the alpha plane are capped at 16 MiB, checked before reading."""

    def enlarge(parts: list[Chunk]) -> None:
        big = Chunk(chunk_type, bytes(container.MAX_METADATA_BYTES + 1))
        if chunk_type == b"ALPH":
            parts[:] = [c for c in parts if c.type != b"ALPH"]
        insert_before(b"LATD", big)(parts)

    spy = ReadSpy(edited(rgba_sdl, chunks=enlarge))
    with peak_heap() as peak, pytest.raises(OSError, match="larger than"):
        Image.open(spy)
    assert peak[0] < SMALL_PEAK and spy.largest < 1 << 16


def test_too_many_chunks(rgb_sdl: bytes) -> None:
    def many(parts: list[Chunk]) -> None:
        parts[1:1] = [Chunk(b"zzzz", b"")] * (container.MAX_CHUNKS + 1)

    with pytest.raises(OSError, match="more than 1024 chunks"):
        Image.open(io.BytesIO(edited(rgb_sdl, chunks=many)))


@pytest.mark.parametrize("mode", ["P", "I;16", "RGBX", "XYZ", ""])
def test_undecodable_image_mode_is_refused_at_open(rgb_sdl: bytes, mode: str) -> None:
    """Found by the fuzzer: such a mode reached Pillow's image allocation and raised a stray ValueError."""
    damaged = edited(rgb_sdl, header={"mode": mode.encode()})
    with pytest.raises(SyntaxError, match="mode"):
        SdlImageFile(io.BytesIO(damaged))
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(damaged))


@pytest.mark.parametrize("chunk_type", [b"\0\0\0\0", b"ab1d", b"\xffabc"])
def test_chunk_types_are_letters(rgb_sdl: bytes, chunk_type: bytes) -> None:
    with pytest.raises(OSError, match="invalid chunk type"):
        Image.open(io.BytesIO(edited(rgb_sdl, chunks=insert_before(b"SEND", Chunk(chunk_type, b"x")))))


def test_send_is_empty_and_checked(rgb_sdl: bytes) -> None:
    with pytest.raises(OSError, match="not empty"):
        Image.open(io.BytesIO(edited(rgb_sdl, chunks=lambda parts: setattr(parts[-1], "data", b"x"))))
    with pytest.raises(OSError, match="SEND"):
        Image.open(io.BytesIO(rgb_sdl[:-1] + bytes([rgb_sdl[-1] ^ 1])))


def test_truncated_payload_and_load_truncated_images(rgb_sdl: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    payload_length = parse_shdr(split(rgb_sdl)[0][0].data)["payload_length"]
    inside_payload = rgb_sdl[: rgb_sdl.index(b"LATD") + 4 + payload_length // 2]
    before_payload = rgb_sdl[: rgb_sdl.index(b"LATD") - 2]
    without_end = rgb_sdl[:-12]
    with pytest.raises(OSError, match="truncated"):
        decoded(inside_payload)
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(without_end)).verify()
    assert decoded(without_end).tobytes() == decoded(rgb_sdl).tobytes()  # all the pixels are there
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    image = decoded(inside_payload)
    assert image.size == (24, 16) and image.mode == "RGB"
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(inside_payload)).verify()
    with pytest.raises(OSError, match="before its payload"):
        Image.open(io.BytesIO(before_payload))


# --------------------------------------------------------------------------- forward compatibility

@pytest.mark.parametrize("major", [3, 0, 255])
def test_other_major_version_is_refused(rgb_sdl: bytes, major: int) -> None:
    with pytest.raises(OSError, match=rf"version {major}\.0 is not supported.*upgrade"):
        Image.open(io.BytesIO(rgb_sdl[:8] + bytes([major, 0]) + rgb_sdl[10:]))


@pytest.mark.parametrize("before", [b"LATD", b"SEND"])
def test_unknown_critical_chunk_is_refused(rgb_sdl: bytes, before: bytes) -> None:
    damaged = edited(rgb_sdl, chunks=insert_before(before, Chunk(b"QNTZ", b"new and essential")))
    with pytest.raises(OSError, match=r"QNTZ.*does not know"):
        Image.open(io.BytesIO(damaged))


def test_unknown_ancillary_chunks_are_skipped(rgb_sdl: bytes) -> None:
    reference = decoded(rgb_sdl).tobytes()

    def sprinkle(parts: list[Chunk]) -> None:
        for position in (len(parts) - 1, 2, 1):  # before SEND, after LATD, right after SHDR
            parts.insert(position, Chunk(b"fUtr", b"something a newer writer adds"))

    newer = edited(rgb_sdl[:9] + bytes([9]) + rgb_sdl[10:], chunks=sprinkle)  # and minor version 1.9
    with Image.open(io.BytesIO(newer)) as image:
        assert image.info["sdl"]["version"] == "1.9"
        image.verify()
    assert decoded(newer).tobytes() == reference


# --------------------------------------------------------------------------- weights

def _booby_trapped_pickle(path: Path, marker: Path) -> None:
    """A pickle whose unpickling creates ``marker``: proof that nobody unpickled it."""

    class Trap:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    path.write_bytes(pickle.dumps(Trap()))


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".bin", ".pt", ".pkl", ".PTH"])
def test_pickled_weights_are_refused_unopened(rgb_sdl: bytes, tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "unpickled"
    weights = tmp_path / f"taesd{suffix}"
    _booby_trapped_pickle(weights, marker)
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format="SDL", weights=str(weights))
    image = Image.open(io.BytesIO(rgb_sdl))
    image.decode_options = {"weights": str(weights)}
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        image.load()
    with pytest.raises(UnsafeWeightsError):
        models.load_model("sd-vae", weights=weights)
    assert not marker.exists()


def test_a_folder_of_pickled_weights_is_not_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    _booby_trapped_pickle(folder / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(OSError, match="no weights"):
        models.load_model("sd-vae", weights=folder)
    assert not marker.exists()


def test_decoder_digest_mismatch(rgb_sdl: bytes) -> None:
    other = edited(rgb_sdl, header={"digest": bytes(32)})
    image = Image.open(io.BytesIO(other))
    with pytest.raises(DigestMismatchError, match="not the ones this file was written with") as info:
        image.load()
    assert isinstance(info.value, OSError)
    image = Image.open(io.BytesIO(other))
    image.decode_options = {"allow_digest_mismatch": True}
    with pytest.warns(RuntimeWarning, match="decoder weights"):
        image.load()
    assert np.array_equal(np.asarray(image), np.asarray(decoded(rgb_sdl)))
