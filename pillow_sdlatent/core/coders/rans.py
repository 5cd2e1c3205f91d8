"""Interleaved rANS over numpy lanes, and the input checks, shared by the context coders.

Symbols are coded in *pieces*: a run of at most ``lanes`` symbols whose i-th symbol uses lane i.
Each symbol is an interval ``[start, start + freq)`` of a ``PROB_SCALE`` total. A symbol outside its
table's window is an *escape*: its table entry is coded first, then, per piece holding escapes, a
uniform 5-bit step over the escaped lanes (bit count n of the excess v >= 1), a step with the low
min(n, 8) bits of v and, for lanes with n > 8, one with the other n - 8 bits. After each step every
lane of the step whose state fell below ``RANS_LOW`` reads one 16-bit word, lanes in increasing
order. The encoder runs the same steps in reverse.
"""

from __future__ import annotations

import numpy as np

PROB_BITS = 16
PROB_SCALE = 1 << PROB_BITS
RANS_LOW = 1 << 16  # states live in [RANS_LOW, 2**32); renormalisation moves 16-bit words
ESC_NBITS_BITS = 5  # an escape's bit count is coded as a uniform 5-bit value
MAX_ESC_NBITS = 16
#: an escape costs at most 11 + 5 + 16 bits, so no symbol takes more than 32 bits (FORMAT.md's LATD limit)
ESCAPE_FREQ = 32
MAX_SYMBOL = 32767  # symbols are 16-bit signed


