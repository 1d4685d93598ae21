"""Proxy fidelity of the tiny space: which brief-training score ranks configurations as long training does?

    python benchmarks/proxy_fidelity.py pool        # draw the pool, run the 108-step trial protocol, choose configurations
    python benchmarks/proxy_fidelity.py reference   # long training of the chosen ones, 2 seeds (hours; resumable)
    python benchmarks/proxy_fidelity.py proxies     # the candidate brief protocols (resumable)
    python benchmarks/proxy_fidelity.py score       # the table: tau, Spearman, regret, top-3 recall, compute
    python benchmarks/proxy_fidelity.py --smoke     # every step at the smallest size, in a temporary folder

Every run's result is written to its own JSON file under ``--data`` (default
``benchmarks/data/proxy_fidelity/``) the moment it finishes, so a stop part-way loses at most the
runs in progress, and rerunning a step skips what is stored. ``--shard I/N`` splits a step's runs
over N processes (each takes every N-th run), e.g. one per core with ``--threads 1``. The rule
that chooses the configurations, the reference protocol and the candidates are in
docs/proxy_fidelity.md; the scoring is ``ehrsr.stats.ranking_quality`` over the stored curves, so
re-scoring a new proxy costs seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import print_table
from ehrsr.config import EHRSRConfig
from ehrsr.data import TaskConfig, prepare_data
from ehrsr.fulltrain import FullTrainSettings, Recipe, full_train
from ehrsr.fulltrain.data import ValData
from ehrsr.metrics import bicubic_baseline, evaluate
from ehrsr.model import build_model
from ehrsr.search.pareto import pareto_front
from ehrsr.search.ranking import LearningCurve, extrapolated_psnr, final_psnr, loss_sum
from ehrsr.search.runner import unit_mac_counter
from ehrsr.search.space import load_space
from ehrsr.stats import StatsError, ranking_quality
from ehrsr.training import TrainSettings, train

DATA_DIR = Path(__file__).resolve().parent / "data" / "proxy_fidelity"
SCALE = 4
PROFILE_SHAPE = (1, 3, 256, 256)  # MACs of the deploy form at the NTIRE size, the front's cost axis
MODULES = ("wab", "ssm", "moe")  # each must appear in at least MODULE_QUOTA chosen configurations
MODULE_QUOTA = 4
FRONT_SHARE = 0.4  # of the chosen configurations, this share comes from the pool's Pareto front


# ---------------------------------------------------------------------------------------------
# protocols: what one brief run trains with


@dataclass(frozen=True)
class Protocol:
    """A brief training protocol: the tiny space's batch and patch unless changed, a learning rate
    (None: the one the pool drew for the configuration, as a search samples it), ``steps``, and
    the steps at which the validation PSNR is recorded."""

    name: str
    steps: int
    lr: float | None
    batch_size: int = 8
    patch_size: int = 32
    eval_every: int = 12
    description: str = ""

    def settings(self, drawn_lr: float) -> TrainSettings:
        return TrainSettings(steps=self.steps, lr=self.lr if self.lr is not None else drawn_lr,
                             batch_size=self.batch_size, patch_size=self.patch_size)

    def eval_steps(self) -> list[int]:
        return sorted({*range(self.eval_every, self.steps + 1, self.eval_every), self.steps})


# the tiny space's trial before this measurement: 108 steps at the learning rate the space drew
# (log-uniform 2e-4..2e-3); the unit of compute in the table, and the pool's ranking
TODAY = Protocol("s108-drawn-lr", 108, None,
                 description="108 steps at the drawn lr (log-uniform 2e-4..2e-3), the pool's protocol")
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    TODAY,
    Protocol("lr5e-4", 108, 5e-4, description="108 steps, lr fixed at the recipe's 5e-4"),
    Protocol("lr1e-3", 108, 1e-3, description="108 steps, lr fixed at 1e-3"),
    Protocol("lr2e-3", 108, 2e-3, description="108 steps, lr fixed at 2e-3"),
    Protocol("lr4e-3", 108, 4e-3, description="108 steps, lr fixed at 4e-3"),
    Protocol("p48-lr2e-3", 48, 2e-3, patch_size=48, eval_every=6,
             description="48 steps of 48 px patches (the same pixels as 108 of 32 px), lr 2e-3"),
    Protocol("s324-lr2e-3", 324, 2e-3, eval_every=36, description="324 steps (3x), lr 2e-3"),
    Protocol("s972-lr2e-3", 972, 2e-3, eval_every=108, description="972 steps (9x), lr 2e-3"),
    Protocol("s1944-lr2e-3", 1944, 2e-3, eval_every=216, description="1944 steps (18x), lr 2e-3"),
)}


@dataclass(frozen=True)
class ReferenceProtocol:
    """Long training as ``run_search.py train`` trains a pick (the recipe's defaults: Adam 5e-4,
    cosine to 0, EMA 0.999 with warm-up, clip 1.0), at the tiny space's batch and patch."""

    steps: int = 2400
    batch_size: int = 8
    patch_size: int = 32
    validations: int = 8  # curve points

    def recipe(self, seed: int) -> Recipe:
        every = max(1, self.steps // self.validations)
        return Recipe(steps=self.steps, batch_size=self.batch_size, patch_size=self.patch_size, seed=seed,
                      val_every=every, checkpoint_every=every)


# ---------------------------------------------------------------------------------------------
# storage: one JSON file per finished run


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _machine() -> dict[str, Any]:
    return {"threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
            "cores": os.cpu_count()}


# ---------------------------------------------------------------------------------------------
# data


_DATA: dict[str, Any] = {}
_FOLDERS: dict[str, Path] = {}  # "train"/"val" HR folders instead of the built-in images (the smoke run's)


def builtin_sets() -> tuple[Any, Any]:
    """The built-in x4 training and validation images (prepared once, then from the cache)."""
    if not _DATA:
        _DATA["train"], _DATA["val"] = prepare_data(TaskConfig(scale=SCALE), _FOLDERS.get("train"),
                                                    _FOLDERS.get("val"), progress=False)
    return _DATA["train"], _DATA["val"]


# ---------------------------------------------------------------------------------------------
# one brief run


def brief_run(config: EHRSRConfig, protocol: Protocol, drawn_lr: float, seed: int) -> dict[str, Any]:
    """Train ``config`` with ``protocol`` from the trial's initialisation rule (``torch.manual_seed``
    then build) and record its validation PSNR curve and training-loss history."""
    train_set, val_set = builtin_sets()
    settings = protocol.settings(drawn_lr)
    torch.manual_seed(seed)
    model = build_model(config)
    curve: list[list[float]] = []
    eval_seconds: list[float] = []

    def on_eval(step: int, trained: torch.nn.Module) -> bool:
        result = evaluate(trained, val_set, crop_border=SCALE)
        curve.append([step, result.psnr, result.ssim])
        eval_seconds.append(result.seconds)
        return True

    start = time.perf_counter()
    result = train(model, train_set, settings, seed=seed, eval_steps=protocol.eval_steps(), on_eval=on_eval,
                   log_every=max(1, protocol.steps // 36))
    return {
        "protocol": protocol.name, "settings": {k: getattr(settings, k) for k in ("steps", "lr", "batch_size", "patch_size")},
        "seed": seed, "psnr_curve": curve, "loss_history": [[s, v] for s, v in result.history],
        "train_seconds": result.train_seconds, "eval_seconds_each": float(np.median(eval_seconds)),
        "wall_seconds": time.perf_counter() - start, "machine": _machine(),
    }


def curve_of(run: dict[str, Any]) -> LearningCurve:
    return LearningCurve.from_lists([(s, p) for s, p, _ in run["psnr_curve"]], run["loss_history"],
                                    run["settings"]["steps"])


# ---------------------------------------------------------------------------------------------
# the pool and the rule that chooses the configurations


def draw_pool(size: int, seed: int) -> list[dict[str, Any]]:
    """The tiny space's two reference configurations, then configurations drawn by Optuna's
    RandomSampler(seed) through the space's own sampling (refused and repeated ones skipped)."""
    space = load_space("tiny")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    pool: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name, params in space.reference_params().items():
        sampled = space.config_from_params(params, scale=SCALE)
        pool.append({"name": name, "params": params, "config": sampled.config.to_dict(),
                     "drawn_lr": float(np.sqrt(2e-4 * 2e-3)), "summary": sampled.summary()})
        seen.add(sampled.config.to_json())
    draws = 0
    while len(pool) < size:
        draws += 1
        if draws > 50 * size:
            raise RuntimeError(f"could not draw {size} distinct configurations")
        trial = study.ask()
        sampled = space.suggest(trial, scale=SCALE)
        study.tell(trial, 0.0)
        if sampled.config is None or sampled.config.to_json() in seen:
            continue
        seen.add(sampled.config.to_json())
        pool.append({"name": f"random-{trial.number}", "params": sampled.params, "config": sampled.config.to_dict(),
                     "drawn_lr": float(sampled.train.lr), "summary": sampled.summary()})
    return pool


def _spread(items: list[int], n: int, key: Callable[[int], float]) -> list[int]:
    """``n`` of ``items`` at evenly spaced ranks of ``key`` (all when there are no more than ``n``)."""
    ordered = sorted(items, key=key)
    if n >= len(ordered):
        return ordered
    if n <= 0:
        return []
    return [ordered[int(i)] for i in np.unique(np.round(np.linspace(0, len(ordered) - 1, n)).astype(int))]


def choose(pool: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """The documented rule (docs/proxy_fidelity.md): both references; then ``FRONT_SHARE`` of ``k``
    from the pool's Pareto front on (brief PSNR up, MACs down) at evenly spaced MACs ranks, the rest
    from the dominated cloud at evenly spaced brief-PSNR ranks; then, while a module of ``MODULES``
    is in fewer than ``MODULE_QUOTA`` chosen configurations, the unchosen configuration with it
    whose brief PSNR is nearest the pool's median."""
    brief = [p["brief_psnr"] for p in pool]
    macs = [p["macs"] for p in pool]
    front = pareto_front(np.column_stack([brief, macs]), ["maximize", "minimize"])
    chosen = [i for i, p in enumerate(pool) if p["name"] in ("conv-only", "all-modules")]
    front_left = [i for i in front if i not in chosen]
    cloud = [i for i in range(len(pool)) if i not in front and i not in chosen]
    n_front = min(len(front_left), max(0, round(FRONT_SHARE * k) - sum(i in front for i in chosen)))
    chosen += _spread(front_left, n_front, key=lambda i: macs[i])
    chosen += _spread(cloud, max(0, k - len(chosen)), key=lambda i: brief[i])
    median = float(np.median(brief))
    for module in MODULES:
        def uses(i: int, module: str = module) -> bool:
            return bool(pool[i]["config"].get(module, {}).get("enabled"))

        while sum(uses(i) for i in chosen) < MODULE_QUOTA:
            candidates = [i for i in range(len(pool)) if i not in chosen and uses(i)]
            if not candidates:
                break
            chosen.append(min(candidates, key=lambda i: abs(brief[i] - median)))
    return {"chosen": sorted(chosen), "front": sorted(front)}


def step_pool(data: Path, size: int, k: int, seed: int, shard: tuple[int, int]) -> None:
    pool_file = data / "pool.json"
    if pool_file.exists():
        pool_doc = _read_json(pool_file)
    else:
        pool_doc = {"seed": seed, "size": size, "scale": SCALE, "space": "tiny", "pool": draw_pool(size, seed)}
        _write_json(pool_file, pool_doc)
    pool = pool_doc["pool"]
    counter = unit_mac_counter()
    for index in _shard(range(len(pool)), shard):
        path = data / "brief" / TODAY.name / f"{index:03d}-s0.json"
        if path.exists():
            continue
        config = EHRSRConfig.from_dict(pool[index]["config"])
        run = brief_run(config, TODAY, pool[index]["drawn_lr"], seed=0)
        count = counter.count(build_model(config), PROFILE_SHAPE)
        run.update({"index": index, "macs": count.macs, "params_deploy": count.params_deploy})
        _write_json(path, run)
        print(f"[pool] #{index} {pool[index]['summary']}: brief {final_psnr(curve_of(run)):.3f} dB, "
              f"{count.macs / 1e6:.1f}M MACs, {run['wall_seconds']:.1f} s", flush=True)
    runs = [data / "brief" / TODAY.name / f"{i:03d}-s0.json" for i in range(len(pool))]
    if not all(p.exists() for p in runs):
        print("[pool] other shards are still running; rerun `pool` when they are done to choose")
        return
    for entry, path in zip(pool, runs):
        run = _read_json(path)
        entry["brief_psnr"], entry["macs"], entry["params_deploy"] = final_psnr(curve_of(run)), run["macs"], run["params_deploy"]
    pool_doc.update(choose(pool, k), k=k, pool=pool)
    _write_json(pool_file, pool_doc)
    counts = {m: sum(bool(pool[i]["config"].get(m, {}).get("enabled")) for i in pool_doc["chosen"]) for m in MODULES}
    print(f"[pool] chose {len(pool_doc['chosen'])} of {len(pool)} ({len(pool_doc['front'])} on the front); "
          f"modules: {counts}")


# ---------------------------------------------------------------------------------------------
# reference and proxies


def _shard(items: Iterable[Any], shard: tuple[int, int]) -> list[Any]:
    i, n = shard
    return [item for j, item in enumerate(items) if j % n == i]


def _chosen(data: Path) -> tuple[list[dict[str, Any]], list[int]]:
    if not (data / "pool.json").exists():
        raise SystemExit(f"{data / 'pool.json'} does not exist: run the `pool` step first (or give --data)")
    doc = _read_json(data / "pool.json")
    if "chosen" not in doc:
        raise SystemExit("run `pool` first (pool.json has no chosen configurations yet)")
    return doc["pool"], doc["chosen"]


def reference_run(config: EHRSRConfig, protocol: ReferenceProtocol, seed: int, work: Path) -> dict[str, Any]:
    """Long training through ``ehrsr.fulltrain.full_train`` (checkpoints in ``work``, so a killed
    run resumes); returns the EMA weights' validation curve."""
    start = time.perf_counter()
    val = (ValData("val", _FOLDERS["val"]),) if "val" in _FOLDERS else ()
    result = full_train(FullTrainSettings(config=config, recipe=protocol.recipe(seed), out_dir=work, progress=False,
                                          finish=False, source="benchmarks/proxy_fidelity.py",
                                          train_data=_FOLDERS.get("train"), val_data=val))
    rows = [r for r in _read_curve(work / "validation.csv")]
    return {"seed": seed, "steps": protocol.steps, "recipe": protocol.recipe(seed).to_dict(),
            "psnr_curve": [[r["step"], r["psnr"], r["ssim"], r["loss"]] for r in rows],
            "final_psnr": rows[-1]["psnr"], "final_ssim": rows[-1]["ssim"],
            "steps_per_second": result.steps_per_second, "wall_seconds": time.perf_counter() - start,
            "machine": _machine()}


def _read_curve(path: Path) -> list[dict[str, float]]:
    import csv

    with path.open() as f:
        return [{"step": int(r["step"]), "psnr": float(r["psnr"]), "ssim": float(r["ssim"]), "loss": float(r["loss"])}
                for r in csv.DictReader(f)]


def step_reference(data: Path, protocol: ReferenceProtocol, seeds: list[int], shard: tuple[int, int],
                   work_root: Path) -> None:
    pool, chosen = _chosen(data)
    jobs = [(index, seed) for seed in seeds for index in chosen]
    for index, seed in _shard(jobs, shard):
        path = data / "reference" / f"{index:03d}-s{seed}.json"
        if path.exists():
            continue
        config = EHRSRConfig.from_dict(pool[index]["config"])
        run = reference_run(config, protocol, seed, work_root / f"{index:03d}-s{seed}")
        run["index"] = index
        _write_json(path, run)
        print(f"[reference] #{index} seed {seed} {pool[index]['summary']}: {run['final_psnr']:.3f} dB after "
              f"{protocol.steps} steps, {run['wall_seconds'] / 60:.1f} min", flush=True)


def step_proxies(data: Path, names: list[str], seeds: list[int], shard: tuple[int, int]) -> None:
    pool, chosen = _chosen(data)
    jobs = [(name, index, seed) for name in names for seed in seeds for index in chosen]
    for name, index, seed in _shard(jobs, shard):
        path = data / "brief" / name / f"{index:03d}-s{seed}.json"
        if path.exists():
            continue
        config = EHRSRConfig.from_dict(pool[index]["config"])
        run = brief_run(config, PROTOCOLS[name], pool[index]["drawn_lr"], seed=seed)
        run["index"] = index
        _write_json(path, run)
        print(f"[{name}] #{index} seed {seed}: {final_psnr(curve_of(run)):.3f} dB, {run['wall_seconds']:.1f} s",
              flush=True)


# ---------------------------------------------------------------------------------------------
# scoring


@dataclass(frozen=True)
class Candidate:
    """A proxy: a protocol's runs (``seeds`` of them averaged) scored by ``score(curve, pool entry)``;
    ``protocol`` None: no training (a count of the configuration). ``evals``: the validation passes
    the score needs (None: every one the run recorded). ``combine``: the names of two candidates
    whose ranks are summed instead (their compute added)."""

    name: str
    protocol: str | None
    score: Callable[[LearningCurve | None, dict[str, Any]], float] | None = None
    seeds: tuple[int, ...] = (0,)
    evals: int | None = 2  # a trial evaluates at its rung(s) and at the end
    combine: tuple[str, str] | None = None
    compute_fraction: float = 1.0  # of the protocol's run the score needs (a rung: part of it)


def candidates(reference_steps: int) -> list[Candidate]:
    """Every proxy the benchmark scores (docs/proxy_fidelity.md lists them)."""
    out: list[Candidate] = [
        Candidate("MACs (no training)", None, lambda c, p: math.log(p["macs"]), evals=0),
        Candidate("deploy parameters (no training)", None, lambda c, p: math.log(p["params_deploy"]), evals=0),
    ]
    for name, protocol in PROTOCOLS.items():
        out.append(Candidate(f"{name}: final PSNR", name, lambda c, p: final_psnr(c)))
        out.append(Candidate(f"{name}: final PSNR, 2 seeds", name, lambda c, p: final_psnr(c), seeds=(0, 1)))
        out.append(Candidate(f"{name}: loss sum (last half)", name, lambda c, p: loss_sum(c, 0.5), evals=0))
        out.append(Candidate(f"{name}: loss sum (last quarter)", name, lambda c, p: loss_sum(c, 0.25), evals=0))
        for model in ("pow3", "exp3"):
            out.append(Candidate(f"{name}: {model} extrapolation", name,
                                 lambda c, p, m=model, skip=protocol.eval_every: extrapolated_psnr(
                                     c, reference_steps, m, skip_before=skip),
                                 evals=None))
        out.append(Candidate(f"{name}: final PSNR + MACs (rank sum)", None,
                             combine=(f"{name}: final PSNR", "MACs (no training)")))
        out.append(Candidate(f"{name}: pow3 extrapolation + MACs (rank sum)", None,
                             combine=(f"{name}: pow3 extrapolation", "MACs (no training)")))
    out.append(Candidate(f"{TODAY.name}: PSNR at the first rung (a third of the steps)", TODAY.name,
                         lambda c, p: c.psnr_at(c.steps // 3), evals=1, compute_fraction=1 / 3))
    return out


def _load_runs(data: Path, kind: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    runs = {}
    folder = data / kind
    for path in sorted(folder.rglob("*.json")) if folder.exists() else []:
        run = _read_json(path)
        key = (path.parent.name, run["index"], run["seed"]) if kind == "brief" else (run["index"], run["seed"])
        runs[key] = run
    return runs


def _train_pixels(protocol: Protocol) -> float:
    return float(protocol.steps * protocol.batch_size * protocol.patch_size**2)


def score(data: Path, k: int = 3, rng: int = 0, only: Sequence[str] | None = None,
          resamples: int = 2000) -> list[dict[str, Any]]:
    """One row per candidate proxy (or those named in ``only``) over the configurations whose
    reference (seed 0 at least; ``reference_truth``) and proxy runs are all present: compute,
    Kendall and Spearman with 95 % intervals, regret, top-k recall. ``multiple``: training pixels
    (steps x batch x patch^2) per configuration against the 108-step trial (``TODAY``), the
    deterministic measure of compute; ``seconds``: the measured median, which depends on the
    machine's load when the runs were made."""
    pool, chosen = _chosen(data)
    reference = _load_runs(data, "reference")
    brief = _load_runs(data, "brief")
    complete, truth = reference_truth(chosen, reference)
    if len(complete) < 4:
        return []
    today = _train_pixels(TODAY)
    values: dict[str, list[float]] = {}
    cost: dict[str, tuple[float, float]] = {}  # name -> (multiple, seconds)
    rows = []
    for cand in candidates(int(reference[(complete[0], 0)]["steps"])):
        if only is not None and cand.name not in only and not any(cand.name in (c.combine or ())
                                                                  for c in candidates(1) if c.name in only):
            continue
        try:
            if cand.combine is not None:
                if not all(name in values for name in cand.combine):
                    continue
                ranks = [sps.rankdata(values[name]) for name in cand.combine]
                values[cand.name] = [float(a + b) for a, b in zip(*ranks)]
                cost[cand.name] = tuple(sum(cost[n][j] for n in cand.combine) for j in range(2))
            elif cand.protocol is None:
                values[cand.name] = [cand.score(None, pool[i]) for i in complete]
                cost[cand.name] = (0.0, 0.0)
            else:
                keys = [(cand.protocol, i, s) for i in complete for s in cand.seeds]
                if not all(key in brief for key in keys):
                    continue
                values[cand.name] = [
                    float(np.mean([cand.score(curve_of(brief[(cand.protocol, i, s)]), pool[i]) for s in cand.seeds]))
                    for i in complete]
                seconds = float(np.median([sum(_compute(brief[(cand.protocol, i, s)], cand.evals) for s in cand.seeds)
                                           for i in complete]))
                cost[cand.name] = (cand.compute_fraction * len(cand.seeds) * _train_pixels(PROTOCOLS[cand.protocol])
                                   / today, cand.compute_fraction * seconds)
            if only is not None and cand.name not in only:
                continue
            quality = ranking_quality(values[cand.name], truth, k=k, rng=rng, n_resamples=resamples)
        except (KeyError, ValueError, StatsError) as exc:
            rows.append({"proxy": cand.name, "error": str(exc)})
            continue
        a = quality.agreement
        rows.append({"proxy": cand.name, "multiple": cost[cand.name][0], "seconds": cost[cand.name][1],
                     "kendall": a.kendall, "kendall_low": a.kendall_low, "kendall_high": a.kendall_high,
                     "spearman": a.spearman, "spearman_low": a.spearman_low, "spearman_high": a.spearman_high,
                     "regret_db": quality.regret, "top_k_recall": quality.top_k_recall, "n": a.n})
    return rows


def reference_truth(chosen: Sequence[int], reference: dict[tuple[Any, ...], dict[str, Any]]
                    ) -> tuple[list[int], list[float]]:
    """The configurations with a seed-0 reference run, and each one's reference PSNR: the mean
    final PSNR of the seeds stored for it (two seeds were run for a subset when time ran short;
    ``_print_seed_spread`` reports how far the seeds differ)."""
    complete = [i for i in chosen if (i, 0) in reference]
    truth = [float(np.mean([run["final_psnr"] for (j, _), run in reference.items() if j == i])) for i in complete]
    return complete, truth


def _seed_counts(chosen: Sequence[int], reference: dict[tuple[Any, ...], dict[str, Any]]) -> str:
    """``"2 seeds for 10, 1 seed for 8"``: how many configurations have how many reference seeds."""
    per_config = [sum(1 for (j, _) in reference if j == i) for i in chosen]
    counts = {n: per_config.count(n) for n in sorted(set(per_config) - {0}, reverse=True)}
    return ", ".join(f"{n} seed{'s' if n > 1 else ''} for {count}" for n, count in counts.items())


TARGET_TAU, TARGET_LOW, TARGET_REGRET = 0.8, 0.5, 0.05


def choose_default(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cheapest proxy that meets the targets: Kendall tau >= 0.8 with the interval's lower
    bound above 0.5, and a regret of at most 0.05 dB (ties: the higher tau); a trained proxy only
    (a count of the configuration ranks it by cost, not by what it learned, and the front already
    has cost on its other axis). None when no proxy meets them."""
    reaching = [r for r in rows if "error" not in r and r["multiple"] > 0 and r["kendall"] >= TARGET_TAU
                and r["kendall_low"] > TARGET_LOW and r["regret_db"] <= TARGET_REGRET
                and "MACs" not in r["proxy"] and "parameters" not in r["proxy"]]
    return min(reaching, key=lambda r: (r["multiple"], -r["kendall"])) if reaching else None


def truncated_reference(data: Path) -> list[dict[str, Any]]:
    """Kendall tau between the reference run's own validation PSNR part-way (EMA weights, a cosine
    schedule not yet at its end) and its final value: how early the long run's ranking settles."""
    _, chosen = _chosen(data)
    reference = _load_runs(data, "reference")
    complete, final = reference_truth(chosen, reference)
    if len(complete) < 4:
        return []
    rows = []
    for k, point in enumerate(reference[(complete[0], 0)]["psnr_curve"]):
        part = [float(np.mean([run["psnr_curve"][k][1] for (j, _), run in reference.items() if j == i]))
                for i in complete]
        rows.append({"step": int(point[0]), "kendall": float(sps.kendalltau(part, final).statistic)})
    return rows


def _compute(run: dict[str, Any], evals: int | None) -> float:
    """Seconds a proxy costs on one configuration: training plus the validation passes it uses."""
    n = len(run["psnr_curve"]) if evals is None else evals
    return float(run["train_seconds"]) + n * float(run["eval_seconds_each"])


def print_score(data: Path, write: bool = False, resamples: int = 2000) -> list[dict[str, Any]]:
    rows = score(data, resamples=resamples)
    if not rows:
        print("no configuration has its reference and proxy runs stored yet")
        return rows
    reference = _load_runs(data, "reference")
    n = rows[0].get("n", 0)
    ordered = sorted(rows, key=lambda r: -r.get("kendall", -2))
    print_table(
        ["proxy", "compute (x 108-step trial)", "s / config", "Kendall tau [95 % CI]", "Spearman [95 % CI]", "regret (dB)",
         "top-3 recall"],
        [(r["proxy"], f"{r['multiple']:.2f}", f"{r['seconds']:.1f}",
          f"{r['kendall']:+.2f} [{r['kendall_low']:+.2f}, {r['kendall_high']:+.2f}]",
          f"{r['spearman']:+.2f} [{r['spearman_low']:+.2f}, {r['spearman_high']:+.2f}]",
          f"{r['regret_db']:.3f}", f"{r['top_k_recall']:.2f}") if "error" not in r
         else (r["proxy"], "-", "-", r["error"][:60], "", "", "") for r in ordered],
        title=f"proxies against long training ({n} configurations, reference = mean final PSNR of the seeds run: "
              f"{_seed_counts(_chosen(data)[1], reference)}; Y channel, crop 4, built-in x4 images; compute: "
              "training pixels per configuration against the 108-step trial; s / config: measured, load-dependent)",
    )
    truncated = truncated_reference(data)
    if truncated:
        print_table(["reference step", "Kendall tau against its final PSNR"],
                    [(r["step"], f"{r['kendall']:+.2f}") for r in truncated],
                    title="how early the long run's own ranking settles (EMA weights part-way)")
    _print_seed_spread(reference)
    default = choose_default(rows)
    none = "none reaches tau >= 0.8 with its lower bound above 0.5 and a regret of at most 0.05 dB"
    print(f"\ndefault proxy: {default['proxy'] if default else none}")
    if write:
        doc = {"configurations": n, "reference_seeds": _seed_counts(_chosen(data)[1], reference),
               "reference": ReferenceProtocol().recipe(0).to_dict(), "default": default["proxy"] if default else None,
               "resamples": resamples, "rows": rows, "truncated_reference": truncated, "machine": _machine()}
        _write_json(data / "table.json", doc)
        print(f"written: {data / 'table.json'}")
    if (default is not None and default["proxy"].endswith(": final PSNR")
            and PROTOCOLS[default["proxy"].split(":")[0]].lr is not None):
        print("\nthe space file's section for it (ehrsr/search_spaces/tiny.yaml):\n" + proxy_section(default))
    return rows


def proxy_section(row: dict[str, Any]) -> str:
    """The ``proxy:`` section of a space file stating ``row``'s measured agreement."""
    protocol = PROTOCOLS[row["proxy"].split(":")[0]]
    reference = ReferenceProtocol()
    return "\n".join([
        "proxy:",
        f"  kendall: [{row['kendall']:.2f}, {row['kendall_low']:.2f}, {row['kendall_high']:.2f}]",
        f"  spearman: [{row['spearman']:.2f}, {row['spearman_low']:.2f}, {row['spearman_high']:.2f}]",
        f"  configurations: {row['n']}",
        f"  regret_db: {row['regret_db']:.3f}",
        f"  top3_recall: {row['top_k_recall']:.2f}",
        f"  measured_on: {{task: sr, scale: {SCALE}, data: builtin}}",
        f"  trial: {{max_steps: {protocol.steps}, batch_size: {protocol.batch_size}, "
        f"patch_size: {protocol.patch_size}, lr: {protocol.lr:.1e}}}",
        f"  reference: \"{reference.steps} steps as run_search.py train trains a pick (Adam 5e-4, cosine, EMA), "
        f"batch {reference.batch_size}, {reference.patch_size} px; benchmarks/proxy_fidelity.py\"",
    ])


def _print_seed_spread(reference: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    by_index: dict[int, dict[int, float]] = {}
    for (index, seed), run in reference.items():
        by_index.setdefault(index, {})[seed] = run["final_psnr"]
    pairs = [v for v in by_index.values() if len(v) >= 2]
    if not pairs:
        return
    both = [v for v in pairs if 0 in v and 1 in v]
    diffs = [abs(v[0] - v[1]) for v in both]
    if diffs:
        line = (f"\nreference seed-to-seed spread over {len(diffs)} configurations: |seed 0 - seed 1| median "
                f"{np.median(diffs):.3f} dB, max {np.max(diffs):.3f} dB")
        if len(both) >= 4:  # the ceiling of any proxy: how well one long run ranks like another seed's
            tau = float(sps.kendalltau([v[0] for v in both], [v[1] for v in both]).statistic)
            line += f"; Kendall tau seed 0 vs seed 1: {tau:+.2f}"
        print(line)


# ---------------------------------------------------------------------------------------------


def _parse_shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    shard = (int(i), int(n or 1))
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return shard


def _smoke_images(folder: Path) -> None:
    """Two 64 px training and two 48 px validation crops of the built-in images (HR, x4)."""
    from PIL import Image
    from skimage import data as skdata

    for part, side, names in (("train", 64, ("astronaut", "chelsea")), ("val", 48, ("coffee", "rocket"))):
        (folder / part).mkdir(parents=True)
        for name in names:
            image = getattr(skdata, name)()[:side, :side]
            Image.fromarray(image).save(folder / part / f"{name}.png")
        _FOLDERS[part] = folder / part


def smoke() -> None:
    """Every step at the smallest size in a temporary folder: a pool of 6 (no module quotas) trained
    2 steps of batch 2 on two small crops and validated on two others, 4-step references validated
    once, two 2-step protocols, then the table (with 200 bootstrap resamples)."""
    global PROTOCOLS, TODAY, MODULE_QUOTA
    saved = dict(PROTOCOLS), TODAY, MODULE_QUOTA
    try:
        MODULE_QUOTA = 0  # the quotas add configurations: not at this size
        TODAY = Protocol("s108-drawn-lr", 2, None, batch_size=2, patch_size=8, eval_every=2)
        PROTOCOLS = {TODAY.name: TODAY, "lr2e-3": Protocol("lr2e-3", 2, 2e-3, batch_size=2, patch_size=8, eval_every=2)}
        with tempfile.TemporaryDirectory(prefix="proxy_fidelity_smoke_") as folder:
            data = Path(folder)
            _smoke_images(data / "images")
            step_pool(data, size=6, k=5, seed=0, shard=(0, 1))
            step_reference(data, ReferenceProtocol(steps=4, batch_size=2, patch_size=8, validations=1), [0], (0, 1),
                           data / "work")
            step_proxies(data, list(PROTOCOLS), [0], (0, 1))
            rows = print_score(data, resamples=200)
            if not any("kendall" in r for r in rows):
                raise SystemExit("smoke: no proxy was scored")
    finally:
        PROTOCOLS, TODAY, MODULE_QUOTA = saved
        _FOLDERS.clear()
        _DATA.clear()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", choices=("pool", "reference", "proxies", "score", "bicubic"))
    parser.add_argument("--write", action="store_true", help="score: also write the table to DATA/table.json")
    parser.add_argument("--smoke", action="store_true", help="every step at the smallest size, in a temporary folder")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help=f"results folder (default {DATA_DIR})")
    parser.add_argument("--pool-size", type=int, default=40)
    parser.add_argument("--configs", type=int, default=18, help="configurations chosen before the module quotas")
    parser.add_argument("--pool-seed", type=int, default=0)
    parser.add_argument("--reference-steps", type=int, default=ReferenceProtocol.steps)
    parser.add_argument("--seeds", default="0,1", help="training seeds (reference and proxies)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="proxies step: protocols to run")
    parser.add_argument("--shard", type=_parse_shard, default=(0, 1), help="I/N: this process runs every N-th run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("EHRSR_CACHE", Path.home() / ".cache" / "ehrsr"))
                        / "proxy_fidelity_runs", help="checkpoints of the reference runs (resume after a kill)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.smoke:
        smoke()
        return
    if args.step is None:
        parser.error("give a step (pool, reference, proxies, score) or --smoke")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"machine: {_machine()}")
    if args.step == "pool":
        step_pool(args.data, args.pool_size, args.configs, args.pool_seed, args.shard)
    elif args.step == "reference":
        step_reference(args.data, ReferenceProtocol(steps=args.reference_steps), seeds, args.shard, args.work)
    elif args.step == "proxies":
        unknown = [p for p in args.protocols.split(",") if p not in PROTOCOLS]
        if unknown:
            parser.error(f"unknown protocol(s) {unknown}; known: {', '.join(PROTOCOLS)}")
        step_proxies(args.data, args.protocols.split(","), seeds, args.shard)
    elif args.step == "bicubic":
        _, val_set = builtin_sets()
        print(f"MATLAB bicubic on the built-in validation images: {bicubic_baseline(val_set, crop_border=SCALE).psnr:.3f} dB")
    else:
        print_score(args.data, write=args.write)


if __name__ == "__main__":
    main()
