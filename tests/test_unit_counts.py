"""A search's MAC counts summed from cached unit counts (``ehrsr.profiling.unit_counts``) equal
``count_macs``'s fvcore figures, for configurations of both shipped spaces; each unit is traced
once per process; MoE-TX with a capacity limit and non-EHR-SR models are counted whole; the
on-disk store is shared by processes (a later one traces nothing), survives concurrent writers
and corrupt files, and is not read by other code (its fingerprint)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ehrsr.model import build_model
from ehrsr.profiling import count_macs
from ehrsr.profiling import unit_counts as unit_counts_module
from ehrsr.profiling.counting import count_parameters, deploy_form
from ehrsr.profiling.latency_model import sample_configs
from ehrsr.profiling.unit_counts import UnitCountStore, UnitMacCounter, count_fingerprint
from ehrsr.search.space import load_space

REPO = Path(__file__).resolve().parents[1]

SHAPE = (1, 3, 40, 56)  # not a multiple of the windows or levels: padding is part of the units


def _configs(space: str, n: int, *, moe: bool) -> list:
    found = []
    for config in sample_configs(load_space(space), 400, seed=11):
        if config.moe.enabled == moe:
            found.append(config)
        if len(found) == n:
            return found
    raise AssertionError(f"fewer than {n} configurations with moe={moe} in {space}")


@pytest.mark.parametrize("space", ["tiny", "full"])
@pytest.mark.parametrize("moe", [False, True])
def test_unit_sums_equal_whole_network_counts(space: str, moe: bool) -> None:
    counter = UnitMacCounter()
    for config in _configs(space, 4, moe=moe):
        assert config.moe.capacity_factor == 0  # the shipped spaces route without a capacity limit
        torch.manual_seed(0)
        model = build_model(config)
        whole = count_macs(model, SHAPE)
        summed = counter.count(model, SHAPE)
        assert summed.macs == whole.macs > 0, config
        assert summed.macs_constant == whole.macs_constant
        assert summed.params == whole.params and summed.params_deploy == whole.params_deploy
        assert summed.by_operator == {k: v for k, v in whole.by_operator.items() if v}
        assert summed.unsupported_ops == whole.unsupported_ops == {}
        assert summed.macs_ptflops is None and summed.input_shape == SHAPE
    assert counter.reused_units > 0  # units repeat across configurations and inside one network


def test_each_unit_is_traced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = UnitMacCounter()
    config = _configs("tiny", 1, moe=False)[0]
    first = counter.count(build_model(config), SHAPE)
    traced, copied = [], []
    real, real_deploy = unit_counts_module.count_fvcore, unit_counts_module.deploy_form
    monkeypatch.setattr(unit_counts_module, "count_fvcore", lambda *a: traced.append(1) or real(*a))
    monkeypatch.setattr(unit_counts_module, "deploy_form", lambda m: copied.append(1) or real_deploy(m))
    model = build_model(config)
    again = counter.count(model, SHAPE)
    assert traced == [] and again == first
    # every unit known: no deploy copy is made, its parameters are the units' sum
    assert copied == [] and again.params_deploy == count_parameters(real_deploy(model)[0])
    bigger = (1, 3, 64, 64)  # other resolutions are other units
    assert counter.count(build_model(config), bigger).macs == count_macs(build_model(config), bigger).macs
    assert traced


def test_moe_with_a_capacity_and_other_models_are_counted_whole() -> None:
    counter = UnitMacCounter()
    config = _configs("tiny", 1, moe=True)[0]
    assert counter.eligible(build_model(config), SHAPE)
    capped = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=1.25))
    capped_model = build_model(capped)
    assert not counter.eligible(capped_model, SHAPE)
    counted = counter.count(capped_model, SHAPE)
    assert counted.macs_ptflops is not None and counted.macs == count_macs(capped_model, SHAPE).macs
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert not counter.eligible(conv, SHAPE)
    assert counter.count(conv, SHAPE).macs == 3 * 8 * 9 * 40 * 56
    assert not counter.eligible(build_model(config), (2, 3, 40, 56))
    assert counter.counted_units == 0


# ---------------------------------------------------------------------------------------------
# the on-disk store shared by the processes of a machine

_COUNT_IN_A_PROCESS = """
import json, sys
from ehrsr.model import build_model
from ehrsr.profiling import unit_counts
from ehrsr.profiling.latency_model import sample_configs
from ehrsr.search.space import load_space

