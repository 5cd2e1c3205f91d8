"""Interleaved rANS lanes, and the input checks, shared by the context coders.

Symbols are coded in *pieces*: a run of at most ``lanes`` symbols whose i-th symbol uses lane i.
Each symbol is an interval ``[start, start + freq)`` of a ``PROB_SCALE`` total. A symbol outside its
table's window is an *escape*: its table entry is coded first, then, per piece holding escapes, a
uniform 5-bit step over the escaped lanes (bit count n of the excess v >= 1), a step with the low
min(n, 8) bits of v and, for lanes with n > 8, one with the other n - 8 bits. After each step every
lane of the step whose state fell below ``RANS_LOW`` reads one 16-bit word, lanes in increasing
order. The encoder runs the same steps in reverse.

Lane states are Python integers, stepped symbol by symbol: a wavefront holds a few dozen symbols,
too few for numpy calls (a microsecond each) to pay off against one ``bisect`` per symbol.
"""

from __future__ import annotations

from bisect import bisect_right

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
    """Lanes for a latent of ``n_symbols`` (the format fixes this rule): each costs 4 bytes of state,
    and no step holds more symbols than the largest wavefront."""
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


def in_symbol_range(s: np.ndarray) -> bool:
    return bool(s.min() >= -MAX_SYMBOL - 1 and s.max() <= MAX_SYMBOL)


class RansEncoder:
    """Codes in reverse of the decoding order, one Python integer state per lane."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        self.state = [RANS_LOW] * lanes
        self.words: list[int] = []  # in reverse of the order the decoder reads them

    def _put(self, lane: int, start: int, freq: int) -> None:
        x = self.state[lane]
        if x >= freq << 16:
            self.words.append(x & 0xFFFF)
            x >>= 16
        self.state[lane] = ((x // freq) << 16) + x % freq + start

    def _uniform(self, lanes: list[int], values: list[int], nbits: list[int]) -> None:
        """One step over ``lanes`` (increasing), each coding a value of its own bit count."""
        for lane, value, n in zip(reversed(lanes), reversed(values), reversed(nbits), strict=True):
            self._put(lane, value << (PROB_BITS - n), 1 << (PROB_BITS - n))

    def _escapes(self, lanes: list[int], excess: list[int]) -> None:
        """The steps of one piece's escapes (lanes increasing), in reverse of the decoding order."""
        nb = [v.bit_length() - 1 for v in excess]
        big = [i for i, n in enumerate(nb) if n > 8]
        self._uniform([lanes[i] for i in big], [excess[i] >> 8 & ((1 << (nb[i] - 8)) - 1) for i in big],
                      [nb[i] - 8 for i in big])
        some = [i for i, n in enumerate(nb) if n > 0]
        self._uniform([lanes[i] for i in some], [excess[i] & ((1 << min(nb[i], 8)) - 1) for i in some],
                      [min(nb[i], 8) for i in some])
        self._uniform(lanes, nb, [ESC_NBITS_BITS] * len(lanes))

    def code(self, steps: tuple[tuple[int, int], ...], start: np.ndarray, freq: np.ndarray, excess: np.ndarray) -> None:
        """Code every symbol (coding order) of the ``[begin, end)`` wavefronts ``steps``.

        ``excess`` is 0 for a symbol inside its window and the escape's v >= 1 otherwise.
        """
        starts, freqs = start.tolist(), freq.tolist()
        escaped = np.flatnonzero(excess)
        escapes_before = [*np.searchsorted(escaped, [b for b, _ in steps]).tolist(), len(escaped)]
        escaped_list, excess_list = escaped.tolist(), excess[escaped].tolist()
        lanes = self.lanes
        for wave in range(len(steps) - 1, -1, -1):
            b, e = steps[wave]
            first, last = escapes_before[wave], escapes_before[wave + 1]
            for k in reversed(range(b, e, lanes)):
                piece = [i for i in range(first, last) if k <= escaped_list[i] < k + lanes]
                if piece:
                    self._escapes([escaped_list[i] - k for i in piece], [excess_list[i] for i in piece])
            for i in range(e - 1, b - 1, -1):
                self._put((i - b) % lanes, starts[i], freqs[i])

    def getvalue(self) -> bytes:
        state = np.asarray(self.state, dtype="<u4").tobytes()
        return state + np.asarray(self.words[::-1], dtype="<u2").tobytes()


class TruncatedStreamError(ValueError):
    """The payload ended before its last symbol; every symbol decoded before that point is right."""


