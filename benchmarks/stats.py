"""The statistics of a ratio: the median of per-round ratios, its bootstrap interval, and verdicts.

Each round times every variant once; a variant's ratio in that round is its time over the
reference variant's time *in the same round*. The figure reported is the median of those
per-round ratios, with a 95% percentile-bootstrap interval of that median: resample the rounds
with replacement, take the median of each resample, and keep the 2.5th and 97.5th percentiles.

A target is judged from the interval, never from the median alone:

- ``"at most"`` (e.g. fused prefill <= 1.01 x base): **met** when the whole interval is at or
  below the limit, **missed** when the whole interval is above it, otherwise **not resolved**.
- ``"equal"`` (e.g. merged = 1.00 x base within 1%): **met** when the whole interval lies inside
  [1 - tolerance, 1 + tolerance], **missed** when it lies wholly outside, else **not resolved**.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4000
RESOLUTION = 0.01  # the half-width the rounds continue until (in ratio units: 0.01 = 1%)
# Below 6 rounds no 95% interval of a median exists without assuming a distribution: even
# [min, max] covers the median with probability only 1 - 2 * 0.5**n (94% at n = 5).
MIN_ROUNDS = 6


def median_interval(values, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                    seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median of ``values`` and its percentile-bootstrap interval.

    Deterministic for a given ``seed``. With fewer than MIN_ROUNDS values the interval given is
    [min, max], which covers the median less than 95% of the time: no verdict is drawn from it
    (``verdict(..., rounds=n)``).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values: nothing to take the median of")
    median = float(np.median(values))
    if values.size < MIN_ROUNDS:
        return median, float(values.min()), float(values.max())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(resamples, values.size))    # (resamples, n) round indices
    medians = np.median(values[picks], axis=1)                              # (resamples,)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return median, float(low), float(high)


def half_width(median: float, low: float, high: float) -> float:
    """How far the interval reaches from the median, on its wider side (ratio units)."""
    return max(median - low, high - median)


def resolved(median: float, low: float, high: float, resolution: float = RESOLUTION) -> bool:
    """True when the interval lies within +-resolution of the median."""
    return half_width(median, low, high) <= resolution


@dataclass(frozen=True)
class Target:
    """One target: a ratio (variant over reference) that must be ``at most`` a limit, or ``equal`` to 1."""

    name: str
    kind: str            # "at most" | "equal"
    limit: float         # "at most": the highest acceptable ratio; "equal": the tolerance around 1

    def describe(self) -> str:
        return f"<= {self.limit:.2f}" if self.kind == "at most" else f"1.00 +-{self.limit * 100:.0f}%"


def verdict(target: Target, low: float, high: float, rounds: int = MIN_ROUNDS) -> tuple[str, str]:
    """("met" | "missed" | "not resolved", why) for an interval [low, high] from ``rounds`` rounds.

    The reason says, when the verdict is "not resolved", how far the interval reaches past the
    limit on each side: the resolution the run would have needed to decide.
    """
    if low > high:
        raise ValueError(f"interval [{low}, {high}] is empty")
    if rounds < MIN_ROUNDS:
        return "not resolved", f"only {rounds} rounds: a 95% interval of a median needs {MIN_ROUNDS} at least"
    if target.kind == "at most":
        if high <= target.limit:
            return "met", f"interval at or below {target.limit:.3f}"
        if low > target.limit:
            return "missed", f"interval above {target.limit:.3f} by {(low - target.limit) * 100:.1f}% at least"
        return "not resolved", (f"interval {low:.3f}-{high:.3f} straddles {target.limit:.3f} "
                                f"(-{(target.limit - low) * 100:.1f}% / +{(high - target.limit) * 100:.1f}%)")
    if target.kind == "equal":
        lo_limit, hi_limit = 1 - target.limit, 1 + target.limit
        if lo_limit <= low and high <= hi_limit:
            return "met", f"interval inside {lo_limit:.3f}-{hi_limit:.3f}"
        if high < lo_limit or low > hi_limit:
            gap = lo_limit - high if high < lo_limit else low - hi_limit
            return "missed", f"interval outside {lo_limit:.3f}-{hi_limit:.3f} by {gap * 100:.1f}% at least"
        over = max(lo_limit - low, high - hi_limit)
        return "not resolved", (f"interval {low:.3f}-{high:.3f} reaches {over * 100:.1f}% past "
                                f"{lo_limit:.3f}-{hi_limit:.3f}")
    raise ValueError(f"unknown target kind {target.kind!r}; use 'at most' or 'equal'")
