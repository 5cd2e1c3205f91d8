"""Fuzzing helpers shared by ``tests/test_fuzz.py`` and ``benchmarks/fuzz.py``.

Three parts: tiny seed files encoded with the real weights; structure-aware
mutators for the chunk layout of FORMAT.md (a blind mutator mostly trips the
first CRC, so half of the mutants get their CRCs recomputed); and a pool of
worker processes that runs every input through ``Image.open`` -> ``load()``
and ``Image.open`` -> ``verify()``, so that a crash, a hang or a runaway
allocation is caught and classified instead of taking the harness down.

The contract being checked (issue #4): each action ends in a decoded image,
``SyntaxError``, ``OSError`` (``DecompressionBombError`` and
``UnidentifiedImageError`` included) or a ``ValueError`` raised deliberately by
this package; nothing else, within the time and memory limits.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import struct
import tempfile
import time
import traceback
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import connection, get_context
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError

from pillow_sdlatent.core import coders, container
from pillow_sdlatent.core.registry import DEFAULT_MODEL, get_spec

PACKAGE_DIR = str(Path(container.__file__).resolve().parent)
ACTIONS = ("load", "verify", "load_truncated", "thumbnail")
#: Workers lower Pillow's pixel limit to this, so that a mutant describing a big
#: image with a payload that happens to decode cannot swamp a small machine.
#: The limit logic itself is exercised all the same.
FUZZ_MAX_PIXELS = 128 * 128
#: Python-heap peak (tracemalloc) allowed per input; inputs are at most a few KB
#: and images at most 2 x FUZZ_MAX_PIXELS, so anything near this is unjustified.
TRACED_LIMIT = 64 << 20
#: Resident-set growth allowed per input (torch's buffers are not traced).
RSS_LIMIT = 768 << 20


# --------------------------------------------------------------------------- seeds

def _pattern(width: int, height: int, seed: int) -> Image.Image:
    """A smooth gradient with some noise: photo-like enough for the encoder, tiny to store."""
    rng = random.Random(seed)
    pixels = bytes(
        min(255, max(0, int(120 + 100 * math.sin((x + 2 * y + 40 * c) / (3 + seed)) + rng.randint(-20, 20))))
        for y in range(height) for x in range(width) for c in range(3)
    )
    return Image.frombytes("RGB", (width, height), pixels)


def _metadata() -> dict[str, Any]:
    exif = Image.Exif()
    exif[0x010F] = "fuzz"
    return {
        "exif": exif,
        "icc_profile": b"\0\0\0\x80fake-icc" + bytes(range(64)),
        "xmp": b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>',
    }


#: the test vectors, some of whose files carry QREG regions (the encoder writes them only for faces it finds);
#: its own path, not conftest's VECTORS: benchmarks/fuzz.py imports this module without pytest
QREG_VECTORS = Path(__file__).resolve().parent.parent / "fixtures" / "vectors"


def make_seeds() -> dict[str, bytes]:
    """Small valid files of every decoded mode, with and without metadata, in every coder (a few KB in all)."""
    specs: list[tuple[str, Image.Image, dict[str, Any]]] = []
    base = _pattern(24, 16, 1)
    specs.append(("rgb-16x16", base.crop((0, 0, 16, 16)), {}))
    specs.append(("rgb-24x8", base.crop((0, 0, 24, 8)), {"quality": 30}))
    specs.append(("l-16x8", base.crop((0, 0, 16, 8)).convert("L"), {}))
    specs.append(("1-8x8", base.crop((0, 0, 8, 8)).convert("L").point(lambda v: 255 * (v > 128)).convert("1"), {}))
    la = base.crop((0, 0, 8, 16)).convert("LA")
    specs.append(("la-8x16", la, {}))
    rgba = _pattern(16, 16, 2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((16, 16)))
    specs.append(("rgba-16x16-meta", rgba, _metadata()))
    specs.append(("rgb-9x7-meta", _pattern(9, 7, 3), {**_metadata(), "quality": 95}))
    specs.append(("taesd3-8x8", base.crop((0, 0, 8, 8)), {"model": "taesd3"}))
    specs.append(("rgb-24x16-scaled", base, {"scale": 0.5}))  # version 2: the latent codes a 12x8 image
    for name, image, options in specs[:]:
        if name in ("rgb-16x16", "la-8x16", "rgba-16x16-meta", "taesd3-8x8"):
            model = str(options.get("model", DEFAULT_MODEL))
            specs += [(f"{name}-{coder}", image, {**options, "coder": coder})
                      for coder in sorted(set(coders.CODERS) - {coders.default_coder(model)})
                      if coders.codes_channels(coder, get_spec(model).channels)]
    seeds = {}
    for name, image, options in specs:
        buffer = io.BytesIO()
        image.save(buffer, format="SDL", **options)
        seeds[name] = buffer.getvalue()
    for vector in sorted(QREG_VECTORS.glob("*_qreg.sdl")):  # files with finer regions (QREG)
        seeds[vector.stem] = vector.read_bytes()
    return seeds


# --------------------------------------------------------------------------- chunk structure

PREFIX_LENGTH = len(container.SIGNATURE) + 2


@dataclass
class Chunk:
    """One chunk; ``crc`` is the value as found (stale after an edit until ``fix_crcs``)."""

    type: bytes
    data: bytes
    crc: int | None = None


def split(data: bytes) -> tuple[list[Chunk], bytes] | None:
    """The chunks of a well-formed file (and the bytes after them), or None."""
    chunks: list[Chunk] = []
    pos = PREFIX_LENGTH
    while pos + 12 <= len(data):
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            return None
        chunks.append(Chunk(chunk_type, data[pos + 8 : end], struct.unpack_from(">I", data, end)[0]))
        pos = end + 4
        if chunk_type == container.END:
            break
    return chunks, data[pos:]


def join(prefix: bytes, chunks: list[Chunk], trailer: bytes = b"") -> bytes:
    """Serialize chunks; a chunk keeps its recorded CRC (stale or not), else gets a correct one."""
    out = [prefix]
    for chunk in chunks:
        crc = zlib.crc32(chunk.type + chunk.data) if chunk.crc is None else chunk.crc
        out.append(struct.pack(">I4s", len(chunk.data), chunk.type) + chunk.data + struct.pack(">I", crc))
    out.append(trailer)
    return b"".join(out)


def fix_crcs(data: bytes) -> bytes:
    """Recompute the CRC of every chunk whose declared extent fits in the data."""
    out = bytearray(data)
    pos = PREFIX_LENGTH
    while pos + 12 <= len(out):
        (length,) = struct.unpack_from(">I", out, pos)
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        struct.pack_into(">I", out, end, zlib.crc32(bytes(out[pos + 4 : end])))
        pos = end + 4
    return bytes(out)


#: SHDR fields in order (FORMAT.md): name and kind.
SHDR_FIELDS = (
    ("width", "u32"), ("height", "u32"), ("flags", "u32"), ("original_mode", "str8"), ("mode", "str8"),
    ("model", "str8"), ("digest", "raw32"), ("channels", "u16"), ("latent_height", "u32"),
    ("latent_width", "u32"), ("quantizer", "str8"), ("quantizer_params", "bytes16"), ("coder", "str8"),
    ("coder_params", "bytes32"), ("payload_length", "u64"),
)
#: the fields version 2 adds at the end when the latent codes a resampled image
SHDR_V2_FIELDS = (("coded_width", "u32"), ("coded_height", "u32"), ("resampling", "u8"))
_UINT = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q"}


def parse_shdr(data: bytes) -> dict[str, Any] | None:
    """SHDR fields by name (version 1's, or version 2's), without any validation; None if they do not fit."""
    for layout in (SHDR_FIELDS, SHDR_FIELDS + SHDR_V2_FIELDS):
        fields = _split_fields(data, layout)
        if fields is not None:
            return fields
    return None


def _split_fields(data: bytes, layout: tuple[tuple[str, str], ...]) -> dict[str, Any] | None:
    fields: dict[str, Any] = {}
    pos = 0
    try:
        for name, kind in layout:
            if kind in _UINT:
                (fields[name],) = struct.unpack_from(_UINT[kind], data, pos)
                pos += struct.calcsize(_UINT[kind])
            elif kind == "raw32":
                fields[name], pos = data[pos : pos + 32], pos + 32
            else:
                size_format = {"str8": ">B", "bytes16": ">H", "bytes32": ">I"}[kind]
                (size,) = struct.unpack_from(size_format, data, pos)
                pos += struct.calcsize(size_format)
                fields[name], pos = data[pos : pos + size], pos + size
    except struct.error:
        return None
    return fields if pos == len(data) else None


def build_shdr(fields: dict[str, Any]) -> bytes:
    """Inverse of :func:`parse_shdr`; integers wrap to their field width."""
    out = []
    for name, kind in SHDR_FIELDS + (SHDR_V2_FIELDS if "coded_width" in fields else ()):
        value = fields[name]
        if kind in _UINT:
            out.append(struct.pack(_UINT[kind], value % (1 << (8 * struct.calcsize(_UINT[kind])))))
        elif kind == "raw32":
            out.append(bytes(value[:32]).ljust(32, b"\0"))
        else:
            size_format, limit = {"str8": (">B", 0xFF), "bytes16": (">H", 0xFFFF), "bytes32": (">I", 1 << 20)}[kind]
            value = bytes(value[:limit])
            out.append(struct.pack(size_format, len(value)) + value)
    return b"".join(out)


# --------------------------------------------------------------------------- mutators

Mutator = Callable[[random.Random, bytes, dict[str, bytes]], bytes]
INTERESTING_32 = (0, 1, 2, 7, 8, 9, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
                  0xFFFFFFFF, 16 << 20, (16 << 20) + 1, 1 << 30, 1 << 20, (1 << 20) + 1)
INTERESTING_64 = (*INTERESTING_32, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
STRINGS = (b"", b"RGB", b"L", b"LA", b"RGBA", b"1", b"P", b"I;16", b"F", b"CMYK", b"RGBX", b"taesd", b"taesdxl",
           b"taesd3", b"taef1", b"sd-vae", b"nope", b"uniform", *(name.encode() for name in coders.CODERS),
           b"ctx", b"\xff\xfe", b"a\nb", b"A" * 255)


def _structured(data: bytes) -> tuple[list[Chunk], bytes] | None:
    parts = split(data)
    return parts if parts and parts[0] else None


def flip_bits(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite_bytes(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if out:
            out[rng.randrange(len(out))] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)))
    return bytes(out)


def insert_delete_bytes(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    pos = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        return data[:pos] + rng.randbytes(rng.randint(1, 16)) + data[pos:]
    return data[:pos] + data[pos + rng.randint(1, 16) :]


def truncate(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def version(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    major = rng.choice((0, 1, 1, 2, 255))
    return data[:8] + bytes([major, rng.choice((0, 1, 255))]) + data[10:]


def random_body(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """Random bytes after a valid magic (and, half the time, after a valid SHDR)."""
    keep = PREFIX_LENGTH
    parts = _structured(data)
    if parts and rng.random() < 0.5:
        keep += 12 + len(parts[0][0].data)
    return data[:keep] + rng.randbytes(rng.randint(0, 300))


def _edit_header(rng: random.Random, data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    parts = _structured(data)
    if not parts:
        return flip_bits(rng, data, {})
    chunks, trailer = parts
    fields = parse_shdr(chunks[0].data)
    if fields is None:
        return flip_bits(rng, data, {})
    edit(fields)
    chunks[0].data = build_shdr(fields)
    return join(data[:PREFIX_LENGTH], chunks, trailer)


def header_number(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """A numeric SHDR field set to 0 / max / sign-bit / off-by-one; sizes kept consistent half the time."""

    def edit(fields: dict[str, Any]) -> None:
        name = rng.choice([n for n, kind in SHDR_FIELDS + SHDR_V2_FIELDS if kind in _UINT and n in fields])
        pool = INTERESTING_64 if name == "payload_length" else INTERESTING_32
        value = rng.choice((*pool, fields[name] + 1, fields[name] - 1, rng.randrange(1 << 16)))
        fields[name] = value
        axis = name.removeprefix("coded_")
        if axis in ("width", "height") and rng.random() < 0.5:  # keep the sizes consistent
            fields[name] = max(1, min(value % (1 << 32), container.MAX_SIDE))
            coded = "coded_" + axis
            if coded in fields:  # version 2: the latent follows the coded size, at most the image's
                fields[coded] = min(fields[coded], fields[axis])
            fields["latent_" + axis] = -(-fields.get(coded, fields[axis]) // 8)

    return _edit_header(rng, data, edit)


def header_string(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    def edit(fields: dict[str, Any]) -> None:
        name = rng.choice([n for n, kind in SHDR_FIELDS if kind == "str8"])
        fields[name] = rng.choice((*STRINGS, rng.randbytes(rng.randint(0, 8))))
        if name == "model" and fields[name] in (b"taesd3", b"taef1") and rng.random() < 0.5:
            fields["channels"] = 16

    return _edit_header(rng, data, edit)


def header_params(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """Quantizer steps that are NaN, infinite, zero or out of range; odd coder parameters."""

    def edit(fields: dict[str, Any]) -> None:
        channels = fields["channels"]
        if rng.random() < 0.6:
            step = rng.choice((float("nan"), float("inf"), -1.0, 0.0, 1e-7, 1e-6, 1e6, 1e7, 0.5, 3e38))
            count = rng.choice((channels, channels, channels - 1, channels + 1, 0))
            fields["quantizer_params"] = struct.pack(f">{max(count, 0)}f", *[step] * max(count, 0))
        else:
            fields["coder_params"] = rng.choice((b"", b"\0", b"\x01", b"\x02", b"\x03", b"\x01\x01", b"\xff" * 9))
        if rng.random() < 0.3:
            fields["digest"] = rng.randbytes(32)

    return _edit_header(rng, data, edit)


def _edit_bytes(rng: random.Random, data: bytes) -> bytes:
    """A run of zeros or ones, a flipped bit, or bytes added or cut at the end."""
    pos = rng.randrange(len(data) + 1)
    run = rng.randint(1, 8)
    choice = rng.randrange(5)
    if choice == 0:
        return data[:pos] + bytes(run) + data[pos + run :]
    if choice == 1:
        return data[:pos] + b"\xff" * run + data[pos + run :]
    if choice == 2 and data:
        index = rng.randrange(len(data))
        return data[:index] + bytes([data[index] ^ (1 << rng.randrange(8))]) + data[index + 1 :]
    if choice == 3:
        return data + rng.randbytes(run)
    return data[: max(0, len(data) - run)]


def coder_bytes(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """Targeted edits of the coder's own bytes (its params, or the start or end of the payload)."""
    if rng.random() < 0.5:

        def edit(fields: dict[str, Any]) -> None:
            fields["coder_params"] = _edit_bytes(rng, fields["coder_params"])

        return _edit_header(rng, data, edit)
    parts = _structured(data)
    payload = [i for i, c in enumerate(parts[0]) if c.type == container.PAYLOAD] if parts else []
    if not parts or not payload:
        return flip_bits(rng, data, seeds)
    chunks, trailer = parts
    old = chunks[payload[0]].data
    head = rng.random() < 0.5
    new = _edit_bytes(rng, old[:8]) + old[8:] if head else old[:-8] + _edit_bytes(rng, old[-8:])
    _set_payload(chunks, payload[0], new, rng)
    return join(data[:PREFIX_LENGTH], chunks, trailer)


