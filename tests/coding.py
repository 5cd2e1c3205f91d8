"""Helpers the coder tests share."""

from __future__ import annotations

import numpy as np

from pillow_sdlatent.core.coders import EntropyCoder


def round_trip(coder: EntropyCoder, symbols: np.ndarray) -> tuple[bytes, bytes]:
    """Encode, decode, insist on the exact symbols back; the coded (params, payload)."""
    params, payload = coder.encode(symbols)
    decoded = coder.decode(params, payload, symbols.shape)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, symbols)
    return params, payload


def sample_symbols(channels: int) -> np.ndarray:
    """(channels, 6, 7) patterned symbols with escapes at the extremes of the 16-bit range."""
    c, y, x = np.meshgrid(np.arange(channels), np.arange(6), np.arange(7), indexing="ij")
    symbols = ((c * 7919 + y * 104729 + x * 1299709) % 13 - 6 + y - x).astype(np.int32)
    symbols[1, 2, 3], symbols[2, 5, 0], symbols[0, 0, 0] = 30000, -32768, 32767
    return symbols
