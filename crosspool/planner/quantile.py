"""Quantiles of time-weighted demand, with a confidence interval from independent trials.

Owns the statistics of the planner: a `WeightedSample` is the distribution of one trial's demand over
time (each demand level with the seconds spent at it); `estimate_quantile` pools the trials' time into
one distribution, takes its quantile, and brackets it with a Woodruff interval built from the trials'
independence: each trial's fraction of time at or below the estimate is one i.i.d. draw, their spread
gives the standard error of the pooled fraction, and the interval is the pooled quantile at
p -/+ z * that error. (Time samples inside one trial are correlated; trials are not, which is why the
error comes from trials and not from time samples.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(eq=False, slots=True)
class WeightedSample:
    levels: np.ndarray                     # sorted, unique demand levels
    weights: np.ndarray                    # seconds spent at each level (> 0)

    @staticmethod
    def of(levels: np.ndarray, weights: np.ndarray) -> WeightedSample:
        """Merge equal levels and drop zero weights."""
        keep = weights > 0
        uniq, inverse = np.unique(np.asarray(levels)[keep], return_inverse=True)
        return WeightedSample(uniq, np.bincount(inverse, weights=np.asarray(weights, float)[keep],
                                                minlength=len(uniq)))

    @property
    def total(self) -> float:
        return float(self.weights.sum())

    def cdf(self, x: float) -> float:
        """Fraction of time at or below x."""
        if self.total == 0:
            return 1.0
        return float(self.weights[: np.searchsorted(self.levels, x, side="right")].sum() / self.total)

    def exceedance(self, x: float) -> float:
        """Fraction of time above x."""
        return 1.0 - self.cdf(x)

    def quantile(self, p: float) -> float:
        """Smallest level at or below which at least a fraction p of the time is spent."""
        if not len(self.levels):
            return 0.0
        cum = np.cumsum(self.weights)
        i = int(np.searchsorted(cum, p * cum[-1] * (1 - 1e-12), side="left"))
        return float(self.levels[min(i, len(self.levels) - 1)])

    def mean(self) -> float:
        return float((self.levels * self.weights).sum() / self.total) if self.total else 0.0


def pool(samples: list[WeightedSample]) -> WeightedSample:
    """One distribution from several trials (each trial weighs its seconds)."""
    if not samples:
        return WeightedSample(np.empty(0), np.empty(0))
    return WeightedSample.of(np.concatenate([s.levels for s in samples]),
                             np.concatenate([s.weights for s in samples]))


@dataclass(frozen=True, slots=True)
class QuantileEstimate:
    percentile: float                      # e.g. 99.0
    value: float
    low: float
    high: float
    confidence: float                      # e.g. 0.95
    trials: int
    std_error: float                       # of the pooled fraction of time at or below `value` (or the level below)

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high


def check_percentile(percentile: float) -> None:
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")


def estimate_quantile(samples: list[WeightedSample], percentile: float, confidence: float = 0.95,
                      pooled: WeightedSample | None = None) -> QuantileEstimate:
    """The `percentile` of the pooled time distribution with a Woodruff confidence interval over trials."""
    check_percentile(percentile)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(samples) < 2:
        raise ValueError(f"a confidence interval needs at least 2 trials, got {len(samples)}")
    pooled = pooled or pool(samples)
    p = percentile / 100
    value = pooled.quantile(p)
    # The error of the fraction at the estimate and at the level just below it: when the estimate sits on
    # a jump of a discrete distribution the truth may be either, and the fraction varies less above it.
    i = int(np.searchsorted(pooled.levels, value))
    se = 0.0
    for level in pooled.levels[max(i - 1, 0): i + 1]:
        below = np.array([s.cdf(level) for s in samples])
        se = max(se, float(below.std(ddof=1) / math.sqrt(len(samples))))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    low = pooled.quantile(max(p - z * se, 0.0))
    high = pooled.quantile(min(p + z * se, 1.0))
    return QuantileEstimate(percentile, value, min(low, value), max(high, value), confidence, len(samples), se)