def chunk_length(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """A chunk's length field set to 0, +-1, past the end, 16 MiB, 1 GiB, 0xFFFFFFFF."""
    parts = _structured(data)
    if not parts:
        return flip_bits(rng, data, seeds)
    chunks, _ = parts
    index = rng.randrange(len(chunks))
    pos = PREFIX_LENGTH + sum(12 + len(c.data) for c in chunks[:index])
    old = len(chunks[index].data)
    value = rng.choice((*INTERESTING_32, old + 1, max(old - 1, 0), len(data), len(data) * 1000))
    return data[:pos] + struct.pack(">I", value % (1 << 32)) + data[pos + 4 :]


def _set_payload(chunks: list[Chunk], index: int, data: bytes, rng: random.Random) -> None:
    """Replace a chunk's data; for LATD, make SHDR agree on the length most of the time."""
    chunks[index].data = data
    if chunks[index].type == container.PAYLOAD and rng.random() < 0.8:
        fields = parse_shdr(chunks[0].data)
        if fields is not None:
            fields["payload_length"] = len(data)
            chunks[0].data = build_shdr(fields)


def _zstd_frame(content_size: int | None, body: bytes) -> bytes:
    """A hand-made zstd frame header (single segment, optional 8-byte content size) followed by ``body``."""
    if content_size is None:
        return struct.pack("<IB", 0xFD2FB528, 0x00) + bytes([0x58]) + body  # window descriptor, no size
    return struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", content_size) + body


def zstd_bomb(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """LATD or ALPH replaced by a zstd frame that claims a huge (or wrong, or no) content size."""
    import zstandard

    parts = _structured(data)
    if not parts:
        return flip_bits(rng, data, seeds)
    chunks, trailer = parts
    targets = [i for i, c in enumerate(chunks) if c.type in (container.PAYLOAD, container.ALPHA)]
    if not targets:
        return flip_bits(rng, data, seeds)
    index = rng.choice(targets)
    rle_block = struct.pack("<I", 1 | (1 << 1) | (rng.choice((1, 10, 4096)) << 3))[:3] + b"\0"
    choice = rng.randrange(5)
    if choice == 0:
        frame = _zstd_frame(rng.choice((4 << 30, 1 << 40, 1 << 62, (1 << 64) - 1)), rle_block)
    elif choice == 1:
        frame = _zstd_frame(None, rle_block * rng.choice((1, 64)))
    elif choice == 2:
        frame = _zstd_frame(rng.choice((0, 1, 10, 4096)), rle_block)
    else:
        original = chunks[index].data[1:] if chunks[index].type == container.ALPHA else chunks[index].data
        try:
            expected = len(zstandard.ZstdDecompressor().decompressobj().decompress(original))
        except zstandard.ZstdError:
            expected = 256
        size = rng.choice((expected, expected * 2, expected - 1, 1 << 24)) if choice == 3 else expected
        frame = zstandard.ZstdCompressor(write_content_size=rng.random() < 0.5).compress(b"\0" * max(size, 0))
    if chunks[index].type == container.ALPHA:
        frame = bytes([rng.choice((0, 0, 1))]) + frame
    _set_payload(chunks, index, frame, rng)
    return join(data[:PREFIX_LENGTH], chunks, trailer)


def replace_chunk_data(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    parts = _structured(data)
    if not parts:
        return flip_bits(rng, data, seeds)
    chunks, trailer = parts
    index = rng.randrange(len(chunks))
    old = chunks[index].data
    new = rng.choice((b"", rng.randbytes(len(old)), rng.randbytes(rng.randint(1, 64)), old[: len(old) // 2]))
    _set_payload(chunks, index, new, rng)
    return join(data[:PREFIX_LENGTH], chunks, trailer)


def chunk_order(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """Duplicate, drop or swap chunks."""
    parts = _structured(data)
    if not parts:
        return flip_bits(rng, data, seeds)
    chunks, trailer = parts
    i, j = rng.randrange(len(chunks)), rng.randrange(len(chunks) + 1)
    action = rng.randrange(3)
    if action == 0:
        chunks.insert(j, Chunk(chunks[i].type, chunks[i].data, chunks[i].crc))
    elif action == 1:
        del chunks[i]
    else:
        j = min(j, len(chunks) - 1)
        chunks[i], chunks[j] = chunks[j], chunks[i]
    return join(data[:PREFIX_LENGTH], chunks, trailer)


def unknown_chunk(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """A chunk this reader does not know: critical, ancillary, or not letters at all."""
    parts = _structured(data)
    if not parts:
        return flip_bits(rng, data, seeds)
    chunks, trailer = parts
    kind = rng.randrange(4)
    letters = "abcdefghijklmnopqrstuvwxyz"
    name = "".join(rng.choice(letters) for _ in range(4))
    if kind == 0:
        chunk_type = name.capitalize().encode()
    elif kind == 1:
        chunk_type = name.encode()
    elif kind == 2:
        chunk_type = rng.randbytes(4)
    else:
        chunk_type = rng.choice((b"eXIf", b"iCCP", b"xMPd", b"ALPH", b"LATD", b"SEND", b"SHDR", b"shdr", b"send"))
    chunks.insert(rng.randrange(1, len(chunks) + 1), Chunk(chunk_type, rng.randbytes(rng.randint(0, 40))))
    return join(data[:PREFIX_LENGTH], chunks, trailer)


def splice(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """Chunks of another seed mixed in: a payload or alpha plane that belongs to a different header."""
    parts, other = _structured(data), _structured(seeds[rng.choice(sorted(seeds))])
    if not parts or not other:
        return flip_bits(rng, data, seeds)
    chunks, trailer = parts
    donor = rng.choice(other[0])
    same = [i for i, c in enumerate(chunks) if c.type == donor.type]
    if same:
        chunks[rng.choice(same)] = donor
    else:
        chunks.insert(rng.randrange(1, len(chunks) + 1), donor)
    return join(data[:PREFIX_LENGTH], chunks, trailer)


MUTATORS: dict[str, Mutator] = {
    fn.__name__: fn
    for fn in (flip_bits, overwrite_bytes, insert_delete_bytes, truncate, version, random_body, header_number,
               header_string, header_params, coder_bytes, chunk_length, zstd_bomb, replace_chunk_data, chunk_order,
               unknown_chunk, splice)
}


@dataclass
class Case:
    """One input: reproducible from ``label`` (run seed, index, seed file, mutators).

    Every input is loaded and verified; the flags add a load with
    LOAD_TRUNCATED_IMAGES and a ``thumbnail()`` (the latent preview path).
    """

    label: str
    data: bytes
    load_truncated: bool = False
    thumbnail: bool = False


def mutate(run_seed: int, index: int, seeds: dict[str, bytes]) -> Case:
    """The ``index``-th mutant of a run: 1-3 stacked mutators, then CRCs recomputed half the time."""
    rng = random.Random(f"{run_seed}:{index}")
    seed_name = rng.choice(sorted(seeds))
    data = seeds[seed_name]
    names = [rng.choice(sorted(MUTATORS)) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    for name in names:
        data = MUTATORS[name](rng, data, seeds)
    fixed = rng.random() < 0.5
    if fixed:
        data = fix_crcs(data)
    label = f"run {run_seed} #{index}: {seed_name} <- {'+'.join(names)}{' +crc' if fixed else ''}"
    return Case(label, data, load_truncated=rng.random() < 0.25, thumbnail=rng.random() < 0.25)


def truncations(seeds: dict[str, bytes], names: Iterable[str]) -> Iterator[Case]:
    """Each named seed cut at every length, read both strictly and with LOAD_TRUNCATED_IMAGES."""
    for name in names:
        data = seeds[name]
        for length in range(len(data)):
            yield Case(f"{name} truncated to {length}", data[:length], load_truncated=True, thumbnail=True)


# --------------------------------------------------------------------------- running one input

def _explicit_value_error(exc: ValueError) -> bool:
    """A ValueError counts as an explicit check when a ``raise`` in this package threw it."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return bool(last and last.filename.startswith(PACKAGE_DIR) and (last.line or "").lstrip().startswith("raise"))


def _attempt(path: str, action: str) -> str:
    with Image.open(path) as image:
        if image.format != "SDL":
            return f"other-format:{image.format}"
        if action == "verify":
            image.verify()
            return "verified"
        if action == "thumbnail":
            image.thumbnail((2, 2))
            return "thumbnail"
        image.load()
        return "decoded"


def classify(path: str, action: str) -> tuple[str, str]:
    """(outcome kind, traceback when the outcome is a failure) for one action on one file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _attempt(path, action), ""
    except Image.DecompressionBombError:
        return "DecompressionBombError", ""
    except UnidentifiedImageError:
        return "UnidentifiedImageError", ""
    except (SyntaxError, OSError) as exc:
        return type(exc).__name__, ""
    except ValueError as exc:
        if _explicit_value_error(exc):
            return type(exc).__name__, ""
        return f"FAIL:{type(exc).__name__}", traceback.format_exc()
    except Exception as exc:  # anything else is exactly what the fuzzer looks for
        return f"FAIL:{type(exc).__name__}", traceback.format_exc()


def _clear_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fp:
            fp.write("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int:
    with open("/proc/self/status") as fp:
        for line in fp:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(case: Case, path: str) -> dict[str, Any]:
    """Write the input to ``path`` and run every action on it; outcome kinds, failure details, peaks."""
    with open(path, "wb") as fp:
        fp.write(case.data)
    result: dict[str, Any] = {"outcomes": {}, "details": {}}
    rss_tracked = _clear_rss_peak()
    rss_before = _rss_peak() if rss_tracked else 0
    tracemalloc.reset_peak()
    traced_before = tracemalloc.get_traced_memory()[0]
    for action in ACTIONS:
        if (action == "load_truncated" and not case.load_truncated) or (action == "thumbnail" and not case.thumbnail):
            continue
        ImageFile.LOAD_TRUNCATED_IMAGES = action == "load_truncated"
        try:
            kind, detail = classify(path, action)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        result["outcomes"][action] = kind
        if detail:
            result["details"][action] = detail
    result["traced_peak"] = tracemalloc.get_traced_memory()[1] - traced_before
    result["rss_growth"] = _rss_peak() - rss_before if rss_tracked else 0
    if result["traced_peak"] > TRACED_LIMIT or result["rss_growth"] > RSS_LIMIT:
        result["outcomes"]["memory"] = "FAIL:memory"
        result["details"]["memory"] = f"traced peak {result['traced_peak']}, RSS growth {result['rss_growth']}"
    return result


def is_failure(kind: str) -> bool:
    return kind.startswith("FAIL")


# --------------------------------------------------------------------------- worker pool

def _worker(conn: connection.Connection, warmup: list[bytes], max_pixels: int) -> None:
    """Worker process: one CPU thread, a scratch file, every model loaded, then cases until told to stop."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # a missing model is expected, not news
    import torch

    torch.set_num_threads(1)
    from pillow_sdlatent.core.registry import REGISTRY
    from pillow_sdlatent.models import load_model

    for name in REGISTRY:  # a mutant may name any model: load them all now, not inside a measured input
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_model(name)
        except OSError:
            pass
    Image.MAX_IMAGE_PIXELS = max_pixels
    scratch_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
    handle, path = tempfile.mkstemp(prefix="sdl-fuzz-", suffix=".sdl", dir=scratch_dir)
    os.close(handle)
    tracemalloc.start()
    try:
        for data in warmup:
            run_case(Case("warmup", data), path)
        conn.send("ready")
        while True:
            case = conn.recv()
            if case is None:
                return
            conn.send(run_case(case, path))
    finally:
        os.unlink(path)


@dataclass
class _Slot:
    process: Any
    conn: connection.Connection
    case: Case | None = None
    started: float = 0.0


@dataclass
class FuzzPool:
    """Worker processes with a per-input timeout; a worker that dies or hangs is reported and replaced.

    Workers are spawned (not forked) so that torch's threads start clean in each.
    """

    workers: int = 2
    timeout: float = 20.0
    warmup: list[bytes] = field(default_factory=list)
    max_pixels: int = FUZZ_MAX_PIXELS
    start_timeout: float = 600.0
    _slots: list[_Slot] = field(default_factory=list)

    def __enter__(self) -> FuzzPool:
        self._slots = [self._start() for _ in range(self.workers)]
        for slot in self._slots:
            self._wait_ready(slot)
        return self

    def __exit__(self, *exc: object) -> None:
        for slot in self._slots:
            with contextlib.suppress(OSError):
                slot.conn.send(None)
            slot.process.join(5)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()

    def _start(self) -> _Slot:
        context = get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, self.warmup, self.max_pixels), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def _wait_ready(self, slot: _Slot) -> None:
        if not slot.conn.poll(self.start_timeout) or slot.conn.recv() != "ready":
            raise RuntimeError("fuzz worker did not start")

    def _replace(self, slot: _Slot) -> None:
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join()
        fresh = self._start()
        self._wait_ready(fresh)
        slot.process, slot.conn, slot.case = fresh.process, fresh.conn, None

    def map(self, cases: Iterable[Case]) -> Iterator[tuple[Case, dict[str, Any]]]:
        """Run every case; yields (case, result) in completion order."""
        pending = iter(cases)
        exhausted = False
        while True:
            for slot in self._slots:
                if slot.case is None and not exhausted:
                    case = next(pending, None)
                    if case is None:
                        exhausted = True
                        break
                    slot.case, slot.started = case, time.monotonic()
                    slot.conn.send(case)
            busy = [slot for slot in self._slots if slot.case is not None]
            if not busy:
                return
            deadline = min(slot.started for slot in busy) + self.timeout
            ready = connection.wait([slot.conn for slot in busy], max(0.0, deadline - time.monotonic()))
            for slot in busy:
                case = slot.case
                assert case is not None
                if slot.conn in ready:
                    try:
                        result = slot.conn.recv()
                    except (EOFError, OSError):
                        slot.process.join()
                        result = _dead(f"FAIL:crash(exit {slot.process.exitcode})")
                        self._replace(slot)
                        yield case, result
                        continue
                    slot.case = None
                    yield case, result
                elif time.monotonic() - slot.started > self.timeout:
                    self._replace(slot)
                    yield case, _dead("FAIL:hang")


def _dead(kind: str) -> dict[str, Any]:
    """The result of an input that killed or stalled its worker: charged to every action."""
    return {"outcomes": {"worker": kind}, "details": {"worker": kind}, "traced_peak": 0, "rss_growth": 0}
