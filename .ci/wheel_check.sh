#!/usr/bin/env bash
# Packaging check: build the wheel, install it into a fresh virtual environment (no extras, not
# editable) and run a micro search from an empty folder outside the checkout. It fails if the
# wheel misses a module, a dependency or its package data (the shipped search spaces and device
# profiles), or if anything still reads files from the repository.
#
# PyTorch is installed at the versions of the calling environment, from the wheel folder
# $EHRSR_WHEEL_CACHE (filled by .ci/run; downloaded here when missing), so the ~3 GB are fetched once.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
started=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
step() { echo "[wheel check $((SECONDS - started)) s] $*"; }
# pip's and setuptools' chatter goes to a log, shown only when the command fails
quiet() { "$@" >"$work/log" 2>&1 || { cat "$work/log"; echo "failed: $*"; exit 1; }; }

step "building the wheel"
had_build=0; [ -e "$repo/build" ] && had_build=1
quiet python -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
[ "$had_build" = 1 ] || rm -rf "$repo/build"  # setuptools builds in the source tree
wheel=$(ls "$work"/dist/ehrsr-*.whl)
listing=$(python -m zipfile -l "$wheel")
for name in tiny full devices; do
    grep -q "ehrsr/search_spaces/$name.yaml" <<<"$listing" || { echo "the wheel lacks ehrsr/search_spaces/$name.yaml"; exit 1; }
done

read -r -a torch_pins < <(python -c "from importlib.metadata import version as v; print(f'torch=={v(\"torch\")} torchvision=={v(\"torchvision\")}')")
wheels="${EHRSR_WHEEL_CACHE:-$HOME/.cache/ehrsr-ci/wheels}"
step "fresh virtual environment with ${torch_pins[*]} (wheels from $wheels)"
quiet python -m pip download --quiet --dest "$wheels" "${torch_pins[@]}"  # a no-op when already there
python -m venv "$work/venv"
# --no-compile: byte-compiling all of torch costs more than the few modules a run imports
quiet "$work/venv/bin/python" -m pip install --quiet --no-compile --no-index --find-links "$wheels" "${torch_pins[@]}"
step "installing $(basename "$wheel") and its dependencies"
quiet "$work/venv/bin/python" -m pip install --quiet --no-compile "$wheel"

# an empty folder, no PYTHONPATH: only the installed package can be imported
mkdir "$work/run" && cd "$work/run"
unset PYTHONPATH
cp "$repo/tests/fixtures/micro.yaml" my_space.yaml  # a user's own space file, by path
"$work/venv/bin/python" - <<'PY'
"""The shipped YAML files resolve inside the installed package; tiny images for the search."""
from pathlib import Path

import numpy as np
from PIL import Image

import ehrsr
from ehrsr.deploy import load_device_profiles
from ehrsr.resources import shipped_space_names, spaces_dir
from ehrsr.search.space import load_space

package = Path(ehrsr.__file__).resolve().parent
assert "site-packages" in package.parts, f"ehrsr imported from {package}, not the installed wheel"
assert spaces_dir().resolve().is_relative_to(package), spaces_dir()
assert shipped_space_names() == ["full", "tiny"], shipped_space_names()
for name in shipped_space_names():
    assert load_space(name).path.resolve().is_relative_to(package)
assert "laptop-cpu-256" in load_device_profiles()
rng = np.random.default_rng(0)
for folder in ("train", "val"):
    Path(folder).mkdir()
    for i in range(3):
        smooth = np.kron(rng.integers(0, 256, (12, 12, 3)), np.ones((8, 8, 1)))  # 96 x 96
        Image.fromarray(smooth.astype(np.uint8)).save(f"{folder}/img{i}.png")
print(f"package data: {', '.join(shipped_space_names())} spaces and device profiles from {spaces_dir()}")
PY

step "micro search with the ehrsr console script in $PWD"
"$work/venv/bin/ehrsr" --space my_space.yaml --budget trials=2 --train-data train --val-data val \
    --cache-dir cache --out-dir reports --study-name wheel-check --profile-size 32 \
    --profile-seconds 0.01 --no-early-stopping --ablation-share 0 --no-report --quiet
"$work/venv/bin/python" - <<'PY'
import optuna

study = optuna.load_study(study_name="wheel-check", storage="sqlite:///reports/wheel-check/study.db")
done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
assert len(done) == 2 and all(t.values[0] > 10 for t in done), [(t.state, t.values) for t in study.trials]
print(f"micro search: {len(done)} complete trials, PSNR {', '.join(f'{t.values[0]:.2f}' for t in done)} dB")
PY
step "passed"
