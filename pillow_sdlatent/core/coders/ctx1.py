"""Context-adaptive, integer-exact rANS coder for quantized latent symbols ("ctx1").

Each symbol is coded with a discretised bell-shaped distribution whose centre is
an integer linear prediction from already-decoded neighbours (causal ones in the
same channel; a 3x3 window in each of the three previous channels, the
co-located symbol in older ones) and whose width is picked by a context made
from the prediction errors around it. The predictor weights and the context ->
width tables are fitted per image by the encoder and stored in ``params``.
Every probability the decoder uses comes from integer arithmetic only, so a
file decodes identically on any platform. FORMAT.md ("ctx1") has the layout.

Decoding is vectorised over wavefronts (``wavefront.py``): symbol (c, y, x)
belongs to wavefront ``2*y + x + 4*c``, and every neighbour it is predicted from
lies on an earlier one, so each wavefront is predicted in one numpy step and its
symbols are decoded by interleaved rANS lanes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from .rans import (
    ESC_NBITS_BITS,
    ESCAPE_FREQ,
    MAX_SYMBOL,
    PROB_BITS,
    PROB_SCALE,
    RansEncoder,
    checked_shape,
    checked_symbols,
)
from .wavefront import WavefrontLayout, decode_wavefronts, wavefront_layout

# --- probability tables -----------------------------------------------------

FRAC_BITS = 4  # predictions are fixed point with this many fraction bits
FRAC = 1 << FRAC_BITS
N_SCALES = 32
SHAPE_POWER = 8  # weight (1 + u^2 / 16) ** -8: a Student-t with 15 degrees of freedom
MU_LIMIT = MAX_SYMBOL * FRAC


def _scale_grid() -> list[int]:
    """Distribution widths in units of 1/256 symbol, ratio ~1.19 (2**0.25), 0.19 .. 41."""
    widths = [48]
    for _ in range(N_SCALES - 1):
        widths.append((widths[-1] * 1219 + 512) >> 10)
    return widths


@dataclass(frozen=True)
class _Tables:
    """All (width, fraction) distributions, flattened.

    Table ``tid = q * FRAC + f`` is centred at ``base + f / FRAC`` and has entries
    ``[escape-low, d = -R .. R + 1, escape-high]`` for ``d = symbol - base``.
    """

    start: np.ndarray  # int64 cumulative frequency of every entry
    freq: np.ndarray  # int64 frequency of every entry
    offset: np.ndarray  # int64 index of each table's first entry
    radius: np.ndarray  # int64 R of each table
    bounds: tuple[list[int], ...]  # per table: its entry boundaries 0 .. PROB_SCALE, for the decoder


def _bell_frequencies(width256: int, frac: int, radius: int) -> np.ndarray:
    """Integer-only frequencies of one table, escapes first and last; sums to PROB_SCALE."""
    d = np.arange(-radius, radius + 2, dtype=np.int64)
    num = FRAC * d - frac  # distance from the centre in 1/FRAC symbol
    u2 = (num * num << 24) // (width256 * width256)  # (distance / width)^2, 16 fraction bits
    t = u2 // (2 * SHAPE_POWER)
    w = np.full(d.shape, 1 << 30, dtype=np.int64)
    for _ in range(SHAPE_POWER):
        w = (w << 16) // (65536 + t)
    budget = PROB_SCALE - 2 * ESCAPE_FREQ - d.size
    body = 1 + w * budget // int(w.sum())
    body[int(np.argmax(w))] += PROB_SCALE - 2 * ESCAPE_FREQ - int(body.sum())
    return np.concatenate(([ESCAPE_FREQ], body, [ESCAPE_FREQ]))


@functools.cache
def _tables() -> _Tables:
    freqs, radii = [], []
    for width in _scale_grid():
        radius = (6 * width + 255) // 256 + 1
        for frac in range(FRAC):
            freqs.append(_bell_frequencies(width, frac, radius))
            radii.append(radius)
    sizes = np.asarray([f.size for f in freqs], dtype=np.int64)
    offset = np.cumsum(sizes) - sizes
    radius = np.asarray(radii, dtype=np.int64)
    freq = np.concatenate(freqs)
    start = np.concatenate([np.cumsum(f) - f for f in freqs])
    bounds = tuple([0, *np.cumsum(f).tolist()] for f in freqs)
    return _Tables(start, freq, offset, radius, bounds)


# --- context model -------------------------------------------------------------

PAD = 2  # zero border around every channel, so neighbour gathers never leave the array
CHANNEL_SKEW = 4  # wavefront lag between channels: channel c may look at (y + 1, x + 1) of channel c - 1
WEIGHT_BITS = 7  # predictor weights are integers in units of 2**-WEIGHT_BITS
MAX_WEIGHT = 1 << 15
MAX_BIAS = 1 << 24
#: causal same-channel neighbours (dy, dx); each lies on an earlier wavefront (2*dy + dx < 0)
SAME_TAPS = ((0, -1), (-1, 0), (-1, -1), (-1, 1), (0, -2), (-2, 0), (-1, -2), (-2, -1), (-2, 1), (-2, 2))
#: window used in earlier channels (2*dy + dx < CHANNEL_SKEW)
PREV_TAPS = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))
PREV_WINDOW_CHANNELS = 3  # channels further back contribute their co-located symbol only
#: activity = weighted sum of |prediction error| (in 1/FRAC symbol) at these (dy, dx, weight)
SAME_ACTIVITY = (
    (0, -1, 4),
    (-1, 0, 4),
    (-1, -1, 2),
    (-1, 1, 2),
    (0, -2, 2),
    (-2, 0, 2),
    (-1, -2, 1),
    (-2, -1, 1),
    (-2, 1, 1),
    (-2, 2, 1),
)
PREV_ACTIVITY = ((0, 0, 4), (0, -1, 1), (0, 1, 1), (-1, 0, 1), (1, 0, 1))
PREV_ACTIVITY_CHANNELS = 2
ERROR_LIMIT = 1 << 20
N_CTX = 16
#: activity bucket edges 32 * sqrt(2)**k, integer-exact
CTX_EDGES = np.asarray([math.isqrt(1 << (10 + k)) for k in range(N_CTX - 1)], dtype=np.int64)


def _layout(shape: tuple[int, int, int]) -> WavefrontLayout:
    """Wavefronts ``2*y + x + CHANNEL_SKEW*c``: a wavefront's symbols depend only on earlier ones."""
    return wavefront_layout(shape, PAD, 2, CHANNEL_SKEW)


