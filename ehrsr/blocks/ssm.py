"""SSMB: a Mamba-style selective-scan block over flattened image tokens.

The scan is Mamba's S6 recurrence (Gu & Dao 2023) with input-dependent ``delta``, ``B``, ``C``::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t

with ``A = -exp(A_log)`` and ``delta = softplus(dt_proj(dt))``. Images are scanned in up to four
orders (row-major / column-major, forward / backward) and the results summed, as VMamba's
cross-scan and MambaIR do for 2D data: the *cross-scan* (``cross_scan``) is the per-direction dt
projection and softplus, the scans of all directions, the ``D`` skip and the sum back in
row-major order.

Implementations of the same computation:

* ``selective_scan_sequential``: the plain loop over ``t``, the reference the others are tested
  against (invariant 6 in ``docs/architecture.md``); ``cross_scan_reference`` builds the
  cross-scan around any of the scans below from PyTorch ops (the PyTorch reference and fallback).
* ``selective_scan_parallel``: a chunked scan, parallel across chunks of about ``sqrt(L / 4)``
  steps: ``2 sqrt(L)``-ish vectorised steps instead of ``L`` small ones, numerically the same
  products of decays in ``(0, 1]`` as the loop (a log-space cumsum can overflow), and no
  ``(b, d, l, n)`` tensor in memory. It is the custom operator ``torch.ops.ehrsr.selective_scan``.
* the whole cross-scan as the custom operator ``torch.ops.ehrsr.cross_scan``: on the CPU the
  compiled kernel of ``scan_kernel`` (forward and reverse-time adjoint in one pass, reading every
  input where it lies; ``SCAN_KERNEL``) when it can be built, else ``cross_scan_reference`` over
  ``torch.ops.ehrsr.selective_scan`` with a backward that recomputes it under autograd.
* ``mamba_ssm``'s fused CUDA kernel ``selective_scan_fn`` inside ``cross_scan_reference`` when that
  package is importable and the tensors are on CUDA (imported lazily, so CPU-only installs work).
* ``selective_scan_exportable``: the recurrence as one ``torch`` scan higher-order op, which the
  dynamo ONNX exporter turns into one ONNX ``Scan`` node with a dynamic sequence length.

MAC counters see one op with known shapes (``cross_scan_macs``, ``selective_scan_macs`` give the
costs) instead of a cloud of element-wise ops.

All scans compute in float32 (float64 stays float64): the exponentials of the recurrence lose
too much precision in half types, so the block casts explicitly and casts the result back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.blocks import scan_kernel
from ehrsr.blocks.layers import DropPath, LayerNorm2d

__all__ = [
    "SSMBlock",
    "cross_scan",
    "cross_scan_macs",
    "cross_scan_reference",
    "mamba_kernel",
    "selective_scan",
    "selective_scan_exportable",
    "selective_scan_macs",
    "selective_scan_parallel",
    "selective_scan_sequential",
]

ScanImpl = Literal["auto", "parallel", "sequential"]


def selective_scan_macs(batch: int, d_inner: int, length: int, d_state: int) -> int:
    """Multiply-accumulates of one selective scan, derived from the recurrence above.

    Per (batch, channel, step, state): ``delta * A`` (1), ``(delta * u) * B`` (1), the state update
    ``a * h + b`` (1 MAC) and the output ``C * h`` summed over states (1 MAC): 4 per element.
    Per (batch, channel, step): ``delta * u`` (1) and the skip ``D * u`` (1): 2 per element.
    The exponential is not counted, as counters do not count activations.
    """
    return 4 * batch * d_inner * length * d_state + 2 * batch * d_inner * length


def cross_scan_macs(batch: int, channels: int, length: int, d_state: int, directions: int, dt_rank: int) -> int:
    """Multiply-accumulates of one cross-scan (``cross_scan``): per direction, the dt projection
    (``dt_rank`` per channel and token) and the selective scan of every channel."""
    return directions * (selective_scan_macs(batch, channels, length, d_state) + batch * channels * length * dt_rank)


def _check_shapes(u, delta, A, B, C, D) -> None:
    b, d, length = u.shape
    n = A.shape[1]
    groups = B.shape[1] if B.dim() == 4 else 1
    bc_shape = (b, groups, n, length) if B.dim() == 4 else (b, n, length)
    if (
        delta.shape != u.shape
        or A.shape != (d, n)
        or B.shape != bc_shape
        or C.shape != B.shape
        or D.shape != (d,)
        or d % groups
    ):
        raise ValueError(
            "selective_scan expects u, delta (b, d, l), A (d, n), B, C (b, n, l) or (b, g, n, l) with g "
            f"dividing d, D (d,); got u {tuple(u.shape)}, delta {tuple(delta.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}, D {tuple(D.shape)}"
        )


def _grouped(B: torch.Tensor) -> torch.Tensor:
    """``B`` / ``C`` as ``(b, g, n, l)``: one group (shared by all channels) when given ``(b, n, l)``."""
    return B if B.dim() == 4 else B[:, None]


def selective_scan_sequential(u, delta, A, B, C, D) -> torch.Tensor:
    """Reference: the recurrence as a loop over the sequence. Shapes as in the mamba_ssm kernel.

    ``B`` and ``C`` are ``(b, n, l)`` (shared by all channels) or ``(b, g, n, l)``: channel group
    ``i`` (``d / g`` consecutive channels) uses ``B[:, i]``, as VMamba stacks its scan directions.
    """
    _check_shapes(u, delta, A, B, C, D)
    b, d, length = u.shape
    B, C = _grouped(B), _grouped(C)
    per_group = d // B.shape[1]
    B = B.repeat_interleave(per_group, dim=1)  # (b, d, n, l): the reference may spend memory
    C = C.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(b, d, A.shape[1])  # (b, d, n)
    ys = []
    for t in range(length):
        a_t = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        b_t = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, :, :, t]  # (b, d, n)
        h = a_t * h + b_t
        ys.append((h * C[:, :, :, t]).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    return y + D[None, :, None] * u


def default_chunk(length: int) -> int:
    """Chunk length balancing the two loops of the chunked scan (about ``sqrt(L / 4)``, a power of 2).

    The scan runs ``2 * chunk`` vectorised steps inside chunks and ``length / chunk`` cheap carry
    steps across them; this choice minimises the number of small kernels (measured on CPU).
    """
    return max(4, 2 ** round(math.log2(max(1.0, math.sqrt(length / 4)))))


def selective_scan_parallel(u, delta, A, B, C, D, chunk: int | None = None) -> torch.Tensor:
    """Chunked scan: parallel across chunks, sequential inside them; equals the reference loop.

    The sequence is cut into ``n_chunks`` chunks of ``chunk`` steps. Pass 1 runs the recurrence
    from a zero state in every chunk at once (one vectorised step per position in the chunk) and
    keeps each chunk's cumulative decay. A short loop then carries the true start state from chunk
    to chunk, and pass 2 adds the start state's decayed contribution ``C_t . (prod a) h_start``.
    Every factor is a decay in ``(0, 1]``, so nothing can overflow (unlike a log-space cumsum),
    and no ``(b, d, l, n)`` tensor is ever materialised: memory stays ``O(b d l + b d n l / chunk)``.
    """
    _check_shapes(u, delta, A, B, C, D)
    bsz, d, length = u.shape
    n = A.shape[1]
    B, C = _grouped(B), _grouped(C)
    groups = B.shape[1]
    chunk = max(1, min(chunk or default_chunk(length), length))
    n_chunks = math.ceil(length / chunk)
    pad = n_chunks * chunk - length
    if pad:
        # padded steps have delta = 0: decay exp(0) = 1 and input 0, so they carry the state unchanged
        u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
        B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    # channels as (groups, channels per group): B and C broadcast over the second
    lead = (bsz, groups, d // groups)
    delta_c = delta.view(*lead, n_chunks, chunk)
    du = (delta * u).view(*lead, n_chunks, chunk)
    b_c = B.view(bsz, groups, n, n_chunks, chunk).permute(0, 1, 3, 4, 2)[:, :, None]  # (b, g, 1, c, T, n)
    c_c = C.view(bsz, groups, n, n_chunks, chunk).permute(0, 1, 3, 4, 2)[:, :, None]  # (b, g, 1, c, T, n)
    a_b = A.view(groups, d // groups, 1, n)  # (g, d/g, 1, n)

    h = u.new_zeros(*lead, n_chunks, n)
    decay = u.new_ones(*lead, n_chunks, n)
    ys = []
    for t in range(chunk):  # pass 1: zero-state recurrence inside every chunk at once
        a_t = torch.exp(delta_c[..., t, None] * a_b)  # (b, g, d/g, c, n)
        h = a_t * h + du[..., t, None] * b_c[..., t, :]
        decay = decay * a_t
        ys.append((h * c_c[..., t, :]).sum(-1))  # (b, g, d/g, c)
    if n_chunks > 1:
        starts = [h.new_zeros(*lead, n)]
        for c in range(n_chunks - 1):  # carry: start_{c+1} = decay_c * start_c + h_end_c
            starts.append(decay[..., c, :] * starts[-1] + h[..., c, :])
        g = torch.stack(starts, dim=-2)  # (b, g, d/g, c, n)
        for t in range(chunk):  # pass 2: the start state decays through the chunk
            g = torch.exp(delta_c[..., t, None] * a_b) * g
            ys[t] = ys[t] + (g * c_c[..., t, :]).sum(-1)
    y = torch.stack(ys, dim=-1).reshape(bsz, d, n_chunks * chunk)[:, :, :length]  # (b, d, l)
    return y + D[None, :, None] * u[:, :, :length]


# ---------------------------------------------------------------------------------------------
# The custom op: a materialised chunked scan and its hand-written backward (reverse-time adjoint)
#
# Tensors below are "time-major within chunks": (T, b, g, d/g, c[, n]) for T steps per chunk and
# c chunks, so that step t of every chunk is one contiguous slice and each step of the loops is a
# single fused ``addcmul`` kernel.


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """``(b, g, d/g, L)`` -> time-major view ``(T, b, g, d/g, c)``."""
    return x.unflatten(-1, (n_chunks, chunk)).movedim(-1, 0)


def _bc_to_chunks(B: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """``(b, g, n, L)`` -> time-major view ``(T, b, g, 1, c, n)`` broadcasting over channels."""
    return B.unflatten(-1, (n_chunks, chunk)).permute(4, 0, 1, 3, 2)[:, :, :, None]


def _from_chunks(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_to_chunks`` (also for ``(T, b, g, c, n)`` -> ``(b, g, n, L)`` via the caller)."""
    return x.movedim(0, -1).flatten(-2)


