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
    pause = pipeline.TRIALS_TABLE_PAUSE_FACTOR * 0.5
    pipeline.refresh_trials_table(None, folder)  # the first trial: written
    assert writes == [100.0]
    for elapsed in (1.0, pause / 2, pause - 0.1):  # trials ending within factor x 0.5 s of it: skipped
        clock["now"] = 100.5 + elapsed
        pipeline.refresh_trials_table(None, folder)
    assert len(writes) == 1
    clock["now"] = 100.5 + pause
    pipeline.refresh_trials_table(None, folder)
    assert writes == [100.0, 100.5 + pause]
    clock["now"] += 1.0
    pipeline.write_trials_table(None, folder)  # the search's end: always written
    assert writes[-1] == clock["now"] - 0.5
    other = tmp_path / "other"
    pipeline.refresh_trials_table(None, other)  # another study's table is paced on its own
    assert len(writes) == 4