def _prediction_taps(lay: WavefrontLayout, c: int) -> list[int]:
    """Flat offsets of the predictor taps of channel ``c``, in the order of its weights."""
    taps = [(0, dy, dx) for dy, dx in SAME_TAPS]
    for prev in range(c):
        if prev >= c - PREV_WINDOW_CHANNELS:
            taps += [(prev - c, dy, dx) for dy, dx in PREV_TAPS]
        else:
            taps.append((prev - c, 0, 0))
    return lay.offsets(taps).tolist()


def _activity_taps(lay: WavefrontLayout, c: int) -> list[tuple[int, int]]:
    taps = [(0, dy, dx, wt) for dy, dx, wt in SAME_ACTIVITY]
    for prev in range(max(0, c - PREV_ACTIVITY_CHANNELS), c):
        taps += [(prev - c, dy, dx, wt) for dy, dx, wt in PREV_ACTIVITY]
    return list(zip(lay.offsets(t[:3] for t in taps).tolist(), [t[3] for t in taps], strict=True))


def _n_weights(c: int) -> int:
    return len(SAME_TAPS) + sum(len(PREV_TAPS) if p >= c - PREV_WINDOW_CHANNELS else 1 for p in range(c))


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclass(frozen=True)
class _Model:
    """Integer model of all channels; per-channel rows zero-padded to a common width."""

    taps: np.ndarray  # (C, T) flat offsets of the predictor taps
    weights: np.ndarray  # (C, T) units 2**-WEIGHT_BITS; 0 on padding
    bias: np.ndarray  # (C,) units 2**-WEIGHT_BITS
    act_taps: np.ndarray  # (C, A) flat offsets of the activity taps
    act_weights: np.ndarray  # (C, A)
    scales: np.ndarray  # (C * N_CTX,) width index per (channel, context)

    @classmethod
    def build(cls, lay: WavefrontLayout, weights: list[list[int]], bias: list[int], scales: list[list[int]]) -> _Model:
        chans = range(lay.shape[0])
        taps = [_prediction_taps(lay, c) for c in chans]
        acts = [_activity_taps(lay, c) for c in chans]
        n_taps, n_acts = len(taps[-1]), len(acts[-1])
        return cls(
            _padded(taps, n_taps),
            _padded(weights, n_taps),
            np.asarray(bias, dtype=np.int64),
            _padded([[o for o, _ in a] for a in acts], n_acts),
            _padded([[w for _, w in a] for a in acts], n_acts),
            np.asarray(scales, dtype=np.int64).reshape(-1),
        )

    def predict(self, sym: np.ndarray, pos: np.ndarray, ch: np.ndarray | int) -> np.ndarray:
        """Fixed-point (FRAC_BITS) prediction of the symbols at flat positions ``pos`` of channel(s) ``ch``."""
        feats = sym[pos[:, None] + self.taps[ch]]
        acc = np.einsum("ij,ij->i", feats, np.broadcast_to(self.weights[ch], feats.shape)) + self.bias[ch]
        mu = (acc + (1 << (WEIGHT_BITS - FRAC_BITS - 1))) >> (WEIGHT_BITS - FRAC_BITS)
        return np.minimum(np.maximum(mu, -MU_LIMIT, out=mu), MU_LIMIT, out=mu)

    def contexts(self, err: np.ndarray, pos: np.ndarray, ch: np.ndarray | int) -> np.ndarray:
        near = err[pos[:, None] + self.act_taps[ch]]
        activity = np.einsum("ij,ij->i", near, np.broadcast_to(self.act_weights[ch], near.shape))
        return np.searchsorted(CTX_EDGES, activity, side="right")