traced = []
real = unit_counts.count_fvcore
unit_counts.count_fvcore = lambda *a: traced.append(1) or real(*a)  # every unit this process traces
counter = unit_counts.UnitMacCounter(unit_counts.UnitCountStore(sys.argv[1]))
counts = [counter.count(build_model(c), (1, 3, 40, 56)) for c in sample_configs(load_space("tiny"), 2, seed=5)]
print(json.dumps({"macs": [c.macs for c in counts], "params_deploy": [c.params_deploy for c in counts],
                  "traced": len(traced), "counted": counter.counted_units,
                  "loaded": counter.loaded_units}))
"""


def _start_counting(store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _COUNT_IN_A_PROCESS, str(store)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_the_disk_store_is_shared_between_processes(tmp_path: Path) -> None:
    store = tmp_path / "unit_macs"
    # two processes count the same networks at the same time into an empty store: concurrent
    # writers of the same entries, each read back whole
    writers = [_result(p) for p in [_start_counting(store), _start_counting(store)]]
    # counted here without a store (unit sums equal count_macs: test_unit_sums_equal_whole_network_counts)
    alone = UnitMacCounter()
    configs = list(sample_configs(load_space("tiny"), 2, seed=5))
    expected = [alone.count(build_model(c), SHAPE).macs for c in configs]
    expected_params = [count_parameters(deploy_form(build_model(c))[0]) for c in configs]
    for run in writers:
        assert run["macs"] == expected
        assert run["traced"] == run["counted"] > 0
    # a later process counts nothing: every unit comes from the files the others wrote
    reader = _result(_start_counting(store))
    assert reader["macs"] == expected
    assert reader["params_deploy"] == expected_params
    assert reader["traced"] == reader["counted"] == 0
    assert reader["loaded"] > 0
    entries = list(store.glob("*/*.json"))
    assert len(entries) == reader["loaded"]  # one file per distinct unit, no temporary files left
    assert not list(store.glob("*/.*.tmp"))


def test_a_corrupt_or_foreign_entry_is_counted_again(tmp_path: Path) -> None:
    config = _configs("tiny", 1, moe=False)[0]
    first = UnitMacCounter(UnitCountStore(tmp_path))
    expected = first.count(build_model(config), SHAPE)
    files = sorted(tmp_path.glob("*/*.json"))
    assert len(files) == first.counted_units > 1
    files[0].write_text('{"key": "trun')  # a torn write (never left by the store, which renames)
    data = json.loads(files[1].read_text())
    files[1].write_text(json.dumps({**data, "key": "another unit"}))  # a hash collision
    again = UnitMacCounter(UnitCountStore(tmp_path))
    assert again.count(build_model(config), SHAPE) == expected
    assert again.counted_units == 2 and again.loaded_units == first.counted_units - 2
    assert json.loads(files[0].read_text())["macs"] >= 0  # rewritten whole


def test_entries_of_other_code_are_not_reused(tmp_path: Path) -> None:
    config = _configs("tiny", 1, moe=False)[0]
    UnitMacCounter(UnitCountStore(tmp_path, fingerprint="a" * 64)).count(build_model(config), SHAPE)
    other = UnitMacCounter(UnitCountStore(tmp_path, fingerprint="b" * 64))
    other.count(build_model(config), SHAPE)
    assert other.loaded_units == 0 and other.counted_units > 0
    # the installation's fingerprint follows the sources a count depends on
    package = tmp_path / "package"
    (package / "blocks").mkdir(parents=True)
    (package / "blocks" / "naf.py").write_text("WIDTH = 1\n")
    (package / "model.py").write_text("")
    before = count_fingerprint(package)
    assert count_fingerprint(package) == before
    (package / "blocks" / "naf.py").write_text("WIDTH = 2\n")
    assert count_fingerprint(package) != before
    (package / "notes.txt").write_text("not a source")
    (package / "blocks" / "naf.py").write_text("WIDTH = 1\n")
    assert count_fingerprint(package) == before


def test_an_unwritable_store_only_costs_the_sharing(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the store's folder should be")
    counter = UnitMacCounter(UnitCountStore(blocked))
    config = _configs("tiny", 1, moe=False)[0]
    assert counter.count(build_model(config), SHAPE).macs == count_macs(build_model(config), SHAPE).macs
