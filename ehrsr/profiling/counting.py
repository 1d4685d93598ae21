"""MACs and parameters: fvcore (primary, the NTIRE Efficient SR convention) cross-checked by ptflops.

Two independent counters look at the same forward pass:

* **fvcore** ``FlopCountAnalysis`` traces the model with ``torch.jit`` and prices the nodes of the
  trace. It counts one multiply-add as one, so its total is MACs (the NTIRE ESR challenges report
  it as "FLOPs"). Its own handlers are kept for every operator it knows (so totals match NTIRE),
  except ``matmul``/``mm``, ``einsum`` and the norms (same formulas, see ``_FVCORE_OVERRIDDEN``).
* **ptflops** (aten backend, 0.7.x) intercepts the operators at dispatch time
  (``TorchDispatchMode``). Its ``ATEN_OPS_MAPPING`` prices only ``mm``, ``matmul``, ``addmm``,
  ``bmm`` and ``convolution`` (adding bias terms); we hand it, through its own ``custom_hooks``
  argument, the rules of ``rules.OP_RULES`` (fvcore's formulas) for every operator both counters
  may see. It runs under ``torch.inference_mode()``, where dispatch sees the same high-level
  operators (``conv2d``, ``linear``, ``layer_norm``, ``scaled_dot_product_attention``,
  ``fft_rfft2``) as fvcore's trace; the decomposed forms are priced too, so grad mode works.

Nothing in site-packages is edited and no global table is patched: fvcore gets per-analysis
handles (``set_op_handle``), ptflops per-counter hooks.

Both counters add two things of ours:

* **unsupported operators** -- anything neither priced by ``OP_RULES`` nor declared free in
  ``ZERO_COST_OPS`` -- are reported in ``MacCount.unsupported_ops`` (empty for EHR-SR);
* **the data path**: an operator whose inputs do not depend on the model input (weights-only
  work such as SPAN's per-forward kernel fusion, or a position-bias table lookup) is constant for a
  deployed model; its MACs go to ``macs_constant`` instead of ``macs``. For a module that is not an
  EHR-SR model, ``params_deploy`` counts the parameters that reach the data path, so a training
  branch that only feeds a fused ``eval_conv`` is not counted twice.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from ehrsr.profiling.rules import OP_RULES, ZERO_COST_OPS, OpRule, TensorShape

__all__ = [
    "CountingError",
    "MacCount",
    "count_fvcore",
    "count_macs",
    "count_parameters",
    "count_prepared",
    "deploy_form",
    "eval_mode",
    "is_ehrsr_model",
]

# fvcore handlers replaced by ours (everything else fvcore prices keeps fvcore's own handler):
# matmul/mm and einsum (see rules.matmul_macs / rules.einsum_macs), and the norms, whose fvcore
# handler asserts a 2-5-D input (OmniSR normalises 6-D window tensors); ours is the same formula
_FVCORE_OVERRIDDEN = (
    "aten::matmul",
    "aten::mm",
    "aten::einsum",
    "aten::layer_norm",
    "aten::group_norm",
    "aten::instance_norm",
)
# operators whose result is shape information only: data dependence does not flow through them
_SHAPE_ONLY = frozenset({"aten::size", "aten::sym_size", "aten::numel", "aten::dim", "prim::shape", "aten::len"})

DEPLOY_EHRSR = "ehrsr.reparameterize (fused deploy copy, eval mode)"
DEPLOY_GENERIC = "module as given, eval mode"


class CountingError(RuntimeError):
    """A counter could not run the model (tracing failed, or the forward raised)."""


@dataclass(frozen=True)
class MacCount:
    """Result of ``count_macs``. MACs: one multiply-accumulate = 1 (fvcore's convention)."""

    macs: int  # fvcore total on the data path: the NTIRE "FLOPs (fvcore)" number
    # ptflops (aten backend) total with the same rules: the cross-check (None: not run, as in a
    # search's per-unit counts, ``ehrsr.profiling.unit_counts``)
    macs_ptflops: int | None
    params: int  # parameters of the model as given (every branch, training ones included)
    params_deploy: int  # parameters of the deploy form (fused; nothing counted twice)
    unsupported_ops: dict[str, int]  # operators a counter could not price, with call counts
    by_operator: dict[str, int]  # fvcore MACs per family (conv, linear, matmul, attention, fft, ...)
    by_operator_ptflops: dict[str, int]  # the same from ptflops
    # MACs of input-independent (weights-only) work, left out of both totals; the larger of the two
    # counters' figures (fvcore's trace drops work done on ``.data``, which ptflops still sees)
    macs_constant: int
    input_shape: tuple[int, ...]  # the input the counts are for (MACs scale with it)
    deploy_form: str  # what was counted: the EHR-SR deploy copy or the module as given

    @property
    def relative_difference(self) -> float:
        """``|macs - macs_ptflops| / macs``: the counters' disagreement (0 when both are 0, NaN
        when ptflops was not run)."""
        if self.macs_ptflops is None:
            return float("nan")
        if self.macs == 0:
            return 0.0 if self.macs_ptflops == 0 else float("inf")
        return abs(self.macs - self.macs_ptflops) / self.macs

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["relative_difference"] = self.relative_difference
        return data


# ---------------------------------------------------------------------------------------------
# public helpers


def is_ehrsr_model(model: nn.Module) -> bool:
    """True for an EHR-SR network (it carries its ``EHRSRConfig`` as ``model.config``)."""
    from ehrsr.config import EHRSRConfig

    return isinstance(getattr(model, "config", None), EHRSRConfig)


def deploy_form(model: nn.Module) -> tuple[nn.Module, str]:
    """The module to profile and a description: the fused copy for EHR-SR, else ``model`` itself.

    The generic module is returned as is (not put in eval mode here; see ``eval_mode``).
    """
    if is_ehrsr_model(model):
        from ehrsr.reparam import reparameterize

        return reparameterize(model), DEPLOY_EHRSR
    return model, DEPLOY_GENERIC


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements; a parameter shared by several modules is counted once."""
    return sum(p.numel() for p in model.parameters())


def validate_input_shape(input_shape: Sequence[int], model: nn.Module | None = None) -> tuple[int, ...]:
    """A tuple of positive ints; for EHR-SR also ``(B, in_channels, H, W)``. Raises ``ValueError``."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}") from None
    if not shape or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
    if model is not None and is_ehrsr_model(model):
        channels = model.config.in_channels
        if len(shape) != 4 or shape[1] != channels:
            raise ValueError(
                f"input_shape for an EHR-SR model must be (batch, {channels}, height, width), got {shape}"
            )
    return shape