# --- parameter bit packing ---------------------------------------------------------


class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, value: int, n: int) -> None:
        self.bits += [(value >> i) & 1 for i in range(n - 1, -1, -1)]

    def put_signed(self, value: int, k: int) -> None:
        """Signed exp-Golomb of order ``k`` (zigzag first)."""
        u = (value << 1) if value >= 0 else ((-value << 1) - 1)
        u += 1 << k
        n = u.bit_length()
        self.put(0, n - 1 - k)
        self.put(u, n)

    def getvalue(self) -> bytes:
        return np.packbits(np.asarray(self.bits, dtype=np.uint8)).tobytes()


class _BitReader:
    MAX_PREFIX = 40

    def __init__(self, data: bytes) -> None:
        self.value = int.from_bytes(data, "big")
        self.size = 8 * len(data)
        self.pos = 0

    def get(self, n: int) -> int:
        if self.pos + n > self.size:
            raise ValueError("ctx coder parameters are truncated")
        self.pos += n
        return (self.value >> (self.size - self.pos)) & ((1 << n) - 1)

    def get_signed(self, k: int) -> int:
        zeros = 0
        while self.get(1) == 0:
            zeros += 1
            if zeros > self.MAX_PREFIX:
                raise ValueError("ctx coder parameters hold an oversized number")
        u = (((1 << zeros) | self.get(zeros)) << k | self.get(k)) - (1 << k)
        return (u >> 1) if u & 1 == 0 else -((u + 1) >> 1)

    def finish(self) -> None:
        """Only zero padding to the byte boundary may follow the last field."""
        rest = self.size - self.pos
        if rest >= 8 or self.value & ((1 << rest) - 1):
            raise ValueError("ctx coder parameters have trailing data")


# --- per-image model fitting (encoder only; floats here only choose stored integers) ---------

WEIGHT_K_BITS = 3  # each channel's weights use exp-Golomb of an order 0..7 stored in 3 bits
SCALE_BITS = 5
BIAS_EG_K = 6
FIT_SAMPLES = 1 << 14  # symbols per channel used to fit the predictor
SCALE_SAMPLES = 1 << 15  # and to choose the width table
ENCODE_BLOCK = 1 << 16  # positions gathered at once, bounding the encoder's memory


