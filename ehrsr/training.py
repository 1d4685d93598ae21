"""Brief training under a budget: the fidelity knob of every search trial.

The recipe is the usual one of light SR / restoration models (BasicSR, NAFNet, SwinIR): AdamW
(betas 0.9 / 0.99), linear warm-up then cosine decay to zero over the full number of ``steps``,
L1, MSE or Charbonnier loss (plus the network's MoE load-balancing loss), gradient-norm clipping,
random LR/HR patches with flips and rotations. On CUDA it adds bf16 autocast and channels_last.

The cosine schedule always spans ``steps`` (the full-fidelity length), even when the run is cut
short by ``seconds`` or stopped by ``on_eval``: a trial stopped at a quarter of its steps has
trained exactly like the first quarter of the full run, which is what multi-fidelity early
stopping compares (and ``start_state`` lets a promoted trial continue the same run).

What the user chooses (learning rate, weight decay, loss, batch, patch, steps, ...) travels as one
frozen :class:`TrainSettings` from the search space to the optimizer, so no setting can be
dropped on the way (``docs/data_and_metrics.md``, "Brief training").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ehrsr import faults

if TYPE_CHECKING:  # the settings are read by light modules (reports) that need no data code
    from ehrsr.data.datasets import TrainSet

_clock = time.perf_counter  # module-level so tests can drive time with a fake clock

__all__ = [
    "LOSSES",
    "TrainResult",
    "TrainSettings",
    "TrainingDiverged",
    "TrainingError",
    "TrainingOutOfMemory",
    "finite_step",
    "learning_rate_at",
    "train",
]


class TrainingError(RuntimeError):
    """Base class of the ways a training run can fail that the search records and survives."""


class TrainingDiverged(TrainingError):
    """The loss or the gradients became NaN or infinite."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"training diverged at step {step}: {what}")
        self.step = step
        self.what = what


def finite_step(step: int, total: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float]:
    """The loss and gradient norm of update ``step`` (0-based) as floats; ``TrainingDiverged``
    when either is not finite. One host sync per step: the check must name the step."""
    loss_value, norm_value = float(total.detach()), float(grad_norm)
    if not math.isfinite(loss_value):
        raise TrainingDiverged(step + 1, f"loss is {loss_value}")
    if not math.isfinite(norm_value):
        raise TrainingDiverged(step + 1, f"gradient norm is {norm_value}")
    return loss_value, norm_value


class TrainingOutOfMemory(TrainingError):
    """The device ran out of memory for this batch and patch size."""

    def __init__(self, batch_size: int, patch_size: int, device: torch.device, step: int, detail: str = "") -> None:
        super().__init__(
            f"out of memory on {device} at step {step} with batch_size={batch_size}, patch_size={patch_size} "
            f"(LR pixels); use a smaller batch or patch{': ' + detail if detail else ''}"
        )
        self.batch_size = batch_size
        self.patch_size = patch_size
        self.step = step


@dataclass
class TrainResult:
    """What a run did.

    ``steps_done`` is the position reached in the schedule (counting the steps of the run that
    ``start_state`` continues, if any).
    ``history`` holds ``(step, mean loss since the previous entry)``; ``final_loss`` is its last
    value. ``stop_reason`` is ``"steps"`` (all steps done), ``"seconds"`` (time budget) or
    ``"on_eval"`` (the callback asked to stop). ``train_seconds`` excludes ``on_eval`` time.
    ``state`` resumes the run: pass it as ``start_state`` with the same model object.
    """

    steps_done: int
    train_seconds: float
    eval_seconds: float
    final_loss: float
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    stop_reason: str = "steps"
    state: dict[str, Any] = field(default_factory=dict, repr=False)


def learning_rate_at(step: int, *, base_lr: float, steps: int, warmup_steps: int) -> float:
    """Learning rate of update number ``step`` (0-based): linear warm-up over ``warmup_steps``
    updates from ``base_lr / warmup_steps`` to ``base_lr``, then half a cosine down to 0 at ``steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def _mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


def _charbonnier_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Charbonnier (a smooth L1) with eps = 1e-3, as in LapSRN / MPRNet / Restormer.
    return torch.sqrt((pred - target) ** 2 + 1e-6).mean()


_LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": _l1_loss,
    "mse": _mse_loss,
    "charbonnier": _charbonnier_loss,
}
# looked up when a run starts (not bound at import), so a test can spy on the one a run uses

LOSSES: tuple[str, ...] = tuple(_LOSS_FUNCTIONS)
"""Reconstruction losses ``train`` implements; the one list a search space validates against."""


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The reconstruction loss called ``name`` (one of ``LOSSES``), looked up now (spy-friendly)."""
    try:
        return _LOSS_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}") from None


