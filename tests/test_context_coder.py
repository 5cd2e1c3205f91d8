"""The "ctx1" context-model coder: exact round trips, the saving over zstd, a frozen format, hostile input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pillow_sdlatent.context_coder import ContextCoder, _tables
from pillow_sdlatent.entropy import ZstdCoder

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "kodak_taesd_symbols.npz"
CODER = ContextCoder()


def round_trip(symbols: np.ndarray) -> tuple[bytes, bytes]:
    params, payload = CODER.encode(symbols)
    decoded = CODER.decode(params, payload, symbols.shape)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, symbols)
    return params, payload


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 9), (1, 7, 1), (2, 5, 4), (16, 3, 5), (4, 13, 21), (16, 9, 11)])
@pytest.mark.parametrize("scale", [0.3, 3.0, 40.0])
def test_round_trip_laplacian(shape: tuple[int, int, int], scale: float) -> None:
    rng = np.random.default_rng(hash((shape, scale)) % 2**32)
    round_trip(np.rint(rng.laplace(0, scale, shape)).astype(np.int32))


@pytest.mark.parametrize(
    "symbols",
    [
        np.zeros((4, 64, 96), np.int32),
        np.full((1, 1, 1), 32767, np.int32),
        np.full((1, 1, 1), -32768, np.int32),
        np.full((16, 2, 3), -32768, np.int32),
        np.tile(np.array([32767, -32768], np.int32), (3, 8, 4)),
        np.random.default_rng(1).integers(-32768, 32768, (4, 12, 10)).astype(np.int32),
    ],
    ids=["zeros", "max", "min", "min-16ch", "alternating-extremes", "uniform-int16"],
)
def test_round_trip_extremes(symbols: np.ndarray) -> None:
    _, payload = round_trip(symbols)
    assert len(payload) <= 1024 + 4 * symbols.size  # FORMAT.md's LATD limit: at most 32 bits a symbol


def test_escapes_in_a_smooth_latent_stay_cheap() -> None:
    """Rare huge values are escaped without spoiling the predictor for everything else."""
    rng = np.random.default_rng(2)
    symbols = np.rint(rng.laplace(0, 2, (4, 32, 48))).astype(np.int32)
    plain = sum(map(len, round_trip(symbols)))
    symbols[1, 5, 7], symbols[3, 30, 0], symbols[0, 0, 47] = 32767, -32768, 20000
    assert sum(map(len, round_trip(symbols))) < plain + 40


def test_empty_latent() -> None:
    assert CODER.encode(np.zeros((4, 0, 3), np.int32)) == (b"", b"")
    assert CODER.decode(b"", b"", (4, 0, 3)).shape == (4, 0, 3)


def test_encode_refuses_what_it_cannot_code() -> None:
    with pytest.raises(ValueError):
        CODER.encode(np.array([[[32768]]], np.int32))
    with pytest.raises(ValueError):
        CODER.encode(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError):
        CODER.encode(np.zeros((1, 2, 3), np.float32))


def test_kodak_latents_beat_zstd() -> None:
    """Quantized TAESD latents of kodim04 and kodim22 (fixture, steps 0.25 and 0.6).

    Measured when written: 21.5% fewer bytes than zstd at step 0.6 and 16.6% at
    0.25 (all 24 Kodak images: 21.3% and 17.3%). The 25% once aimed for is not
    reached by this model; the floors below guard against regressions.
    """
    fixture = np.load(FIXTURE)
    for step, floor in (("0.6", 0.20), ("0.25", 0.15)):
        ctx = zstd = 0
        for image in ("kodim04", "kodim22"):
            symbols = fixture[f"{image}_step{step}"].astype(np.int32)
            ctx += sum(map(len, round_trip(symbols)))
            zstd += sum(map(len, ZstdCoder().encode(symbols)))
        assert 1 - ctx / zstd >= floor, (step, ctx, zstd)


# Frozen format: a stream written by this version must keep decoding to the same symbols, on any
# platform. The expected symbols come from integer arithmetic only.
GOLDEN_PARAMS = "1ffafe5fffc7ffff5fcbfff8fffffff27f2fffe0"
GOLDEN_PAYLOAD = (
    "fcff876b75343701bc6122008b37a900d7e4e0259ad6e545557d92955be0b8890d874d0cfd136eba81a71e34cd3e9c2396758acab9d4"
    "df6f5d68c639ec0756e8a6d26e6fa0efba100307f411a117a1f41f00c3e49893f4bf"
)
TABLES_SHA256 = "734f5c74a8367e2e9170ead92d646da5a05c5a4a586dfc25308269d8fc2f4808"


def golden_symbols() -> np.ndarray:
    c, y, x = np.meshgrid(np.arange(3), np.arange(6), np.arange(7), indexing="ij")
    symbols = ((c * 7919 + y * 104729 + x * 1299709) % 13 - 6 + y - x).astype(np.int32)
    symbols[1, 2, 3], symbols[2, 5, 0], symbols[0, 0, 0] = 30000, -32768, 32767
    return symbols


def test_frozen_stream_decodes() -> None:
    decoded = CODER.decode(bytes.fromhex(GOLDEN_PARAMS), bytes.fromhex(GOLDEN_PAYLOAD), (3, 6, 7))
    np.testing.assert_array_equal(decoded, golden_symbols())


def test_frozen_probability_tables() -> None:
    assert hashlib.sha256(_tables().freq.astype("<i4").tobytes()).hexdigest() == TABLES_SHA256


def decode_or_value_error(params: bytes, payload: bytes, shape: tuple[int, int, int]) -> None:
    try:
        decoded = CODER.decode(params, payload, shape)
    except ValueError:
        return
    assert decoded.shape == shape and decoded.dtype == np.int32


def test_damaged_input_raises_only_value_error() -> None:
    rng = np.random.default_rng(3)
    fixture = np.load(FIXTURE)
    samples = [
        fixture["kodim22_step0.6"][:, :12, :20].astype(np.int32),
        np.rint(rng.laplace(0, 3, (16, 3, 5))).astype(np.int32),
        golden_symbols(),
    ]
    for symbols in samples:
        params, payload = CODER.encode(symbols)
        shape = symbols.shape
        for cut in range(0, len(payload), max(1, len(payload) // 25)):
            decode_or_value_error(params, payload[:cut], shape)
        for cut in range(len(params)):
            decode_or_value_error(params[:cut], payload, shape)
        for _ in range(25):
            flipped = bytearray(payload)
            flipped[rng.integers(len(flipped))] ^= 1 << int(rng.integers(8))
            decode_or_value_error(params, bytes(flipped), shape)
            flipped = bytearray(params)
            flipped[rng.integers(len(flipped))] ^= 1 << int(rng.integers(8))
            decode_or_value_error(bytes(flipped), payload, shape)
            decode_or_value_error(params, rng.bytes(int(rng.integers(len(payload) + 8))), shape)
            decode_or_value_error(rng.bytes(int(rng.integers(len(params) + 8))), payload, shape)
            other = (int(rng.integers(1, 17)), int(rng.integers(1, 9)), int(rng.integers(1, 9)))
            decode_or_value_error(params, payload, other)


def test_decode_rejects_damage_it_can_see() -> None:
    params, payload = CODER.encode(golden_symbols())
    for bad_params, bad_payload in [
        (params, payload[:-2]),  # truncated
        (params, payload + b"\0\0"),  # trailing words
        (params, payload[:-1]),  # odd length
        (params + b"\0", payload),  # trailing parameter byte
        (b"", payload),
        (params, b""),
        (params, b"\xff" * (8 * 126 + 64)),  # longer than any stream for this shape
    ]:
        with pytest.raises(ValueError):
            CODER.decode(bad_params, bad_payload, (3, 6, 7))
    with pytest.raises(ValueError):
        CODER.decode(params, payload, (3, 6, -7))


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(
        np.int32,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6),
        elements=st.integers(-32768, 32767) | st.integers(-8, 8),
    )
)
def test_round_trip_any_small_latent(symbols: np.ndarray) -> None:
    round_trip(symbols)