def _chunked_states(delta_t: torch.Tensor, A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Every state of ``h_t = exp(delta_t A) h_{t-1} + x_t`` from ``h = 0``, overwriting ``x``.

    ``delta_t`` is ``(T, b, g, d/g, c)``, ``A`` ``(g, d/g, n)`` and ``x`` ``(T, b, g, d/g, c, n)``
    contiguous. Pass 1 runs the recurrence inside every chunk at once from a zero state, a short
    loop carries the true start states across chunks with the chunk decays, and one bulk update
    adds each start state's decay ``exp(A * cumsum(delta))``: exponents are <= 0, so nothing can
    overflow (only dividing by a cumulative decay could, which this never does).
    """
    chunk, n_chunks = x.shape[0], x.shape[-2]
    a_exp = A[:, :, None, :]  # (g, d/g, 1, n) against (..., c, n)
    decay = torch.exp(delta_t[..., None] * a_exp)  # (T, b, g, d/g, c, n)
    for t in range(1, chunk):
        torch.addcmul(x[t], decay[t], x[t - 1], out=x[t])
    if n_chunks == 1:
        return x
    cum_delta = delta_t.cumsum(0)
    chunk_decay = torch.exp(cum_delta[-1][..., None] * a_exp).movedim(-2, 0)  # (c, b, g, d/g, n)
    ends = x[-1].movedim(-2, 0)
    starts = torch.zeros_like(chunk_decay)
    for c in range(1, n_chunks):  # start_c = decay_{c-1} * start_{c-1} + h_end_{c-1}
        torch.addcmul(ends[c - 1], chunk_decay[c - 1], starts[c - 1], out=starts[c])
    torch.exp(cum_delta[..., None] * a_exp, out=decay)  # decay of the start state up to step t
    return x.addcmul_(decay, starts.movedim(0, -2))


class _ScanShapes:
    """Padded, grouped views shared by the forward and backward of the op."""

    def __init__(self, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
        self.bsz, self.d, self.length = u.shape
        self.n = A.shape[1]
        self.groups = B.shape[1] if B.dim() == 4 else 1
        self.chunk = max(1, min(default_chunk(self.length), self.length))
        self.n_chunks = math.ceil(self.length / self.chunk)
        self.pad = self.n_chunks * self.chunk - self.length

    def seq(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, d, l)`` -> padded time-major ``(T, b, g, d/g, c)``."""
        x = F.pad(x, (0, self.pad)) if self.pad else x
        return _to_chunks(x.reshape(self.bsz, self.groups, -1, x.shape[-1]), self.n_chunks, self.chunk)

    def bc(self, B: torch.Tensor) -> torch.Tensor:
        """``(b, [g,] n, l)`` -> padded time-major ``(T, b, g, 1, c, n)``."""
        B = _grouped(B)
        return _bc_to_chunks(F.pad(B, (0, self.pad)) if self.pad else B, self.n_chunks, self.chunk)

    def unseq(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, b, g, d/g, c)`` -> ``(b, d, l)``."""
        return _from_chunks(x).reshape(self.bsz, self.d, -1)[..., : self.length]

    def unbc(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(T, b, g, c, n)`` -> the layout of ``like`` (``(b, [g,] n, l)``)."""
        x = x.permute(1, 2, 4, 3, 0).flatten(-2)[..., : self.length]  # (b, g, n, l)
        return x.reshape(like.shape)


# Channels are processed in slabs of at most this many (b, d/g, l, n) elements, so the materialised
# states stay bounded (256 MiB per float32 buffer) on large images; training patches fit one slab.
SLAB_ELEMENTS = 2**26


def _slabs(shapes: _ScanShapes) -> list[slice]:
    """Slices of the per-group channel axis, each at most ``SLAB_ELEMENTS`` state elements."""
    per_group = shapes.d // shapes.groups
    per_channel = shapes.bsz * shapes.groups * shapes.n_chunks * shapes.chunk * shapes.n
    step = max(1, SLAB_ELEMENTS // per_channel)
    return [slice(i, min(i + step, per_group)) for i in range(0, per_group, step)]


# How the op's backward computes its gradients. "recompute" (default): run the chunked forward
# again under autograd and differentiate it. "adjoint": the hand-written reverse-time adjoint scan
# below, over materialised states. Measured on a quiet 2-core CPU (benchmarks/blocks.py and the
# op alone, interleaved), the adjoint was 1.1-2.0x *slower* than the recompute (for example
# fwd+bwd 1222 vs 613 ms at 64x64, batch 8, 4 directions): it streams (b, d, l, n) tensors through
# memory several times, while the recompute's autograd graph is a few large element-wise kernels
# per step. On a machine loaded 10-20x over the order can come out reversed; the quiet run decides.
SCAN_BACKWARD: Literal["recompute", "adjoint"] = "recompute"

# On the CPU (float32 / float64) the cross-scan op runs the compiled kernel of ``scan_kernel`` when
# it can be built ("auto"): the whole cross-scan, forward and adjoint backward, in one pass
# (benchmarks/blocks.py). "torch" keeps the PyTorch forms (cross_scan_reference) everywhere.
SCAN_KERNEL: Literal["auto", "torch"] = "auto"


def _scan_op_forward(u, delta, A, B, C, D) -> torch.Tensor:
    """The op's forward: the chunked scan (no ``(b, d, l, n)`` tensor; faster than the materialised
    form below on CPU in every measured case: 100 vs 309 ms at 64x64, batch 8, 2 directions)."""
    return selective_scan_parallel(u, delta, A, B, C, D)


def _materialised_forward(u, delta, A, B, C, D) -> torch.Tensor:
    """The scan over materialised states (``_chunked_states``), as the adjoint sees it."""
    shapes = _ScanShapes(u, A, B)
    a_g = A.view(shapes.groups, -1, shapes.n)
    delta_t, du_t = shapes.seq(delta), shapes.seq(delta * u)
    b_t, c_t = shapes.bc(B), shapes.bc(C)
    y = delta_t.new_empty(delta_t.shape)  # (T, b, g, d/g, c)
    for sl in _slabs(shapes):
        h = _chunked_states(delta_t[:, :, :, sl], a_g[:, sl], du_t[:, :, :, sl, :, None] * b_t)
        y[:, :, :, sl] = torch.linalg.vecdot(h, c_t)
    return shapes.unseq(y) + D[None, :, None] * u


def _scan_op_backward(u, delta, A, B, C, D, grad_y):
    """Gradients of the scan by its adjoint: ``lam_t = C_t gy_t + a_{t+1} lam_{t+1}`` (a reverse scan).

    With the states ``h_t`` (recomputed in bulk, without autograd) and ``lam_t``: ``dC_t = sum_d gy h_t``,
    ``d(delta u)_t = lam_t . B_t``, ``dB_t = sum_d lam_t delta_t u_t``, and the decay's gradient
    ``G_t = lam_t * a_t h_{t-1} = lam_t * (h_t - delta_t u_t B_t)`` gives ``dA = sum G delta`` and
    ``d delta = G . A + u d(delta u)``.
    """
    shapes = _ScanShapes(u, A, B)
    a_g = A.view(shapes.groups, -1, shapes.n)
    delta_t, u_t, gy_t = shapes.seq(delta), shapes.seq(u), shapes.seq(grad_y)
    b_t = shapes.bc(B)
    du_t = delta_t * u_t
    # the adjoint is a forward scan of the reversed sequence whose decays are shifted by one step:
    # reversed step s uses a_{L-s}, and step 0 (decaying a zero state) gets delta = 0
    length = shapes.n_chunks * shapes.chunk
    delta_pad = F.pad(delta, (0, shapes.pad)) if shapes.pad else delta
    rev = _ScanShapes(u.new_empty(shapes.bsz, shapes.d, length), A, _grouped(C))
    delta_rev = rev.seq(F.pad(delta_pad.flip(-1)[..., :-1], (1, 0)))
    grad_rev = rev.seq(F.pad(grad_y, (0, shapes.pad)).flip(-1))
    c_rev = rev.bc(F.pad(_grouped(C), (0, shapes.pad)).flip(-1))

    grad_b = grad_c = None
    grad_a = torch.empty_like(a_g)
    grad_delta = torch.empty_like(delta_t)
    grad_du = torch.empty_like(delta_t)
    for sl in _slabs(shapes):
        h = _chunked_states(delta_t[:, :, :, sl], a_g[:, sl], du_t[:, :, :, sl, :, None] * b_t)
        lam = _chunked_states(delta_rev[:, :, :, sl], a_g[:, sl], grad_rev[:, :, :, sl, :, None] * c_rev)
        lam = lam.flip(0, -2)  # back to forward time: reversing both the steps and the chunks
        part_c = torch.einsum("tbgdc,tbgdcn->tbgcn", gy_t[:, :, :, sl], h)
        part_b = torch.einsum("tbgdcn,tbgdc->tbgcn", lam, du_t[:, :, :, sl])
        grad_c = part_c if grad_c is None else grad_c + part_c
        grad_b = part_b if grad_b is None else grad_b + part_b
        grad_du[:, :, :, sl] = torch.linalg.vecdot(lam, b_t)
        decay_grad = h.sub_(du_t[:, :, :, sl, :, None] * b_t).mul_(lam)  # G_t = lam_t * a_t h_{t-1}
        grad_a[:, sl] = torch.einsum("tbgdcn,tbgdc->gdn", decay_grad, delta_t[:, :, :, sl])
        grad_delta[:, :, :, sl] = torch.einsum("tbgdcn,gdn->tbgdc", decay_grad, a_g[:, sl])
    grad_delta += grad_du * u_t
    grad_u = shapes.unseq(grad_du * delta_t) + D[None, :, None] * grad_y
    grad_d = (grad_y * u).sum((0, 2))
    return (
        grad_u,
        shapes.unseq(grad_delta),
        grad_a.reshape(A.shape),
        shapes.unbc(grad_b, B),
        shapes.unbc(grad_c, C),
        grad_d,
    )


@torch.library.custom_op("ehrsr::selective_scan", mutates_args=())
def _selective_scan_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    _check_shapes(u, delta, A, B, C, D)
    return _scan_op_forward(u, delta, A, B, C, D)


@_selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D):
    return torch.empty_like(u)


def _selective_scan_setup(ctx, inputs, output) -> None:
    # only the inputs are kept: the backward recomputes the states in bulk (a few large kernels),
    # which costs less than keeping a (b, d, l, n) tensor alive from forward to backward
    ctx.save_for_backward(*inputs)


def _selective_scan_backward(ctx, grad_y):
    if SCAN_BACKWARD == "adjoint":
        return _scan_op_backward(*ctx.saved_tensors, grad_y.contiguous())
    inputs = [t.detach().requires_grad_(t.requires_grad or t.is_floating_point()) for t in ctx.saved_tensors]
    with torch.enable_grad():
        y = selective_scan_parallel(*inputs)
    return torch.autograd.grad(y, inputs, grad_y, allow_unused=True)


_selective_scan_op.register_autograd(_selective_scan_backward, setup_context=_selective_scan_setup)

_MAMBA_KERNEL: object | None = None


def mamba_kernel():
    """``mamba_ssm``'s ``selective_scan_fn`` or None; imported on first use only."""
    global _MAMBA_KERNEL
    if _MAMBA_KERNEL is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception:  # not installed, or built for another CUDA: fall back silently
            selective_scan_fn = False
        _MAMBA_KERNEL = selective_scan_fn
    return _MAMBA_KERNEL or None


def selective_scan(u, delta, A, B, C, D, impl: ScanImpl = "auto") -> torch.Tensor:
    """Dispatch: ``auto`` uses the CUDA kernel when available, else the parallel custom op."""
    if impl == "sequential":
        return selective_scan_sequential(u, delta, A, B, C, D)
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        # exporters do not know the custom op: give them the same scan as plain tensor ops
        return selective_scan_parallel(u, delta, A, B, C, D)
    if impl == "auto" and u.is_cuda:
        kernel = mamba_kernel()
        if kernel is not None:
            return kernel(u.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), D)
    if impl not in ("auto", "parallel"):
        raise ValueError(f"unknown scan implementation {impl!r}; use 'auto', 'parallel' or 'sequential'")
    return torch.ops.ehrsr.selective_scan(u, delta, A, B, C, D)


