"""Learned context coders ("ctx2", "ctx3"): a small integer network picks every probability.

Each symbol's distribution is a mixture of discretised logistics whose parameters an MLP computes
from already-decoded symbols: a causal 4x7 window of its own channel and a 7x7 window, centred on
it, of each of the first three channels coded before it (channels are coded one after another). The
coders differ only in their network, which ships inside the package (``NETWORKS``): ``ctx2`` codes
4-channel TAESD (SD 1.x) latents, ``ctx3`` 16-channel taesd3 latents as the ``klt`` quantizer codes
them (components, strongest first, so the windows are of the three strongest). Each network was
trained on photos outside the test sets (``training/train_ctx2.py``); per image, the file stores only
two bytes: the conditioning step the encoder found best and the window radius.

Everything a probability depends on is integer arithmetic: integer weights, shifts, clamps and
lookup tables. The matrix products run as float64 BLAS calls on integer values (scaled by powers
of two) whose every partial sum is bounded below 2**53 (checked when the weights load), which
IEEE-754 computes exactly in any order, so a file decodes identically on every platform. FORMAT.md
("ctx2") has the arithmetic.

Decoding runs channel by channel over wavefronts ``WAVE_SLOPE*y + x`` (``wavefront.py``): every tap of
a symbol lies on an earlier wavefront, so each wavefront is one batched network evaluation plus
interleaved rANS lanes. The earlier channels' share of the first layer is known before a channel
starts, so it runs as one large product per channel (in blocks); per wavefront only the 24
own-channel taps, the hidden layers and the probability tables remain. Where the package was built
with a compiler, the whole decoding loop, and the encoder's network, run in C instead
(``_ctx2_native.c``, on two threads where a second core is free): the same integers, and the tests hold
the two to the same bytes and symbols.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...once import LoadOnce
from ...weights import WEIGHTS_DIR
from .rans import (
    ESCAPE_FREQ,
    MAX_SYMBOL,
    PROB_SCALE,
    RansEncoder,
    TruncatedStreamError,
    check_finished,
    checked_shape,
    checked_symbols,
    read_stream,
)
from .wavefront import WavefrontLayout, decode_wavefronts, wavefront_layout

try:
    from . import _ctx2_native as native
except ImportError:  # built without a C compiler: the numpy loop decodes the same symbols, slower
    native = None



def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: threads the C network runs on (the symbols are the same for any count): two where a second core is free to take
NATIVE_THREADS = min(2, _cores())


@dataclass(frozen=True)
class Network:
    """A shipped network: the one coder name it serves stands for exactly these weights (FORMAT.md)."""

    file: Path
    #: SHA-256 of ``file``: a file coded with other weights would decode to garbage, so refuse them
    sha256: str
    channels: int
    #: RMS of its training latents in latent units: the encoder's first guess at the conditioning step
    latent_rms: float


#: coder name -> its network: SD 1.x TAESD latents; taesd3 latents as klt components over their step weights
NETWORKS: dict[str, Network] = {
    "ctx2": Network(WEIGHTS_DIR / "ctx2_sd1.safetensors",
                    "d721061b26e0b1eafa70ff9a6f660748e34aecdf2f185d1db49964c05414022a", 4, 0.8),
    "ctx3": Network(WEIGHTS_DIR / "ctx3_sd3.safetensors",
                    "3e599c5a73935ecc29f1d364da3a901a5a06476253d43ba69e20bcc330a16e66", 16, 0.71),
}
#: a channel reads windows of the first min(channel, WINDOW_CHANNELS) channels
WINDOW_CHANNELS = 3
#: causal taps of the symbol's own channel (dy, dx); WAVE_SLOPE * dy + dx < 0 for each
SAME_TAPS = tuple((dy, dx) for dy in range(-3, 1) for dx in range(-3, 4) if dy < 0 or dx < 0)
WAVE_SLOPE = 4
PREV_RADIUS = 3  # earlier channels contribute a (2r+1)^2 window centred on the symbol
PAD = 3
#: the network's inputs per channel: own-channel taps, then the windows of channels 0 .. WINDOW_CHANNELS-1
PREV_TAPS = tuple((dy, dx) for dy in range(-PREV_RADIUS, PREV_RADIUS + 1)
                  for dx in range(-PREV_RADIUS, PREV_RADIUS + 1))
N_INPUTS = len(SAME_TAPS) + WINDOW_CHANNELS * len(PREV_TAPS)

# fixed-point layout (FORMAT.md "ctx2"): values in units of 2**-k
STEP_BITS = 16  # STEP_TABLE[cond] = round(2**((cond - COND_ZERO) / 16) * 2**16)
COND_ZERO = 160
INPUT_BITS = 8  # network inputs: latent units * 2**8, clamped to +-INPUT_LIMIT
INPUT_LIMIT = 1 << 12  # 16 latent units: training latents stay within 9.2, so only outliers are clamped
WEIGHT_BITS = 10
ACC_BITS = INPUT_BITS + WEIGHT_BITS  # pre-activations and outputs: units of 2**-18
ACT_LIMIT = (1 << 16) - 1  # hidden activations: units of 2**-8, clamped to [0, ACT_LIMIT]
MU_BITS = 8  # means: symbol units * 2**8
LOG_SCALE_STEPS = 16  # log-scale table index: round(ln(scale) * 16)
SIG_RES = 32  # sigmoid table: sigma((i - SIG_HALF) / 32)
SIG_HALF = 512
SIG_BITS = 16
INV_SCALE_BITS = 16
EXP_STEPS = 16  # mixture weight table: exp(-i / 16) * 2**16
EXACT_LIMIT = 1 << 53
SINGLE_EXACT_LIMIT = 1 << 24  # float32 holds every integer below this exactly
MAX_RADIUS = 64


@dataclass(frozen=True)
class _Net:
    """The integer network and its lookup tables, as loaded from WEIGHTS_FILE."""

    # float64: the file's integers (units below), w1, b1, w_cond, w2 and b2 multiplied by 2**-WEIGHT_BITS
    # (exact), so that the hidden layers' pre-activations come out in activation units, ready for floor
    w1: np.ndarray  # (N_INPUTS, H) units 2**-WEIGHT_BITS
    b1: np.ndarray  # (channels, H), units 2**-ACC_BITS (channel one-hot folded in)
    w_cond: np.ndarray  # (H,), per 1/16 of log2(step), units 2**-ACC_BITS
    w2: np.ndarray  # (H, H)
    b2: np.ndarray  # (H,)
    w3: np.ndarray  # (H, 3K): K means, K log-scales, K mixture logits (not scaled)
    b3: np.ndarray  # (3K,)
    step_table: np.ndarray  # (256,) int64
    inv_scale: np.ndarray  # int64, 2**INV_SCALE_BITS / scale at log-scale index i + LOG_SCALE_MIN
    log_scale_min: int
    sigmoid: np.ndarray  # (2 * SIG_HALF + 1,) int64
    exp_table: np.ndarray  # int64, exp(-i / EXP_STEPS) * 2**16
    # w1 and w2 as float32 (exact: their integers stay below 2**24), and the largest |weight| of each
    # row, for _exact_affine
    w1_single: np.ndarray
    w1_row_max: np.ndarray
    w2_single: np.ndarray
    w2_row_max: np.ndarray

    @property
    def mixtures(self) -> int:
        return self.w3.shape[1] // 3


_loaded = LoadOnce()


def _net(name: str) -> _Net:
    """The shipped network of coder ``name``, loaded and checked once (thread-safe)."""
    return _loaded.get(("net", name), lambda: _load_net(NETWORKS[name]))


def clear_cache() -> list[_Net]:
    """Forget the loaded network (``models.clear_cache`` calls this); returns it.

    A fresh ``LoadOnce`` also brings fresh locks: a forked child may inherit the old ones held.
    """
    global _loaded
    dropped, _loaded = list(_loaded.items.values()), LoadOnce()
    return dropped


def _load_net(network: Network) -> _Net:
    from safetensors.numpy import load

    path = network.file
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != network.sha256:
        raise OSError(f"{path} is not the context network this build was made with; reinstall the package")
    t = {k: v.astype(np.int64) for k, v in load(data).items()}
    hidden, outputs = t["w3"].shape
    shapes = {"w1": (N_INPUTS, hidden), "b1": (network.channels, hidden), "w_cond": (hidden,), "w2": (hidden, hidden),
              "b2": (hidden,), "b3": (outputs,), "step_table": (256,), "sigmoid": (2 * SIG_HALF + 1,),
              "exp_table": (256,), "log_scale_min": (1,)}
    sig, exp_table, inv = t["sigmoid"], t["exp_table"], t["inv_scale"]
    valid = (
        outputs % 3 == 0 and all(t[k].shape == shape for k, shape in shapes.items()) and inv.ndim == 1 and inv.size
        and sig.min() >= 0 and sig.max() <= 1 << SIG_BITS and (np.diff(sig) >= 0).all()  # a monotone CDF
        and exp_table.min() >= 0 and exp_table.max() <= 1 << 16 and exp_table[0] > 0
        and inv.min() > 0 and inv.max() <= 1 << 24 and t["step_table"].min() > 0 and t["step_table"].max() < 1 << 24
    )
    if not valid:
        raise OSError(f"{path} does not hold a valid context network")
    # the bound behind the float64 products: |inputs| * |weights| summed over a row stays far below 2**53
    bounds = (
        INPUT_LIMIT * int(np.abs(t["w1"]).sum(0).max()) + int(np.abs(t["b1"]).max())
        + 255 * int(np.abs(t["w_cond"]).max()),
        ACT_LIMIT * int(np.abs(t["w2"]).sum(0).max()) + int(np.abs(t["b2"]).max()),
        ACT_LIMIT * int(np.abs(t["w3"]).sum(0).max()) + int(np.abs(t["b3"]).max()),
    )
    if max(bounds) >= EXACT_LIMIT >> 8 or max(np.abs(t[k]).max() for k in ("w1", "w2")) >= SINGLE_EXACT_LIMIT:
        raise OSError(f"{path} holds weights too large for exact arithmetic")
    exact = {k: t[k] * 2.0**-WEIGHT_BITS for k in ("w1", "b1", "w_cond", "w2", "b2")}
    exact.update({k: t[k].astype(np.float64) for k in ("w3", "b3")})
    return _Net(**exact, step_table=t["step_table"], inv_scale=inv, log_scale_min=int(t["log_scale_min"][0]),
                sigmoid=sig, exp_table=exp_table,
                w1_single=exact["w1"].astype(np.float32), w1_row_max=np.abs(exact["w1"]).max(1),
                w2_single=exact["w2"].astype(np.float32), w2_row_max=np.abs(exact["w2"]).max(1))


def _layout(shape: tuple[int, int, int]) -> WavefrontLayout:
    """Channel after channel, wavefronts ``WAVE_SLOPE*y + x``: every own-channel tap lies on an earlier one."""
    return wavefront_layout(shape, PAD, WAVE_SLOPE, None)


@dataclass(frozen=True)
class _Mixture:
    """Per-symbol distribution parameters, all integers."""

    mu: np.ndarray  # (N, K) means, symbol units * 2**MU_BITS
    inv: np.ndarray  # (N, K) 2**INV_SCALE_BITS / scale
    weight: np.ndarray  # (N, K) unnormalised mixture weights
    centre: np.ndarray  # (N,) integer centre of the coding window
    sigmoid: np.ndarray  # the network's sigmoid table

    def cdf(self, edge: np.ndarray) -> np.ndarray:
        """Unnormalised mixture CDF at the symbol edges ``edge - 1/2``; ``edge`` is (N,) or (N, E)."""
        wide = edge.ndim == 2
        mu = self.mu[:, None, :] if wide else self.mu
        inv = self.inv[:, None, :] if wide else self.inv
        wt = self.weight[:, None, :] if wide else self.weight
        z = ((edge[..., None] << MU_BITS) - (1 << (MU_BITS - 1)) - mu) * inv  # units 2**-(MU_BITS + INV_SCALE_BITS)
        shift = MU_BITS + INV_SCALE_BITS - 5  # SIG_RES = 2**5
        # index round(z) + SIG_HALF, clamped to the table: take's "clip" mode is the clamp
        idx = (z + ((1 << (shift - 1)) + (SIG_HALF << shift))) >> shift
        return (np.take(self.sigmoid, idx, mode="clip") * wt).sum(-1)


def _features(sym: np.ndarray, step_fx: int) -> np.ndarray:
    """Network inputs of symbols: latent units * 2**INPUT_BITS, clamped, as float64."""
    x = sym * step_fx >> (STEP_BITS - INPUT_BITS)
    return np.minimum(np.maximum(x, -INPUT_LIMIT), INPUT_LIMIT).astype(np.float64)


def _activation(pre: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Hidden activations from pre-activations in activation units: floor, then clamp to
    [0, ACT_LIMIT], in place or into ``out``.

    ``out`` may be float32: the clamped integers are below 2**24, and a value float32 rounds on
    the way in lies outside [0, ACT_LIMIT] and still clamps to the same end.
    """
    out = np.floor(pre, out=pre if out is None else out)
    np.maximum(out, 0, out=out)
    return np.minimum(out, ACT_LIMIT, out=out)


