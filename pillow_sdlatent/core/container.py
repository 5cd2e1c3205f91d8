"""The byte layout of ``.sdl`` files (see FORMAT.md): chunks, CRCs, limits.

Pure Python on purpose: ``Image.open`` goes through here and must stay cheap
(no torch, no numpy). Every length read from a file is checked against a limit
before anything is allocated for it.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import IO

from PIL import Image

SIGNATURE = b"\x89SDL\r\n\x1a\n"
#: The major versions this package reads. A file carries the lowest version that can express it
#: (FORMAT.md, Version rules): 1.0, or 2.0 when its latent codes a resampled image.
READ_MAJORS = (1, 2)
#: Resampling filters a version-2 header may name for coded size -> image size (FORMAT.md, SHDR).
LANCZOS = 1
RESAMPLING = {LANCZOS: Image.Resampling.LANCZOS}

LATENT_FACTOR = 8
MAX_SIDE = 1 << 20
MAX_HEADER_BYTES = 1 << 16
MAX_METADATA_BYTES = 16 << 20
MAX_CHUNKS = 1024
MAX_PARAMS_BYTES = 1 << 20
MAX_CHANNELS = 64
#: The modes a file may declare, i.e. what a reader decodes to (FORMAT.md, Modes).
MODES = frozenset({"RGB", "L", "RGBA", "LA", "1"})
ALPHA_MODES = frozenset({"RGBA", "LA"})

#: Metadata chunk type -> the Pillow ``info`` key it carries.
METADATA_CHUNKS = {b"eXIf": "exif", b"iCCP": "icc_profile", b"xMPd": "xmp"}
HEADER, ALPHA, PAYLOAD, END = b"SHDR", b"ALPH", b"LATD", b"SEND"
#: QREG (FORMAT.md): rectangles of the latent whose symbols stand for a finer step than the quantizer's
REGIONS = b"QREG"
MAX_REGIONS = 1024
#: the smallest step factor a region may give (a region only ever refines)
MIN_STEP_FACTOR = 2.0**-8
#: SHDR flag bit 0 (FORMAT.md, SHDR): the writer found fine detail (small text) that latent restoration
#: would redraw; a reader decodes without it. Readers before format 1.1 ignore it, as they may.
FLAG_NO_RESTORATION = 1


class FormatError(SyntaxError):
    """The bytes are not an ``.sdl`` file, or its header is damaged."""


class DamagedFileError(OSError):
    """The header is fine but the rest of the file is damaged or truncated."""


class TruncatedPayloadError(DamagedFileError):
    """The payload chunk ends before its declared length."""

    def __init__(self, message: str, partial: bytes) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class Header:
    """Everything a reader needs to know before touching the payload."""

    width: int
    height: int
    original_mode: str
    mode: str
    model: str
    decoder_digest: bytes
    latent_shape: tuple[int, int, int]
    quantizer: str
    quantizer_params: bytes
    coder: str
    coder_params: bytes
    payload_length: int
    flags: int = 0
    #: (width, height) of the image the latent codes, when smaller than the image (version 2);
    #: the reader resizes the decoded image to (width, height) with ``resampling``
    coded_size: tuple[int, int] | None = None
    resampling: int = LANCZOS

    @property
    def coded(self) -> tuple[int, int]:
        """The size of the image the latent holds: the image's own size unless it was resampled."""
        return self.coded_size or (self.width, self.height)

    @property
    def needed_version(self) -> tuple[int, int]:
        """The lowest format version that can express this header (what a writer writes)."""
        return (2 if self.coded_size is not None else 1, 1 if self.flags & FLAG_NO_RESTORATION else 0)

    def to_bytes(self) -> bytes:
        channels, lat_h, lat_w = self.latent_shape
        parts = [
            struct.pack(">III", self.width, self.height, self.flags),
            _str8(self.original_mode),
            _str8(self.mode),
            _str8(self.model),
            _exact(self.decoder_digest, 32, "decoder digest"),
            struct.pack(">HII", channels, lat_h, lat_w),
            _str8(self.quantizer),
            struct.pack(">H", len(self.quantizer_params)) + self.quantizer_params,
            _str8(self.coder),
            struct.pack(">I", len(self.coder_params)) + self.coder_params,
            struct.pack(">Q", self.payload_length),
        ]
        if self.coded_size is not None:
            parts.append(struct.pack(">IIB", *self.coded_size, self.resampling))
        data = b"".join(parts)
        if len(data) > MAX_HEADER_BYTES:
            raise ValueError("header too large")
        return data

    @classmethod
    def from_bytes(cls, data: bytes, major: int = 1) -> Header:
        reader = _Reader(data)
        width, height, flags = reader.unpack(">III")
        original_mode, mode, model = reader.str8(), reader.str8(), reader.str8()
        digest = reader.take(32)
        channels, lat_h, lat_w = reader.unpack(">HII")
        quantizer = reader.str8()
        quantizer_params = reader.take(reader.unpack(">H")[0])
        coder = reader.str8()
        (coder_len,) = reader.unpack(">I")
        if coder_len > MAX_PARAMS_BYTES:
            raise FormatError("coder parameters too large")
        coder_params = reader.take(coder_len)
        (payload_length,) = reader.unpack(">Q")
        coded_size, resampling = None, LANCZOS
        if major >= 2:
            coded_width, coded_height, resampling = reader.unpack(">IIB")
            coded_size = (coded_width, coded_height)
        if not reader.at_end():
            raise FormatError("trailing bytes in SHDR")
        header = cls(width, height, original_mode, mode, model, digest, (channels, lat_h, lat_w),
                     quantizer, quantizer_params, coder, coder_params, payload_length, flags,
                     coded_size, resampling)
        header.check_limits()
        return header

    def check_limits(self) -> None:
        """Refuse shapes and lengths the format does not allow (FORMAT.md, Limits)."""
        check_size(self.width, self.height)
        if self.mode not in MODES:
            raise FormatError(f"SDL header declares unsupported image mode {self.mode!r}")
        channels, lat_h, lat_w = self.latent_shape
        if not 1 <= channels <= MAX_CHANNELS:
            raise FormatError(f"latent channel count {channels} out of range")
        coded_width, coded_height = self.coded
        if not (1 <= coded_width <= self.width and 1 <= coded_height <= self.height):
            raise FormatError(f"coded size {coded_width}x{coded_height} is not within the image size")
        if self.resampling not in RESAMPLING:
            raise DamagedFileError(
                f"SDL file resamples with filter {self.resampling}, which this reader does not know; "
                "upgrade pillow_sdlatent"
            )
        if (lat_h, lat_w) != latent_size(coded_width, coded_height)[::-1]:
            raise FormatError("latent shape does not match the coded image size")
        if self.payload_length > max_payload_length(self.latent_shape):
            raise FormatError("payload length exceeds what the latent shape allows")