def selective_scan_exportable(u, delta, A, B, C, D) -> torch.Tensor:
    """The recurrence as one ``torch`` scan (a higher-order op), for exporters: the dynamo ONNX
    exporter turns it into one ONNX ``Scan`` node whose sequence length stays dynamic. The decays
    and inputs of every step are computed in bulk first, so each step is ``h = a h + b`` and
    ``y = <C, h>``. Shapes as ``selective_scan_sequential``; slow in eager mode (not used there)."""
    from torch._higher_order_ops.scan import scan  # torch's scan op: what the exporter translates

    _check_shapes(u, delta, A, B, C, D)
    bsz, d, _ = u.shape
    B, C = _grouped(B), _grouped(C)
    per_group = d // B.shape[1]
    # time-major (L, b, d, n): the scan runs over the first axis
    decay = torch.exp(delta.permute(2, 0, 1)[..., None] * A)
    drive = (delta * u).permute(2, 0, 1)[..., None] * B.permute(3, 0, 1, 2).repeat_interleave(per_group, dim=2)
    c_t = C.permute(3, 0, 1, 2).repeat_interleave(per_group, dim=2)

    def step(h, inputs):
        a_t, b_t, c = inputs
        h = a_t * h + b_t
        return h, (h * c).sum(-1)

    _, y = scan(step, u.new_zeros(bsz, d, A.shape[1]), (decay, drive, c_t))  # y: (L, b, d)
    return y.permute(1, 2, 0) + D[None, :, None] * u


