"""The "ctx1" context-model coder: the saving over zstd, cheap escapes, a frozen format (the rest: test_coders.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pillow_sdlatent.core.coders import ZstdCoder
from pillow_sdlatent.core.coders.ctx1 import ContextCoder, _tables
from tests.coding import round_trip, sample_symbols

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "kodak_taesd_symbols.npz"
CODER = ContextCoder()


def test_escapes_in_a_smooth_latent_stay_cheap() -> None:
    """Rare huge values are escaped without spoiling the predictor for everything else."""
    rng = np.random.default_rng(2)
    symbols = np.rint(rng.laplace(0, 2, (4, 32, 48))).astype(np.int32)
    plain = sum(map(len, round_trip(CODER, symbols)))
    symbols[1, 5, 7], symbols[3, 30, 0], symbols[0, 0, 47] = 32767, -32768, 20000
    assert sum(map(len, round_trip(CODER, symbols))) < plain + 40


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
            ctx += sum(map(len, round_trip(CODER, symbols)))
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


def test_frozen_stream_decodes() -> None:
    decoded = CODER.decode(bytes.fromhex(GOLDEN_PARAMS), bytes.fromhex(GOLDEN_PAYLOAD), (3, 6, 7))
    np.testing.assert_array_equal(decoded, sample_symbols(3))


def test_frozen_probability_tables() -> None:
    assert hashlib.sha256(_tables().freq.astype("<i4").tobytes()).hexdigest() == TABLES_SHA256
