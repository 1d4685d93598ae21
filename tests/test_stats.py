"""Paired statistics on hand-made per-image tables whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from ehrsr.stats import (
    NO_EFFECT,
    StatsError,
    auto_seed_plan,
    minimum_detectable_effect,
    paired_interval,
    rank_agreement,
    verdict,
)

# 12 images x 3 seeds; per-image noise of sd 0.05 dB, fixed by a seed
_NOISE = np.random.default_rng(7).normal(0.0, 0.05, size=(3, 12))


@pytest.mark.parametrize("method", ["bootstrap", "t"])
def test_clear_positive_negative_and_null_effects(method: str) -> None:
    positive = paired_interval(0.3 + _NOISE, method=method)
    negative = paired_interval(-0.3 + _NOISE, method=method)
    null = paired_interval(_NOISE - _NOISE.mean(), method=method)
    assert positive.low > 0.2 and positive.high < 0.4  # +0.3 dB, found inside a tight interval
    assert verdict(positive, higher_is_better=True) == "helps"
    assert verdict(positive, higher_is_better=False) == "hurts"  # e.g. latency going up
    assert verdict(negative, higher_is_better=True) == "hurts"
    assert verdict(negative, higher_is_better=False) == "helps"
    assert null.low < 0 < null.high and abs(null.mean) < 1e-12
    assert verdict(null, higher_is_better=True) == NO_EFFECT
    assert (positive.n_seeds, positive.n_images, positive.n) == (3, 12, 36)


def test_t_interval_matches_the_textbook_formula() -> None:
    per_image = np.array([0.10, 0.25, -0.05, 0.30, 0.15])
    table = np.stack([per_image - 0.02, per_image + 0.02])  # two seeds averaging to per_image
    interval = paired_interval(table, method="t")
    half = sps.t.ppf(0.975, 4) * per_image.std(ddof=1) / math.sqrt(5)
    assert interval.mean == pytest.approx(per_image.mean())
    assert (interval.low, interval.high) == pytest.approx((per_image.mean() - half, per_image.mean() + half))


def test_bootstrap_includes_seed_to_seed_variation() -> None:
    # every image moves together with the seed: +0.5 under seed 0, -0.3 under seed 1. The images
    # agree perfectly, so an images-only interval would be very narrow; the pigeonhole bootstrap
    # knows a new seed may land anywhere between and straddles zero.
    table = np.array([[0.5] * 10, [-0.3] * 10]) + _NOISE[:2, :10] * 0.1
    assert paired_interval(table, method="t").low > 0.0
    pigeonhole = paired_interval(table, method="bootstrap")
    assert pigeonhole.low < 0.0 < pigeonhole.high


def test_bootstrap_is_reproducible_and_validates_input() -> None:
    assert paired_interval(_NOISE, rng=3) == paired_interval(_NOISE, rng=3)
    with pytest.raises(StatsError, match="at least 2 images"):
        paired_interval([[0.1], [0.2]])
    with pytest.raises(StatsError, match="NaN"):
        paired_interval([0.1, float("nan"), 0.2])
    with pytest.raises(StatsError, match="valid: bootstrap, t"):
        paired_interval(_NOISE, method="anova")  # type: ignore[arg-type]


def test_minimum_detectable_effect_formula_and_scaling() -> None:
    per_image = np.array([0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.05])
    n = per_image.size
    expected = (sps.t.ppf(0.975, n - 1) + sps.t.ppf(0.8, n - 1)) * per_image.std(ddof=1) / math.sqrt(n)
    assert minimum_detectable_effect(per_image) == pytest.approx(expected)
    # the same spread over four times the images: the MDE roughly halves (sqrt(n), smaller t)
    quadrupled = np.tile(per_image, 4)
    ratio = minimum_detectable_effect(quadrupled) / minimum_detectable_effect(per_image)
    assert 0.35 < ratio < 0.5


def test_minimum_detectable_effect_counts_seed_variation_like_the_interval() -> None:
    # two seeds whose training landed differently: every image moves together (a seed effect),
    # plus a little image noise. Averaging over seeds would hide the seed term entirely.
    noise = np.random.default_rng(5).normal(0, 0.005, size=(2, 18))
    table = np.array([[0.05] * 18, [-0.05] * 18]) + noise
    mde = minimum_detectable_effect(table)
    image_only = minimum_detectable_effect(table.mean(axis=0))
    assert mde > 5 * image_only
    interval = paired_interval(table)
    half_width = (interval.high - interval.low) / 2
    # the MDE (2.8 standard errors) exceeds the interval's half width (about 2 standard errors)
    assert half_width < mde < 2.5 * half_width
    assert minimum_detectable_effect(table, rng=1) == pytest.approx(mde, rel=0.1)  # bootstrap noise is small


def test_rank_agreement_point_values_equal_scipy() -> None:
    brief = [28.1, 28.4, 27.9, 28.8, 28.0, 28.6, 27.5]
    long = [29.0, 29.5, 29.1, 29.9, 28.7, 29.4, 28.9]
    result = rank_agreement(brief, long)
    assert result.spearman == pytest.approx(sps.spearmanr(brief, long).statistic, abs=0)
    assert result.kendall == pytest.approx(sps.kendalltau(brief, long).statistic, abs=0)
    assert result.spearman_low <= result.spearman <= result.spearman_high
    assert result.kendall_low <= result.kendall <= result.kendall_high
    assert result.n == 7
    perfect = rank_agreement([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert (perfect.spearman, perfect.kendall, perfect.spearman_low, perfect.kendall_low) == pytest.approx((1, 1, 1, 1))


def test_rank_agreement_needs_four_points() -> None:
    with pytest.raises(StatsError, match="at least 4"):
        rank_agreement([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert issubclass(StatsError, ValueError)


def _table(mean: float, seeds: int, images: int = 10) -> np.ndarray:
    return mean + np.random.default_rng(seeds).normal(0.0, 0.05, size=(seeds, images))


def test_auto_seeds_start_at_two_then_only_undecided_ones() -> None:
    first = auto_seed_plan({"a": None, "b": _table(0.3, 1)}, remaining_seconds=1e9, seconds_per_seed=10.0)
    assert first.next_seed == ("a", "b")  # fewest seeds first; no verdict before two seeds
    deltas = {"clear": _table(0.3, 2), "null": _table(0.0, 2) - _table(0.0, 2).mean(), "maxed": _table(0.0, 6) - 0.0}
    deltas["maxed"] = deltas["maxed"] - deltas["maxed"].mean()
    plan = auto_seed_plan(deltas, remaining_seconds=1e9, seconds_per_seed=10.0)
    assert plan.decided == ("clear",)  # decided: stops getting seeds
    assert plan.at_max == ("maxed",)  # undecided but at max_seeds=6
    assert plan.next_seed == ("null",)
    assert plan.seconds_planned == 10.0


def test_auto_seeds_stop_when_all_decided_and_when_budget_ends() -> None:
    decided = auto_seed_plan({"a": _table(0.3, 2), "b": _table(-0.4, 3)}, remaining_seconds=1e9, seconds_per_seed=5.0)
    assert decided.done and set(decided.decided) == {"a", "b"}
    nulls = {name: _table(0.0, 2) - _table(0.0, 2).mean() for name in ("x", "y", "z")}
    costs = {"x": 30.0, "y": 30.0, "z": 30.0}
    partial = auto_seed_plan(nulls, remaining_seconds=70.0, seconds_per_seed=costs)
    assert len(partial.next_seed) == 2 and len(partial.unaffordable) == 1  # 2 x 30 s fit in 70 s
    broke = auto_seed_plan(nulls, remaining_seconds=10.0, seconds_per_seed=costs)
    assert broke.done and set(broke.unaffordable) == {"x", "y", "z"}


def test_auto_seeds_prefer_variants_closest_to_a_decision() -> None:
    noise = np.random.default_rng(1).normal(0.0, 0.3, size=(2, 10))
    noise -= noise.mean()
    almost = 0.08 + noise  # interval contains zero but the mean is well away from it
    hopeless = 0.0 + noise
    plan = auto_seed_plan({"hopeless": hopeless, "almost": almost}, remaining_seconds=15.0, seconds_per_seed=10.0)
    assert paired_interval(almost).contains_zero
    assert plan.next_seed == ("almost",) and plan.unaffordable == ("hopeless",)