def lane_count(n_symbols: int, largest_wavefront: int) -> int:
    """Lanes for a latent of ``n_symbols``: more mean fewer numpy steps but cost 4 bytes each, and no
    step holds more symbols than the largest wavefront."""
    return min(max(4, min(128, n_symbols // 3072)), largest_wavefront)


def checked_symbols(symbols: np.ndarray, coder: str) -> np.ndarray:
    """The (C, H, W) integer array a coder was given; ``ValueError`` for one it cannot code."""
    sym3 = np.asarray(symbols)
    if sym3.ndim != 3 or not np.issubdtype(sym3.dtype, np.integer):
        raise ValueError(f"{coder} needs a (C, H, W) integer symbol array")
    if sym3.size and (sym3.min() < -MAX_SYMBOL - 1 or sym3.max() > MAX_SYMBOL):
        raise ValueError("latent symbols exceed 16 bits; use a coarser quality")
    return sym3


def checked_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """A latent shape from the container as three Python ints; ``ValueError`` for anything else."""
    if len(shape) != 3 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in shape):
        raise ValueError(f"bad latent shape {shape!r}")
    ch, h, w = (int(n) for n in shape)
    return ch, h, w


def zero_padded(sym3: np.ndarray, pad: int) -> np.ndarray:
    """The symbols as a flat int64 copy with a zero border ``pad`` wide around every channel."""
    ch, h, w = sym3.shape
    padded = np.zeros((ch, h + 2 * pad, w + 2 * pad), dtype=np.int64)
    padded[:, pad : pad + h, pad : pad + w] = sym3
    return padded.ravel()


def in_symbol_range(s: np.ndarray) -> bool:
    return bool(s.min() >= -MAX_SYMBOL - 1 and s.max() <= MAX_SYMBOL)


def bit_length(v: np.ndarray) -> np.ndarray:
    n = np.zeros(v.shape, dtype=np.int64)
    for i in range(MAX_ESC_NBITS + 2):
        n += (v >> i) > 0
    return n


class RansEncoder:
    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        self.state = np.full(lanes, RANS_LOW, dtype=np.int64)
        self.out: list[np.ndarray] = []

    def step(self, lanes: np.ndarray | slice, start: np.ndarray, freq: np.ndarray) -> None:
        x = self.state[lanes]
        emit = x >= freq << 16
        if emit.any():
            self.out.append((x[emit] & 0xFFFF)[::-1])
            x = np.where(emit, x >> 16, x)
        self.state[lanes] = ((x // freq) << 16) + x % freq + start

    def uniform(self, lanes: np.ndarray, value: np.ndarray, nbits: np.ndarray) -> None:
        shift = PROB_BITS - nbits
        self.step(lanes, value << shift, np.left_shift(1, shift))

    def code(self, steps: tuple[tuple[int, int], ...], start: np.ndarray, freq: np.ndarray, excess: np.ndarray) -> None:
        """Code every symbol (coding order) of the ``[begin, end)`` wavefronts ``steps``.

        ``excess`` is 0 for a symbol inside its window and the escape's v >= 1 otherwise.
        """
        nb = bit_length(excess) - 1
        lo_bits = excess & ((1 << np.clip(nb, 0, 8)) - 1)
        hi_bits = (excess >> 8) & ((1 << np.maximum(nb - 8, 0)) - 1)
        escaped = excess > 0
        lanes = self.lanes
        for b, e in reversed(steps):
            pieces = list(range(b, e, lanes))[::-1]
            if escaped[b:e].any():
                for k in pieces:
                    esc = escaped[k : min(k + lanes, e)].nonzero()[0]
                    if not esc.size:
                        continue
                    g = esc + k
                    big = nb[g] > 8
                    if big.any():
                        self.uniform(esc[big], hi_bits[g[big]], nb[g[big]] - 8)
                    some = nb[g] > 0
                    if some.any():
                        self.uniform(esc[some], lo_bits[g[some]], np.minimum(nb[g[some]], 8))
                    self.uniform(esc, nb[g], np.full(esc.size, ESC_NBITS_BITS))
            for k in pieces:
                end = min(k + lanes, e)
                self.step(slice(0, end - k), start[k:end], freq[k:end])

    def getvalue(self) -> bytes:
        words = np.concatenate(self.out)[::-1] if self.out else np.zeros(0, dtype=np.int64)
        return self.state.astype("<u4").tobytes() + words.astype("<u2").tobytes()


class RansDecoder:
    def __init__(self, payload: bytes, lanes: int, n_symbols: int, name: str) -> None:
        self.name = name
        n_words, odd = divmod(len(payload) - 4 * lanes, 2)
        # no symbol costs more than 32 bits (plus rANS rounding), so two words per symbol and some slack
        if n_words < 0 or odd or n_words > 2 * n_symbols + 256:
            raise ValueError(f"{name} payload has a bad length")
        self.state = np.frombuffer(payload, dtype="<u4", count=lanes).astype(np.int64)
        if (self.state < RANS_LOW).any():
            raise ValueError(f"{name} payload has a bad initial state")
        self.words = np.frombuffer(payload, dtype="<u2", offset=4 * lanes)
        self.pos = 0

    def read(self, x: np.ndarray) -> None:
        """Renormalise lane states ``x`` in place."""
        need = (x < RANS_LOW).nonzero()[0]
        if need.size:
            end = self.pos + need.size
            if end > len(self.words):
                raise ValueError(f"{self.name} payload is truncated")
            x[need] = (x[need] << 16) | self.words[self.pos : end]
            self.pos = end

    def slots(self, n: int) -> np.ndarray:
        """Where in ``[0, PROB_SCALE)`` the next symbols of lanes ``0 .. n-1`` lie."""
        return self.state[:n] & (PROB_SCALE - 1)

    def advance(self, start: np.ndarray, freq: np.ndarray) -> None:
        """Consume the symbols ``[start, start + freq)`` found from :meth:`slots` in the first lanes."""
        n = len(start)
        x = self.state[:n]
        x = freq * (x >> 16) + (x & (PROB_SCALE - 1)) - start
        self.read(x)
        self.state[:n] = x

    def uniform(self, lanes: np.ndarray, nbits: np.ndarray) -> np.ndarray:
        shift = PROB_BITS - nbits
        x = self.state[lanes]
        slot = x & (PROB_SCALE - 1)
        value = slot >> shift
        x = np.left_shift(1, shift) * (x >> 16) + slot - (value << shift)
        self.read(x)
        self.state[lanes] = x
        return value

    def excess(self, escaped: np.ndarray) -> np.ndarray:
        """The excess v >= 1 of the escaped lanes (indices, increasing) of one piece."""
        nb = self.uniform(escaped, np.full(escaped.size, ESC_NBITS_BITS))
        if nb.max() > MAX_ESC_NBITS:
            raise ValueError(f"{self.name} payload has an oversized escape")
        v = np.left_shift(1, nb)
        some = nb > 0
        v[some] |= self.uniform(escaped[some], np.minimum(nb[some], 8))
        big = nb > 8
        v[big] |= self.uniform(escaped[big], nb[big] - 8) << 8
        return v

    def finish(self) -> None:
        if self.pos != len(self.words) or (self.state != RANS_LOW).any():
            raise ValueError(f"{self.name} payload is damaged (final state mismatch)")
