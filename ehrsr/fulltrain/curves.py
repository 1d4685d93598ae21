"""TensorBoard curves of a full-training run, written into its run folder: ``tensorboard --logdir runs/``.

Scalars (docs/full_training.md, "Curves")::

    train/loss                  mean training loss (the recipe's loss plus the MoE balance terms)
                                over the steps since the previous point
    train/grad_norm             mean global gradient norm before clipping, same steps
    train/lr                    learning rate of the point's last step
    train/steps_per_second      training steps per second over the same steps (validation and
                                checkpoint writing excluded)
    train/cuda_peak_memory_mib  peak CUDA memory allocated over the same steps (CUDA runs only)
    val/<set>/psnr, val/<set>/ssim
                                PSNR (dB) and SSIM of the EMA weights, as validation.csv: on Y
                                (BT.601), crop = scale, every val_every steps

A point closes every ``log_every`` steps, at every checkpoint and at the last step, so each step's
loss is in exactly one point and a run resumed from a checkpoint writes the same points as a run
never stopped. A killed run may have written points after its last checkpoint: the resumed run
first removes every event of a later step from the folder's event files (``drop_events_after``),
then appends a new file, so each tag's steps stay unique for any reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ehrsr.fulltrain.checkpoint import save_atomically

__all__ = ["EVENT_FILE_GLOB", "TrainingCurves", "drop_events_after"]

EVENT_FILE_GLOB = "events.out.tfevents.*"  # TensorBoard's event file names


def drop_events_after(run_dir: Path, step: int) -> int:
    """Remove every event with a step above ``step`` from the event files in ``run_dir`` (each
    file rewritten atomically); returns how many were removed. A torn last record (the writer was
    killed mid-write) is dropped with its file's rewrite or left for the readers to skip."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    removed = 0
    for path in sorted(run_dir.glob(EVENT_FILE_GLOB)):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [raw for raw in records if Event.FromString(raw).step <= step]
        if len(kept) == len(records):
            continue
        removed += len(records) - len(kept)

        def write(chosen: list[bytes], target: Path) -> None:
            with open(target, "wb") as handle:
                writer = RecordWriter(handle)
                for raw in chosen:
                    writer.write(raw)
                writer.flush()

        save_atomically(kept, path, save=write)
    return removed


class TrainingCurves:
    """The run's TensorBoard writer: ``add_step`` after every training step, ``close_point`` where
    a point is due, ``validation`` after each validation, ``flush`` before each checkpoint."""

    def __init__(self, run_dir: Path, *, start_step: int, cuda_device: torch.device | None = None) -> None:
        drop_events_after(run_dir, start_step)  # what a killed run wrote after its checkpoint
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir), flush_secs=30)
        self._cuda = cuda_device
        self._reset()

    def _reset(self) -> None:
        self._steps, self._loss, self._grad_norm, self._seconds = 0, 0.0, 0.0, 0.0
        if self._cuda is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda)

    def add_step(self, loss: float, grad_norm: float, seconds: float) -> None:
        self._steps += 1
        self._loss += loss
        self._grad_norm += grad_norm
        self._seconds += seconds

    def close_point(self, step: int, lr: float) -> None:
        """Write the point of the steps added since the last one (nothing when there were none)."""
        if self._steps == 0:
            return
        add = self._writer.add_scalar
        add("train/loss", self._loss / self._steps, step)
        add("train/grad_norm", self._grad_norm / self._steps, step)
        add("train/lr", lr, step)
        if self._seconds > 0:
            add("train/steps_per_second", self._steps / self._seconds, step)
        if self._cuda is not None:
            add("train/cuda_peak_memory_mib", torch.cuda.max_memory_allocated(self._cuda) / 2**20, step)
        self._reset()

    def validation(self, step: int, results: Mapping[str, Any]) -> None:
        """``results``: set name -> ``ehrsr.metrics`` evaluation (``psnr``, ``ssim``)."""
        for name, result in results.items():
            self._writer.add_scalar(f"val/{name}/psnr", result.psnr, step)
            self._writer.add_scalar(f"val/{name}/ssim", result.ssim, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