# ---------------------------------------------------------------------------------------------
# count_macs


def count_macs(model: nn.Module, input_shape: Sequence[int] = (1, 3, 256, 256)) -> MacCount:
    """Count MACs (fvcore and ptflops) and parameters for one input of ``input_shape``.

    An EHR-SR model is counted in its deploy form (``ehrsr.reparameterize``); any other module as
    given, in eval mode (its training flags are restored afterwards). Counting runs on the CPU in
    float32 on a seeded uniform [0, 1) input: the counts depend on shapes only (MoE routing on
    the input's values), and device-specific kernels (cuDNN, a fused CUDA scan) cannot hide
    operators from the counters there. No timing is done; a tiny model takes well under a second.
    """
    shape = validate_input_shape(input_shape, model)
    deploy, description = deploy_form(model)
    return count_prepared(model, deploy, description, shape)


def count_prepared(model: nn.Module, deploy: nn.Module, description: str, shape: tuple[int, ...]) -> MacCount:
    """``count_macs`` for a deploy form already built (``profile_model`` reuses its copy)."""
    counted = _cpu_float32(deploy, copied=deploy is not model)
    with eval_mode(counted):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        fv = count_fvcore(counted, x)
        pt = _count_ptflops(counted, x)
    if description == DEPLOY_EHRSR:
        params_deploy = count_parameters(deploy)
    else:
        params_deploy = _data_path_parameters(counted, pt.used_storages)
    unsupported = {
        name: max(fv.unsupported.get(name, 0), pt.unsupported.get(name, 0))
        for name in sorted(set(fv.unsupported) | set(pt.unsupported))
    }
    return MacCount(
        macs=fv.total,
        macs_ptflops=pt.total,
        params=count_parameters(model),
        params_deploy=params_deploy,
        unsupported_ops=unsupported,
        by_operator=dict(sorted(fv.by_family.items())),
        by_operator_ptflops=dict(sorted(pt.by_family.items())),
        macs_constant=max(fv.constant, pt.constant),
        input_shape=shape,
        deploy_form=description,
    )


@dataclass
class _Tally:
    total: int = 0
    constant: int = 0
    by_family: Counter = dataclasses.field(default_factory=Counter)
    unsupported: dict[str, int] = dataclasses.field(default_factory=dict)
    used_storages: set[int] = dataclasses.field(default_factory=set)