@dataclass(frozen=True)
class TrainSettings:
    """What the user chooses about one training run (the runtime knobs such as device, seed and
    callbacks are ``train``'s keyword arguments instead).

    Validated on construction: a bad value raises one ``ValueError`` naming the field. Stored
    with a trial as ``dataclasses.asdict(settings)`` and read back with ``from_dict``.
    """

    steps: int  # optimizer updates of the full run; the schedule spans them (no sensible default)
    lr: float = 1e-3  # AdamW peak learning rate; 1e-3 suits light SR nets with warm-up (NAFNet-like)
    weight_decay: float = 1e-4  # decoupled decay; small, as in light SR recipes (0 turns it off)
    loss: str = "l1"  # L1: the SR default since EDSR, which found it converges better than MSE
    batch_size: int = 16  # patches per step; 16 is the usual light-SR batch
    patch_size: int = 48  # LR patch side in pixels (HR = patch_size * scale); 48 as in EDSR / RCAN
    warmup_steps: int | None = None  # linear warm-up; None: 5% of steps (at most 500), enough for AdamW's moments
    grad_clip: float | None = 1.0  # max global gradient norm (None: off); 1.0 guards brief high-lr runs

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"training setting {name} {rule}, got {getattr(self, name)!r}")

        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
            if value < minimum:
                raise bad(name, f"must be >= {minimum}")

        def number(name: str, *, positive: bool) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
            if value < 0 or (positive and value == 0):
                raise bad(name, "must be > 0" if positive else "must be >= 0")

        integer("steps", 1)
        number("lr", positive=True)
        number("weight_decay", positive=False)
        if self.loss not in LOSSES:
            raise bad("loss", f"must be one of {', '.join(LOSSES)}")
        integer("batch_size", 1)
        integer("patch_size", 1)
        if self.warmup_steps is not None:
            integer("warmup_steps", 0)
        if self.grad_clip is not None:
            number("grad_clip", positive=True)

    @property
    def resolved_warmup_steps(self) -> int:
        """``warmup_steps``, or its default: 5% of ``steps``, at most 500."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(500, max(0, round(0.05 * self.steps)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, ignore: Collection[str] = ()) -> TrainSettings:
        """Settings from a stored dict (``dataclasses.asdict`` of one). Missing keys take their
        defaults; an unknown key is an error, except those in ``ignore`` (e.g. the ``seed`` a
        trial stores alongside)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names and k not in ignore)
        if unknown:
            raise ValueError(
                f"unknown training setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"valid: {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**{k: v for k, v in data.items() if k in names})


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device (or the host allocator) running out of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def train(
    model: nn.Module,
    train_set: TrainSet,
    settings: TrainSettings,
    *,
    seconds: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    eval_steps: Iterable[int] = (),
    on_eval: Callable[[int, nn.Module], bool | None] | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    progress: bool = False,
    start_state: dict[str, Any] | None = None,
    log_every: int = 10,
) -> TrainResult:
    """Train ``model`` on random patches of ``train_set`` until ``settings.steps`` or ``seconds`` run out.

    Args:
        model: maps LR ``(B, 3, p, p)`` to HR ``(B, 3, p*s, p*s)``; if it has ``aux_loss()``,
            that scalar (the MoE load-balancing loss of the last forward) is added to the loss.
            It is moved to ``device`` and left in train mode.
        train_set: a prepared :class:`~ehrsr.data.TrainSet` (move it with ``.to(device)`` first
            to cut patches on the GPU).
        settings: the user's choices (:class:`TrainSettings`): ``steps`` (optimizer updates of
            the full run; the schedule is defined over them), AdamW ``lr`` and decoupled
            ``weight_decay``, ``loss`` (one of ``LOSSES``), ``batch_size`` and ``patch_size`` (LR
            patch side; HR is ``patch_size * scale``), ``warmup_steps``, ``grad_clip``.
        seconds: optional wall-clock limit on training (``on_eval`` time not counted).
        seed: seeds patch sampling and torch's global RNG (dropout, noise injection).
        eval_steps, on_eval: after each step in ``eval_steps``, ``on_eval(step, model)`` runs with
            the model in eval mode; returning ``False`` stops training (early stopping).
        amp: bf16 autocast; default on for CUDA only. channels_last: default on for CUDA only.
        progress: tqdm bar. start_state: ``TrainResult.state`` of an earlier run to continue.
        log_every: steps per ``history`` entry.

    Raises:
        TrainingDiverged: NaN/inf loss or gradient norm (names the step).
        TrainingOutOfMemory: the device ran out of memory (names batch and patch size).
    """
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    steps, lr, weight_decay = settings.steps, settings.lr, settings.weight_decay
    batch_size, patch_size, grad_clip = settings.batch_size, settings.patch_size, settings.grad_clip
    warmup_steps = settings.resolved_warmup_steps
    if seconds is not None and seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    if patch_size > train_set.max_patch_size:
        raise ValueError(f"patch_size {patch_size} exceeds the largest that fits the training images ({train_set.max_patch_size})")
    model_scale = getattr(getattr(model, "config", None), "scale", None)
    if model_scale is not None and model_scale != train_set.scale:
        raise ValueError(f"the model's scale ({model_scale}) differs from the training data's ({train_set.scale})")
    criterion = loss_function(settings.loss)
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    amp = is_cuda if amp is None else amp
    channels_last = is_cuda if channels_last is None else channels_last
    eval_at = set(eval_steps)
    has_aux = callable(getattr(model, "aux_loss", None))

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # no weight decay on biases, norms and learned scalars (the usual AdamW practice)
            (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.99),
        foreach=True,
    )
    generator = torch.Generator(device=train_set.device)
    generator.manual_seed(seed)
    torch.manual_seed(seed)
    first_step = 0
    if start_state:
        optimizer.load_state_dict(start_state["optimizer"])
        generator.set_state(start_state["generator"])
        torch.set_rng_state(start_state["torch_rng"])
        if is_cuda and start_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(start_state["cuda_rng"], device)
        first_step = int(start_state["step"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=first_step, desc="training", unit="step", leave=False)

    history: list[tuple[int, float]] = []
    interval_losses: list[torch.Tensor] = []
    train_seconds = 0.0
    eval_seconds = 0.0
    stop_reason = "steps"
    step = first_step
    segment_start = _clock()

    def flush_history() -> None:
        if interval_losses:
            history.append((step, float(torch.stack(interval_losses).mean())))
            interval_losses.clear()

    while step < steps:
        current_lr = learning_rate_at(step, base_lr=lr, steps=steps, warmup_steps=warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        try:
            faults.inject("oom", step + 1)  # EHRSR_FAULT (tests only; nothing when unset)
            lr_patch, hr_patch = train_set.sample(batch_size, patch_size, generator, device)
            if channels_last:
                lr_patch = lr_patch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                pred = model(lr_patch)
                if pred.shape != hr_patch.shape:
                    raise ValueError(f"model output {tuple(pred.shape)} does not match the HR patch {tuple(hr_patch.shape)}")
                total = criterion(pred.float(), hr_patch)
                if has_aux:
                    total = total + model.aux_loss().float()
                if faults.hits("nan", step + 1):
                    total = total * float("nan")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                if grad_clip is not None
                else torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            )
        except Exception as exc:
            if is_out_of_memory(exc):
                optimizer.zero_grad(set_to_none=True)
                if is_cuda:
                    torch.cuda.empty_cache()
                raise TrainingOutOfMemory(batch_size, patch_size, device, step + 1, str(exc).splitlines()[0]) from None
            raise
        loss_value, _ = finite_step(step, total, grad_norm)  # one host sync: brief runs are short
        optimizer.step()
        step += 1
        interval_losses.append(total.detach().float())
        if step % log_every == 0:
            flush_history()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{current_lr:.2e}")

        if step in eval_at and on_eval is not None:
            if is_cuda:
                torch.cuda.synchronize(device)
            train_seconds += _clock() - segment_start
            eval_start = _clock()
            model.eval()
            try:
                keep_going = on_eval(step, model)
            finally:
                model.train()
            eval_seconds += _clock() - eval_start
            segment_start = _clock()
            if keep_going is False:
                stop_reason = "on_eval"
                break
        if seconds is not None and train_seconds + (_clock() - segment_start) >= seconds and step < steps:
            stop_reason = "seconds"
            break

    if is_cuda:
        torch.cuda.synchronize(device)
    train_seconds += _clock() - segment_start
    flush_history()
    if bar is not None:
        bar.close()
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if is_cuda else None,
    }
    return TrainResult(
        steps_done=step,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        final_loss=history[-1][1] if history else math.nan,
        history=history,
        stopped_early=stop_reason != "steps",
        stop_reason=stop_reason,
        state=state,
    )