def _to_scan_order(x: torch.Tensor, direction: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, L, C)`` in the token order of ``direction`` (0 row-major, 1 its
    reverse, 2 column-major, 3 its reverse): views and flips, no index tensors."""
    seq = (x if direction < 2 else x.transpose(1, 2)).flatten(1, 2)
    return seq.flip(1) if direction % 2 else seq


def _from_scan_order(seq: torch.Tensor, direction: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``_to_scan_order``: ``(B, L, C)`` -> ``(B, H, W, C)``."""
    seq = seq.flip(1) if direction % 2 else seq
    if direction < 2:
        return seq.unflatten(1, (height, width))
    return seq.unflatten(1, (width, height)).transpose(1, 2)


def _check_cross_shapes(tokens, proj, dt_weight, dt_bias, A, D) -> None:
    bsz, height, width, channels = tokens.shape
    directions, _, d_state = A.shape
    rank = dt_weight.shape[-1]
    if (
        not 1 <= directions <= 4
        or proj.shape != (bsz, height, width, directions * (rank + 2 * d_state))
        or dt_weight.shape != (directions, channels, rank)
        or dt_bias.shape != (directions, channels)
        or A.shape != (directions, channels, d_state)
        or D.shape != (directions, channels)
    ):
        raise ValueError(
            "cross_scan expects tokens (B, H, W, E), proj (B, H, W, K (R + 2N)), dt_weight (K, E, R), dt_bias (K, E), "
            f"A (K, E, N), D (K, E) with K in 1..4; got tokens {tuple(tokens.shape)}, proj {tuple(proj.shape)}, "
            f"dt_weight {tuple(dt_weight.shape)}, dt_bias {tuple(dt_bias.shape)}, A {tuple(A.shape)}, D {tuple(D.shape)}"
        )