def _cpu_float32(module: nn.Module, copied: bool) -> nn.Module:
    """``module`` on the CPU in float32: itself when it already is, else a copy (never moved in place)."""
    tensors = [*module.parameters(), *module.buffers()]
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    float32 = all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    if on_cpu and float32:
        return module
    target = module if copied else copy.deepcopy(module)
    return target.to(device="cpu", dtype=torch.float32)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; every sub-module's ``training`` flag is restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def _describe_failure(counter: str, model: nn.Module, x: torch.Tensor, exc: Exception) -> CountingError:
    return CountingError(
        f"{counter} could not count {type(model).__name__} on an input of shape {tuple(x.shape)}: "
        f"{type(exc).__name__}: {exc}"
    )


# ---------------------------------------------------------------------------------------------
# fvcore


def _jit_arg(value: Any) -> Any:
    """A traced value as a rule sees it: a tensor as its shape, a list as a list, a constant as itself."""
    if value.isCompleteTensor():
        return TensorShape(int(v) for v in value.type().sizes())
    node = value.node()
    kind = node.kind()
    if kind == "prim::ListConstruct":
        return [_jit_arg(v) for v in node.inputs()]
    if kind == "prim::Constant":
        return value.toIValue()
    return None  # computed during the trace (a size read from a tensor, ...): not a constant


class _JitDataPath:
    """Which values of the trace depend on the model input (the first ``n_inputs`` graph inputs)."""

    def __init__(self, n_inputs: int) -> None:
        self.n_inputs = n_inputs
        self.memo: dict[int, bool] = {}

    def depends(self, value: Any) -> bool:
        # iterative depth-first walk up the producers (a deep network would overflow recursion)
        memo = self.memo
        stack = [value]
        while stack:
            v = stack[-1]
            key = v.unique()
            if key in memo:
                stack.pop()
                continue
            node = v.node()
            kind = node.kind()
            if kind == "prim::Param":
                memo[key] = v.offset() < self.n_inputs
            elif kind in _SHAPE_ONLY:
                memo[key] = False  # shapes are fixed for a deployed model: not data
            else:
                pending = [i for i in node.inputs() if i.unique() not in memo]
                if pending:
                    stack.extend(pending)
                    continue
                memo[key] = any(memo[i.unique()] for i in node.inputs())
            stack.pop()
        return memo[value.unique()]


def _fvcore_handles(tally: _Tally, data_path: _JitDataPath) -> dict[str, Any]:
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS

    def wrap(family: str, price: Any) -> Any:
        def handle(inputs: list[Any], outputs: list[Any]) -> Counter:
            macs = price(inputs, outputs)
            macs = int(sum(macs.values())) if isinstance(macs, Counter) else int(macs)
            if any(data_path.depends(v) for v in inputs):
                return Counter({family: macs})
            tally.constant += macs
            return Counter()

        return handle

    def from_rule(rule: OpRule) -> Any:
        def price(inputs: list[Any], outputs: list[Any]) -> int:
            return rule.macs([_jit_arg(v) for v in inputs], [_jit_arg(v) for v in outputs])

        return price

    handles: dict[str, Any] = {}
    for name, fvcore_handle in _DEFAULT_SUPPORTED_OPS.items():
        if name not in _FVCORE_OVERRIDDEN:
            handles[name] = wrap(OP_RULES[name].family, fvcore_handle)
    for name, rule in OP_RULES.items():
        if name not in handles:
            handles[name] = wrap(rule.family, from_rule(rule))
    return handles


