"""A small deterministic pairwise (2-way) covering-array generator for configuration tests."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any


def uncovered_pairs(factors: dict[str, Sequence[Any]], rows: list[dict[str, Any]]) -> set[tuple]:
    """Every (factor a, value a, factor b, value b) pair that no row contains."""
    names = list(factors)
    needed = {
        (a, va, b, vb)
        for a, b in itertools.combinations(names, 2)
        for va in factors[a]
        for vb in factors[b]
    }
    for row in rows:
        for a, b in itertools.combinations(names, 2):
            needed.discard((a, row[a], b, row[b]))
    return needed


def pairwise_rows(factors: dict[str, Sequence[Any]], seed: int = 0, candidates: int = 60) -> list[dict[str, Any]]:
    """Greedy AETG-style construction: add the candidate row covering most uncovered pairs."""
    rng = random.Random(seed)
    names = list(factors)
    rows: list[dict[str, Any]] = []
    missing = uncovered_pairs(factors, rows)
    while missing:
        # seed each candidate with one still-missing pair so progress is guaranteed
        target = sorted(missing, key=repr)[rng.randrange(len(missing))]
        best, best_gain = None, -1
        for _ in range(candidates):
            row = {n: rng.choice(list(factors[n])) for n in names}
            row[target[0]], row[target[2]] = target[1], target[3]
            gain = sum(
                (a, row[a], b, row[b]) in missing for a, b in itertools.combinations(names, 2)
            )
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append(best)
        missing = uncovered_pairs(factors, rows)
    return rows
