"""Operator cost rules shared by the two MAC counters (fvcore and ptflops' aten backend).

Convention (fvcore, NTIRE Efficient SR): one multiply-accumulate counts as one, bias additions,
element-wise operations, activations, reductions and data movement count zero. Every operator that
can occur in a model is either

* priced by a rule in ``OP_RULES`` (convolutions, matrix products, norms, resampling, attention,
  FFTs, the selective scan), or
* declared free in ``ZERO_COST_OPS`` (the one documented list of operators the convention does not
  count), or
* reported as unsupported: a new matmul-like operator is never silently priced at zero.

A rule sees the call the same way from both counters: every tensor argument as its shape (a
``TensorShape``), lists as lists, other arguments as plain values (``None`` where fvcore's trace
holds a value that is not a constant), and the outputs as shapes. The rules are pure functions of
shapes, so the MAC count does not depend on the device, dtype or data (MoE routing is data
dependent: the counters count the one input they are given).

fvcore 0.1.5 has its own handlers for ``_convolution``, ``linear``, ``addmm``, ``mm``, ``bmm``,
``matmul``, ``einsum``, the norms, nearest/bilinear up-sampling, ``adaptive_avg_pool2d`` and
``grid_sampler``. ``counting.py`` keeps fvcore's handlers for convolutions, linear layers,
``bmm``, batch norm, resampling and pooling, so totals stay comparable with NTIRE numbers; it
replaces ``matmul``/``mm`` and ``einsum`` (see ``matmul_macs`` and ``einsum_macs`` for why) and the
norms (fvcore's formula, without its 2-5-D assertion). The rules here re-state fvcore's formulas for
ptflops, and the tests check that the two implementations agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FAMILIES",
    "OP_RULES",
    "ZERO_COST_OPS",
    "ZERO_COST_OPS_BY_CATEGORY",
    "OpRule",
    "TensorShape",
    "conv_macs",
    "einsum_macs",
    "fft_macs",
    "matmul_macs",
    "sdpa_macs",
]


class TensorShape(tuple):
    """The shape of a tensor argument (a tuple subclass, so rules can tell tensors from int lists)."""

    __slots__ = ()


Rule = Callable[[Sequence[Any], Sequence[Any]], int]


@dataclass(frozen=True)
class OpRule:
    """How to price one operator: its by-operator bucket and its MAC formula."""

    family: str  # bucket in ``MacCount.by_operator``: the same for both counters
    macs: Rule  # (args, outputs) -> MACs, args/outputs as described in the module docstring


FAMILIES = ("conv", "linear", "matmul", "norm", "upsample", "pool", "grid_sample", "attention", "fft", "selective_scan")


# ---------------------------------------------------------------------------------------------
# helpers


def _prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


def _numel(shape: Sequence[int] | None) -> int:
    if shape is None:
        raise ValueError("a cost rule needs a tensor shape that the trace did not record")
    return _prod(shape)


def _arg(args: Sequence[Any], index: int, default: Any = None) -> Any:
    """Positional argument ``index`` or ``default``: dispatch drops trailing default arguments."""
    return args[index] if len(args) > index else default


def _is_tensor(value: Any) -> bool:
    return isinstance(value, TensorShape)


# ---------------------------------------------------------------------------------------------
# convolution, products


def conv_macs(x: Sequence[int], w: Sequence[int], out: Sequence[int], transposed: bool) -> int:
    """``batch * prod(weight) * prod(spatial)``: fvcore's rule, bias ignored.

    The weight ``(C_out, C_in / groups, k...)`` already divides by the groups, so depthwise and
    grouped convs are exact; ``spatial`` is the output's for a conv and the input's for a
    transposed conv (every input pixel scatters one kernel).
    """
    spatial = (x if transposed else out)[2:]
    return int(x[0]) * _prod(w) * _prod(spatial)


def _conv_rule(transposed: bool | int) -> Rule:
    """``transposed``: a constant, or the index of the argument that holds the flag."""

    def rule(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        flag = bool(_arg(args, transposed, False)) if not isinstance(transposed, bool) else transposed
        return conv_macs(args[0], args[1], outputs[0], flag)

    return rule


def matmul_macs(a: Sequence[int], b: Sequence[int]) -> int:
    """``torch.matmul`` with broadcasting: ``prod(batch) * m * k * n``.

    fvcore's own ``matmul`` rule is ``numel(a) * n``: the same number whenever ``a`` carries the
    batch dimensions, but short by the batch factor for ``(m, k) @ (b, k, n)`` and an error for
    vectors. This rule covers both and is used by both counters.
    """
    a_shape, b_shape = list(a), list(b)
    if len(a_shape) == 1:
        a_shape = [1, *a_shape]
    if len(b_shape) == 1:
        b_shape = [*b_shape, 1]
    m, k = a_shape[-2:]
    n = b_shape[-1]
    batch = np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    return _prod(batch) * int(m) * int(k) * int(n)


def _matmul_rule(first: int) -> Rule:
    def rule(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        return matmul_macs(args[first], args[first + 1])

    return rule


def _linear(args: Sequence[Any], outputs: Sequence[Any]) -> int:
    # fvcore: numel(input) * out_features (bias ignored)
    return _numel(args[0]) * int(args[1][0])


def _addmm(args: Sequence[Any], outputs: Sequence[Any]) -> int:
    # (bias, m1, m2): fvcore counts m1 @ m2 only; ptflops' own rule adds the bias, we do not
    m1, m2 = args[1], args[2]
    return int(m1[0]) * int(m1[1]) * int(m2[1])


def _bmm_like(first: int) -> Rule:
    def rule(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        a, b = args[first], args[first + 1]
        return int(a[0]) * int(a[1]) * int(a[2]) * int(b[2])

    return rule


def _dot(args: Sequence[Any], outputs: Sequence[Any]) -> int:
    return int(args[0][0])


def einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """Exact MACs of ``torch.einsum`` along numpy's optimal pairwise contraction path.

    Each pairwise contraction costs the product of the sizes of every index it touches (one MAC
    per output element per summed combination); single-operand steps (traces, sums, transposes)
    cost nothing, like reductions elsewhere. fvcore's own rule reads numpy's printed report,
    which rounds to four significant digits; this one is exact and is used by both counters.
    """
    lhs, rhs = _explicit_einsum(equation.replace(" ", ""), shapes)
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum equation {equation!r} has {len(terms)} operands, got {len(shapes)} shapes")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        if len(term) != len(shape):
            raise ValueError(f"einsum operand {term!r} does not match shape {tuple(shape)}")
        for letter, size in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), int(size))  # broadcasting: 1 vs n
    if len(terms) == 1:
        return 0
    # zero-stride arrays: numpy only needs the shapes to plan the path
    views = [np.broadcast_to(np.int8(0), tuple(int(v) for v in s)) for s in shapes]
    path = np.einsum_path(f"{lhs}->{rhs}", *views, optimize="optimal")[0]
    operands = list(terms)
    macs = 0
    for step in path[1:]:
        picked = [operands[i] for i in step]
        for i in sorted(step, reverse=True):
            del operands[i]
        touched = set("".join(picked))
        if len(picked) >= 2:
            macs += _prod(sizes[c] for c in touched)
        kept = touched & (set("".join(operands)) | set(rhs))
        operands.append("".join(sorted(kept)))
    return macs


def _explicit_einsum(equation: str, shapes: Sequence[Sequence[int]]) -> tuple[str, str]:
    """(inputs, output) with ``...`` spelled out as fresh letters and the implicit output made explicit."""
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    widths = [len(s) - (len(t) - 3) for t, s in zip(terms, shapes) if "..." in t]
    block = "".join(fresh[: max(widths, default=0)])
    # broadcast dimensions align on the right, so each operand takes the last letters of the block
    terms = [
        t.replace("...", block[len(block) - (len(s) - (len(t) - 3)) :]) if "..." in t else t
        for t, s in zip(terms, shapes)
    ]
    if arrow:
        rhs = rhs.replace("...", block)
    else:  # numpy / torch: broadcast dimensions first, then the letters that occur once, sorted
        letters = "".join(terms)
        rhs = block + "".join(sorted(c for c in set(letters) - set(block) if letters.count(c) == 1))
    return ",".join(terms), rhs


def _einsum(args: Sequence[Any], outputs: Sequence[Any]) -> int:
    return einsum_macs(args[0], args[1])


# ---------------------------------------------------------------------------------------------
# norms (fvcore's formulas: 5 per element with an affine weight, 4 without; eval batch norm 2 / 1)


def _norm_rule(affine_index: int) -> Rule:
    def rule(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        return _numel(args[0]) * (5 if _is_tensor(_arg(args, affine_index)) else 4)

    return rule


def _batch_norm_rule(weight_index: int, training_index: int | None) -> Rule:
    """fvcore: training mode prices like a norm (5 / 4), eval mode 2 per element (1 without affine)."""

    def rule(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        training = bool(_arg(args, training_index, False)) if training_index is not None else False
        affine = _is_tensor(_arg(args, weight_index))
        if training:
            return _numel(args[0]) * (5 if affine else 4)
        return _numel(args[0]) * (2 if affine else 1)

    return rule


# ---------------------------------------------------------------------------------------------
# resampling, pooling


def _per_output(taps: int) -> Rule:
    """``taps`` MACs per output element (fvcore: nearest 1, bilinear 4)."""

    def rule(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        return taps * _numel(outputs[0])

    return rule


def _per_input(args: Sequence[Any], outputs: Sequence[Any]) -> int:
    # fvcore's adaptive_avg_pool2d: one per input element
    return _numel(args[0])


# ---------------------------------------------------------------------------------------------
# attention


def sdpa_macs(q: Sequence[int], k: Sequence[int], v: Sequence[int]) -> int:
    """Scaled dot-product attention: ``Q K^T`` plus ``P V``.

    ``prod(batch) * L * S * (E + E_v)`` for q ``(..., L, E)``, k ``(..., S, E)``, v ``(..., S, E_v)``;
    exactly the two matmuls of the math path, so fused kernels and the reference count the same.
    The scale, the additive mask and the softmax are element-wise (free); a causal mask is not
    discounted (kernels skip about half, the convention counts the dense product).
    """
    return _prod(q[:-2]) * int(q[-2]) * int(k[-2]) * (int(q[-1]) + int(v[-1]))


def _sdpa(args: Sequence[Any], outputs: Sequence[Any]) -> int:
    return sdpa_macs(args[0], args[1], args[2])


# ---------------------------------------------------------------------------------------------
# FFT


def fft_macs(signal_points: int, batch: int, real: bool) -> int:
    """FFT cost: ``2.5 N log2 N`` MACs per complex transform of N points, half for a real one.

    The classic radix-2 Cooley-Tukey count is ``5 N log2 N`` real floating-point operations per
    complex transform (the figure FFTW's benchFFT uses to turn times into MFLOPS), and half of that,
    ``2.5 N log2 N``, for real-input / real-output transforms. One MAC is two flops, hence
    ``2.5`` and ``1.25``. A multi-dimensional transform of ``N = n1 * n2`` points costs the same
    formula (the row-column algorithm sums ``log2 n1 + log2 n2``). Rounded to an integer.
    """
    if signal_points <= 1:
        return 0
    per_transform = (1.25 if real else 2.5) * signal_points * math.log2(signal_points)
    return round(batch * per_transform)


def _fft_dims(ndim: int, dim: Any, s: Any, default: str) -> list[int]:
    """Transformed dimensions of a ``torch.fft`` call (``default``: '1', '2' or 'n')."""
    if isinstance(dim, int):
        dims = [dim]
    elif isinstance(dim, (list, tuple)) and dim and all(isinstance(d, int) for d in dim):
        dims = list(dim)
    elif default == "1":
        dims = [-1]
    elif default == "2":
        dims = [-2, -1]
    elif isinstance(s, (list, tuple)) and s:
        dims = list(range(-len(s), 0))
    else:
        dims = list(range(ndim))
    return [d % ndim for d in dims]


def _signal(shape: Sequence[int], dims: Sequence[int], s: Any) -> tuple[int, int]:
    """(points per transform, number of transforms) for ``shape`` transformed over ``dims``.

    ``s`` (when a constant list or int) overrides the transformed sizes, as ``torch.fft`` pads or
    trims the signal to it.
    """
    sizes = [int(shape[d]) for d in dims]
    if isinstance(s, int):
        s = [s]
    if isinstance(s, (list, tuple)) and len(s) == len(sizes) and all(isinstance(v, int) and v > 0 for v in s):
        sizes = [int(v) for v in s]
    points = _prod(sizes)
    batch = _prod(int(shape[d]) for d in range(len(shape)) if d not in dims)
    return points, batch


def _torch_fft_rule(kind: str, default_dims: str) -> Rule:
    """``torch.fft.*`` as fvcore's trace and inference-mode dispatch see it: (input, s|n, dim, norm).

    ``kind``: 'c2c' (fft/ifft*), 'r2c' (rfft*, ihfft*: the real side is the input) or 'c2r'
    (irfft*, hfft*: the real side is the output).
    """

    def rule(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        s, dim = _arg(args, 1), _arg(args, 2)
        if kind == "c2r":
            real_side = outputs[0]
            dims = _fft_dims(len(real_side), dim, s, default_dims)
            points, batch = _signal(real_side, dims, None)  # the output already has the signal sizes
        else:
            x = args[0]
            dims = _fft_dims(len(x), dim, s, default_dims)
            points, batch = _signal(x, dims, s)
        return fft_macs(points, batch, real=kind != "c2c")

    return rule


def _aten_fft_rule(kind: str) -> Rule:
    """The decomposed ``_fft_r2c(x, dim, ...)``, ``_fft_c2r(x, dim, ...)``, ``_fft_c2c(x, dim, ...)``."""

    def rule(args: Sequence[Any], outputs: Sequence[Any]) -> int:
        shape = outputs[0] if kind == "c2r" else args[0]
        dims = [d % len(shape) for d in args[1]]
        points, batch = _signal(shape, dims, None)
        return fft_macs(points, batch, real=kind != "c2c")

    return rule


# ---------------------------------------------------------------------------------------------
# selective scan (EHR-SR's custom operators: the scan, and the SSMB's cross-scan around it)


def _selective_scan(args: Sequence[Any], outputs: Sequence[Any]) -> int:
    # The MAC rule lives beside the implementation (one piece of code per idea); imported lazily
    # so that profiling plain modules never imports the EHR-SR blocks.
    from ehrsr.blocks.ssm import selective_scan_macs

    batch, d_inner, length = (int(v) for v in args[0])
    d_state = int(args[2][1])
    return selective_scan_macs(batch, d_inner, length, d_state)


def _cross_scan(args: Sequence[Any], outputs: Sequence[Any]) -> int:
    # the SSMB's whole cross-scan op: tokens (B, H, W, E), dt_weight (K, E, R), A (K, E, N)
    from ehrsr.blocks.ssm import cross_scan_macs

    batch, height, width, channels = (int(v) for v in args[0])
    directions, _, dt_rank = (int(v) for v in args[2])
    return cross_scan_macs(batch, channels, height * width, int(args[4][2]), directions, dt_rank)


# ---------------------------------------------------------------------------------------------
# the table


def _rules() -> dict[str, OpRule]:
    table: dict[str, OpRule] = {}

    def add(family: str, rule: Rule, *names: str) -> None:
        for name in names:
            table[name] = OpRule(family, rule)

    # convolutions: the traced form (_convolution), the inference-mode form (conv2d, ...) and the
    # backend kernels that appear when autograd decomposes them
    add("conv", _conv_rule(6), "aten::_convolution", "aten::convolution", "aten::convolution_overrideable")
    add(
        "conv",
        _conv_rule(False),
        "aten::conv1d",
        "aten::conv2d",
        "aten::conv3d",
        "aten::_convolution_mode",
        "aten::mkldnn_convolution",
        "aten::cudnn_convolution",
        "aten::miopen_convolution",
        "aten::_slow_conv2d_forward",
        "aten::thnn_conv2d",
        "aten::slow_conv3d",
        "aten::slow_conv_dilated2d",
        "aten::slow_conv_dilated3d",
        "aten::_nnpack_spatial_convolution",
        "aten::miopen_depthwise_convolution",
        "aten::_conv_depthwise2d",
        "aten::conv_depthwise3d",
    )
    add(
        "conv",
        _conv_rule(True),
        "aten::conv_transpose1d",
        "aten::conv_transpose2d",
        "aten::conv_transpose3d",
        "aten::cudnn_convolution_transpose",
        "aten::miopen_convolution_transpose",
        "aten::slow_conv_transpose2d",
        "aten::slow_conv_transpose3d",
    )
    # fully connected
    add("linear", _linear, "aten::linear")
    add("linear", _addmm, "aten::addmm", "aten::_addmm_activation")
    # matrix products
    add("matmul", _matmul_rule(0), "aten::matmul", "aten::mm", "aten::mv")
    add("matmul", _matmul_rule(1), "aten::addmv")
    add("matmul", _bmm_like(0), "aten::bmm")
    add("matmul", _bmm_like(1), "aten::baddbmm", "aten::addbmm")
    add("matmul", _dot, "aten::dot", "aten::vdot")
    add("matmul", _einsum, "aten::einsum")
    # norms
    add("norm", _norm_rule(2), "aten::layer_norm", "aten::native_layer_norm", "aten::group_norm")
    add("norm", _norm_rule(1), "aten::instance_norm", "aten::native_group_norm")
    add("norm", _batch_norm_rule(1, 5), "aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit")
    add("norm", _batch_norm_rule(1, 5), "aten::_batch_norm_impl_index", "aten::cudnn_batch_norm", "aten::miopen_batch_norm")
    add("norm", _batch_norm_rule(1, None), "aten::_native_batch_norm_legit_no_training")
    # resampling: taps per output element (fvcore: nearest 1, bilinear 4; the rest follow suit)
    add(
        "upsample",
        _per_output(1),
        "aten::upsample_nearest1d",
        "aten::upsample_nearest2d",
        "aten::upsample_nearest3d",
        "aten::_upsample_nearest_exact1d",
        "aten::_upsample_nearest_exact2d",
        "aten::_upsample_nearest_exact3d",
    )
    add("upsample", _per_output(2), "aten::upsample_linear1d")
    add("upsample", _per_output(4), "aten::upsample_bilinear2d", "aten::_upsample_bilinear2d_aa")
    add("upsample", _per_output(8), "aten::upsample_trilinear3d")
    add("upsample", _per_output(16), "aten::upsample_bicubic2d", "aten::_upsample_bicubic2d_aa")
    add("grid_sample", _per_output(4), "aten::grid_sampler", "aten::grid_sampler_2d", "aten::cudnn_grid_sampler")
    # adaptive average pooling: one per input element (fvcore)
    add(
        "pool",
        _per_input,
        "aten::adaptive_avg_pool1d",
        "aten::adaptive_avg_pool2d",
        "aten::_adaptive_avg_pool2d",
        "aten::adaptive_avg_pool3d",
        "aten::_adaptive_avg_pool3d",
        "aten::mkldnn_adaptive_avg_pool2d",
    )
    # attention: the public op and every fused kernel it may dispatch to
    add(
        "attention",
        _sdpa,
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_attention_math",
        "aten::_scaled_dot_product_attention_math_for_mps",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_fused_attention_overrideable",
    )
    # FFTs: torch.fft.* (traced and inference-mode forms) and the decomposed kernels
    add("fft", _torch_fft_rule("c2c", "1"), "aten::fft_fft", "aten::fft_ifft")
    add("fft", _torch_fft_rule("c2c", "2"), "aten::fft_fft2", "aten::fft_ifft2")
    add("fft", _torch_fft_rule("c2c", "n"), "aten::fft_fftn", "aten::fft_ifftn")
    add("fft", _torch_fft_rule("r2c", "1"), "aten::fft_rfft", "aten::fft_ihfft")
    add("fft", _torch_fft_rule("r2c", "2"), "aten::fft_rfft2", "aten::fft_ihfft2")
    add("fft", _torch_fft_rule("r2c", "n"), "aten::fft_rfftn", "aten::fft_ihfftn")
    add("fft", _torch_fft_rule("c2r", "1"), "aten::fft_irfft", "aten::fft_hfft")
    add("fft", _torch_fft_rule("c2r", "2"), "aten::fft_irfft2", "aten::fft_hfft2")
    add("fft", _torch_fft_rule("c2r", "n"), "aten::fft_irfftn", "aten::fft_hfftn")
    add("fft", _aten_fft_rule("r2c"), "aten::_fft_r2c")
    add("fft", _aten_fft_rule("c2r"), "aten::_fft_c2r")
    add("fft", _aten_fft_rule("c2c"), "aten::_fft_c2c")
    # EHR-SR's selective scan
    add("selective_scan", _selective_scan, "ehrsr::selective_scan")
    add("selective_scan", _cross_scan, "ehrsr::cross_scan")
    return table


OP_RULES: dict[str, OpRule] = _rules()
"""Priced operators by qualified name (``aten::conv2d``); both counters use these formulas."""


# ---------------------------------------------------------------------------------------------
# operators the convention prices at zero

ZERO_COST_OPS_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    # Element-wise arithmetic and math: NTIRE's fvcore totals leave them out, so do we.
    "elementwise": (
        "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "neg_", "abs",
        "pow", "pow_", "sqrt", "rsqrt", "exp", "exp_", "expm1", "log", "log_", "log1p", "log2",
        "reciprocal", "square", "sign", "floor", "floor_", "ceil", "round", "trunc", "frac",
        "remainder", "fmod", "floor_divide", "addcmul", "addcdiv", "lerp", "hypot", "atan2",
        "sin", "cos", "tan", "tanh", "tanh_", "erf", "erfinv", "clamp", "clamp_", "clamp_min",
        "clamp_min_", "clamp_max", "clamp_max_", "clip", "minimum", "maximum", "fmin", "fmax",
        "real", "imag", "view_as_real", "view_as_complex", "complex", "polar", "angle", "conj",
        "conj_physical", "_conj", "resolve_conj", "resolve_neg", "nan_to_num", "xlogy", "where",
        "masked_fill", "masked_fill_", "lerp_", "fill_", "zero_", "copy_", "type_as",
        "__and__", "__or__", "__xor__", "__iand__", "__ior__", "bitwise_and", "bitwise_or",
        "bitwise_not", "bitwise_xor", "logical_and", "logical_or", "logical_not", "logical_xor",
    ),
    # Activations and gates (including softmax, whose exp / sum / divide are element-wise).
    "activation": (
        "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "_prelu_kernel", "rrelu",
        "elu", "elu_", "selu", "celu", "gelu", "gelu_", "silu", "silu_", "mish", "mish_",
        "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "hardswish", "hardswish_",
        "hardtanh", "hardtanh_", "softplus", "softsign", "logsigmoid", "glu", "threshold",
        "threshold_", "softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax",
        "dropout", "dropout_", "feature_dropout", "alpha_dropout", "native_dropout",
    ),
    # Reductions and statistics: fvcore does not count them (a mean/var LayerNorm written by hand
    # therefore costs 0 while F.layer_norm costs 5 per element: price norms through F.layer_norm).
    "reduction": (
        "sum", "mean", "var", "std", "var_mean", "std_mean", "prod", "amax", "amin", "max", "min",
        "aminmax", "argmax", "argmin", "norm", "linalg_vector_norm", "frobenius_norm", "logsumexp",
        "cumsum", "cumsum_", "cumprod", "cummax", "cummin", "all", "any", "count_nonzero",
        "topk", "sort", "argsort", "kthvalue", "median", "mode",
    ),
    # Pooling windows: max / average pooling is a reduction (fvcore counts only adaptive average).
    "pooling": (
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "mkldnn_max_pool2d",
        "max_unpool2d", "lp_pool2d",
    ),
    # Shape, layout and data movement: no arithmetic.
    "data_movement": (
        "view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "unflatten", "squeeze",
        "squeeze_", "unsqueeze", "unsqueeze_", "permute", "transpose", "transpose_", "t", "numpy_T",
        "mT", "contiguous", "clone", "detach", "detach_", "alias", "lift_fresh", "lift_fresh_copy",
        "expand", "expand_as", "broadcast_to", "repeat", "repeat_interleave", "tile", "flip",
        "roll", "rot90", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "chunk",
        "split", "split_with_sizes", "unsafe_split", "unsafe_chunk", "tensor_split", "unbind",
        "narrow", "slice", "select", "as_strided", "as_strided_", "movedim", "moveaxis",
        "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
        "unfold", "im2col", "col2im", "fold", "pad", "constant_pad_nd", "reflection_pad1d",
        "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
        "replication_pad3d", "circular_pad1d", "circular_pad2d", "_pad_circular", "_pad_enum",
        "to", "_to_copy", "type", "float", "half", "bfloat16", "double", "int", "long", "bool",
        "_autocast_to_reduced_precision", "_autocast_to_full_precision", "contiguous_format",
        "view_as", "resize_", "set_", "_copy_from", "_copy_from_and_resize", "to_dense",
        "to_mkldnn", "_to_dense", "diagonal", "diag_embed", "tril", "triu", "_unsafe_index",
    ),
    # Indexing, routing and scatter / gather (MoE dispatch, window bias tables): data movement.
    "indexing": (
        "index", "index_put", "index_put_", "_index_put_impl_", "index_select", "index_add",
        "index_add_", "index_copy", "index_copy_", "index_fill", "index_fill_", "gather",
        "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
        "masked_select", "masked_scatter", "masked_scatter_", "take", "take_along_dim",
        "nonzero", "nonzero_numpy", "nonzero_static", "argwhere", "one_hot",
        "embedding", "bucketize", "searchsorted", "unique_dim", "_unique2", "unique_consecutive",
    ),
    # Comparisons and tests.
    "comparison": (
        "eq", "eq_", "ne", "ne_", "lt", "lt_", "le", "le_", "gt", "gt_", "ge", "ge_", "isnan",
        "isinf", "isfinite", "isclose", "allclose", "equal", "is_nonzero", "sign_", "signbit",
        "_assert_async", "_local_scalar_dense", "item",
    ),
    # Tensor creation, random numbers, metadata (no arithmetic on data).
    "creation_and_metadata": (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros",
        "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like",
        "new_full", "scalar_tensor", "tensor", "arange", "linspace", "logspace", "eye",
        "meshgrid", "fft_fftfreq", "fft_rfftfreq", "fft_fftshift", "fft_ifftshift", "rand",
        "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
        "bernoulli_", "normal", "normal_", "uniform_", "exponential_", "multinomial",
        "size", "sym_size", "numel", "sym_numel", "dim", "stride", "sym_stride", "is_contiguous",
        "promote_types", "result_type", "can_cast", "is_floating_point", "is_complex",
        "Int", "Float", "Bool", "ScalarImplicit", "IntImplicit", "FloatImplicit", "NumToTensor",
        "_shape_as_tensor", "_reshape_from_tensor", "_has_compatible_shallow_copy_type", "record_stream", "_record_function_enter",
        "_record_function_enter_new", "_record_function_exit",
    ),
}
"""Operators priced at zero, by reason. ``ZERO_COST_OPS`` is the flat set of qualified names."""


def _zero_cost_set() -> frozenset[str]:
    names = {f"aten::{op}" for ops in ZERO_COST_OPS_BY_CATEGORY.values() for op in ops}
    overlap = names & set(OP_RULES)
    if overlap:  # one list per idea: a priced op must never also be declared free
        raise RuntimeError(f"operators both priced and free: {sorted(overlap)}")
    return frozenset(names)


ZERO_COST_OPS: frozenset[str] = _zero_cost_set()