class RansDecoder:
    """Decodes with one Python integer state per lane.

    ``partial``: the payload may be a prefix of the stream (a truncated file): whole words only are
    kept, and running out of them raises ``TruncatedStreamError`` instead of the checks at the end.
    """

    def __init__(self, payload: bytes, lanes: int, n_symbols: int, name: str, partial: bool = False) -> None:
        self.name = name
        self.lanes = lanes
        state, words = read_stream(payload, lanes, n_symbols, name, partial)
        self.state: list[int] = state.tolist()
        self.words: list[int] = words.tolist()
        self.pos = 0

    def _word(self) -> int:
        if self.pos == len(self.words):
            raise TruncatedStreamError(f"{self.name} payload is truncated")
        self.pos += 1
        return self.words[self.pos - 1]

    def wave(self, bounds: list[list[int]]) -> np.ndarray:
        """Decode one wavefront: symbol i (lane ``i % lanes``) was coded with the table whose entry
        boundaries are ``bounds[i]`` (0 .. PROB_SCALE; first and last entry are the escapes).

        Returns each symbol's offset from its table's lowest in-window value: entry - 1 inside the
        window, -v for a low escape, the window size - 1 + v for a high one.
        """
        state, words, lanes = self.state, self.words, self.lanes
        pos = self.pos
        offsets, escaped = [], []
        for i, row in enumerate(bounds):
            lane = i % lanes
            x = state[lane]
            slot = x & (PROB_SCALE - 1)
            j = bisect_right(row, slot) - 1
            lo, hi = row[j], row[j + 1]
            x = (hi - lo) * (x >> 16) + slot - lo
            if x < RANS_LOW:
                if pos == len(words):
                    raise TruncatedStreamError(f"{self.name} payload is truncated")
                x = x << 16 | words[pos]
                pos += 1
            state[lane] = x
            offsets.append(j - 1)
            if lo == 0 or hi == PROB_SCALE:
                escaped.append(i)
        self.pos = pos
        if escaped:
            self._escapes(bounds, offsets, escaped)
        return np.asarray(offsets, dtype=np.int64)

    def _escapes(self, bounds: list[list[int]], offsets: list[int], escaped: list[int]) -> None:
        """Read the excess of the ``escaped`` symbols (increasing), piece by piece, into ``offsets``."""
        lanes = self.lanes
        while escaped:
            k = escaped[0] - escaped[0] % lanes
            piece = [i for i in escaped if i < k + lanes]
            escaped = escaped[len(piece) :]
            for i, v in zip(piece, self._excess([i - k for i in piece]), strict=True):
                offsets[i] = -v if offsets[i] < 0 else len(bounds[i]) - 4 + v

    def _uniform(self, lanes: list[int], nbits: list[int]) -> list[int]:
        """One step over ``lanes`` (increasing), each reading a value of its own bit count."""
        values = []
        for lane, n in zip(lanes, nbits, strict=True):
            shift = PROB_BITS - n
            x = self.state[lane]
            slot = x & (PROB_SCALE - 1)
            value = slot >> shift
            x = ((x >> 16) << shift) + slot - (value << shift)
            self.state[lane] = x << 16 | self._word() if x < RANS_LOW else x
            values.append(value)
        return values

    def _excess(self, lanes: list[int]) -> list[int]:
        """The excess v >= 1 of the escaped ``lanes`` (increasing) of one piece."""
        nb = self._uniform(lanes, [ESC_NBITS_BITS] * len(lanes))
        if max(nb) > MAX_ESC_NBITS:
            raise ValueError(f"{self.name} payload has an oversized escape")
        v = [1 << n for n in nb]
        some = [i for i, n in enumerate(nb) if n > 0]
        for i, bits in zip(some, self._uniform([lanes[i] for i in some], [min(nb[i], 8) for i in some]), strict=True):
            v[i] |= bits
        big = [i for i, n in enumerate(nb) if n > 8]
        for i, bits in zip(big, self._uniform([lanes[i] for i in big], [nb[i] - 8 for i in big]), strict=True):
            v[i] |= bits << 8
        return v

    def finish(self) -> None:
        check_finished(self.state, self.pos, len(self.words), self.name)


def read_stream(payload: bytes, lanes: int, n_symbols: int, name: str,
                partial: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The lanes' initial states (uint32) and the renormalisation words (native uint16) of a payload,
    both fresh arrays; ``ValueError`` for a payload no stream of ``n_symbols`` symbols can have.

    ``partial``: the payload may be a prefix of the stream (see ``RansDecoder``).
    """
    if partial:
        if len(payload) < 4 * lanes:
            raise TruncatedStreamError(f"{name} payload is truncated before its first symbol")
        payload = payload[: len(payload) - (len(payload) - 4 * lanes) % 2]
    n_words, odd = divmod(len(payload) - 4 * lanes, 2)
    # no symbol costs more than 32 bits (plus rANS rounding), so two words per symbol and some slack
    if n_words < 0 or odd or n_words > 2 * n_symbols + 256:
        raise ValueError(f"{name} payload has a bad length")
    state = np.frombuffer(payload, dtype="<u4", count=lanes).astype(np.uint32)
    if (state < RANS_LOW).any():
        raise ValueError(f"{name} payload has a bad initial state")
    return state, np.frombuffer(payload, dtype="<u2", offset=4 * lanes).astype(np.uint16)


def check_finished(state: list[int] | np.ndarray, words_read: int, n_words: int, name: str) -> None:
    """``ValueError`` unless a decode read every word and left every lane at its initial state."""
    if words_read != n_words or any(x != RANS_LOW for x in state):
        raise ValueError(f"{name} payload is damaged (final state mismatch)")