def _exact_affine(x: np.ndarray, magnitude: np.ndarray, w: np.ndarray, w_single: np.ndarray,
                  bias: np.ndarray) -> np.ndarray:
    """``x @ w + bias`` (integer inputs, weights in units 2**-WEIGHT_BITS) exactly, as float64; the
    product in float32 (about twice as fast) for the rows where that is provably exact.

    ``magnitude`` (per row, at least ``|x| @ max|w|`` over each row of w) bounds every partial sum of
    a row's products; below 2**24 units 2**-WEIGHT_BITS each is a number float32 holds exactly,
    whatever order BLAS adds in. Almost all rows of TAESD latents of photos pass.
    """
    single = magnitude < SINGLE_EXACT_LIMIT * 2.0**-WEIGHT_BITS
    if single.all():
        return x.astype(np.float32, copy=False) @ w_single + bias  # float32 + float64 adds in float64
    out = np.empty((len(x), w.shape[1]))
    out[single] = x[single].astype(np.float32) @ w_single
    out[~single] = x[~single] @ w
    out += bias
    return out


def _run(net: _Net, pre1: np.ndarray, step_fx: int) -> _Mixture:
    """The integer MLP from its first layer's pre-activations ``pre1`` (overwritten).

    Every value is an integer (times 2**-WEIGHT_BITS) below 2**45, so float64 products, sums and
    floor are all exact; float32 only where _exact_affine proves it exact.
    """
    h = _activation(pre1, np.empty(pre1.shape, dtype=np.float32))
    h = _activation(_exact_affine(h, h @ net.w2_row_max, net.w2, net.w2_single, net.b2)) @ net.w3
    h += net.b3
    out = h.astype(np.int64)
    k = net.mixtures
    # mean: latent units * 2**-ACC_BITS -> symbol units * 2**MU_BITS, i.e. / (step * 2**(ACC_BITS - MU_BITS))
    mu = (out[:, :k] << (STEP_BITS + MU_BITS - ACC_BITS)) // step_fx
    mu = np.minimum(np.maximum(mu, -MAX_SYMBOL << MU_BITS), MAX_SYMBOL << MU_BITS)
    ls_shift = ACC_BITS - 4  # LOG_SCALE_STEPS = 2**4
    # log-scale index round(out) - log_scale_min, clamped to the table by take's "clip" mode
    li = (out[:, k : 2 * k] + ((1 << (ls_shift - 1)) - (net.log_scale_min << ls_shift))) >> ls_shift
    inv = np.take(net.inv_scale, li, mode="clip")
    logits = out[:, 2 * k :]
    below_max = (logits.max(1, keepdims=True) + (1 << (ls_shift - 1)) - logits) >> ls_shift  # >= 0
    weight = np.take(net.exp_table, below_max, mode="clip")
    centre = ((mu * weight).sum(1) // weight.sum(1) + (1 << (MU_BITS - 1))) >> MU_BITS
    return _Mixture(mu, inv, weight, centre, net.sigmoid)


ENCODE_BLOCK = 1 << 14  # symbols the encoder runs the network on at once, bounding its memory


@dataclass(frozen=True)
class _Model:
    """The network set up for one image: its conditioning step folded into the first layer's bias."""

    net: _Net
    lay: WavefrontLayout
    step_fx: int
    same_taps: np.ndarray  # flat offsets of the own-channel taps (the first rows of w1)
    prev_taps: tuple[np.ndarray, ...]  # per channel: flat offsets of the earlier channels' windows
    bias1: tuple[np.ndarray, ...]  # per channel, units of activations

    @classmethod
    def build(cls, lay: WavefrontLayout, cond: int, name: str) -> _Model:
        net = _net(name)
        cond_bias = net.w_cond * (cond - COND_ZERO)
        prev_taps = tuple(lay.offsets((prev - ch, dy, dx) for prev in range(min(ch, WINDOW_CHANNELS))
                                      for dy, dx in PREV_TAPS)
                          for ch in range(lay.shape[0]))
        return cls(net, lay, int(net.step_table[cond]), lay.offsets((0, dy, dx) for dy, dx in SAME_TAPS),
                   prev_taps, tuple(net.b1[ch] + cond_bias for ch in range(lay.shape[0])))

    def prev_layer1(self, feat: np.ndarray, pos: np.ndarray, ch: int) -> np.ndarray:
        """The earlier channels' share of the first layer at ``pos`` of channel ``ch``, bias included."""
        rows = slice(len(SAME_TAPS), len(SAME_TAPS) + len(self.prev_taps[ch]))
        net = self.net
        x = feat[pos[:, None] + self.prev_taps[ch]]
        return _exact_affine(x, np.abs(x) @ net.w1_row_max[rows], net.w1[rows], net.w1_single[rows], self.bias1[ch])

    def own_layer1(self, feat: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """The symbol's own channel's share of the first layer at ``pos`` (no bias)."""
        return feat[pos[:, None] + self.same_taps] @ self.net.w1[: len(SAME_TAPS)]

    def mixture(self, feat: np.ndarray, pos: np.ndarray, ch: int) -> _Mixture:
        """The distributions at ``pos`` of channel ``ch`` from the network inputs ``feat`` (see _features)."""
        if native is not None:
            k = self.net.mixtures
            mu, inv, weight = (np.empty((len(pos), k), dtype=np.int64) for _ in range(3))
            centre = np.empty(len(pos), dtype=np.int64)
            native.mixtures(pos, np.full(len(pos), ch, dtype=np.int64), feat, self.native_net, mu, inv, weight, centre,
                            NATIVE_THREADS)
            return _Mixture(mu, inv, weight, centre, self.net.sigmoid)
        pre = self.prev_layer1(feat, pos, ch)
        pre += self.own_layer1(feat, pos)
        return _run(self.net, pre, self.step_fx)

    @functools.cached_property
    def native_net(self) -> tuple:
        """The network and this image's conditioning as the C functions take them (``_ctx2_native.c``)."""
        net, lay = self.net, self.lay
        window = lay.offsets((0, dy, dx) for dy, dx in PREV_TAPS)
        return (self.same_taps, window, lay.plane, net.w1_single, net.w1, net.w1_row_max, np.stack(self.bias1),
                net.w2_single, net.w2, net.w2_row_max, net.b2, net.w3, net.b3, net.inv_scale, net.exp_table,
                net.sigmoid, self.step_fx, net.log_scale_min)

    def mixture_all(self, feat: np.ndarray, pos: np.ndarray, ch: int) -> _Mixture:
        """:meth:`mixture` in blocks, bounding the encoder's memory on large latents."""
        parts = [self.mixture(feat, pos[k : k + ENCODE_BLOCK], ch) for k in range(0, len(pos), ENCODE_BLOCK)]
        fields = ("mu", "inv", "weight", "centre")
        return _Mixture(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields), self.net.sigmoid)


def _starts(at_edges: np.ndarray, at_low: np.ndarray, at_high: np.ndarray, edges: np.ndarray,
            radius: int) -> np.ndarray:
    """Start (within PROB_SCALE) of window entries ``edges`` (0 .. 2R+1) from the mixture CDF there
    and at the window's two ends.

    Entry j is the value ``centre - R + j``; its interval is ``[start(j), start(j + 1))``. Every value
    in the window gets at least 1/PROB_SCALE, the two escapes ESCAPE_FREQ each, at both ends.
    """
    budget = PROB_SCALE - 2 * ESCAPE_FREQ - (2 * radius + 1)
    return ESCAPE_FREQ + edges + (at_edges - at_low + edges) * budget // (at_high - at_low + 2 * radius + 1)


def _cumulative(mix: _Mixture, edges: np.ndarray, radius: int) -> np.ndarray:
    """:func:`_starts` of the entries ``edges`` (one per symbol) of each symbol's table."""
    lo = mix.centre - radius
    return _starts(mix.cdf(lo + edges), mix.cdf(lo), mix.cdf(lo + 2 * radius + 1), edges, radius)


def _window_bounds(mix: _Mixture, radius: int) -> np.ndarray:
    """(N, 2R+4) entry boundaries of each symbol's whole table: 0, the window's starts, PROB_SCALE."""
    edges = np.arange(2 * radius + 2)
    at = mix.cdf((mix.centre - radius)[:, None] + edges)
    bounds = np.empty((len(at), 2 * radius + 4), dtype=np.int64)
    bounds[:, 0], bounds[:, -1] = 0, PROB_SCALE
    bounds[:, 1:-1] = _starts(at, at[:, :1], at[:, -1:], edges, radius)
    return bounds


def _intervals(mix: _Mixture, s: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rANS start, frequency and escape excess of symbols ``s``."""
    d = s - mix.centre
    j = np.clip(d + radius, 0, 2 * radius)
    start = _cumulative(mix, j, radius)
    freq = _cumulative(mix, j + 1, radius) - start
    low, high = d < -radius, d > radius
    start = np.where(low, 0, np.where(high, PROB_SCALE - ESCAPE_FREQ, start))
    freq = np.where(low | high, ESCAPE_FREQ, freq)
    return start, freq, np.where(low, -radius - d, np.where(high, d - radius, 0))


DECODE_BLOCK = 1 << 14  # symbols whose earlier-channel share of the first layer is computed at once


class _Decoding:
    """The model state while decoding: symbols and network inputs so far (``WavefrontModel``)."""

    def __init__(self, model: _Model, radius: int, name: str) -> None:
        self.model, self.radius, self.name = model, radius, name
        lay = model.lay
        self.sym = np.zeros(lay.shape[0] * lay.plane, dtype=np.int64)
        self.feat = np.zeros(self.sym.shape, dtype=np.float64)
        self.block = (0, 0)  # [begin, end) of the coding order that ``prev`` covers
        self.prev = np.zeros((0, model.net.w1.shape[1]))

    def tables(self, begin: int, end: int) -> tuple[list[list[int]], np.ndarray]:
        model = self.model
        if end > self.block[1]:
            self._next_block(begin, end)
        pre = model.own_layer1(self.feat, model.lay.pos[begin:end])
        pre += self.prev[begin - self.block[0] : end - self.block[0]]
        mix = _run(model.net, pre, model.step_fx)
        return _window_bounds(mix, self.radius).tolist(), mix.centre - self.radius

    def _next_block(self, begin: int, end: int) -> None:
        """Earlier channels are all decoded when a channel starts: run their share of the first layer
        for up to DECODE_BLOCK symbols of this channel from ``begin`` in one product."""
        lay = self.model.lay
        per_channel = lay.shape[1] * lay.shape[2]
        ch = begin // per_channel
        stop = min(max(begin + DECODE_BLOCK, end), (ch + 1) * per_channel)
        self.prev = self.model.prev_layer1(self.feat, lay.pos[begin:stop], ch)
        self.block = (begin, stop)

    def store(self, begin: int, end: int, symbols: np.ndarray) -> None:
        pos = self.model.lay.pos[begin:end]
        self.sym[pos] = symbols
        self.feat[pos] = _features(symbols, self.model.step_fx)

    def decode_native(self, payload: bytes, partial: bool) -> None:
        """Decode every wavefront in one call of the C decoder: the symbols ``decode_wavefronts``
        would give, and the same errors (``TruncatedStreamError`` where the stream ends early)."""
        model, lay, name = self.model, self.model.lay, self.name
        state, words = read_stream(payload, lay.lanes, lay.pos.size, name, partial)
        words_read, status = native.decode(np.asarray(lay.steps, dtype=np.int64), lay.pos, lay.chan, self.sym,
                                           self.feat, state, words, model.native_net, self.radius, lay.lanes,
                                           NATIVE_THREADS)
        if status:
            error, message = _NATIVE_ERRORS[status]
            raise error(f"{name} payload {message}")
        check_finished(state, words_read, len(words), name)


#: native.decode's status codes (_ctx2_native.c) -> the numpy loop's error for the same stream
_NATIVE_ERRORS: dict[int, tuple[type[ValueError], str]] = {
    1: (TruncatedStreamError, "is truncated"),
    2: (ValueError, "decodes to an out-of-range symbol"),
    3: (ValueError, "has an oversized escape"),
}


# --- the coder ---------------------------------------------------------------------------

COND_SAMPLES = 1 << 9  # symbols per channel the encoder scores each conditioning step on
COND_PROBES = (8, 4, 2, 1)  # search around the guess, halving the stride
ESCAPE_BITS = 32  # about what an escape costs (FORMAT.md: 11 + 5 + its bits)


def _window_radius(distance: np.ndarray) -> int:
    """The radius that codes symbols at these distances from their centres cheapest.

    Every value in the window takes 1/PROB_SCALE from all symbols; one outside it pays an escape. So
    a few outliers are escaped rather than widening every symbol's table.
    """
    radii = np.arange(1, MAX_RADIUS + 1)
    outside = len(distance) - np.searchsorted(np.sort(distance), radii, side="right")
    bits = len(distance) * (2 * radii + 1) / PROB_SCALE / np.log(2) + ESCAPE_BITS * outside
    return int(radii[np.argmin(bits)])


def _guess_cond(sym3: np.ndarray, latent_rms: float) -> int:
    """Conditioning index of the step that gives these symbols the spread ``latent_rms`` of the network's
    training latents.

    The spread ignores the largest 0.1% of values, so that a few outliers do not move it.
    """
    magnitude = np.abs(sym3.astype(np.float64))
    spread = float(np.sqrt(np.mean(np.square(np.minimum(magnitude, np.percentile(magnitude, 99.9)))))) or 1.0
    return int(np.clip(np.rint(16 * np.log2(latent_rms / spread)) + COND_ZERO, 0, 255))


class LearnedContextCoder:
    """Integer MLP context model; ``ctx2`` is about 26% smaller than ``ZstdCoder`` on TAESD latents of photos."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.channels = NETWORKS[name].channels

    def prepare(self) -> None:
        """Load and check the network now (``OSError`` if it is missing or not the shipped one)."""
        _net(self.name)

    def _check_channels(self, channels: int) -> None:
        if channels != self.channels:
            raise ValueError(f"{self.name} codes {self.channels}-channel latents only, not {channels}")

    def encode(self, symbols: np.ndarray) -> tuple[bytes, bytes]:
        sym3 = checked_symbols(symbols, f"{self.name} coder")
        self._check_channels(sym3.shape[0])
        if sym3.size == 0:
            return b"", b""
        ch, h, w = sym3.shape
        lay = _layout((ch, h, w))
        sym = lay.padded(sym3)
        cond = self._choose_cond(sym, lay, _guess_cond(sym3, NETWORKS[self.name].latent_rms))
        model = _Model.build(lay, cond, self.name)
        feat = _features(sym, model.step_fx)
        per_channel = [lay.pos[c * h * w : (c + 1) * h * w] for c in range(ch)]
        mixes = [model.mixture_all(feat, pos, c) for c, pos in enumerate(per_channel)]
        s = sym[lay.pos]
        centre = np.concatenate([m.centre for m in mixes])
        radius = _window_radius(np.abs(s - centre))
        coded = [_intervals(m, sym[pos], radius) for m, pos in zip(mixes, per_channel, strict=True)]
        start, freq, excess = (np.concatenate(parts) for parts in zip(*coded, strict=True))
        enc = RansEncoder(lay.lanes)
        enc.code(lay.steps, start, freq, excess)
        return bytes([cond, radius]), enc.getvalue()

    def _choose_cond(self, sym: np.ndarray, lay: WavefrontLayout, guess: int) -> int:
        """The conditioning step that codes a sample of the symbols shortest (a per-image fit)."""
        ch, h, w = lay.shape
        sample = np.linspace(0, h * w - 1, min(h * w, COND_SAMPLES)).astype(np.int64)
        per_channel = [lay.pos[c * h * w + sample] for c in range(ch)]

        def bits(cond: int) -> float:
            model = _Model.build(lay, cond, self.name)
            feat = _features(sym, model.step_fx)
            total = 0.0
            for c, pos in enumerate(per_channel):
                _, freq, excess = _intervals(model.mixture(feat, pos, c), sym[pos], MAX_RADIUS)
                total += float(np.log2(PROB_SCALE / freq).sum()) + 16.0 * np.count_nonzero(excess)
            return total

        best = guess
        scores = {guess: bits(guess)}
        for stride in COND_PROBES:
            for cand in (best - stride, best + stride):
                if 0 <= cand <= 255 and cand not in scores:
                    scores[cand] = bits(cand)
            best = min(scores, key=scores.__getitem__)
        return best

    def decode(self, params: bytes, payload: bytes, shape: tuple[int, int, int], partial: bool = False) -> np.ndarray:
        ch, h, w = checked_shape(shape)
        self._check_channels(ch)
        if h * w == 0:
            if params or payload:
                raise ValueError(f"{self.name} coder data for an empty latent")
            return np.zeros((ch, h, w), dtype=np.int32)
        if len(params) != 2 or not 1 <= params[1] <= MAX_RADIUS:
            raise ValueError(f"bad {self.name} coder parameters")
        cond, radius = params
        lay = _layout((ch, h, w))
        decoding = _Decoding(_Model.build(lay, cond, self.name), radius, f"{self.name} coder")
        if native is None:
            decode_wavefronts(payload, lay, decoding, decoding.name, partial)
        else:
            try:
                decoding.decode_native(payload, partial)
            except TruncatedStreamError:
                if not partial:
                    raise
        return lay.unpadded(decoding.sym)