def _subsample(n: int, k: int) -> np.ndarray:
    return np.linspace(0, n - 1, min(n, k)).astype(np.int64)


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Gaussian elimination for a small positive definite system; LAPACK's thread start-up costs more."""
    a, b = a.copy(), b.copy()
    n = len(b)
    for i in range(n):
        f = a[i + 1 :, i] / a[i, i]
        a[i + 1 :, i:] -= f[:, None] * a[i, i:]
        b[i + 1 :] -= f * b[i]
    x = np.zeros(n)
    for i in range(n - 1, -1, -1):
        x[i] = (b[i] - np.dot(a[i, i + 1 :], x[i + 1 :])) / a[i, i]
    return x


def _least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xa = np.concatenate([x, np.ones((len(y), 1))], axis=1)
    gram = np.einsum("ni,nj->ij", xa, xa)  # einsum, not BLAS: no thread pool for a small product
    ridge = 1e-9 * np.trace(gram) + 1e-9  # keeps flat or all-zero channels solvable
    return _solve(gram + ridge * np.eye(len(gram)), np.einsum("ni,n->i", xa, y))


def _fit_weights(sym: np.ndarray, pos: np.ndarray, taps: list[int]) -> tuple[list[int], int]:
    """Least-squares predictor, refitted without outlier rows, rounded to the stored precision."""
    pos = pos[_subsample(len(pos), FIT_SAMPLES)]
    x = sym[pos[:, None] + np.asarray(taps, dtype=np.int64)].astype(np.float64)
    y = sym[pos].astype(np.float64)
    sol = _least_squares(x, y)
    r = np.abs(y - x @ sol[:-1] - sol[-1])
    keep = r <= 8 * np.median(r) + 1  # a few escapes must not bend the predictor for everything else
    if keep.sum() > len(sol):
        sol = _least_squares(x[keep], y[keep])
    one = 1 << WEIGHT_BITS
    weights = np.clip(np.rint(sol[:-1] * one), 1 - MAX_WEIGHT, MAX_WEIGHT - 1).astype(np.int64)
    bias = np.rint(np.median(y * one - x @ weights))
    return weights.tolist(), int(np.clip(bias, 1 - MAX_BIAS, MAX_BIAS - 1))


def _signed_eg_bits(values: np.ndarray, k: int) -> np.ndarray:
    u = np.where(values >= 0, 2 * values, -2 * values - 1) + (1 << k)
    nbits = np.zeros(u.shape, dtype=np.int64)
    for i in range(1, 40):
        nbits += (u >> i) > 0
    return 2 * nbits + 1 - k


@functools.cache
def _entry_bits() -> np.ndarray:
    return PROB_BITS - np.log2(_tables().freq)