def cross_scan_reference(tokens, proj, dt_weight, dt_bias, A, D, scan=selective_scan) -> torch.Tensor:
    """The cross-scan from PyTorch ops around ``scan`` (any of the selective scans above).

    ``tokens`` ``(B, H, W, E)``; ``proj`` ``(B, H, W, K (R + 2N))``, each token's projection with
    direction ``k``'s ``[dt (R) | B (N) | C (N)]`` at ``k (R + 2N)``; ``dt_weight`` ``(K, E, R)``,
    ``dt_bias`` ``(K, E)``, ``A`` ``(K, E, N)`` (negative), ``D`` ``(K, E)``. Every direction's tokens
    and projections are put in its scan order, ``delta = softplus(dt @ dt_weight^T + dt_bias)``, the K
    sequences are stacked along the channels into one scan (direction ``k``'s ``B``, ``C`` form channel
    group ``k``, VMamba's layout, which ``mamba_ssm`` also takes), and each direction's output is put
    back in row-major order; the sum over directions is returned, ``(B, H, W, E)``.
    """
    _check_cross_shapes(tokens, proj, dt_weight, dt_bias, A, D)
    bsz, height, width, channels = tokens.shape
    directions, _, d_state = A.shape
    rank = dt_weight.shape[-1]
    per_direction = rank + 2 * d_state
    u = torch.stack([_to_scan_order(tokens, k) for k in range(directions)], 1)  # (B, K, L, E)
    rows = torch.stack(
        [_to_scan_order(proj[..., k * per_direction : (k + 1) * per_direction], k) for k in range(directions)], 1
    )  # (B, K, L, R + 2N)
    dt, b_mat, c_mat = rows.split([rank, d_state, d_state], dim=-1)
    delta = F.softplus(torch.einsum("bklr,ker->bkle", dt, dt_weight) + dt_bias[None, :, None, :])  # (B, K, L, E)
    y = scan(
        u.transpose(2, 3).reshape(bsz, directions * channels, -1),
        delta.transpose(2, 3).reshape(bsz, directions * channels, -1),
        A.reshape(directions * channels, d_state),
        b_mat.transpose(2, 3),  # (B, K, N, L)
        c_mat.transpose(2, 3),
        D.reshape(-1),
    ).view(bsz, directions, channels, -1).transpose(2, 3)  # (B, K, L, E)
    out = _from_scan_order(y[:, 0], 0, height, width)
    for k in range(1, directions):
        out = out + _from_scan_order(y[:, k], k, height, width)
    return out


