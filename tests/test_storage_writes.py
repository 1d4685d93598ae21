"""A trial's parameters and attributes written in one transaction on SQLite and PostgreSQL
(``ehrsr.search.storage``: ``write_user_attrs``, ``set_user_attrs``, ``suggest_and_set``): the
study reads exactly what Optuna's own writes store, Optuna's checks still refuse, fewer
statements reach the database, and a failed write leaves nothing half-written."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy
import sqlalchemy.exc
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError

from ehrsr.search import storage as storage_module
from ehrsr.search.storage import (
    _batching_rdb,
    open_storage,
    set_user_attrs,
    suggest_and_set,
    write_user_attrs,
)
from ehrsr.study_schema import study_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(params=["sqlite", "postgresql", "journal"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'writes.db'}"
    if request.param == "journal":
        return f"journal:{tmp_path / 'writes.journal'}"
    return request.getfixturevalue("pg_url")


def _statements(study: optuna.Study) -> list[str]:
    seen: list[str] = []
    engine = getattr(getattr(study_storage(study), "_backend", None), "engine", None)
    if engine is not None:
        sqlalchemy.event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def _suggest(trial: optuna.Trial) -> dict:
    width = trial.suggest_categorical("width", [16, 32, 48])
    depth = trial.suggest_int("depth", 1, 4)
    lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    heads = trial.suggest_int("heads", 1, 2) if width > 16 else None
    again = trial.suggest_int("depth", 1, 4)  # a repeated suggestion returns the held value
    assert again == depth
    return {"width": width, "depth": depth, "lr": lr, "heads": heads}


def _two_studies(url: str) -> tuple[optuna.Study, optuna.Study]:
    storage = open_storage(url)
    made = [optuna.create_study(storage=storage, study_name=name, sampler=optuna.samplers.RandomSampler(seed=5))
            for name in ("batched", "optuna")]
    return made[0], made[1]


def test_the_parameters_and_attributes_are_stored_as_optunas_own_writes_store_them(url) -> None:
    batched, plain = _two_studies(url)
    on_database = not url.startswith("journal:")
    assert (_batching_rdb(study_storage(batched)) is not None) == on_database  # this Optuna has what it needs
    for i in range(3):
        trial = batched.ask()
        seen = _statements(batched)
        drawn = suggest_and_set(trial, lambda t=trial: _suggest(t), lambda d: {"config": d, "device_kind": "cpu"})
        if on_database and i > 0:  # the trial read, the parameters inserted, the attributes upserted
            assert len(seen) <= 3, seen  # (the first trial also looks up each name's earlier distribution)
        assert trial.params == {k: v for k, v in drawn.items() if v is not None}
        assert trial.user_attrs == {"config": drawn, "device_kind": "cpu"}
        twin = plain.ask()
        assert _suggest(twin) == drawn  # the same sampler stream, Optuna's writes
        twin.set_user_attr("config", drawn)
        twin.set_user_attr("device_kind", "cpu")
        batched.tell(trial, 1.0)
        plain.tell(twin, 1.0)
    for ours, theirs in zip(batched.get_trials(), plain.get_trials(), strict=True):
        assert ours.params == theirs.params and ours.distributions == theirs.distributions
        assert ours.user_attrs == theirs.user_attrs
    # Optuna's samplers and the study read them back: a fresh process sees the same
    reread = optuna.load_study(study_name="batched", storage=open_storage(url))
    assert [t.params for t in reread.trials] == [t.params for t in plain.trials]


def test_many_attributes_go_in_one_transaction_and_replace_earlier_values(url) -> None:
    study, _ = _two_studies(url)
    trial = study.ask()
    seen = _statements(study)
    set_user_attrs(trial, {"a": 1, "b": {"x": [1.5, None]}, "c": "text"})
    if not url.startswith("journal:"):
        assert len(seen) == 2, seen  # the trial read, one upsert
    write_user_attrs(study_storage(study), trial._trial_id, {"a": 2, "d": True})
    assert study.trials[0].user_attrs == {"a": 2, "b": {"x": [1.5, None]}, "c": "text", "d": True}
    assert trial.user_attrs["a"] == 1  # write_user_attrs has no trial object to update
    study.tell(trial, 0.0)
    with pytest.raises(UpdateFinishedTrialError):
        set_user_attrs(trial, {"a": 3, "e": 1})
    assert study.trials[0].user_attrs["a"] == 2


def test_a_distribution_the_study_stored_differently_is_refused_as_optuna_refuses_it(url) -> None:
    study, _ = _two_studies(url)
    first = study.ask()
    first.suggest_int("depth", 1, 4)
    study.tell(first, 0.0)
    trial = study.ask()
    with pytest.raises(ValueError, match=r"[Cc]annot set different distribution kind"):
        suggest_and_set(trial, lambda: trial.suggest_float("depth", 0.0, 1.0), lambda _: {"k": 1})
    assert study.trials[1].params == {} and "k" not in study.trials[1].user_attrs
    assert trial.params == {}  # the held parameter was dropped with the failed write


def test_a_write_that_fails_drops_the_held_parameters_and_a_retry_stores_them(tmp_path, monkeypatch) -> None:
    study, _ = _two_studies(f"sqlite:///{tmp_path / 'fail.db'}")
    trial = study.ask()
    real = storage_module._write_in_one_transaction
    failures = []

    def lost_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(storage_module, "_write_in_one_transaction", lost_once)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        suggest_and_set(trial, lambda: _suggest(trial), lambda d: {"config": d})
    assert trial.params == {} and study.trials[0].params == {}
    drawn = suggest_and_set(trial, lambda: _suggest(trial), lambda d: {"config": d})  # as retry_storage retries it
    stored = study.trials[0]
    assert stored.params == trial.params == {k: v for k, v in drawn.items() if v is not None}
    assert stored.user_attrs == {"config": drawn}
    assert stored.distributions["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert stored.distributions["depth"] == IntDistribution(1, 4)


def test_a_study_made_again_under_the_same_id_may_change_a_parameters_kind(tmp_path) -> None:
    # what this process remembers of a study's distributions never refuses what the database allows
    storage = open_storage(f"sqlite:///{tmp_path / 'again.db'}")
    first = optuna.create_study(storage=storage, study_name="s")
    trial = first.ask()
    suggest_and_set(trial, lambda: trial.suggest_int("depth", 1, 4), lambda _: {"k": 1})
    first_id = first._study_id
    optuna.delete_study(study_name="s", storage=storage)
    again = optuna.create_study(storage=storage, study_name="s")
    assert again._study_id == first_id  # SQLite gives the id again
    trial = again.ask()
    value = suggest_and_set(trial, lambda: trial.suggest_float("depth", 0.0, 1.0), lambda _: {"k": 2})
    assert again.trials[0].params == {"depth": value}
    assert again.trials[0].distributions["depth"] == FloatDistribution(0.0, 1.0)
