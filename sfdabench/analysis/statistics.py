"""Uncertainty and paired tests for the leaderboard: which differences the data can separate.

The leaderboard's numbers come from a crossed design: every method runs on the same seeds (one source model
per task and seed, named by its weights hash) and is scored on the same target-test cases. Three questions,
three tools (all deterministic: the bootstrap draws from a fixed generator):

- **How precise is a method's mean?** :func:`t_interval`: a 95% Student-t interval over seeds of the per-seed
  value (a run's row: its mean over cases). Seeds are the replicates a reader can rerun; with one seed there is
  no interval (NaN).
- **Does a method beat the reference, and by how much?** :func:`paired_difference`: the per-(seed, case)
  differences to the reference run of the same seed and source model. The interval is a crossed bootstrap
  (seeds and cases resampled independently, :data:`BOOTSTRAP_SAMPLES` draws, percentile interval), which keeps
  both sources of variation; the p-value a two-sided Wilcoxon signed-rank test over cases of the differences
  averaged over the paired seeds (averaging first keeps the test's pairs independent: the same cases repeat
  in every seed). Without per-case values (rows exported without their cases) the fallback is a paired t-test
  over seeds, and ``test`` says which was used.
- **Which methods can the data tell apart?** :func:`significance_ranks`: significance ranking in the manner of
  the Medical Segmentation Decathlon: every pair of methods is tested as above, the p-values of a (task, organ,
  metric) are Holm-corrected over all its pairs, and a method's score is the number of methods it is
  significantly better than; methods with equal scores share a rank. A rank is therefore a claim the data
  support at family-wise error :data:`ALPHA`, not an ordering of means.

NaN values (a metric undefined under its empty-mask policy) drop out of their pairs; a pair count says how
many remained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

LEVEL = 0.95
ALPHA = 0.05
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean of the finite ``values``; (nan, nan) with fewer than two."""
    from scipy.stats import t

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan, math.nan
    half = float(t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    mean = float(x.mean())
    return mean - half, mean + half


def crossed_bootstrap_interval(diff: np.ndarray, level: float = LEVEL, samples: int = BOOTSTRAP_SAMPLES,
                               seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile interval of the mean of a (seeds x cases) matrix (NaN = missing pair), resampling its rows
    and its columns independently with replacement. (nan, nan) when there is no value."""
    diff = np.asarray(diff, dtype=float)
    if diff.ndim != 2 or not np.isfinite(diff).any():
        return math.nan, math.nan
    n_seeds, n_cases = diff.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(n_seeds, size=(samples, n_seeds))
    cols = rng.integers(n_cases, size=(samples, n_cases))
    draws = diff[rows[:, :, None], cols[:, None, :]]            # (samples, seeds, cases)
    valid = np.isfinite(draws)
    counts = valid.sum(axis=(1, 2))
    sums = np.where(valid, draws, 0.0).sum(axis=(1, 2))
    means = sums[counts > 0] / counts[counts > 0]               # a draw of only missing pairs has no mean
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


#: Up to this many pairs the signed-rank p-value is exact (every sign flip enumerated, 2**n of them).
EXACT_MAX_PAIRS = 16


def signed_rank_p(diff: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (NaN and zeros dropped, ties get average
    ranks); 1 when all are zero, NaN with none.

    Exact up to :data:`EXACT_MAX_PAIRS` pairs: the share of the 2**n sign assignments whose rank sum lies at least
    as far from its mean as the observed one (what scipy's permutation version computes, vectorised here:
    scipy took ~1.9 s a call on 12 tied cases, ~4 min for one leaderboard). Beyond that, scipy's normal
    approximation. tests/test_statistics.py checks both against scipy.
    """
    from scipy.stats import rankdata, wilcoxon

    d = np.asarray(diff, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return math.nan
    d = d[np.abs(d) > 1e-12]
    if len(d) == 0:
        return 1.0  # identical paired values: no evidence of a difference (scipy would warn and give nan)
    if len(d) > EXACT_MAX_PAIRS:
        return float(wilcoxon(d, method="approx").pvalue)
    ranks = rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    signs = (np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1       # every sign assignment
    null = signs @ ranks
    centre = ranks.sum() / 2
    return float(np.mean(np.abs(null - centre) >= abs(observed - centre) - 1e-9))


def paired_t_p(diff: Sequence[float]) -> float:
    """Two-sided one-sample t-test p-value of paired differences (NaN dropped); 1 when all are equal to 0."""
    from scipy.stats import ttest_1samp

    d = np.asarray(diff, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return math.nan
    if np.allclose(d, d[0], rtol=0, atol=1e-12):
        return 1.0 if abs(d[0]) < 1e-12 else 0.0  # no spread: equal means nothing, a constant shift is certain
    return float(ttest_1samp(d, 0.0).pvalue)


@dataclass(frozen=True)
class Difference:
    """A paired difference (method - reference): mean, interval, p-value, number of pairs and the test."""
    mean: float
    ci_low: float
    ci_high: float
    p: float
    n: int
    test: str           # "wilcoxon-cases" | "t-seeds" | "" (nothing paired)


NOTHING = Difference(math.nan, math.nan, math.nan, math.nan, 0, "")


def paired_difference(method: pd.DataFrame, reference: pd.DataFrame, metric: str, *, by_case: bool,
                      interval: bool = True) -> Difference:
    """``method - reference`` of ``metric`` over pairs of the same ``seed`` and ``source`` (and ``case``
    when ``by_case``). Both frames hold the columns ``seed``, ``source`` (the source model), ``metric`` and,
    for ``by_case``, ``case``: per-case values; otherwise one value per seed (the rows' means over cases)."""
    on = ["seed", "source"] + (["case"] if by_case else [])
    both = method[on + [metric]].merge(reference[on + [metric]], on=on, suffixes=("_m", "_r"))
    both = both.assign(d=both[f"{metric}_m"] - both[f"{metric}_r"])
    both = both[np.isfinite(both["d"].to_numpy(dtype=float))]
    if not len(both):
        return NOTHING
    mean = float(both["d"].mean())
    if by_case:
        low = high = math.nan
        if interval:
            grid = both.pivot_table(index=["seed", "source"], columns="case", values="d", aggfunc="mean")
            low, high = crossed_bootstrap_interval(grid.to_numpy())
        p = signed_rank_p(both.groupby("case")["d"].mean().to_numpy())
        return Difference(mean, low, high, p, len(both), "wilcoxon-cases")
    low, high = t_interval(both["d"].to_numpy())
    return Difference(mean, low, high, paired_t_p(both["d"].to_numpy()), len(both), "t-seeds")


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (NaN stays NaN and does not count as a hypothesis)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def significance_ranks(groups: Sequence[pd.DataFrame], metric: str, higher_is_better: bool, *, by_case: bool,
                       alpha: float = ALPHA) -> tuple[list[int], list[int]]:
    """(wins, rank) per group: wins = how many other groups it is significantly better than (pairwise tests of
    :func:`paired_difference`, Holm-corrected over all pairs); rank = 1 + the number of groups with more wins
    (equal wins share a rank)."""
    k = len(groups)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    tests = [paired_difference(groups[i], groups[j], metric, by_case=by_case, interval=False) for i, j in pairs]
    adjusted = holm([t.p for t in tests])
    wins = [0] * k
    for (i, j), test, p in zip(pairs, tests, adjusted):
        if np.isfinite(p) and p < alpha and np.isfinite(test.mean) and test.mean != 0:
            i_better = (test.mean > 0) == higher_is_better
            wins[i if i_better else j] += 1
    ranks = [1 + sum(w > wins[g] for w in wins) for g in range(k)]
    return wins, ranks
