"""Paired statistics for comparing variants: intervals, verdicts, power, rank agreement, seed plans.

Every comparison here is *paired*: a variant and its reference are evaluated on the same images
with the same training seeds, and the unit of analysis is the per-(seed, image) difference
``delta[s, i] = metric(variant, seed s, image i) - metric(reference, seed s, image i)``.

- :func:`paired_interval`: mean delta with a confidence interval. The default is the *pigeonhole*
  bootstrap of Owen ("The pigeonhole bootstrap", Annals of Applied Statistics 2007) for a crossed
  seeds x images table: images and seeds are resampled independently, so the interval covers
  both sources of variation a new study would meet (other images, other training randomness).
  ``method="t"`` is the classic paired t-interval on per-image deltas averaged over seeds.
  ``docs/statistics.md`` explains the choice.
- :func:`verdict`: "helps" / "hurts" / "no detectable effect at this fidelity".
- :func:`minimum_detectable_effect`: the paired-t power formula
  ``MDE = (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd(d_i) / sqrt(n)`` over the ``n`` per-image
  deltas ``d_i`` averaged over seeds (Cohen, "Statistical Power Analysis", 1988, ch. 2).
- :func:`rank_agreement`: Spearman's rho and Kendall's tau-b (scipy's point values) with
  percentile-bootstrap 95 % intervals over the points.
- :func:`ranking_quality`: rank agreement plus what a search that trusts the proxy would lose:
  the regret of the proxy's best configuration and the recall of the reference's top k.
- :func:`auto_seed_plan`: which ablation variants get one more training seed (``--ablation-seeds
  auto``): every variant gets ``min_seeds``; afterwards only variants whose interval still
  contains zero, most promising first, while the budget lasts, up to ``max_seeds``.

Pure numpy/scipy: no torch, so reports can import it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as sps

__all__ = [
    "MIN_TRUST_POINTS",
    "NO_EFFECT",
    "TRUST_TAU_LOW",
    "PairedInterval",
    "RankAgreement",
    "RankingQuality",
    "SeedPlan",
    "StatsError",
    "as_delta_table",
    "auto_seed_plan",
    "minimum_detectable_effect",
    "paired_interval",
    "rank_agreement",
    "ranking_quality",
    "verdict",
]

NO_EFFECT = "no detectable effect at this fidelity"
TRUST_TAU_LOW = 0.5  # tau's interval must start above this for a proxy to rank like long training
# below this many points the percentile bootstrap collapses (every resample of 4 perfectly ordered
# points gives tau = 1, a "[1, 1]" interval): no verdict either way, only the numbers
MIN_TRUST_POINTS = 6
DEFAULT_BOOTSTRAP_RESAMPLES = 4000  # percentile tails at 95 % settle to ~0.01 dB on our tables


class StatsError(ValueError):
    """The data cannot support the requested statistic (too few points, wrong shape, NaNs)."""


def as_delta_table(deltas: np.ndarray | Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    """Deltas as a float64 ``(n_seeds, n_images)`` table; a flat sequence is one seed."""
    table = np.asarray(deltas, dtype=np.float64)
    if table.ndim == 1:
        table = table[None, :]
    if table.ndim != 2 or table.size == 0:
        raise StatsError(f"deltas must be a non-empty (seeds, images) table, got shape {table.shape}")
    if not np.all(np.isfinite(table)):
        raise StatsError("deltas contain NaN or infinite values")
    return table


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired delta and its two-sided confidence interval."""

    mean: float
    low: float
    high: float
    n_images: int
    n_seeds: int
    method: str
    confidence: float

    @property
    def n(self) -> int:
        """Number of (seed, image) deltas."""
        return self.n_images * self.n_seeds

    @property
    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def paired_interval(
    deltas: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    method: Literal["bootstrap", "t"] = "bootstrap",
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
    n_resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES,
) -> PairedInterval:
    """Mean of a ``(n_seeds, n_images)`` table of paired deltas with a ``confidence`` interval.

    ``bootstrap`` (default): pigeonhole bootstrap, images and seeds resampled independently with
    replacement (images only when there is one seed), percentile interval of the resampled grand
    means. ``t``: Student-t interval on the per-image deltas averaged over seeds (``n_images - 1``
    degrees of freedom). Both need at least 2 images. ``rng`` makes the bootstrap reproducible.
    """
    table = as_delta_table(deltas)
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence must be in (0, 1), got {confidence}")
    n_seeds, n_images = table.shape
    if n_images < 2:
        raise StatsError(f"an interval needs deltas on at least 2 images, got {n_images}")
    mean = float(table.mean())
    alpha = 1.0 - confidence
    if method == "t":
        per_image = table.mean(axis=0)
        se = float(per_image.std(ddof=1)) / math.sqrt(n_images)
        half = float(sps.t.ppf(1.0 - alpha / 2.0, n_images - 1)) * se
        low, high = mean - half, mean + half
    elif method == "bootstrap":
        generator = np.random.default_rng(rng)
        means = _pigeonhole_means(table, generator, n_resamples)
        low, high = (float(v) for v in np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0]))
    else:
        raise StatsError(f"unknown interval method {method!r}; valid: bootstrap, t")
    return PairedInterval(mean, low, high, n_images, n_seeds, method, confidence)


