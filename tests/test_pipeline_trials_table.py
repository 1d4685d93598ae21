"""trials.csv during a search: rewritten after a trial unless its last rewrite is more recent than
``TRIALS_TABLE_PAUSE_FACTOR`` times what that rewrite took (``ehrsr.pipeline.refresh_trials_table``);
``write_trials_table`` (the end of the search) always writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ehrsr import pipeline


def test_rewrites_are_paced_by_their_own_cost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 100.0}
    writes: list[float] = []

    def fake_write(study: object, path: Path) -> Path:
        writes.append(clock["now"])
        clock["now"] += 0.5  # a rewrite of a large study takes half a second
        return path

    monkeypatch.setattr(pipeline.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(pipeline, "write_trials_csv", fake_write)
    monkeypatch.setattr(pipeline, "_TABLE_WRITES", {})
    folder = tmp_path / "study"
    pipeline.refresh_trials_table(None, folder)  # the first trial: written
    assert writes == [100.0]
    for elapsed in (1.0, 5.0, 9.9):  # trials ending within 20 x 0.5 s of the last rewrite: skipped
        clock["now"] = 100.5 + elapsed
        pipeline.refresh_trials_table(None, folder)
    assert len(writes) == 1
    clock["now"] = 100.5 + 10.0
    pipeline.refresh_trials_table(None, folder)
    assert writes == [100.0, 110.5]
    clock["now"] = 111.5
    pipeline.write_trials_table(None, folder)  # the search's end: always written
    assert writes[-1] == 111.5
    other = tmp_path / "other"
    pipeline.refresh_trials_table(None, other)  # another study's table is paced on its own
    assert len(writes) == 4
