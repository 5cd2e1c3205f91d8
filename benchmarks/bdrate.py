"""Bjøntegaard delta rate (BD-rate) with monotone piecewise-cubic (PCHIP) interpolation.

BD-rate is the average rate difference of a test codec against an anchor at
equal quality: log-rate is interpolated as a function of the metric and the
gap is averaged over the quality range both curves reach. PCHIP (as in the
newer JVET tools) rather than one global cubic, because a cubic through 5-10
real points can overshoot and swing the result. Run this file to self-check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson derivatives (scipy's PchipInterpolator rule), so no overshoot."""
    h = np.diff(x)
    delta = np.diff(y) / h
    if len(x) == 2:
        return np.full(2, delta[0])
    d = np.zeros(len(x))
    for k in range(1, len(x) - 1):
        if delta[k - 1] * delta[k] > 0:
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            d[k] = (w1 + w2) / (w1 / delta[k - 1] + w2 / delta[k])
    for end, (h0, h1, d0, d1) in ((0, (h[0], h[1], delta[0], delta[1])), (-1, (h[-1], h[-2], delta[-1], delta[-2]))):
        slope = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if np.sign(slope) != np.sign(d0):
            slope = 0.0
        elif np.sign(d0) != np.sign(d1) and abs(slope) > abs(3 * d0):
            slope = 3 * d0
        d[end] = slope
    return d


def pchip(x: np.ndarray, y: np.ndarray, xq: np.ndarray | float) -> np.ndarray:
    """Evaluate the PCHIP interpolant through (x, y), x strictly increasing, at xq (clamped)."""
    d = _pchip_slopes(x, y)
    xq = np.clip(np.asarray(xq, dtype=np.float64), x[0], x[-1])
    k = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, len(x) - 2)
    h = x[k + 1] - x[k]
    t = (xq - x[k]) / h
    h00, h10 = (1 + 2 * t) * (1 - t) ** 2, t * (1 - t) ** 2
    h01, h11 = t * t * (3 - 2 * t), t * t * (t - 1)
    return h00 * y[k] + h10 * h * d[k] + h01 * y[k + 1] + h11 * h * d[k + 1]


def _integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Exact integral of the PCHIP over [lo, hi]: Simpson's rule is exact on each cubic piece."""
    cuts = np.unique(np.concatenate(([lo, hi], x[(x > lo) & (x < hi)])))
    a, b = cuts[:-1], cuts[1:]
    return float(np.sum((b - a) / 6 * (pchip(x, y, a) + 4 * pchip(x, y, (a + b) / 2) + pchip(x, y, b))))


def _efficient(rate: Sequence[float], metric: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by rate, keeping only those better than every cheaper point.

    A point that costs more for no gain is not on the rate-distortion curve
    (and would make log-rate a non-function of the metric).
    """
    order = np.argsort(rate)
    r = np.asarray(rate, dtype=np.float64)[order]
    m = np.asarray(metric, dtype=np.float64)[order]
    keep, best = [], -np.inf
    for i in range(len(r)):
        if np.isfinite(m[i]) and r[i] > 0 and m[i] > best:
            keep.append(i)
            best = m[i]
    return r[keep], m[keep]


def _metric_at_rate(r: np.ndarray, m: np.ndarray, rate: float) -> float:
    """The curve's metric at a rate (log-rate PCHIP), clamped to the curve's own span."""
    return float(pchip(np.log(r), m, math.log(rate)))


def quality_overlap(anchor_rate: Sequence[float], anchor_metric: Sequence[float],
                    test_rate: Sequence[float], test_metric: Sequence[float],
                    rate_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """(lo, hi) of the metric range both curves reach (inside ``rate_range`` if given); lo >= hi if none."""
    ra, ma = _efficient(anchor_rate, anchor_metric)
    rt, mt = _efficient(test_rate, test_metric)
    if len(ra) < 2 or len(rt) < 2:
        return float("nan"), float("nan")
    lo, hi = max(ma[0], mt[0]), min(ma[-1], mt[-1])
    if rate_range is not None:
        r0, r1 = rate_range
        lo = max(lo, _metric_at_rate(ra, ma, r0), _metric_at_rate(rt, mt, r0))
        hi = min(hi, _metric_at_rate(ra, ma, r1), _metric_at_rate(rt, mt, r1))
    return float(lo), float(hi)


def bd_rate(anchor_rate: Sequence[float], anchor_metric: Sequence[float],
            test_rate: Sequence[float], test_metric: Sequence[float],
            rate_range: tuple[float, float] | None = None) -> float:
    """Percent rate change of test vs anchor at equal quality (negative: test needs fewer bits).

    ``metric`` must be higher-is-better (negate distortions). ``rate_range``
    (lo, hi) restricts the averaging to qualities both curves reach inside that
    rate window. NaN when the curves share no quality range or have < 2 points.
    """
    lo, hi = quality_overlap(anchor_rate, anchor_metric, test_rate, test_metric, rate_range)
    if not hi > lo:
        return float("nan")
    ra, ma = _efficient(anchor_rate, anchor_metric)
    rt, mt = _efficient(test_rate, test_metric)
    gap = (_integral(mt, np.log(rt), lo, hi) - _integral(ma, np.log(ra), lo, hi)) / (hi - lo)
    return float((math.exp(gap) - 1) * 100)


def _self_check() -> None:
    """Identical curves give 0 %, the same curve at half the rate about -50 %."""
    rate = np.array([0.05, 0.1, 0.2, 0.4, 0.8])
    psnr = np.array([24.0, 26.5, 29.0, 31.8, 34.5])
    checks = {
        "identical": (bd_rate(rate, psnr, rate, psnr), 0.0),
        "half rate": (bd_rate(rate, psnr, rate / 2, psnr), -50.0),
        "double rate, window 0.1-0.4": (bd_rate(rate, psnr, rate * 2, psnr, (0.1, 0.4)), 100.0),
        "no overlap": (bd_rate(rate, psnr, rate, psnr + 20), float("nan")),
    }
    for name, (got, want) in checks.items():
        ok = (math.isnan(got) and math.isnan(want)) or abs(got - want) < 1e-6
        print(f"{name:32s} {got:+9.4f} %  (want {want:+.1f}) {'ok' if ok else 'FAIL'}")
        if not ok:
            raise SystemExit(1)
    # interpolation sanity: PCHIP through points of a smooth monotone function stays close to it
    x = np.linspace(0, 3, 7)
    err = np.max(np.abs(pchip(x, np.exp(x), np.linspace(0, 3, 301)) - np.exp(np.linspace(0, 3, 301))))
    print(f"{'pchip max error on exp':32s} {err:9.4f}    {'ok' if err < 0.1 else 'FAIL'}")
    if err >= 0.1:
        raise SystemExit(1)


if __name__ == "__main__":
    _self_check()
