"""What every context coder promises: exact round trips of any symbols it accepts, and only ValueError on damage.

Each coder's own file pins its format and its savings (test_context_coder.py, test_learned_coder.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pillow_sdlatent.core.coders.ctx1 import ContextCoder
from pillow_sdlatent.core.coders.ctx2 import LearnedContextCoder
from tests import coding
from tests.coding import sample_symbols

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "kodak_taesd_symbols.npz"
CODERS = {"ctx1": ContextCoder(), "ctx2": LearnedContextCoder("ctx2")}
SHAPES = [(1, 1, 1), (1, 1, 9), (1, 7, 1), (2, 5, 4), (16, 3, 5), (4, 1, 1), (4, 7, 1), (4, 5, 4), (4, 13, 21),
          (4, 40, 3), (16, 9, 11)]


def accepts(name: str, channels: int) -> bool:
    return getattr(CODERS[name], "channels", channels) == channels


def round_trip(name: str, symbols: np.ndarray) -> tuple[bytes, bytes]:
    return coding.round_trip(CODERS[name], symbols)


@pytest.mark.parametrize(("name", "shape"), [(n, s) for n in CODERS for s in SHAPES if accepts(n, s[0])])
@pytest.mark.parametrize("scale", [0.3, 3.0, 40.0])
def test_round_trip_laplacian(name: str, shape: tuple[int, int, int], scale: float) -> None:
    rng = np.random.default_rng(hash((shape, scale)) % 2**32)
    round_trip(name, np.rint(rng.laplace(0, scale, shape)).astype(np.int32))


EXTREMES = {
    "zeros": np.zeros((4, 64, 96), np.int32),
    "max": np.full((4, 1, 1), 32767, np.int32),
    "min": np.full((4, 2, 3), -32768, np.int32),
    "min-16ch": np.full((16, 2, 3), -32768, np.int32),
    "alternating-extremes": np.tile(np.array([32767, -32768], np.int32), (4, 8, 4)),
    "uniform-int16": np.random.default_rng(1).integers(-32768, 32768, (4, 12, 10)).astype(np.int32),
}


@pytest.mark.parametrize(("name", "case"), [(n, c) for n in CODERS for c in EXTREMES
                                            if accepts(n, EXTREMES[c].shape[0])])
def test_round_trip_extremes(name: str, case: str) -> None:
    symbols = EXTREMES[case]
    _, payload = round_trip(name, symbols)
    assert len(payload) <= 1024 + 4 * symbols.size  # FORMAT.md's LATD limit: at most 32 bits a symbol


@pytest.mark.parametrize("name", CODERS)
def test_empty_latent(name: str) -> None:
    coder = CODERS[name]
    assert coder.encode(np.zeros((4, 0, 3), np.int32)) == (b"", b"")
    assert coder.decode(b"", b"", (4, 0, 3)).shape == (4, 0, 3)


@pytest.mark.parametrize("name", CODERS)
def test_encode_refuses_what_it_cannot_code(name: str) -> None:
    for bad in (np.full((4, 1, 1), 32768, np.int32), np.zeros((4, 3), np.int32), np.zeros((4, 2, 3), np.float32)):
        with pytest.raises(ValueError):
            CODERS[name].encode(bad)


def decode_or_value_error(name: str, params: bytes, payload: bytes, shape: tuple[int, int, int]) -> None:
    try:
        decoded = CODERS[name].decode(params, payload, shape)
    except ValueError:
        return
    assert decoded.shape == shape and decoded.dtype == np.int32


@pytest.mark.parametrize("name", CODERS)
def test_damaged_input_raises_only_value_error(name: str) -> None:
    rng = np.random.default_rng(3)
    samples = [np.load(FIXTURE)["kodim22_step0.6"][:, :12, :20].astype(np.int32), sample_symbols(4)]
    if accepts(name, 16):
        samples.append(np.rint(rng.laplace(0, 3, (16, 3, 5))).astype(np.int32))
    for symbols in samples:
        params, payload = CODERS[name].encode(symbols)
        shape = symbols.shape
        for cut in range(0, len(payload), max(1, len(payload) // 20)):
            decode_or_value_error(name, params, payload[:cut], shape)
        for cut in range(len(params)):
            decode_or_value_error(name, params[:cut], payload, shape)
        for _ in range(20):
            flipped = bytearray(payload)
            flipped[rng.integers(len(flipped))] ^= 1 << int(rng.integers(8))
            decode_or_value_error(name, params, bytes(flipped), shape)
            flipped = bytearray(params)
            flipped[rng.integers(len(flipped))] ^= 1 << int(rng.integers(8))
            decode_or_value_error(name, bytes(flipped), payload, shape)
            decode_or_value_error(name, params, rng.bytes(int(rng.integers(len(payload) + 8))), shape)
            decode_or_value_error(name, rng.bytes(int(rng.integers(len(params) + 8))), payload, shape)
            channels = shape[0] if hasattr(CODERS[name], "channels") else int(rng.integers(1, 17))
            other = (channels, int(rng.integers(1, 9)), int(rng.integers(1, 9)))
            decode_or_value_error(name, params, payload, other)


@pytest.mark.parametrize("name", CODERS)
def test_decode_rejects_damage_it_can_see(name: str) -> None:
    coder = CODERS[name]
    params, payload = coder.encode(sample_symbols(4))
    for bad_params, bad_payload in [
        (params, payload[:-2]),  # truncated
        (params, payload + b"\0\0"),  # trailing words
        (params, payload[:-1]),  # odd length
        (params + b"\0", payload),  # trailing parameter byte
        (b"", payload),
        (params, b""),
        (params, b"\xff" * (8 * 168 + 64)),  # longer than any stream for this shape
    ]:
        with pytest.raises(ValueError):
            coder.decode(bad_params, bad_payload, (4, 6, 7))
    with pytest.raises(ValueError):
        coder.decode(params, payload, (4, 6, -7))


@pytest.mark.parametrize("name", CODERS)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_round_trip_any_small_latent(name: str, data: st.DataObject) -> None:
    channels = getattr(CODERS[name], "channels", None) or data.draw(st.integers(1, 6))
    shape = st.tuples(st.just(channels), st.integers(1, 6), st.integers(1, 6))
    round_trip(name, data.draw(hnp.arrays(np.int32, shape, elements=st.integers(-32768, 32767) | st.integers(-8, 8))))
