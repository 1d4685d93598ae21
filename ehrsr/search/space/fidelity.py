"""The fidelity of a space's trials (``training`` section): patch, batch, loss, the rungs of
multi-fidelity early stopping (Successive Halving: ``min_steps * eta**k`` up to ``max_steps``),
and the ``TrainSettings`` each sampled configuration trains with (``docs/search_spaces.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ehrsr.search.asha import rung_steps
from ehrsr.search.space.distributions import Entry, candidate_values
from ehrsr.search.space.errors import SearchSpaceError
from ehrsr.training import LOSSES, TrainSettings

__all__ = ["TRAINING_OPTIONAL", "TRAINING_REQUIRED", "TRAINING_SEARCHABLE", "Fidelity", "parse_training"]

TRAINING_REQUIRED = ("patch_size", "batch_size", "lr", "min_steps", "eta", "seconds_per_trial_estimate")
TRAINING_OPTIONAL = ("max_steps", "rungs", "loss", "weight_decay")
TRAINING_SEARCHABLE = ("lr", "weight_decay")  # sampled per trial like the model's parameters


@dataclass(frozen=True)
class Fidelity:
    """What one trial trains with, and the rungs of multi-fidelity early stopping."""

    patch_size: int  # LR training patch side in pixels (the HR patch is patch_size * scale)
    batch_size: int  # patches per step
    min_steps: int  # first rung r
    eta: int  # reduction factor between rungs
    max_steps: int  # full fidelity, the top rung
    rung_steps: tuple[int, ...]  # r, r*eta, ... < max_steps, then max_steps
    loss: str  # one of LOSSES
    seconds_per_trial_estimate: float  # prior cost of one full-fidelity trial, for budget planning

    @property
    def n_rungs(self) -> int:
        return len(self.rung_steps)

    def scaled(self, factor: int) -> Fidelity:
        """This fidelity with every step count (rungs included) ``factor`` times longer: what a
        study trains with after a proxy-fidelity check raised its steps (``STEPS_SCALE_ATTR``)."""
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"a steps factor must be an integer >= 1, got {factor!r}")
        if factor == 1:
            return self
        return dataclasses.replace(
            self, min_steps=self.min_steps * factor, max_steps=self.max_steps * factor,
            rung_steps=tuple(s * factor for s in self.rung_steps),
            seconds_per_trial_estimate=self.seconds_per_trial_estimate * factor,
        )

    def train_settings(self, values: dict[str, Any]) -> TrainSettings:
        """What a trial with these sampled ``values`` trains with: this fidelity (full length:
        ``max_steps``) plus the sampled ``lr`` and ``weight_decay`` (the latter defaults to
        ``TrainSettings``'s own default when the space does not set it)."""
        sampled = {k: float(values[k]) for k in TRAINING_SEARCHABLE if k in values}
        return TrainSettings(
            steps=self.max_steps,
            batch_size=self.batch_size,
            patch_size=self.patch_size,
            loss=self.loss,
            **sampled,
        )


def parse_training(
    training: dict[str, Any],
    error: Callable[[tuple[str, ...], str], SearchSpaceError],
    make_entry: Callable[..., Entry],
) -> tuple[Fidelity, list[Entry]]:
    """The ``training`` section: its fidelity and the training parameters (``lr``, ``weight_decay``)
    as entries. ``error(keys, message)`` makes the located error; ``make_entry`` parses one value."""
    valid = TRAINING_REQUIRED + TRAINING_OPTIONAL
    for key in training:
        if key not in valid:
            raise error(("training", str(key)), f"unknown training key; valid keys: {', '.join(valid)}")
    for key in TRAINING_REQUIRED:
        if key not in training:
            raise error(("training",), f"missing '{key}'")
    if ("max_steps" in training) == ("rungs" in training):
        raise error(
            ("training",), "give exactly one of max_steps (the full fidelity) or rungs (how many rungs)"
        )

    def integer(key: str, minimum: int) -> int:
        value = training[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(("training", key), f"must be an integer, got {value!r}")
        if value < minimum:
            raise error(("training", key), f"must be >= {minimum}, got {value}")
        return value

    patch_size = integer("patch_size", 4)
    batch_size = integer("batch_size", 1)
    min_steps = integer("min_steps", 1)
    eta = integer("eta", 2)
    if "max_steps" in training:
        max_steps = integer("max_steps", 1)
        if max_steps < min_steps:
            raise error(("training", "max_steps"), f"must be >= min_steps ({min_steps}), got {max_steps}")
    else:
        max_steps = min_steps * eta ** (integer("rungs", 1) - 1)
    loss = training.get("loss", "l1")
    if loss not in LOSSES:
        raise error(("training", "loss"), f"must be one of {', '.join(LOSSES)}, got {loss!r}")
    estimate = training["seconds_per_trial_estimate"]
    if isinstance(estimate, bool) or not isinstance(estimate, (int, float)) or not estimate > 0:
        raise error(("training", "seconds_per_trial_estimate"), f"must be a number > 0, got {estimate!r}")

    entries = []
    for key, minimum, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False)):
        if key not in training:
            continue
        entry = make_entry("training", key, key, training[key], hint=float)
        bounds = candidate_values(entry.distribution) if entry.searched else [entry.fixed]
        for value in bounds:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise error(("training", key), f"must be a number, got {value!r}")
            if value < minimum or (strict and value == minimum):
                raise error(("training", key), f"must be {'>' if strict else '>='} {minimum}, got {value}")
        if not entry.searched:
            entry = dataclasses.replace(entry, fixed=float(entry.fixed))
        entries.append(entry)

    fidelity = Fidelity(
        patch_size=patch_size,
        batch_size=batch_size,
        min_steps=min_steps,
        eta=eta,
        max_steps=max_steps,
        rung_steps=rung_steps(min_steps, eta, max_steps),
        loss=loss,
        seconds_per_trial_estimate=float(estimate),
    )
    return fidelity, entries

