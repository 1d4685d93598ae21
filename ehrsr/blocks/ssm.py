"""SSMB: a Mamba-style selective-scan block over flattened image tokens.

The scan is Mamba's S6 recurrence (Gu & Dao 2023) with input-dependent ``delta``, ``B``, ``C``::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t

with ``A = -exp(A_log)``. Images are scanned in up to four orders (row-major / column-major,
forward / backward) and the results summed, as VMamba's cross-scan and MambaIR do for 2D data.

Three implementations of the same recurrence:

* ``selective_scan_sequential``: the plain loop over ``t``, the reference the others are tested
  against (invariant 6 in ``docs/architecture.md``).
* ``selective_scan_parallel``: a chunked scan, parallel across chunks of about ``sqrt(L / 4)``
  steps: ``2 sqrt(L)``-ish vectorised steps instead of ``L`` small ones, numerically the same
  products of decays in ``(0, 1]`` as the loop (a log-space cumsum can overflow), and no
  ``(b, d, l, n)`` tensor in memory.
* ``mamba_ssm``'s fused CUDA kernel ``selective_scan_fn`` when that package is importable and the
  tensors are on CUDA (imported lazily, so CPU-only installs work).

The parallel scan is exposed as the custom operator ``torch.ops.ehrsr.selective_scan`` so that
MAC counters see one op with known shapes (``selective_scan_macs`` gives its cost) instead of a
cloud of element-wise ops; its backward recomputes the forward under autograd.

All scans compute in float32 (float64 stays float64): the exponentials of the recurrence lose
too much precision in half types, so the block casts explicitly and casts the result back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.blocks.layers import DropPath, LayerNorm2d

__all__ = [
    "SSMBlock",
    "selective_scan",
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


def _check_shapes(u, delta, A, B, C, D) -> None:
    b, d, length = u.shape
    n = A.shape[1]
    if delta.shape != u.shape or A.shape != (d, n) or B.shape != (b, n, length) or C.shape != (b, n, length):
        raise ValueError(
            "selective_scan expects u, delta (b, d, l), A (d, n), B, C (b, n, l), D (d,); got "
            f"u {tuple(u.shape)}, delta {tuple(delta.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}, D {tuple(D.shape)}"
        )


def selective_scan_sequential(u, delta, A, B, C, D) -> torch.Tensor:
    """Reference: the recurrence as a loop over the sequence. Shapes as in the mamba_ssm kernel."""
    _check_shapes(u, delta, A, B, C, D)
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1])  # (b, d, n)
    ys = []
    for t in range(length):
        a_t = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        b_t = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # (b, d, n)
        h = a_t * h + b_t
        ys.append((h * C[:, None, :, t]).sum(-1))  # (b, d)
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
    chunk = max(1, min(chunk or default_chunk(length), length))
    n_chunks = math.ceil(length / chunk)
    pad = n_chunks * chunk - length
    if pad:
        # padded steps have delta = 0: decay exp(0) = 1 and input 0, so they carry the state unchanged
        u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
        B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    delta_c = delta.view(bsz, d, n_chunks, chunk)
    du = (delta * u).view(bsz, d, n_chunks, chunk)
    b_c = B.view(bsz, n, n_chunks, chunk).permute(0, 2, 3, 1)[:, None]  # (b, 1, c, T, n)
    c_c = C.view(bsz, n, n_chunks, chunk).permute(0, 2, 3, 1)[:, None]  # (b, 1, c, T, n)
    a_b = A[None, :, None, :]  # (1, d, 1, n)

    h = u.new_zeros(bsz, d, n_chunks, n)
    decay = u.new_ones(bsz, d, n_chunks, n)
    ys = []
    for t in range(chunk):  # pass 1: zero-state recurrence inside every chunk at once
        a_t = torch.exp(delta_c[:, :, :, t, None] * a_b)  # (b, d, c, n)
        h = a_t * h + du[:, :, :, t, None] * b_c[:, :, :, t]
        decay = decay * a_t
        ys.append((h * c_c[:, :, :, t]).sum(-1))  # (b, d, c)
    if n_chunks > 1:
        starts = [h.new_zeros(bsz, d, n)]
        for c in range(n_chunks - 1):  # carry: start_{c+1} = decay_c * start_c + h_end_c
            starts.append(decay[:, :, c] * starts[-1] + h[:, :, c])
        g = torch.stack(starts, dim=2)  # (b, d, c, n)
        for t in range(chunk):  # pass 2: the start state decays through the chunk
            g = torch.exp(delta_c[:, :, :, t, None] * a_b) * g
            ys[t] = ys[t] + (g * c_c[:, :, :, t]).sum(-1)
    y = torch.stack(ys, dim=-1).reshape(bsz, d, n_chunks * chunk)[:, :, :length]  # (b, d, l)
    return y + D[None, :, None] * u[:, :, :length]


@torch.library.custom_op("ehrsr::selective_scan", mutates_args=())
def _selective_scan_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    return selective_scan_parallel(u, delta, A, B, C, D)


@_selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D):
    return torch.empty_like(u)


def _selective_scan_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _selective_scan_backward(ctx, grad_y):
    # Recompute the forward under autograd: memory stays O(input) between forward and backward,
    # at the price of a second forward pass of the scan.
    inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
    with torch.enable_grad():
        y = selective_scan_parallel(*inputs)
    return torch.autograd.grad(y, inputs, grad_y, allow_unused=True)


_selective_scan_op.register_autograd(_selective_scan_backward, setup_context=_selective_scan_setup)

_MAMBA_KERNEL: object | None = None


def _mamba_kernel():
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
        kernel = _mamba_kernel()
        if kernel is not None:
            return kernel(u.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), D)
    if impl not in ("auto", "parallel"):
        raise ValueError(f"unknown scan implementation {impl!r}; use 'auto', 'parallel' or 'sequential'")
    return torch.ops.ehrsr.selective_scan(u, delta, A, B, C, D)


def _scan_orders(height: int, width: int, directions: int, device: torch.device) -> list[torch.Tensor]:
    """Token orders of the cross-scan: row-major, reversed, column-major, reversed (first k of them)."""
    row = torch.arange(height * width, device=device)
    col = row.view(height, width).t().reshape(-1)
    return [row, row.flip(0), col, col.flip(0)][:directions]


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
        bsz, _, height, width = x.shape
        xz = self.in_proj(self.norm(x))
        xs, z = xz.chunk(2, dim=1)  # (B, E, H, W) each
        xs = self.act(self.dwconv(xs))
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        tokens = xs.flatten(2)  # (B, E, L)
        y = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            for k, order in enumerate(_scan_orders(height, width, self.directions, x.device)):
                seq = tokens[:, :, order].to(compute_dtype)  # (B, E, L)
                proj = F.linear(seq.transpose(1, 2), self.x_proj[k].weight.to(compute_dtype))  # (B, L, R+2N)
                dt, b_mat, c_mat = proj.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
                dt_proj = self.dt_proj[k]
                delta = F.linear(dt, dt_proj.weight.to(compute_dtype), dt_proj.bias.to(compute_dtype))
                delta = F.softplus(delta).transpose(1, 2)  # (B, E, L)
                a_mat = -torch.exp(self.A_log[k].to(compute_dtype))  # (E, N)
                y_k = selective_scan(
                    seq.contiguous(),
                    delta.contiguous(),
                    a_mat,
                    b_mat.transpose(1, 2).contiguous(),  # (B, N, L)
                    c_mat.transpose(1, 2).contiguous(),
                    self.D[k].to(compute_dtype),
                    impl=self.scan_impl,
                )
                inverse = torch.empty_like(order)
                inverse[order] = torch.arange(order.numel(), device=order.device)
                y_k = y_k[:, :, inverse]  # back to row-major
                y = y_k if y is None else y + y_k
        y = y.to(x.dtype).view(bsz, self.inner, height, width)
        y = self.out_norm(y) * self.act(z)
        return x + self.drop_path(self.out_proj(y))