def _pigeonhole_means(table: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """Grand means of ``n_resamples`` tables with rows (seeds) and columns (images) resampled."""
    n_seeds, n_images = table.shape
    cols = rng.integers(0, n_images, size=(n_resamples, n_images))
    if n_seeds == 1:
        return table[0][cols].mean(axis=1)
    rows = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    # mean over the resampled cells = mean over resampled rows of (mean over resampled columns)
    picked = table[rows[:, :, None], cols[:, None, :]]  # (B, n_seeds, n_images)
    return picked.mean(axis=(1, 2))


def verdict(interval: PairedInterval, higher_is_better: bool) -> str:
    """"helps" when the whole interval lies on the good side of zero, "hurts" when on the bad side,
    else :data:`NO_EFFECT`."""
    if interval.low > 0.0:
        return "helps" if higher_is_better else "hurts"
    if interval.high < 0.0:
        return "hurts" if higher_is_better else "helps"
    return NO_EFFECT


def minimum_detectable_effect(
    deltas: np.ndarray | Sequence[float] | Sequence[Sequence[float]], alpha: float = 0.05, power: float = 0.8,
    rng: np.random.Generator | int | None = 0, n_resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES,
) -> float:
    """Smallest true mean delta a two-sided paired test at level ``alpha`` detects with
    probability ``power``, given the spread of these deltas (same unit as the deltas: dB for PSNR).

    One seed: ``MDE = (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd(d) / sqrt(n)``, ``d`` the per-image
    deltas, ``n`` the number of images. Several seeds: the standard error of the grand mean is the
    standard deviation of the pigeonhole-bootstrap means (the resampling of ``paired_interval``,
    seeds and images both resampled), so seed-to-seed variation counts as it does in the interval:
    ``MDE = (z_{1-alpha/2} + z_{power}) * se``. Averaging over seeds first would hide a seed effect
    shared by all images and claim a resolution the intervals do not have.
    """
    table = as_delta_table(deltas)
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise StatsError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    n_seeds, n = table.shape
    if n < 2:
        raise StatsError(f"the minimum detectable effect needs at least 2 images, got {n}")
    if n_seeds == 1:
        factor = float(sps.t.ppf(1.0 - alpha / 2.0, n - 1) + sps.t.ppf(power, n - 1))
        return factor * float(table[0].std(ddof=1)) / math.sqrt(n)
    se = float(_pigeonhole_means(table, np.random.default_rng(rng), n_resamples).std(ddof=1))
    return float(sps.norm.ppf(1.0 - alpha / 2.0) + sps.norm.ppf(power)) * se


# ---------------------------------------------------------------------------------------------
# rank agreement


@dataclass(frozen=True)
class RankAgreement:
    """Spearman's rho and Kendall's tau-b with percentile-bootstrap intervals over the points."""

    spearman: float
    spearman_low: float
    spearman_high: float
    kendall: float
    kendall_low: float
    kendall_high: float
    n: int
    confidence: float


MIN_RANK_POINTS = 4


def rank_agreement(
    brief: Sequence[float] | np.ndarray,
    long: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
    n_resamples: int = 2000,
) -> RankAgreement:
    """How well scores after a brief training (``brief``) rank the same configurations as after
    a long one (``long``). Points are resampled in pairs; resamples whose ranks are all tied
    (undefined correlation) are dropped from the interval."""
    x, y = np.asarray(brief, dtype=np.float64), np.asarray(long, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise StatsError(f"brief and long must be two equally long 1-D sequences, got {x.shape} and {y.shape}")
    if x.size < MIN_RANK_POINTS:
        raise StatsError(f"rank agreement needs at least {MIN_RANK_POINTS} configurations, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise StatsError("brief and long scores must be finite")
    rho = float(sps.spearmanr(x, y).statistic)
    tau = float(sps.kendalltau(x, y).statistic)
    generator = np.random.default_rng(rng)
    index = generator.integers(0, x.size, size=(n_resamples, x.size))
    rhos, taus = np.full(n_resamples, np.nan), np.full(n_resamples, np.nan)
    for b in range(n_resamples):
        xb, yb = x[index[b]], y[index[b]]
        if np.ptp(xb) == 0 or np.ptp(yb) == 0:
            continue  # every rank tied: no correlation defined
        rhos[b] = sps.spearmanr(xb, yb).statistic
        taus[b] = sps.kendalltau(xb, yb).statistic
    q = [(1.0 - confidence) / 2.0, 1.0 - (1.0 - confidence) / 2.0]
    rho_low, rho_high = (float(v) for v in np.nanquantile(rhos, q))
    tau_low, tau_high = (float(v) for v in np.nanquantile(taus, q))
    return RankAgreement(rho, rho_low, rho_high, tau, tau_low, tau_high, int(x.size), confidence)


@dataclass(frozen=True)
class RankingQuality:
    """How well a proxy ranks configurations against a reference (long training).

    ``agreement``: Spearman and Kendall with their intervals. ``regret``: the reference value of
    the reference's best configuration minus that of the proxy's best (0 when the proxy picks the
    best; in the reference's unit, e.g. dB). ``top_k_recall``: the share of the reference's ``k``
    best that are among the proxy's ``k`` best."""

    agreement: RankAgreement
    regret: float
    top_k_recall: float
    k: int


def ranking_quality(
    proxy: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    *,
    k: int = 3,
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
    n_resamples: int = 2000,
) -> RankingQuality:
    """``rank_agreement`` of ``proxy`` against ``reference`` (higher is better in both), with the
    regret of trusting the proxy's best and the recall of the reference's top ``k``."""
    agreement = rank_agreement(proxy, reference, confidence=confidence, rng=rng, n_resamples=n_resamples)
    x, y = np.asarray(proxy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if not 1 <= k <= x.size:
        raise StatsError(f"k must be between 1 and the number of configurations ({x.size}), got {k}")
    regret = float(y.max() - y[int(np.argmax(x))])
    top_proxy = set(np.argsort(-x, kind="stable")[:k].tolist())
    top_reference = set(np.argsort(-y, kind="stable")[:k].tolist())
    return RankingQuality(agreement, regret, len(top_proxy & top_reference) / k, k)


# ---------------------------------------------------------------------------------------------
# adaptive seeds


@dataclass(frozen=True)
class SeedPlan:
    """Outcome of one planning round of ``--ablation-seeds auto``.

    ``next_seed``: variants that get one more seed now, in the order to run them. ``decided``:
    variants whose interval excludes zero. ``at_max``: undecided variants with ``max_seeds``
    seeds. ``unaffordable``: undecided variants the remaining budget cannot pay for.
    """

    next_seed: tuple[str, ...]
    decided: tuple[str, ...]
    at_max: tuple[str, ...]
    unaffordable: tuple[str, ...]
    seconds_planned: float

    @property
    def done(self) -> bool:
        return not self.next_seed


def auto_seed_plan(
    deltas: Mapping[str, np.ndarray | Sequence[Sequence[float]] | None],
    remaining_seconds: float,
    seconds_per_seed: Mapping[str, float] | float,
    *,
    min_seeds: int = 2,
    max_seeds: int = 6,
    method: Literal["bootstrap", "t"] = "bootstrap",
    confidence: float = 0.95,
    rng: int = 0,
) -> SeedPlan:
    """Which variants to train with one more seed, given what has been measured so far.

    Args:
        deltas: per variant, its ``(n_seeds, n_images)`` delta table so far (``None`` or an
            empty table before its first seed).
        remaining_seconds: budget left for further training runs.
        seconds_per_seed: estimated cost of training and evaluating one more seed, per variant
            or one value for all.
        min_seeds: every variant is brought up to this many seeds first (no verdict before).
        max_seeds: no variant gets more seeds than this.

    Variants below ``min_seeds`` come first (fewest seeds first). Then undecided variants (interval
    contains zero) below ``max_seeds``, those closest to a decision first (largest
    ``|mean| / half-width``). Each is added while its cost fits in the remaining budget.
    Calling this again after the new seeds have run gives the next round; ``done`` ends it.
    """
    if min_seeds < 1 or max_seeds < min_seeds:
        raise StatsError(f"need 1 <= min_seeds <= max_seeds, got {min_seeds}, {max_seeds}")
    cost = {name: float(seconds_per_seed if not isinstance(seconds_per_seed, Mapping) else seconds_per_seed[name])
            for name in deltas}
    tables = {name: (None if table is None or np.size(table) == 0 else as_delta_table(table))
              for name, table in deltas.items()}
    n_seeds = {name: (0 if table is None else table.shape[0]) for name, table in tables.items()}

    warming = sorted((name for name in tables if n_seeds[name] < min_seeds), key=lambda n: (n_seeds[n], n))
    decided, at_max, candidates = [], [], []
    for name, table in tables.items():
        if n_seeds[name] < min_seeds:
            continue
        interval = paired_interval(table, method=method, confidence=confidence, rng=rng)
        if not interval.contains_zero:
            decided.append(name)
        elif n_seeds[name] >= max_seeds:
            at_max.append(name)
        else:
            closeness = abs(interval.mean) / interval.half_width if interval.half_width > 0 else math.inf
            candidates.append((-closeness, name))
    ordered = warming + [name for _, name in sorted(candidates)]

    chosen, unaffordable, spent = [], [], 0.0
    for name in ordered:
        if spent + cost[name] <= remaining_seconds:
            chosen.append(name)
            spent += cost[name]
        else:
            unaffordable.append(name)
    return SeedPlan(tuple(chosen), tuple(sorted(decided)), tuple(sorted(at_max)), tuple(unaffordable), spent)