@torch.library.custom_op("ehrsr::cross_scan", mutates_args=())
def _cross_scan_op(
    tokens: torch.Tensor, proj: torch.Tensor, dt_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    _check_cross_shapes(tokens, proj, dt_weight, dt_bias, A, D)
    if SCAN_KERNEL == "auto" and scan_kernel.supports(tokens, proj, dt_weight, dt_bias, A, D):
        return scan_kernel.forward(tokens, proj, dt_weight, dt_bias, A, D)
    return cross_scan_reference(tokens, proj, dt_weight, dt_bias, A, D, scan=torch.ops.ehrsr.selective_scan)


@_cross_scan_op.register_fake
def _cross_scan_fake(tokens, proj, dt_weight, dt_bias, A, D):
    return torch.empty_like(tokens)


def _cross_scan_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)  # the backward recomputes the states: nothing (B, K, L, E, N) is kept


def _cross_scan_backward(ctx, grad_y):
    if SCAN_KERNEL == "auto" and scan_kernel.supports(*ctx.saved_tensors):
        return scan_kernel.backward(*ctx.saved_tensors, grad_y)
    # the reference again under autograd: through the chunked scan itself ("recompute"), or through
    # the scan op, whose backward is then the hand-written adjoint (SCAN_BACKWARD)
    scan = torch.ops.ehrsr.selective_scan if SCAN_BACKWARD == "adjoint" else selective_scan_parallel
    inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
    with torch.enable_grad():
        y = cross_scan_reference(*inputs, scan=scan)
    return torch.autograd.grad(y, inputs, grad_y, allow_unused=True)