def _symbol_costs(s: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """(N_SCALES, len(s)) ideal code lengths in bits of symbols ``s`` per width index (escapes approximated)."""
    t = _tables()
    tid = np.arange(N_SCALES)[:, None] * FRAC + (mu & (FRAC - 1))
    radius = t.radius[tid]
    d = s - (mu >> FRAC_BITS)
    entry = np.clip(d + radius + 1, 0, 2 * radius + 3)
    escaped = (entry == 0) | (entry == 2 * radius + 3)
    return _entry_bits()[t.offset[tid] + entry] + escaped * (ESC_NBITS_BITS + 2 * np.log2(np.abs(d) + 1))


def _choose_scales(s: np.ndarray, mu: np.ndarray, ctx: np.ndarray) -> tuple[list[int], float]:
    """Width index per context minimising payload plus the cost of storing the table (Viterbi).

    Also returns that minimum in bits, scaled up to all of ``s``.
    """
    pick = _subsample(len(s), SCALE_SAMPLES)
    s, mu, ctx = s[pick], mu[pick], ctx[pick]
    slot = np.arange(N_SCALES)[:, None] + N_SCALES * ctx
    cost = np.bincount(slot.ravel(), _symbol_costs(s, mu).ravel(), N_CTX * N_SCALES).reshape(N_CTX, N_SCALES)
    q = np.arange(N_SCALES)
    step = _signed_eg_bits(q[None, :] - q[:, None], 0).astype(np.float64)  # step[prev, next]
    total = cost[0] + SCALE_BITS
    back = np.zeros((N_CTX, N_SCALES), dtype=np.int64)
    for k in range(1, N_CTX):
        cand = total[:, None] + step
        back[k] = np.argmin(cand, axis=0)
        total = cand[back[k], q] + cost[k]
    scales = [int(np.argmin(total))]
    for k in range(N_CTX - 1, 0, -1):
        scales.append(int(back[k, scales[-1]]))
    return scales[::-1], float(total.min()) * len(s) / len(pick)


def _weight_order(weights: list[int]) -> tuple[int, int]:
    """The exp-Golomb order that codes ``weights`` shortest, and their size in bits with it."""
    arr = np.asarray(weights, dtype=np.int64)
    bits = [int(_signed_eg_bits(arr, k).sum()) for k in range(1 << WEIGHT_K_BITS)]
    return int(np.argmin(bits)), min(bits)


def _write_channel(w: _BitWriter, weights: list[int], bias: int, scales: list[int]) -> None:
    k = _weight_order(weights)[0]
    w.put(k, WEIGHT_K_BITS)
    for v in weights:
        w.put_signed(v, k)
    w.put_signed(bias, BIAS_EG_K)
    w.put(scales[0], SCALE_BITS)
    for a, b in itertools.pairwise(scales):
        w.put_signed(b - a, 0)


def _read_channel(r: _BitReader, n_weights: int) -> tuple[list[int], int, list[int]]:
    k = r.get(WEIGHT_K_BITS)
    weights = [r.get_signed(k) for _ in range(n_weights)]
    if any(abs(v) >= MAX_WEIGHT for v in weights):
        raise ValueError("ctx coder predictor weight out of range")
    bias = r.get_signed(BIAS_EG_K)
    if abs(bias) >= MAX_BIAS:
        raise ValueError("ctx coder predictor bias out of range")
    scales = [r.get(SCALE_BITS)]
    for _ in range(N_CTX - 1):
        scales.append(scales[-1] + r.get_signed(0))
        if not 0 <= scales[-1] < N_SCALES:
            raise ValueError("ctx coder width index out of range")
    return weights, bias, scales


def _encode_symbols(s: np.ndarray, mu: np.ndarray, scale: np.ndarray, lay: WavefrontLayout) -> bytes:
    """rANS-code symbols ``s`` (coding order) given their predictions and width indices."""
    t = _tables()
    tid = scale * FRAC + (mu & (FRAC - 1))
    radius = t.radius[tid]
    d = s - (mu >> FRAC_BITS)
    low, high = d < -radius, d > radius + 1
    j = t.offset[tid] + np.where(low, 0, np.where(high, 2 * radius + 3, d + radius + 1))
    excess = np.where(low, -radius - d, np.where(high, d - radius - 1, 0))
    enc = RansEncoder(lay.lanes)
    enc.code(lay.steps, t.start[j], t.freq[j], excess)
    return enc.getvalue()


class _Decoding:
    """The model state while decoding: symbols and prediction errors so far (``WavefrontModel``)."""

    def __init__(self, lay: WavefrontLayout, model: _Model) -> None:
        self.lay, self.model = lay, model
        self.sym = np.zeros(lay.shape[0] * lay.plane, dtype=np.int64)
        self.err = np.zeros_like(self.sym)
        self.mu = self.sym[:0]

    def tables(self, begin: int, end: int) -> tuple[list[list[int]], np.ndarray]:
        pos, chans = self.lay.pos[begin:end], self.lay.chan[begin:end]
        self.mu = self.model.predict(self.sym, pos, chans)
        ctx = self.model.contexts(self.err, pos, chans)
        tid = self.model.scales[chans * N_CTX + ctx] * FRAC + (self.mu & (FRAC - 1))
        t = _tables()
        return [t.bounds[i] for i in tid.tolist()], (self.mu >> FRAC_BITS) - t.radius[tid]

    def store(self, begin: int, end: int, symbols: np.ndarray) -> None:
        pos = self.lay.pos[begin:end]
        self.sym[pos] = symbols
        self.err[pos] = np.minimum(np.abs(symbols * FRAC - self.mu), ERROR_LIMIT)


# --- the coder --------------------------------------------------------------------------


def _try_channel(
    sym: np.ndarray, err: np.ndarray, lay: WavefrontLayout, c: int, pos: np.ndarray, weights: list[int], bias: int
) -> tuple[float, list[int], int, list[int], np.ndarray, np.ndarray]:
    """Estimated bits of channel ``c`` under one predictor, with what coding it needs.

    Leaves ``err`` of the channel set for this predictor.
    """
    ch = lay.shape[0]
    model = _Model.build(
        lay, [[0]] * c + [weights] + [[0]] * (ch - c - 1), [0] * c + [bias] + [0] * (ch - c - 1), [[0] * N_CTX] * ch
    )
    blocks = range(0, len(pos), ENCODE_BLOCK)
    mu = np.concatenate([model.predict(sym, pos[k : k + ENCODE_BLOCK], c) for k in blocks])
    err[pos] = np.minimum(np.abs(sym[pos] * FRAC - mu), ERROR_LIMIT)
    ctx = np.concatenate([model.contexts(err, pos[k : k + ENCODE_BLOCK], c) for k in blocks])
    scales, bits = _choose_scales(sym[pos], mu, ctx)
    return bits + _weight_order(weights)[1], weights, bias, scales, mu, ctx


class ContextCoder:
    """Predictive context-model coder; about 20% smaller than ``ZstdCoder`` on TAESD latents."""

    name = "ctx1"

    def encode(self, symbols: np.ndarray) -> tuple[bytes, bytes]:
        sym3 = checked_symbols(symbols, "ctx coder")
        if sym3.size == 0:
            return b"", b""
        ch, h, w = sym3.shape
        lay = _layout((ch, h, w))
        sym = lay.padded(sym3)
        err = np.zeros_like(sym)
        mu_all = np.zeros_like(sym)
        scale_all = np.zeros_like(sym)
        inner = (np.arange(h)[:, None] + PAD) * lay.stride + np.arange(w) + PAD
        writer = _BitWriter()
        for c in range(ch):
            pos = inner.ravel() + c * lay.plane
            fitted = _fit_weights(sym, pos, _prediction_taps(lay, c))
            flat = ([0] * len(fitted[0]), int(np.rint(np.median(sym[pos]) * (1 << WEIGHT_BITS))))
            best = min((_try_channel(sym, err, lay, c, pos, *cand) for cand in (fitted, flat)), key=lambda r: r[0])
            _, wts, bias, scales, mu, ctx = best
            err[pos] = np.minimum(np.abs(sym[pos] * FRAC - mu), ERROR_LIMIT)
            _write_channel(writer, wts, bias, scales)
            mu_all[pos] = mu
            scale_all[pos] = np.asarray(scales, dtype=np.int64)[ctx]
        order = lay.pos
        return writer.getvalue(), _encode_symbols(sym[order], mu_all[order], scale_all[order], lay)

    def decode(self, params: bytes, payload: bytes, shape: tuple[int, int, int], partial: bool = False) -> np.ndarray:
        ch, h, w = checked_shape(shape)
        if ch * h * w == 0:
            if params or payload:
                raise ValueError("ctx coder data for an empty latent")
            return np.zeros((ch, h, w), dtype=np.int32)
        reader = _BitReader(params)
        fields = [_read_channel(reader, _n_weights(c)) for c in range(ch)]
        reader.finish()
        lay = _layout((ch, h, w))
        model = _Model.build(lay, *(list(f) for f in zip(*fields, strict=True)))
        decoding = _Decoding(lay, model)
        decode_wavefronts(payload, lay, decoding, "ctx coder", partial)
        return lay.unpadded(decoding.sym)
