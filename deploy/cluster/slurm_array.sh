#!/usr/bin/env bash
# EHR-SR search on a Slurm cluster: a job array, one task per node, one worker per GPU of that
# node, every worker on the same study database. See docs/scaling_out.md.
#
#   export EHRSR_STORAGE='postgresql://ehrsr@db-host:5432/ehrsr'   # password: ~/.pgpass, not here
#   sbatch --export=ALL deploy/cluster/slurm_array.sh                # from the repository root
#
# Workers can join or leave at any time: the budget, the trials and the early-stopping rungs
# live in the database. A worker killed mid-trial (preemption, node failure, scancel) loses only
# that trial; another worker marks it failed. Re-submitting resumes the study.
#
#SBATCH --job-name=ehrsr-search
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=ehrsr-search-%A_%a.out
set -euo pipefail

: "${EHRSR_STORAGE:?set EHRSR_STORAGE to the study database URL (postgresql://user@host/db)}"
EHRSR_SPACE="${EHRSR_SPACE:-full}"
EHRSR_STUDY="${EHRSR_STUDY:-ehrsr-full-sr-x4}"
EHRSR_BUDGET="${EHRSR_BUDGET:-gpu-hours=48}"
# a folder every node sees (weights of each trial, trials.csv); the final report is written by
# one `run_search.py report` after the array (docs/scaling_out.md)
EHRSR_OUT="${EHRSR_OUT:-reports}"
# more run_search.py options, split on spaces, e.g. "--train-data /data/DIV2K --val-data /data/Set5"
read -r -a extra <<< "${EHRSR_WORKER_ARGS:-}"
PYTHON="${PYTHON:-python}"

echo "array task ${SLURM_ARRAY_TASK_ID:-0} on $(hostname): ${SLURM_NTASKS:-1} workers, study ${EHRSR_STUDY}"
# One srun task per GPU (--gpus-per-task=1: each task sees one GPU as cuda:0). A worker that
# ends (budget spent, or killed) does not stop the others (--kill-on-bad-exit=0).
srun --kill-on-bad-exit=0 --gpus-per-task=1 \
    "$PYTHON" run_search.py --space "$EHRSR_SPACE" --storage "$EHRSR_STORAGE" --study-name "$EHRSR_STUDY" \
    --budget "$EHRSR_BUDGET" --out-dir "$EHRSR_OUT" --no-report "${extra[@]}"
