"""Search spaces: validation errors, sampling, conditional parameters, round trips, and the
200-configuration build test over every shipped space."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch

from ehrsr import MODULE_TOGGLES, EHRSRConfig, build_model
from ehrsr.search.space import SPACES_DIR, SearchSpace, SearchSpaceError, load_space, shipped_spaces

BASE = """\
description: test space
model:
  width: {choices: [8, 16]}
  msg.levels: {low: 0, high: 2}
  wab.enabled: {choices: [false, true]}
  wab.heads: {choices: [1, 2]}
training:
  patch_size: 32
  batch_size: 4
  lr: 1.0e-3
  min_steps: 10
  eta: 3
  max_steps: 90
  seconds_per_trial_estimate: 5
"""


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _load(tmp_path: Path, text: str) -> SearchSpace:
    path = tmp_path / "my_space.yaml"
    path.write_text(text)
    return load_space(str(path))


def _with(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


# ---------------------------------------------------------------------------------------------
# validation: each error names the file, the line, the key and the problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + "extras: 1\n", ":15: extras: unknown top-level key; valid keys: description, model, training"),
        (
            _with("wab.heads:", "wab.head:"),
            ":6: model.wab.head: not an EHRSRConfig field; valid keys: width, block_type,",
        ),
        (
            _with("  width:", "  scale: 2\n  width:"),
            ":3: model.scale: is set by the task on the command line",
        ),
        (
            _with("[8, 16]", "[8, wide]"),
            ":3: model.width: choice 'wide' is rejected: width must be an integer, got 'wide'",
        ),
        (
            _with("{low: 0, high: 2}", "{low: 0.5, high: 2}"),
            ":4: model.msg.levels: low must be an integer for this integer field, got 0.5",
        ),
        (_with("{low: 0, high: 2}", "{low: zero, high: 2}"), "model.msg.levels: low must be a number, got 'zero'"),
        (_with("[8, 16]", "[]"), ":3: model.width: choices is empty; give at least one value"),
        (_with("{choices: [8, 16]}", "8"), None),  # a fixed value is fine (control case)
        (_with("[8, 16]", "8"), ":3: model.width: choices must be a list, got int 8"),
        (_with("{low: 0, high: 2}", "{low: 2, high: 1}"), ":4: model.msg.levels: low (2) > high (1)"),
        (
            _with("  width: {choices: [8, 16]}", "  trunk_blocks: {low: 1, high: 4, step: 2}"),
            ":3: model.trunk_blocks: step 2 does not divide the range 1..4",
        ),
        (
            _with("  wab.enabled: {choices: [false, true]}\n", ""),
            ":5: model.wab.heads: is a wab hyperparameter but the module toggle 'wab.enabled' is not in the space",
        ),
        (
            _with("  wab.enabled: {choices: [false, true]}", "  wab.enabled: false"),
            ":6: model.wab.heads: is set but 'wab.enabled' is fixed to false, so it is never used",
        ),
        (
            _with("  wab.heads: {choices: [1, 2]}", "  wab.heads: {choices: [1, 2]}\n  wab.window_size: 1"),
            ":7: model.wab.window_size: value 1 is rejected: wab.window_size must be in 2..32, got 1",
        ),
        (
            _with("  width: {choices: [8, 16]}", "  width: 8\n  msg.depths: {low: 1, high: 20}"),
            ":4: model.msg.depths: range end 20 is rejected: msg.depths must be in 0..16",
        ),
        (
            _with("wab.heads: {choices: [1, 2]}", "wab.heads: 3"),
            ":6: model.wab.heads: value 3 is rejected: wab.heads (3) must divide width (8)",
        ),
        (
            _with("{choices: [8, 16]}", "{choises: [8, 16]}"),
            ":3: model.width: unknown distribution key 'choises'; valid keys: choices, low, high, step, log",
        ),
        (
            _with("  wab.heads: {choices: [1, 2]}", "  wab.heads: {choices: [1, 2]}\n  wab.heads: 2"),
            ":7: model.wab.heads: duplicated key",
        ),
        (
            _with("{choices: [8, 16]}", "[8, 16]"),
            ":3: model.width: a list is not a value here; to search over these values write {choices: [8, 16]}",
        ),
        (
            _with("  wab.heads: {choices: [1, 2]}", "  wab: {heads: 2}"),
            ":6: model.wab: write section fields with dotted names, e.g. 'wab.enabled'",
        ),
        (
            _with("  width: {choices: [8, 16]}", "  block_type: {low: 1, high: 2}"),
            ":3: model.block_type: takes named values, not a numeric range; use choices: [...]",
        ),
        (
            _with("  width: {choices: [8, 16]}", "  block_type: {choices: [naf, resnet]}"),
            "model.block_type: choice 'resnet' is rejected: block_type must be one of 'naf', 'gated'",
        ),
        (
            _with("  width: {choices: [8, 16]}", "  msg.depths: [1, 2]"),
            "model.msg.depths: a fixed list of depths needs a fixed msg.levels",
        ),
        (
            _with("  width: {choices: [8, 16]}", "  trunk_level_offset: {choices: [0, 5]}"),
            "model.trunk_level_offset: choice 5 is rejected: trunk_level_offset 5 exceeds msg.levels",
        ),
        (_with("  lr: 1.0e-3\n", ""), ":7: training: missing 'lr'"),
        (_with("  eta: 3", "  eta: 3\n  epochs: 3"), "training.epochs: unknown training key; valid keys: patch_size,"),
        (_with("  max_steps: 90", "  max_steps: 90\n  rungs: 3"), "training: give exactly one of max_steps"),
        (_with("  max_steps: 90", "  max_steps: 5"), "training.max_steps: must be >= min_steps (10), got 5"),
        (_with("  eta: 3", "  eta: 1"), "training.eta: must be >= 2, got 1"),
        (_with("  eta: 3", "  eta: 3\n  loss: l3"), "training.loss: must be one of l1, mse, charbonnier, got 'l3'"),
        (_with("lr: 1.0e-3", "lr: {low: 0, high: 1.0e-3, log: true}"), "training.lr: a log range needs low > 0"),
        (_with("lr: 1.0e-3", "lr: -1"), "training.lr: must be > 0.0, got -1"),
        (_with("  batch_size: 4", "  batch_size: four"), "training.batch_size: must be an integer, got 'four'"),
        (_with("{choices: [8, 16]}", "{choices: [8, 16]"), ":4: not valid YAML:"),
        ("", "the file is empty"),
        ("- a\n- b\n", "must be a mapping with keys description, model, training"),
    ],
)
def test_validation_errors(tmp_path, text, expected):
    if expected is None:
        _load(tmp_path, text)
        return
    with pytest.raises(SearchSpaceError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "my_space.yaml")), message
    assert expected in message, message
    assert "\n" not in message


def test_unknown_space_name_lists_the_shipped_ones():
    with pytest.raises(SearchSpaceError, match=r"'nope' is neither a shipped space \(full, tiny\)"):
        load_space("nope")


def test_pyyaml_exponent_without_dot_is_read_as_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as text; float-typed keys accept it anyway
    space = _load(tmp_path, _with("lr: 1.0e-3", "lr: {low: 1e-4, high: 1e-3, log: true}"))
    assert space.distributions["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True)


# ---------------------------------------------------------------------------------------------
# loading and the fidelity


def test_shipped_spaces_load_by_name_and_path():
    assert {"tiny", "full"} <= set(shipped_spaces())
    tiny = load_space("tiny")
    assert tiny.name == "tiny"
    assert tiny.path == SPACES_DIR / "tiny.yaml"
    assert tiny.source_text == (SPACES_DIR / "tiny.yaml").read_text()
    by_path = load_space(str(SPACES_DIR / "tiny.yaml"))
    assert by_path.distributions == tiny.distributions
    assert tiny.fidelity.rung_steps == (324, 972)
    assert tiny.fidelity.max_steps == 972
    assert "lr" not in tiny.distributions  # fixed: the measured protocol (docs/proxy_fidelity.md)
    assert tiny.proxy is not None and tiny.proxy.max_steps == tiny.fidelity.max_steps
    assert tiny.fidelity.patch_size == 32 and tiny.fidelity.loss == "l1"
    full = load_space("full")
    assert full.fidelity.rung_steps == (1000, 3000, 9000, 27000)
    assert full.fidelity.patch_size == 64


def test_shipped_files_are_package_data_and_user_files_still_load(tmp_path, monkeypatch):
    import ehrsr
    from ehrsr.deploy import DEVICES_PATH, load_device_profiles
    from ehrsr.resources import devices_file, shipped_space_names, space_file, spaces_dir

    package = Path(ehrsr.__file__).resolve().parent
    assert spaces_dir() == SPACES_DIR and SPACES_DIR.resolve() == package / "search_spaces"
    assert shipped_space_names() == ["full", "tiny"]  # devices.yaml is not a space
    assert space_file("tiny") == SPACES_DIR / "tiny.yaml" and not space_file("nope").exists()
    assert devices_file() == DEVICES_PATH and "laptop-cpu-256" in load_device_profiles()
    # from another working folder: shipped names still resolve, a relative user file too
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text((SPACES_DIR / "tiny.yaml").read_text())
    assert load_space("tiny").path == SPACES_DIR / "tiny.yaml"
    mine = load_space("mine.yaml")
    assert mine.name == "mine" and mine.distributions == load_space("tiny").distributions


def test_rungs_instead_of_max_steps(tmp_path):
    space = _load(tmp_path, _with("  max_steps: 90", "  rungs: 4"))
    assert space.fidelity.rung_steps == (10, 30, 90, 270)
    assert space.fidelity.max_steps == 270 and space.fidelity.n_rungs == 4


# ---------------------------------------------------------------------------------------------
# sampling, conditions and round trips


def _sample(space: SearchSpace, n: int, seed: int = 0, storage=None):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed), storage=storage)
    out = []
    for _ in range(n):
        trial = study.ask()
        sampled = space.suggest(trial)
        study.tell(trial, 0.0)
        out.append((study.trials[-1], sampled))
    return out


def test_conditional_parameters_follow_their_toggles_and_levels():
    space = load_space("tiny")
    seen_on = dict.fromkeys(MODULE_TOGGLES, False)
    seen_off = dict.fromkeys(MODULE_TOGGLES, False)
    for frozen, sampled in _sample(space, 80):
        params = frozen.params
        for module in MODULE_TOGGLES:
            enabled = params[f"{module}.enabled"]
            (seen_on if enabled else seen_off)[module] = True
            hyper = [k for k in params if k.startswith(f"{module}.") and k != f"{module}.enabled"]
            if not enabled:
                assert hyper == [], f"{module} is off but {hyper} were sampled"
            assert enabled == (module in sampled.config.enabled_modules())
        levels = params["msg.levels"]
        assert sorted(k for k in params if k.startswith("msg.depth")) == [f"msg.depth{i}" for i in range(1, levels + 1)]
        assert sampled.config.msg.depths == tuple(params[f"msg.depth{i}"] for i in range(1, levels + 1))
        assert ("trunk_level_offset" in params) == (levels >= 1)
        assert sampled.config.resolved_trunk_level == levels - params.get("trunk_level_offset", 0)
        # fixed values are applied only when their module is on
        if params["wab.enabled"]:
            assert sampled.config.wab.window_size == 4
        assert sampled.config.ssm.directions == (1 if params["ssm.enabled"] else EHRSRConfig().ssm.directions)
        lr = params["lr"] if "lr" in space.distributions else next(e.fixed for e in space.entries if e.name == "lr")
        assert sampled.train.lr == lr and sampled.train.steps == space.fidelity.max_steps
    assert all(seen_on.values()) and all(seen_off.values())


def test_a_parameter_keeps_one_distribution():
    # Optuna requires it within a study; per-level names make it hold for the depths
    for name in ("tiny", "full"):
        space = load_space(name)
        for frozen, _ in _sample(space, 40, seed=1):
            for param, dist in frozen.distributions.items():
                assert dist == space.distributions[param], param


@pytest.mark.parametrize("space_name", ["tiny", "full"])
def test_round_trip_params_to_config_through_sqlite(tmp_path, space_name):
    space = load_space(space_name)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for frozen, sampled in _sample(space, 10, seed=2, storage=storage):
        rebuilt = space.config_from_params(frozen.params)
        assert rebuilt.config == sampled.config
        assert rebuilt.params == sampled.params == frozen.params
        assert rebuilt.train == sampled.train
        # and the config itself survives its own dict round trip
        assert EHRSRConfig.from_dict(sampled.config.to_dict()) == sampled.config


def test_config_from_params_errors():
    space = load_space("tiny")
    params = space.reference_params()["all-modules"]
    with pytest.raises(ValueError, match=r"search space 'tiny' has no parameter 'wab.windw'; its parameters:"):
        space.config_from_params({**params, "wab.windw": 4})
    missing = {k: v for k, v in params.items() if k != "wab.heads"}
    with pytest.raises(ValueError, match=r"params lack 'wab.heads' \(active because wab.enabled is true\)"):
        space.config_from_params(missing)
    with pytest.raises(ValueError, match=r"params\['width'\] = 10 is outside its distribution"):
        space.config_from_params({**params, "width": 10})
    # parameters of a switched-off module are ignored
    conv_only = space.reference_params()["conv-only"]
    assert space.config_from_params({**conv_only, "wab.heads": 2}).config.enabled_modules() == ()


def test_scale_comes_from_the_caller():
    space = load_space("tiny")
    params = space.reference_params()["conv-only"]
    assert space.config_from_params(params, scale=2).config.scale == 2
    assert space.config_from_params(params, scale=1).config.scale == 1


def test_refusal_names_the_reason(tmp_path):
    # heads 3 fits width 12 but not 16: loads (some combinations are valid) and refuses the rest
    space = _load(
        tmp_path,
        _with("[8, 16]", "[12, 16]").replace("wab.heads: {choices: [1, 2]}", "wab.heads: {choices: [3, 4]}"),
    )
    params = {"width": 16, "msg.levels": 0, "wab.enabled": True, "wab.heads": 3}
    sampled = space.config_from_params(params)
    assert sampled.config is None
    assert sampled.refused == "wab.heads (3) must divide width (16) so every head has whole channels"
    assert sampled.summary().startswith("refused (wab.heads (3)")
    assert space.config_from_params({**params, "width": 12}).config is not None


def test_reference_params_anchor_the_study(tmp_path):
    space = load_space("tiny")
    references = space.reference_params()
    assert set(references) == {"conv-only", "all-modules"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    for name, params in references.items():
        study.enqueue_trial(params, user_attrs={"reference": name})
    configs = {}
    for _ in references:
        trial = study.ask()
        sampled = space.suggest(trial)
        assert sampled.params == references[trial.user_attrs["reference"]]
        configs[trial.user_attrs["reference"]] = sampled.config
    assert configs["conv-only"].enabled_modules() == ()
    assert configs["all-modules"].enabled_modules() == MODULE_TOGGLES
    # the anchors differ only in the modules: same backbone at the middle values
    def backbone(cfg):
        return {k: v for k, v in cfg.to_dict().items() if k not in MODULE_TOGGLES}

    assert backbone(configs["all-modules"]) == backbone(configs["conv-only"])
    assert configs["conv-only"].width == 12  # middle of [8, 12, 16, 24]: the first of the two middles
    assert configs["conv-only"].msg.levels == 1
    assert "lr" not in references["conv-only"]  # fixed in tiny, so not a parameter
    # the geometric middle of a log range
    searched = _load(tmp_path, _with("lr: 1.0e-3", "lr: {low: 2.0e-4, high: 2.0e-3, log: true}"))
    assert math.isclose(searched.reference_params()["conv-only"]["lr"], math.sqrt(2.0e-4 * 2.0e-3))


def test_reference_params_with_a_module_fixed_on(tmp_path):
    space = _load(tmp_path, _with("  wab.enabled: {choices: [false, true]}", "  wab.enabled: true"))
    references = space.reference_params()
    assert set(references) == {"all-modules"}  # no conv-only anchor exists in this space
    assert space.toggles()["wab"] == "on"


def test_summary():
    space = load_space("tiny")
    sampled = space.config_from_params(space.reference_params()["all-modules"])
    assert sampled.summary() == "w12 L1[1] T1@1 naf wab+ssm+fsb+moe+repmix+noise"
    assert space.config_from_params(space.reference_params()["conv-only"]).summary() == "w12 L1[1] T1@1 naf conv-only"


# ---------------------------------------------------------------------------------------------
# every configuration a shipped space can produce builds and runs


@pytest.fixture
def one_thread():
    # One intra-op thread: on a shared 2-core machine, OpenMP threads of several processes spin
    # against each other and multiply this test's time tenfold; one thread degrades gracefully.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("space_name", ["tiny", "full"])
def test_200_random_configurations_build_and_run(space_name, one_thread):
    space = load_space(space_name)
    torch.manual_seed(0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=200))
    built, refused, modules_seen = 0, [], set()
    for i in range(200):
        trial = study.ask()
        scale = (1, 2, 3, 4)[i % 4]  # every task: restoration and x2/x3/x4 SR
        sampled = space.suggest(trial, scale=scale)
        if sampled.config is None:
            assert sampled.refused, "a refusal must state its reason"
            refused.append(sampled.refused)
            continue
        model = build_model(sampled.config).eval()
        x = torch.rand(1, 3, 19, 23)  # odd sizes: padding to window / level multiples and back
        with torch.inference_mode():
            y = model(x)
        assert y.shape == (1, 3, 19 * scale, 23 * scale), sampled.summary()
        assert torch.isfinite(y).all(), sampled.summary()
        built += 1
        modules_seen.update(sampled.config.enabled_modules())
        del model
    # the shipped spaces are designed so that nothing is refused (heads divide every width)
    assert refused == []
    assert built == 200
    assert modules_seen == set(MODULE_TOGGLES)