_cross_scan_op.register_autograd(_cross_scan_backward, setup_context=_cross_scan_setup)


def cross_scan(tokens, proj, dt_weight, dt_bias, A, D, impl: ScanImpl = "auto") -> torch.Tensor:
    """The SSMB's cross-scan (shapes as ``cross_scan_reference``), dispatched.

    Exporting with dynamo / ``torch.export``: the reference around ``selective_scan_exportable`` (one
    ONNX ``Scan`` with a dynamic length). The TorchScript exporter: the reference around the chunked
    scan as plain ops (fixed sizes). ``impl="sequential"``: the reference loop. On CUDA with
    ``mamba_ssm``: the reference around its kernel. Otherwise the op ``torch.ops.ehrsr.cross_scan``
    (the compiled CPU kernel where it builds).
    """
    if torch.compiler.is_exporting():
        return cross_scan_reference(tokens, proj, dt_weight, dt_bias, A, D, scan=selective_scan_exportable)
    if torch.onnx.is_in_onnx_export():
        return cross_scan_reference(tokens, proj, dt_weight, dt_bias, A, D, scan=selective_scan_parallel)
    if impl == "sequential":
        return cross_scan_reference(tokens, proj, dt_weight, dt_bias, A, D, scan=selective_scan_sequential)
    if impl not in ("auto", "parallel"):
        raise ValueError(f"unknown scan implementation {impl!r}; use 'auto', 'parallel' or 'sequential'")
    if impl == "auto" and tokens.is_cuda and mamba_kernel() is not None:
        return cross_scan_reference(tokens, proj, dt_weight, dt_bias, A, D, scan=selective_scan)
    return torch.ops.ehrsr.cross_scan(tokens, proj, dt_weight, dt_bias, A, D)