@dataclass(frozen=True)
class Region:
    """A rectangle of latent positions, ``x0 <= x < x1`` and ``y0 <= y < y1``, whose symbols were quantized with
    the quantizer's steps times ``factor`` (a float32 in [MIN_STEP_FACTOR, 1])."""

    x0: int
    y0: int
    x1: int
    y1: int
    factor: float


def regions_to_bytes(regions: tuple[Region, ...], latent_shape: tuple[int, int, int]) -> bytes:
    """QREG's data; ``ValueError`` for regions a reader would refuse."""
    check_regions(regions, latent_shape, ValueError)
    return struct.pack(">H", len(regions)) + b"".join(
        struct.pack(">IIIIf", r.x0, r.y0, r.x1, r.y1, r.factor) for r in regions)


def regions_from_bytes(data: bytes, latent_shape: tuple[int, int, int]) -> tuple[Region, ...]:
    """QREG's regions; ``DamagedFileError`` when the chunk is malformed or a region leaves the latent."""
    if len(data) < 2 or len(data) != 2 + 20 * struct.unpack(">H", data[:2])[0]:
        raise DamagedFileError("QREG chunk length does not match its region count")
    if len(data) > 2 + 20 * MAX_REGIONS:
        raise DamagedFileError(f"QREG holds more than {MAX_REGIONS} regions")
    regions = tuple(Region(*struct.unpack_from(">IIIIf", data, 2 + 20 * i)) for i in range((len(data) - 2) // 20))
    check_regions(regions, latent_shape, DamagedFileError)
    return regions


def check_regions(regions: tuple[Region, ...], latent_shape: tuple[int, int, int], error: type[Exception]) -> None:
    """1..MAX_REGIONS non-empty rectangles inside the latent, each factor a float32 in [MIN_STEP_FACTOR, 1]."""
    _, lat_h, lat_w = latent_shape
    if not 1 <= len(regions) <= MAX_REGIONS:
        raise error(f"QREG holds {len(regions)} regions, not 1..{MAX_REGIONS}")
    for r in regions:
        if not (0 <= r.x0 < r.x1 <= lat_w and 0 <= r.y0 < r.y1 <= lat_h):
            raise error(f"QREG region {r} is not within the {lat_w}x{lat_h} latent")
        if not MIN_STEP_FACTOR <= r.factor <= 1 or struct.unpack(">f", struct.pack(">f", r.factor))[0] != r.factor:
            raise error(f"QREG step factor {r.factor!r} is not a float32 in [{MIN_STEP_FACTOR}, 1]")


@dataclass
class Layout:
    """Where things are in an opened file; the payload itself is not read yet."""

    header: Header
    version: tuple[int, int]
    metadata: dict[str, bytes] = field(default_factory=dict)
    alpha: bytes | None = None
    regions: tuple[Region, ...] = ()
    payload_offset: int = 0
    payload_crc: int | None = None
    complete: bool = True


def check_size(width: int, height: int) -> None:
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise FormatError(f"image size {width}x{height} out of range (1..{MAX_SIDE} a side)")


def check_pixel_limit(width: int, height: int, *, warn: bool = True) -> None:
    """Pillow's decompression-bomb rule on ``Image.MAX_IMAGE_PIXELS``, for decode paths that skip ``Image.open``.

    ``Image.open`` applies it itself after ``_open``; a directly constructed
    image file, ``decode_file`` and ``read_latent`` come through here instead.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return
    pixels = width * height
    if pixels > 2 * limit:
        raise Image.DecompressionBombError(
            f"Image size ({pixels} pixels) exceeds limit of {2 * limit} pixels, "
            "could be decompression bomb DOS attack."
        )
    if warn and pixels > limit:
        warnings.warn(
            f"Image size ({pixels} pixels) exceeds limit of {limit} pixels, could be decompression bomb DOS attack.",
            Image.DecompressionBombWarning, stacklevel=3,
        )


def latent_size(width: int, height: int) -> tuple[int, int]:
    """(latent width, latent height) for an image: ceil division by 8."""
    return -(-width // LATENT_FACTOR), -(-height // LATENT_FACTOR)


def max_payload_length(latent_shape: tuple[int, int, int]) -> int:
    channels, lat_h, lat_w = latent_shape
    return 1024 + 4 * channels * lat_h * lat_w


def is_critical(chunk_type: bytes) -> bool:
    return chunk_type[:1].isupper()


def write(fp: IO[bytes], header: Header, payload: bytes, metadata: dict[str, bytes],
          alpha: bytes | None = None, regions: tuple[Region, ...] = ()) -> None:
    """Write a whole file. Callers build all bytes first, so a failure writes nothing."""
    fp.write(serialize(header, payload, metadata, alpha, regions))


def serialize(header: Header, payload: bytes, metadata: dict[str, bytes],
              alpha: bytes | None = None, regions: tuple[Region, ...] = ()) -> bytes:
    if len(payload) != header.payload_length:
        raise ValueError("payload length does not match the header")
    header.check_limits()
    out = [SIGNATURE, bytes(header.needed_version), _chunk(HEADER, header.to_bytes())]
    for chunk_type, key in METADATA_CHUNKS.items():
        value = metadata.get(key)
        if value:
            if len(value) > MAX_METADATA_BYTES:
                raise ValueError(f"{key} metadata larger than {MAX_METADATA_BYTES} bytes")
            out.append(_chunk(chunk_type, value))
    if alpha is not None:
        if len(alpha) > MAX_METADATA_BYTES:
            raise ValueError("alpha plane too large")
        out.append(_chunk(ALPHA, alpha))
    if regions:
        out.append(_chunk(REGIONS, regions_to_bytes(regions, header.latent_shape)))
    out.append(_chunk(PAYLOAD, payload))
    out.append(_chunk(END, b""))
    return b"".join(out)


def check_signature(prefix: bytes) -> bool:
    return prefix[: len(SIGNATURE)] == SIGNATURE


def read_layout(fp: IO[bytes]) -> Layout:
    """Parse the header and metadata and locate the payload, without reading it.

    ``FormatError`` (a ``SyntaxError``) when this is not a valid ``.sdl``
    header; ``DamagedFileError`` (an ``OSError``) for a newer major version, an
    unknown critical chunk, or damage after the header.
    """
    if not check_signature(fp.read(len(SIGNATURE))):
        raise FormatError("not an SDL file")
    version = fp.read(2)
    if len(version) != 2:
        raise FormatError("truncated SDL signature")
    major, minor = version
    if major not in READ_MAJORS:
        raise DamagedFileError(
            f"SDL format version {major}.{minor} is not supported by this reader "
            f"(it reads versions {' and '.join(f'{m}.x' for m in READ_MAJORS)}); upgrade pillow_sdlatent"
        )
    chunk_type, data, crc_ok = _read_chunk(fp, MAX_HEADER_BYTES, FormatError)
    if chunk_type != HEADER:
        raise FormatError("SDL file does not start with SHDR")
    if not crc_ok:
        raise FormatError("SDL header CRC mismatch")
    layout = Layout(Header.from_bytes(data, major), (major, minor))
    _read_body(fp, layout)
    return layout


def _read_body(fp: IO[bytes], layout: Layout) -> None:
    """Walk the chunks after SHDR; tolerate a truncated payload, flag it."""
    seen: set[bytes] = set()
    for _ in range(MAX_CHUNKS):
        head = fp.read(8)
        if len(head) < 8:
            if PAYLOAD in seen:
                layout.complete = False
                return
            raise DamagedFileError("SDL file truncated before its payload")
        length, chunk_type = struct.unpack(">I4s", head)
        if not chunk_type.isalpha():  # bytes.isalpha: ASCII letters only
            raise DamagedFileError(f"invalid chunk type {chunk_type!r}")
        if chunk_type in seen and chunk_type in (HEADER, ALPHA, REGIONS, PAYLOAD, END, *METADATA_CHUNKS):
            raise DamagedFileError(f"duplicate {chunk_type!r} chunk")
        if chunk_type == HEADER:
            raise DamagedFileError("duplicate 'SHDR' chunk")
        seen.add(chunk_type)
        if chunk_type == PAYLOAD:
            if length != layout.header.payload_length:
                raise DamagedFileError("payload chunk length does not match the header")
            layout.payload_offset = fp.tell()
            fp.seek(length, 1)
            crc = fp.read(4)
            if len(crc) < 4:
                layout.complete = False
                return
            layout.payload_crc = struct.unpack(">I", crc)[0]
            continue
        if chunk_type == END:
            if PAYLOAD not in seen:
                raise DamagedFileError("SDL file has no payload")
            if layout.header.mode in ALPHA_MODES and layout.alpha is None:
                raise DamagedFileError("SDL file lacks the alpha plane its mode needs")
            if length != 0:
                raise DamagedFileError("SEND chunk is not empty")
            crc = fp.read(4)
            if len(crc) < 4:
                layout.complete = False
            elif struct.unpack(">I", crc)[0] != zlib.crc32(END):
                raise DamagedFileError("CRC mismatch in 'SEND' chunk")
            return
        if is_critical(chunk_type) and chunk_type not in (ALPHA, REGIONS):
            raise DamagedFileError(
                f"SDL file needs chunk {chunk_type!r}, which this reader does not know; "
                "upgrade pillow_sdlatent"
            )
        if PAYLOAD in seen and chunk_type in (ALPHA, REGIONS):
            raise DamagedFileError(f"{chunk_type.decode()} chunk after the payload")
        if length > MAX_METADATA_BYTES:
            raise DamagedFileError(f"{chunk_type!r} chunk larger than {MAX_METADATA_BYTES} bytes")
        data = _read_upto(fp, length)
        crc = fp.read(4)
        if len(data) < length or len(crc) < 4:
            if PAYLOAD in seen:
                layout.complete = False
                return
            raise DamagedFileError(f"SDL file truncated inside {chunk_type!r}")
        if struct.unpack(">I", crc)[0] != zlib.crc32(chunk_type + data):
            raise DamagedFileError(f"CRC mismatch in {chunk_type!r} chunk")
        if chunk_type == ALPHA:
            if layout.header.mode not in ALPHA_MODES:
                raise DamagedFileError(f"ALPH chunk in a {layout.header.mode} image")
            layout.alpha = data
        elif chunk_type == REGIONS:
            layout.regions = regions_from_bytes(data, layout.header.latent_shape)
        elif chunk_type in METADATA_CHUNKS:
            layout.metadata[METADATA_CHUNKS[chunk_type]] = data
    raise DamagedFileError(f"more than {MAX_CHUNKS} chunks")


def read_payload(fp: IO[bytes], layout: Layout) -> bytes:
    """Read and CRC-check the payload.

    ``TruncatedPayloadError`` (carrying the bytes that are there) when the file
    ends early; ``DamagedFileError`` when the CRC does not match.
    """
    length = layout.header.payload_length
    fp.seek(layout.payload_offset)
    data = _read_upto(fp, length)
    crc = fp.read(4)
    if len(data) < length or len(crc) < 4:
        raise TruncatedPayloadError(
            f"SDL payload truncated ({len(data)} of {length} bytes)", data
        )
    if struct.unpack(">I", crc)[0] != zlib.crc32(PAYLOAD + data):
        raise DamagedFileError("SDL payload CRC mismatch")
    return data


def _chunk(chunk_type: bytes, data: bytes) -> bytes:
    return struct.pack(">I4s", len(data), chunk_type) + data + struct.pack(
        ">I", zlib.crc32(chunk_type + data)
    )


def _read_chunk(fp: IO[bytes], limit: int, error: type[Exception]) -> tuple[bytes, bytes, bool]:
    head = fp.read(8)
    if len(head) < 8:
        raise error("truncated SDL chunk header")
    length, chunk_type = struct.unpack(">I4s", head)
    if length > limit:
        raise error(f"{chunk_type!r} chunk of {length} bytes exceeds the limit of {limit}")
    data = _read_upto(fp, length)
    crc = fp.read(4)
    if len(data) < length or len(crc) < 4:
        raise error(f"truncated {chunk_type!r} chunk")
    return chunk_type, data, struct.unpack(">I", crc)[0] == zlib.crc32(chunk_type + data)


def _read_upto(fp: IO[bytes], size: int) -> bytes:
    """At most ``size`` bytes, never asking for more than the file holds.

    A buffered file's ``read(n)`` allocates ``n`` bytes before it looks, so a
    lying length field must not get that far.
    """
    here = fp.tell()
    end = fp.seek(0, io.SEEK_END)
    fp.seek(here)
    return fp.read(max(0, min(size, end - here)))


def _str8(text: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > 255:
        raise ValueError(f"string too long for the header: {text[:40]!r}...")
    return bytes([len(raw)]) + raw


def _exact(raw: bytes, size: int, what: str) -> bytes:
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes")
    return raw


class _Reader:
    """Bounds-checked cursor over the header bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise FormatError("SDL header too short")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def str8(self) -> str:
        raw = self.take(self.take(1)[0])
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("non-ASCII string in SDL header") from None
        if not text.isprintable():
            raise FormatError("unprintable string in SDL header")
        return text

    def at_end(self) -> bool:
        return self.pos == len(self.data)
