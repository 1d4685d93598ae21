"""The study record: one typed record per study, and the one that runs on every later process.

Every flag of ``run_search.py`` is enumerated from the parser: a flag either changes only the
run (``RUN_SETTINGS``: budget, workers, verbosity, output, locations) or lands in the record. Each
record flag is followed from the command line into storage, then, in a resumed run given no
flags at all, into the search loop, the ablation, baselines and fidelity steps and deploy; and a
resume that gives it another value is refused in one line naming it, with nothing written.
A new flag without an entry below fails ``test_every_search_flag_is_classified``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest

import ehrsr.pipeline as pipeline
import ehrsr.search.driver as driver
from ehrsr.cli import SEARCH_FLAG_SETTINGS, build_parser, main
from ehrsr.search.study import RUN_SETTINGS, SearchSettings
from ehrsr.study_schema import STUDY_ATTRS, RecordError, StudyInfo, StudyRecord
from tests.data_helpers import synthetic_image, write_image
from tests.reports_study import study_record

MICRO = str(Path(__file__).parent / "fixtures" / "micro.yaml")

# flag -> (value at creation "A", value of a second study "B"; None = the flag left out), and the
# record field each sets with its expected value in the A and the B study. Paths are relative to
# the test folder (``{tmp}``) and filled in by ``_argv``.
RECORD_FLAGS: dict[str, tuple[Any, Any, str, Any, Any]] = {
    "space": (MICRO, "{tmp}/other.yaml", "space.yaml", "micro", "other"),
    "objectives": ("psnr,latency,macs", "psnr,latency", "objectives", ["psnr", "latency", "macs"], ["psnr", "latency"]),
    "device": ("cpu", None, "device.kind", "cpu", "cpu"),
    "profile_size": ("48", "64", "profile.input_shape", [1, 3, 48, 48], [1, 3, 64, 64]),
    "profile_dtype": ("bfloat16", "float32", "profile.dtype", "bfloat16", "float32"),
    "profile_seconds": ("0.5", "0.25", "profile.seconds", 0.5, 0.25),
    "threads": ("1", "2", "profile.threads", 1, 2),
    "max_params": ("900k", "800k", "limits.max_params", 9e5, 8e5),
    "max_macs": ("20G", "10G", "limits.max_macs", 2e10, 1e10),
    "max_latency_ms": ("500", "400", "limits.max_latency_ms", 500.0, 400.0),
    "devices_file": ("{tmp}/devices_a.yaml", "{tmp}/devices_b.yaml", "devices_file", "{tmp}/devices_a.yaml",
                     "{tmp}/devices_b.yaml"),
    "max_memory_mb": ("4096", "2048", "limits.max_memory_mb", 4096.0, 2048.0),
    "sampler": ("random", "tpe", "sampler", "random", "tpe"),
    "seed": ("5", "6", "seed", 5, 6),
    "train_data": ("{tmp}/train_a", "{tmp}/train_b", "data.train", "{tmp}/train_a", "{tmp}/train_b"),
    "val_data": ("{tmp}/val_a", "{tmp}/val_b", "data.val", "{tmp}/val_a", "{tmp}/val_b"),
    "task": ("sr", "deblur", "task.task", "sr", "deblur"),
    "scale": ("2", "3", "task.scale", 2, 3),
    "noise_sigma": ("5", "6", "task.noise_sigma", 5.0, 6.0),
    "blur_sigma": ("0.5", "0.6", "task.blur_sigma", 0.5, 0.6),
    "jpeg_quality": ("90", "80", "task.jpeg_quality", 90, 80),
    "cache_dir": ("{tmp}/cache_a", "{tmp}/cache_b", "cache_dir", "{tmp}/cache_a", "{tmp}/cache_b"),
    "no_early_stopping": (None, True, "early_stopping.enabled", True, False),
    "allow_repeats": (None, True, "allow_repeats", False, True),
    "ablation_share": ("0.2", "0.1", "shares.ablation", 0.2, 0.1),
    "ablation_seeds": ("3", "2", "shares.ablation_seeds", 3, 2),
    "baselines": ("SPAN", "none", "shares.baselines", "SPAN", "none"),
    "baselines_share": ("0.05", "0.1", "shares.baselines_share", 0.05, 0.1),
    "fidelity_share": ("0.05", "0.1", "shares.fidelity", 0.05, 0.1),
    "fidelity_configs": ("5", "6", "shares.fidelity_configs", 5, 6),
    "fidelity_factor": ("3", "2", "shares.fidelity_factor", 3.0, 2.0),
}


def test_every_search_flag_is_classified() -> None:
    parser = build_parser()["search"]
    dests = {action.dest for action in parser._actions} - {"help"}
    assert dests == set(SEARCH_FLAG_SETTINGS), "a flag of run_search.py is missing from cli.SEARCH_FLAG_SETTINGS"
    settings_fields = {f.name for f in dataclasses.fields(SearchSettings)}
    for dest, names in SEARCH_FLAG_SETTINGS.items():
        bases = {name.split(".")[0] for name in names}
        assert bases <= settings_fields, (dest, bases - settings_fields)
        if bases <= set(RUN_SETTINGS):
            assert dest not in RECORD_FLAGS, f"--{dest} only changes the run but has record test values"
        else:
            assert dest in RECORD_FLAGS, f"--{dest} lands in the study record: give it values in RECORD_FLAGS"
    assert set(RECORD_FLAGS) <= dests


def _write_inputs(tmp: Path) -> None:
    text = Path(MICRO).read_text().replace("trunk_blocks: 1", "trunk_blocks: 2")
    (tmp / "other.yaml").write_text(text)
    shipped = Path(__file__).parents[1] / "ehrsr" / "search_spaces" / "devices.yaml"
    for name in ("devices_a.yaml", "devices_b.yaml"):
        shutil.copy(shipped, tmp / name)
    for folder, seed in (("train_a", 0), ("train_b", 1), ("val_a", 2), ("val_b", 3)):
        write_image(tmp / folder / "img.png", synthetic_image(96, 96, seed=seed))


def _base(tmp: Path, name: str, budget: str = "trials=1") -> list[str]:
    return ["--study-name", name, "--out-dir", str(tmp / "reports"), "--budget", budget, "--quiet", "--no-report"]


def _argv(tmp: Path, which: int, name: str, only: str | None = None) -> list[str]:
    """Search arguments of study ``name`` with every record flag at its A (``which`` 0) or B (1)
    value; ``only``: just that flag (at its B value), for a resume."""
    argv = _base(tmp, name) if only is None else []
    for dest, values in RECORD_FLAGS.items():
        if only is not None and dest != only:
            continue
        value = values[1] if only is not None else values[which]
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value).format(tmp=tmp)]
    return argv


def _expected(tmp: Path, value: Any) -> Any:
    return value.format(tmp=tmp) if isinstance(value, str) else value


@pytest.fixture
def no_training(monkeypatch) -> dict[str, Any]:
    """The search without data or training: what the loop would run with is captured instead."""
    seen: dict[str, Any] = {}

    def fake_context(spec: Any, device: Any, **kwargs: Any) -> Any:
        seen.setdefault("driver_specs", []).append(spec)
        return SimpleNamespace(val_set=None)

    def fake_worker(prepared: Any, settings: Any = None, **kwargs: Any) -> driver.WorkerSummary:
        seen["prepared"] = prepared
        return driver.WorkerSummary(stopped_reason="test: no training")

    monkeypatch.setattr(driver, "build_context", fake_context)
    monkeypatch.setattr(driver, "baseline_quality", lambda ctx, spec: {"name": "bicubic", "psnr": 1.0})
    monkeypatch.setattr(driver, "run_worker", fake_worker)
    return seen


def _record(tmp: Path, name: str) -> StudyRecord:
    storage = f"sqlite:///{tmp / 'reports' / name / 'study.db'}"
    return StudyRecord.from_study(optuna.load_study(study_name=name, storage=storage))


def test_each_flag_reaches_the_record_and_every_step_of_a_resumed_run(tmp_path: Path, no_training, monkeypatch,
                                                                      capsys) -> None:
    _write_inputs(tmp_path)
    for which, name in ((0, "a"), (1, "b")):
        assert main(_argv(tmp_path, which, name)) == 0, capsys.readouterr().err
        flat = _record(tmp_path, name).flat()
        for dest, (*_, key, value_a, value_b) in RECORD_FLAGS.items():
            expected = _expected(tmp_path, (value_a, value_b)[which])
            if key == "space.yaml":
                assert flat[key] == (tmp_path / "other.yaml").read_text() if which else Path(MICRO).read_text()
            else:
                assert flat[key] == expected, (dest, key, flat[key], expected)

    # a resume given no recorded flag at all runs the stored record (and trains nothing here)
    record = _record(tmp_path, "a")
    assert main(_base(tmp_path, "a", "trials=2")) == 0
    prepared = no_training["prepared"]
    assert prepared.record == record and not prepared.created
    settings = prepared.settings
    assert (settings.threads, settings.seed, settings.sampler, settings.profile_dtype) == (1, 5, "random", "bfloat16")
    assert (settings.limits.max_params, settings.limits.max_memory_mb, settings.early_stopping) == (9e5, 4096.0, True)
    assert settings.fidelity_configs == 5 and settings.baselines == "SPAN" and settings.ablation_seeds == 3
    spec = no_training["driver_specs"][-1]  # the data the search loop prepares
    assert (spec.train_data, spec.val_data, spec.cache_dir) == (
        str(tmp_path / "train_a"), str(tmp_path / "val_a"), str(tmp_path / "cache_a"))
    assert prepared.space.source_text == Path(MICRO).read_text()

    # the steps after the search rebuild their run context from the same record
    specs: list[Any] = []
    monkeypatch.setattr(pipeline, "build_context", lambda spec, device, **kw: specs.append(spec) or SimpleNamespace())
    calls: dict[str, Any] = {}
    monkeypatch.setattr(pipeline, "run_controlled_ablation",
                        lambda study, ctx, **kw: calls.setdefault("ablation", kw) and _stub_result())
    monkeypatch.setattr(pipeline, "run_baselines", lambda study, ctx, specs, **kw: calls.setdefault("baselines", specs)
                        and _stub_result())
    monkeypatch.setattr(pipeline, "fidelity_sources", lambda study, configs, factor: [])
    monkeypatch.setattr(pipeline, "run_fidelity", lambda study, ctx, **kw: calls.setdefault("fidelity", kw)
                        and _stub_result())
    monkeypatch.setattr(pipeline, "write_report", lambda study, folder, **kw: folder / "report.md")
    out = tmp_path / "reports"
    pipeline.run_ablation("a", None, out, device=None, reference=None, budget_seconds=None, lpips_weights=None)
    pipeline.run_baselines_for_study("a", None, out)
    pipeline.run_fidelity_for_study("a", None, out)
    assert len(specs) == 3
    expected_spec = pipeline.context_spec(record)
    assert all(spec == expected_spec for spec in specs)
    assert expected_spec.threads == 1 and expected_spec.profile_shape == [1, 3, 48, 48]
    assert expected_spec.limits["max_macs"] == 2e10 and expected_spec.crop_border == 2
    assert expected_spec.objectives == ["psnr", "latency", "macs"] and expected_spec.profile_seconds == 0.5
    assert calls["ablation"]["seeds"] == 3  # the study's --ablation-seeds
    assert [spec.name for spec in calls["baselines"]] == ["SPAN"]  # the study's --baselines
    assert (calls["fidelity"]["configs"], calls["fidelity"]["factor"]) == (5, 3.0)

    # deploy reads the study through the same record
    picked: list[Any] = []
    monkeypatch.setattr(pipeline, "pick_deployment", lambda study, name, *a, **kw: picked.append(study) or _stub_result())
    pipeline.deploy_study("a", None, out, ["laptop-cpu-256"])
    info = StudyInfo.from_study(picked[0])
    assert info.record == record and info.scale == 2 and info.input_shape == (1, 3, 48, 48)


def _stub_result() -> Any:
    return SimpleNamespace(runs_run=0, runs_skipped=0, runs_planned=0, reference_trial=0, planned=[], stopped=None,
                           seconds_spent=0.0, sources=[], factor=0.0)


def _study_a_with_a_finished_trial(tmp_path: Path) -> tuple[str, StudyRecord]:
    """Study "a" at the A values with one finished trial (a study without any may be re-created
    with new settings: nothing is lost); its storage URL and record."""
    _write_inputs(tmp_path)
    assert main(_argv(tmp_path, 0, "a")) == 0
    storage = f"sqlite:///{tmp_path / 'reports' / 'a' / 'study.db'}"
    optuna.load_study(study_name="a", storage=storage).add_trial(
        optuna.trial.create_trial(values=[30.0, 1.0, 1e6], user_attrs={"status": "complete"}))
    return storage, _record(tmp_path, "a")


# record flags that name a place on this machine: stored (a resume that leaves them out uses the
# creator's), but each machine of a study may give its own
LOCAL_FLAGS = {"cache_dir"}


@pytest.mark.parametrize("dest", sorted(set(RECORD_FLAGS) - LOCAL_FLAGS))
def test_a_resume_with_another_value_is_refused_naming_the_field(dest: str, tmp_path: Path, no_training,
                                                                   capsys) -> None:
    storage, before = _study_a_with_a_finished_trial(tmp_path)
    capsys.readouterr()
    # the second study leaves --device out (this machine may have no GPU): a resume asks for cuda
    changed = ["--device", "cuda"] if dest == "device" else _argv(tmp_path, 1, "a", only=dest)
    code = main([*_base(tmp_path, "a", "trials=5"), *changed])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    key = RECORD_FLAGS[dest][2]
    shown = {"space.yaml": "search space", "device.kind": "cuda"}.get(key, key)
    assert shown in err, (dest, err)
    assert _record(tmp_path, "a") == before  # nothing written
    assert optuna.load_study(study_name="a", storage=storage).user_attrs.get("budget") != "trials=5"


def test_a_second_machine_keeps_its_own_cache_folder(tmp_path: Path, no_training, capsys, monkeypatch) -> None:
    storage, before = _study_a_with_a_finished_trial(tmp_path)
    no_training.clear()
    code = main([*_base(tmp_path, "a", "trials=5"), *_argv(tmp_path, 1, "a", only="cache_dir")])
    assert code == 0, capsys.readouterr().err
    prepared = no_training["prepared"]
    assert prepared.spec.cache_dir == str(tmp_path / "cache_b")
    assert no_training["driver_specs"][-1].cache_dir == str(tmp_path / "cache_b")  # the search loop's data
    assert _record(tmp_path, "a") == before  # the creator's folder stays the recorded one
    # the steps after the search build their run context (data and caches) in this machine's folder
    built: list[Any] = []
    monkeypatch.setattr(pipeline, "build_context", lambda spec, device, **kw: built.append(spec) or SimpleNamespace())
    study = optuna.load_study(study_name="a", storage=storage)
    pipeline._lazy_context(study, prepared, prepared.settings)()  # fidelity and baselines steps
    class Built(Exception):
        """Raised where the ablation would start running."""

    def stop(*args: Any, **kwargs: Any) -> None:
        raise Built

    monkeypatch.setattr(pipeline, "run_controlled_ablation", stop)
    with pytest.raises(Built):  # the ablation's context is built first; running it is not this test
        pipeline.run_ablation("a", storage, tmp_path / "reports", device="cpu", reference=None, seeds=1,
                              budget_seconds=None, lpips_weights=None, steps=8, fidelity_note="test",
                              cache_dir=prepared.spec.cache_dir)
    assert [spec.cache_dir for spec in built] == [str(tmp_path / "cache_b")] * 2


def test_record_round_trip_and_strict_reading() -> None:
    record = study_record(("psnr", "latency"), max_latency_ms=30.0)
    attrs = record.to_attrs()
    assert list(attrs)[-1] == "record_version"  # written last: joining workers wait for it
    assert set(attrs) <= set(STUDY_ATTRS)
    assert StudyRecord.from_attrs(attrs) == record
    with pytest.raises(RecordError, match="unknown key threds"):
        StudyRecord.from_attrs({**attrs, "profile": {**attrs["profile"], "threds": 2}})
    with pytest.raises(RecordError, match="missing seed"):
        StudyRecord.from_attrs({k: v for k, v in attrs.items() if k != "seed"})
    with pytest.raises(RecordError, match="unknown key max_latency"):
        StudyRecord.from_attrs({**attrs, "limits": {"max_latency": 3}})
    with pytest.raises(RecordError, match="no stored study record"):
        StudyRecord.from_attrs({k: v for k, v in attrs.items() if k != "record_version"})
    assert StudyInfo(name="x", objectives=(), attrs=attrs).record == record


@pytest.mark.parametrize("name", ["../escape", "/tmp/x", "a/b", "..", "", " ", "x" * 300])
def test_a_study_name_cannot_leave_the_output_folder(name: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "reports"
    code = main(["--study-name", name, "--out-dir", str(out), "--budget", "trials=1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--study-name" in err, err
    assert not (tmp_path / "escape").exists() and not list(tmp_path.rglob("study.db"))
    for command in ("report", "deploy", "ablate"):
        extra = ["--device-profile", "laptop-cpu-256"] if command == "deploy" else []
        assert main([command, "--study-name", name, "--out-dir", str(out), *extra]) == 2
        assert "--study-name" in capsys.readouterr().err


def test_study_and_trial_keys_are_spelled_only_in_study_schema() -> None:
    """Code reads and writes user attributes through ``TRIAL``, ``STUDY`` and the ``*_ATTR`` names
    of ``ehrsr.study_schema``; a literal key anywhere else would be a second spelling."""
    import re

    from ehrsr.study_schema import STUDY, TRIAL, TRIAL_ATTRS, TrialKeys

    literal = re.compile(r'(user_attrs\.get\(|user_attrs\[|set_user_attr\(|set_user_attr,\s*|set_trial_user_attr\([^,]+,\s*|'
                         r'attrs\.get\(|attrs\[)'
                         r'f?"[a-z_{}]+"')
    root = Path(__file__).resolve().parents[1] / "ehrsr"
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}"
             for path in sorted(root.rglob("*.py")) if path.name != "study_schema.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert not found, "\n".join(found)
    # the lists are derived from the dataclasses: no key twice, every study key an attribute of STUDY
    assert len(set(TRIAL_ATTRS)) == len(TRIAL_ATTRS) == len(dataclasses.fields(TrialKeys))
    assert all(getattr(TRIAL, f.name) == f.name for f in dataclasses.fields(TrialKeys))
    assert len(set(STUDY_ATTRS)) == len(STUDY_ATTRS) and all(getattr(STUDY, k) == k for k in STUDY_ATTRS)
    with pytest.raises(AttributeError):
        STUDY.threads  # noqa: B018 (not a study attribute: it lives inside "profile")