class SSMBlock(nn.Module):
    """Residual selective-scan block: norm -> in-proj (x, z) -> dwconv + SiLU -> cross-scan -> gate z."""

    def __init__(
        self,
        channels: int,
        d_state: int = 8,
        expand: float = 1.0,
        dt_rank: int = 0,
        directions: int = 2,
        conv_kernel: int = 3,
        drop_path: float = 0.0,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        if directions not in (1, 2, 4):
            raise ValueError(f"directions must be 1, 2 or 4, got {directions}")
        inner = max(1, round(channels * expand))
        self.inner = inner
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(channels / 16)
        self.directions = directions
        self.scan_impl: ScanImpl = "auto"

        self.norm = LayerNorm2d(channels)
        self.in_proj = nn.Conv2d(channels, 2 * inner, 1)
        self.dwconv = nn.Conv2d(inner, inner, conv_kernel, padding=conv_kernel // 2, groups=inner)
        self.act = nn.SiLU()
        # one set of projections and SSM parameters per scan direction (VMamba's K groups)
        self.x_proj = nn.ModuleList(
            nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False) for _ in range(directions)
        )
        self.dt_proj = nn.ModuleList(nn.Linear(self.dt_rank, inner) for _ in range(directions))
        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel
        a_init = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)
        self.A_log = nn.Parameter(torch.log(a_init)[None].repeat(directions, 1, 1))  # (K, d, n)
        self.D = nn.Parameter(torch.ones(directions, inner))  # (K, d)
        for proj in self.dt_proj:
            # Mamba's init: dt = softplus(bias) log-uniform in [dt_min, dt_max]
            dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            with torch.no_grad():
                proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.out_norm = LayerNorm2d(inner)
        self.out_proj = nn.Conv2d(inner, channels, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(self.norm(x))
        xs, z = xz.chunk(2, dim=1)  # (B, E, H, W) each
        xs = self.act(self.dwconv(xs))
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            # tokens channels-last: each token's channels, and its projections for all directions
            # (one matmul, in row-major order: the scan reads them in each direction's order)
            tokens = xs.to(compute_dtype).permute(0, 2, 3, 1).contiguous()  # (B, H, W, E)
            x_w = torch.cat([p.weight for p in self.x_proj]).to(compute_dtype)  # (K (R + 2N), E)
            y = cross_scan(
                tokens,
                F.linear(tokens, x_w),  # (B, H, W, K (R + 2N))
                torch.stack([p.weight for p in self.dt_proj]).to(compute_dtype),  # (K, E, R)
                torch.stack([p.bias for p in self.dt_proj]).to(compute_dtype),  # (K, E)
                -torch.exp(self.A_log.to(compute_dtype)),  # (K, E, N)
                self.D.to(compute_dtype),  # (K, E)
                impl=self.scan_impl,
            )  # (B, H, W, E)
        y = self.out_norm(y.to(x.dtype).permute(0, 3, 1, 2)) * self.act(z)
        return x + self.drop_path(self.out_proj(y))
