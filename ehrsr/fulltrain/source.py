"""Where the configuration to train comes from: a deployment pick, a configuration file, or a
trial of a stored study. Each gives an ``EHRSRConfig`` and a line saying where it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ehrsr.config import EHRSRConfig
from ehrsr.fulltrain.recipe import FullTrainError
from ehrsr.study_schema import TRIAL

__all__ = ["ConfigSource", "config_from_pick", "load_config_file", "resolve_config"]


@dataclass(frozen=True)
class ConfigSource:
    config: EHRSRConfig
    description: str  # for the model card: "pick reports/S/deploy/P.json (study S, trial 3)"
    search_train: dict[str, Any] | None = None  # the brief training the search gave it, if known


def _config(data: Any, where: str) -> EHRSRConfig:
    try:
        return EHRSRConfig.from_dict(data)
    except ValueError as exc:
        raise FullTrainError(f"{where}: {exc}") from None


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FullTrainError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FullTrainError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from None
    if not isinstance(data, dict):
        raise FullTrainError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def config_from_pick(path: Path) -> ConfigSource:
    """A deployment pick (``reports/<study>/deploy/<profile>.json``)."""
    data = _read_mapping(path)
    if "config" not in data:
        raise FullTrainError(f"{path} is not a deployment pick (no 'config' key)")
    profile = (data.get("profile") or {}).get("name", path.stem)
    where = f"deployment pick {path} (study {data.get('study')}, trial {data.get('trial')}, profile {profile})"
    return ConfigSource(_config(data["config"], str(path)), where, data.get("train"))


def load_config_file(path: Path) -> ConfigSource:
    """A configuration file (JSON or YAML of ``EHRSRConfig`` keys), or a pick / evaluation file
    holding one under ``config``. Unknown keys are refused, naming the valid ones."""
    data = _read_mapping(path)
    if isinstance(data.get("config"), dict):
        return config_from_pick(path)
    return ConfigSource(_config(data, str(path)), f"configuration file {path}")


def _from_study(study_name: str, trial_number: int, storage: str | None, out_dir: Path) -> ConfigSource:
    from ehrsr.search.storage import StorageError, mask_url
    from ehrsr.search.study import SearchError, load_study

    try:
        study, _, _ = load_study(study_name, storage, out_dir)
    except (SearchError, StorageError) as exc:
        raise FullTrainError(str(exc)) from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial_number not in trials:
        raise FullTrainError(f"study {study_name!r} has no trial {trial_number} (it has {len(trials)} trials)")
    config = trials[trial_number].user_attrs.get(TRIAL.config)
    if not config:
        raise FullTrainError(f"trial {trial_number} of study {study_name!r} records no configuration")
    where = f"study {study_name!r} trial {trial_number}" + (f" ({mask_url(storage)})" if storage else "")
    return ConfigSource(_config(config, where), where, trials[trial_number].user_attrs.get(TRIAL.train))


def resolve_config(
    *,
    pick: Path | None = None,
    config: Path | None = None,
    study_name: str | None = None,
    trial: int | None = None,
    storage: str | None = None,
    out_dir: Path = Path("reports"),
) -> ConfigSource:
    """Exactly one of ``pick``, ``config`` or ``study_name`` + ``trial``."""
    given = [pick is not None, config is not None, study_name is not None or trial is not None]
    if sum(given) != 1:
        raise FullTrainError("give exactly one of --pick FILE, --config FILE or --study-name NAME --trial N")
    if pick is not None:
        return config_from_pick(pick)
    if config is not None:
        return load_config_file(config)
    if study_name is None or trial is None:
        raise FullTrainError("--study-name and --trial go together")
    return _from_study(study_name, trial, storage, out_dir)