def count_fvcore(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]) -> _Tally:
    """fvcore's count of ``model(x)`` (``x``: one input, or a tuple of inputs, all on the data path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's import touches deprecated torch.jit
        from fvcore.nn import FlopCountAnalysis

    tally = _Tally()
    inputs = x if isinstance(x, tuple) else (x,)
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**_fvcore_handles(tally, _JitDataPath(n_inputs=len(inputs))))
    analysis.set_op_handle(**dict.fromkeys(ZERO_COST_OPS))  # None: declared free, not "unsupported"
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch.jit's deprecation notice and tracer warnings say nothing about the counts
            warnings.simplefilter("ignore")
            tally.total = int(analysis.total())
            tally.by_family.update({k: int(v) for k, v in analysis.by_operator().items()})
            tally.unsupported = {k: int(v) for k, v in analysis.unsupported_ops().items()}
    except Exception as exc:
        raise _describe_failure("fvcore", model, inputs[0], exc) from exc
    return tally


# ---------------------------------------------------------------------------------------------
# ptflops

_PACKETS: dict[str, Any] = {}


def _packet(name: str) -> Any:
    """The ``torch.ops`` overload packet for ``ns::op``, or None when this build has no such op."""
    packet = _PACKETS.get(name)
    if packet is None:
        namespace, _, op = name.partition("::")
        try:
            packet = getattr(getattr(torch.ops, namespace), op)
        except (AttributeError, RuntimeError):
            return None  # e.g. ehrsr::selective_scan before ehrsr.blocks is imported: retried next time
        _PACKETS[name] = packet
    return packet


def _eager_arg(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorShape(int(v) for v in value.shape)
    if isinstance(value, (list, tuple)):
        return [_eager_arg(v) for v in value]
    return value


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):
        # tensors without a real storage (meta, functional or subclass wrappers) cannot alias a
        # parameter, so they are simply not tracked as data-path storages
        return None


def _make_counter_mode(tally: _Tally) -> Any:
    from ptflops.aten_engine import FlopCounterMode

    class AtenCounter(FlopCounterMode):
        """ptflops' counter plus a record of unpriced operators and data-path tracking."""

        def __init__(self, hooks: dict[Any, Any]) -> None:
            super().__init__(module=None, custom_hooks=hooks, ignored_ops=[])
            self.on_data_path = False  # read by the hooks while ptflops prices the current call
            self._on_path: WeakIdKeyDictionary = WeakIdKeyDictionary()
            self._lineage: WeakIdKeyDictionary = WeakIdKeyDictionary()

        def mark_input(self, x: torch.Tensor) -> None:
            self._on_path[x] = True

        def _lineage_of(self, t: torch.Tensor) -> frozenset[int]:
            lineage = self._lineage.get(t)
            if lineage is None:
                key = _storage_key(t)
                lineage = frozenset() if key is None else frozenset((key,))
            return lineage

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            on_path = any(t in self._on_path for t in tensors)
            # storages (parameters) that the inputs derive from through weights-only work
            lineage = frozenset().union(*(self._lineage_of(t) for t in tensors if t not in self._on_path))
            packet = func._overloadpacket
            if packet not in self.all_ops:
                name = packet._qualified_op_name
                tally.unsupported[name] = tally.unsupported.get(name, 0) + 1
            self.on_data_path = on_path
            out = super().__torch_dispatch__(func, types, args, kwargs)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    if on_path:
                        self._on_path[t] = True
                    else:
                        self._lineage[t] = lineage | self._lineage.get(t, frozenset())
            if on_path:
                tally.used_storages |= lineage
            return out

    return AtenCounter


def _count_ptflops(model: nn.Module, x: torch.Tensor) -> _Tally:
    tally = _Tally()
    mode_class = _make_counter_mode(tally)
    holder: dict[str, Any] = {}

    def priced(rule: OpRule) -> Any:
        def hook(args: Sequence[Any], outputs: Sequence[Any]) -> int:
            macs = int(rule.macs([_eager_arg(a) for a in args], [_eager_arg(o) for o in outputs]))
            if holder["mode"].on_data_path:
                tally.by_family[rule.family] += macs
                return macs
            tally.constant += macs
            return 0

        return hook

    def free(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        return 0

    hooks: dict[Any, Any] = {}
    for name in ZERO_COST_OPS:
        packet = _packet(name)
        if packet is not None:
            hooks[packet] = free
    for name, rule in OP_RULES.items():
        packet = _packet(name)
        if packet is not None:
            hooks[packet] = priced(rule)
    mode = mode_class(hooks)
    holder["mode"] = mode
    try:
        # inference mode: dispatch then sees conv2d / linear / layer_norm / sdpa undecomposed,
        # as fvcore's trace does (see the module docstring)
        with torch.inference_mode():
            x = x.clone()
            mode.mark_input(x)
            with mode:
                model(x)
    except Exception as exc:
        raise _describe_failure("ptflops", model, x, exc) from exc
    tally.total = int(mode.complexity)
    tally.by_family = Counter({k: v for k, v in tally.by_family.items() if v})
    return tally


def _data_path_parameters(model: nn.Module, used_storages: set[int]) -> int:
    """Parameter elements whose storage (after the forward) fed the data path, directly or through
    weights-only work; a training branch that only feeds a fused copy is left out."""
    total = 0
    for p in model.parameters():
        key = _storage_key(p)
        if key is not None and key in used_storages:
            total += p.numel()
    return total

