"""Opening, verifying and refusing files: the Pillow contract around the container."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile, UnidentifiedImageError

from pillow_sdlatent.core import container
from pillow_sdlatent.SdlImagePlugin import SdlImageFile


@pytest.fixture(scope="module")
def sdl_bytes(photo: Image.Image) -> bytes:
    buffer = io.BytesIO()
    photo.save(buffer, format="SDL")
    return buffer.getvalue()


def test_open_does_not_import_torch(sdl_bytes: bytes, tmp_path: Path) -> None:
    target = tmp_path / "x.sdl"
    target.write_bytes(sdl_bytes)
    script = (
        "import sys, pillow_sdlatent\n"
        "from PIL import Image\n"
        f"im = Image.open({str(target)!r})\n"
        "print(im.format, im.size, im.mode, 'torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["SDL", "(192,", "128)", "RGB", "False", "False"]


def test_explicit_register_in_a_fresh_process(sdl_bytes: bytes, tmp_path: Path) -> None:
    target = tmp_path / "x.sdl"
    target.write_bytes(sdl_bytes)
    script = (
        "from PIL import Image\n"
        "from pillow_sdlatent.SdlImagePlugin import register\n"
        "register()\n"
        f"print(Image.open({str(target)!r}).format)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "SDL"


def test_not_an_sdl_file(tmp_path: Path) -> None:
    target = tmp_path / "x.sdl"
    target.write_bytes(b"\x89SDL but then not the rest of the signature")
    with pytest.raises(UnidentifiedImageError):
        Image.open(target)
    png = tmp_path / "y.sdl"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(SyntaxError):
        SdlImageFile(png)


def test_corrupt_header_is_a_syntax_error(sdl_bytes: bytes) -> None:
    damaged = bytearray(sdl_bytes)
    damaged[20] ^= 0x40  # inside SHDR: the header CRC no longer matches
    with pytest.raises(SyntaxError):
        SdlImageFile(io.BytesIO(bytes(damaged)))
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(bytes(damaged)))


def test_truncated_payload_is_an_os_error(sdl_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    truncated = sdl_bytes[: len(sdl_bytes) - 40]
    image = Image.open(io.BytesIO(truncated))
    with pytest.raises(OSError, match="truncated"):
        image.load()
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(truncated)).verify()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    image = Image.open(io.BytesIO(truncated))
    image.load()
    assert image.size == (192, 128)


@pytest.mark.parametrize("coder", ["ctx2", "ctx1"])
def test_a_truncated_payload_keeps_what_it_holds(photo: Image.Image, coder: str) -> None:
    """With LOAD_TRUNCATED_IMAGES the symbols before the cut decode exactly and only the rest is zero
    (the whole latent used to be zeroed: a flat grey picture)."""

    from pillow_sdlatent.core.read import latent_from_layout

    buffer = io.BytesIO()
    photo.save(buffer, format="SDL", model="taesd", coder=coder, quality=75, scale=1)  # uniform: symbol 0 is latent 0
    data = buffer.getvalue()
    layout = container.read_layout(io.BytesIO(data))
    full = latent_from_layout(io.BytesIO(data), layout)
    end = data.index(b"LATD") + 4 + int(0.7 * layout.header.payload_length)
    cut = container.read_layout(io.BytesIO(data[:end]))
    with pytest.raises(OSError, match="truncated"):
        latent_from_layout(io.BytesIO(data[:end]), cut)
    partial = latent_from_layout(io.BytesIO(data[:end]), cut, allow_truncated=True)
    kept = partial == full
    assert kept.mean() > 0.5, f"only {kept.mean():.0%} of the latent survived 70% of the payload"
    assert (partial[~kept] == 0).all()  # what was lost is zero, nothing made up


def test_verify_catches_a_damaged_payload(sdl_bytes: bytes) -> None:
    Image.open(io.BytesIO(sdl_bytes)).verify()
    damaged = bytearray(sdl_bytes)
    damaged[-30] ^= 0x01  # inside LATD
    with pytest.raises(OSError, match="CRC"):
        Image.open(io.BytesIO(bytes(damaged))).verify()


def _with_chunk_before_end(data: bytes, chunk_type: bytes, payload: bytes) -> bytes:
    end = len(data) - 12  # SEND: length, type, CRC
    crc = struct.pack(">I", zlib.crc32(chunk_type + payload))
    chunk = struct.pack(">I4s", len(payload), chunk_type) + payload + crc
    return data[:end] + chunk + data[end:]


def test_unknown_chunks(sdl_bytes: bytes) -> None:
    skipped = Image.open(io.BytesIO(_with_chunk_before_end(sdl_bytes, b"zzZz", b"hello")))
    skipped.load()
    with pytest.raises(OSError, match="does not know"):
        Image.open(io.BytesIO(_with_chunk_before_end(sdl_bytes, b"ZZZZ", b"hello")))


def test_newer_major_version_is_refused(sdl_bytes: bytes) -> None:
    newer = sdl_bytes[:8] + bytes([3, 0]) + sdl_bytes[10:]
    with pytest.raises(OSError, match=r"version 3\.0"):
        Image.open(io.BytesIO(newer))
    minor = sdl_bytes[:9] + bytes([7]) + sdl_bytes[10:]  # a newer minor of the file's own major
    Image.open(io.BytesIO(minor)).load()


def test_header_round_trip() -> None:
    header = container.Header(
        width=1001, height=3, original_mode="P", mode="RGB", model="taesd", decoder_digest=bytes(range(32)),
        latent_shape=(4, 1, 126), quantizer="uniform", quantizer_params=b"\0" * 16, coder="zstd",
        coder_params=b"\x01", payload_length=99,
    )
    assert container.Header.from_bytes(header.to_bytes()) == header
    with pytest.raises(SyntaxError):
        container.Header.from_bytes(header.to_bytes()[:-1])


def test_resampled_header_needs_version_2() -> None:
    """A latent of a downscaled image: version 2's coded size, checked against the latent and the image."""
    fields = dict(width=1001, height=300, original_mode="RGB", mode="RGB", model="taesd",
                  decoder_digest=bytes(32), quantizer="uniform", quantizer_params=b"\0" * 16, coder="zstd",
                  coder_params=b"\x01", payload_length=99)
    header = container.Header(latent_shape=(4, 19, 63), coded_size=(500, 150), **fields)
    assert header.needed_version == (2, 0) and header.coded == (500, 150)
    assert container.Header.from_bytes(header.to_bytes(), 2) == header
    with pytest.raises(SyntaxError, match="trailing"):
        container.Header.from_bytes(header.to_bytes(), 1)
    with pytest.raises(SyntaxError, match="coded image size"):
        container.Header(latent_shape=(4, 38, 126), coded_size=(500, 150), **fields).check_limits()
    with pytest.raises(SyntaxError, match="not within"):
        container.Header(latent_shape=(4, 38, 126), coded_size=(1002, 300), **fields).check_limits()
    with pytest.raises(OSError, match=r"filter 7.*upgrade"):
        container.Header(latent_shape=(4, 19, 63), coded_size=(500, 150), resampling=7, **fields).check_limits()


def test_decompression_bomb_rules(sdl_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 192 * 128 // 2 - 1)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(sdl_bytes))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 192 * 128 - 1)
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(sdl_bytes))


def test_failed_save_leaves_no_file(photo: Image.Image, tmp_path: Path) -> None:
    target = tmp_path / "x.sdl"
    with pytest.raises(ValueError):
        photo.save(target, quality=1000)
    assert not os.path.exists(target)
