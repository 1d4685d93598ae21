"""MoE-TX: token-level mixture of experts for texture specialisation.

Every pixel is a token. A shared depthwise 3x3 conv gives each token its local context; a linear
router with softmax scores the experts, the ``top_k`` best are kept and their weights are
renormalised to sum to 1 (invariant 3 in ``docs/architecture.md``); each expert, a small pointwise FFN, computes
only the tokens routed to it (sparse dispatch), optionally at most ``capacity`` of them
(Switch Transformer, Fedus et al. 2022: capacity = factor * tokens * k / experts; over-capacity
assignments are dropped by lowest router weight and the residual carries those tokens). The idea
of routing restoration features to a small pool of specialised experts follows MoCE-IR (Zamir et
al. 2025) and MFGHMoE.

Auxiliary loss (returned by ``aux_loss()``, summed over blocks by ``EHRSR.aux_loss()``):
``balance_weight * L_balance + entropy_weight * H``, with Switch's load-balancing loss
``L_balance = E * sum_e f_e * P_e`` (``f_e`` the share of routing assignments that went to expert
e, ``P_e`` its mean router probability; it equals 1 for a uniform router, its minimum) and ``H``
the mean router entropy per token (penalising it sharpens routing). Values of the last forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ehrsr.blocks.layers import DropPath, LayerNorm2d

__all__ = ["ExpertFFN", "MoEBlock", "load_balance_loss"]


def load_balance_loss(probs: torch.Tensor, top_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss for probs (T, E) and chosen experts (T, k)."""
    assignments = F.one_hot(top_index, n_experts).to(probs.dtype).sum(dim=1)  # (T, E)
    share = assignments.mean(dim=0) / top_index.shape[1]  # f_e, sums to 1
    mean_prob = probs.mean(dim=0)  # P_e, sums to 1
    return n_experts * (share * mean_prob).sum()


class ExpertFFN(nn.Module):
    """Pointwise FFN expert on (tokens, C): Linear -> GELU -> Linear."""

    def __init__(self, channels: int, expansion: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = max(1, round(channels * expansion))
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(tokens))))


class MoEBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        n_experts: int = 4,
        top_k: int = 2,
        expansion: float = 2.0,
        capacity_factor: float = 0.0,
        balance_weight: float = 0.01,
        entropy_weight: float = 0.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be in 1..n_experts ({n_experts})")
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.balance_weight = balance_weight
        self.entropy_weight = entropy_weight
        self.norm = LayerNorm2d(channels)
        self.local = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.router = nn.Linear(channels, n_experts)
        # small router init: near-uniform routing at the start spreads tokens over all experts
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        self.experts = nn.ModuleList(ExpertFFN(channels, expansion, dropout) for _ in range(n_experts))
        self.drop_path = DropPath(drop_path)
        # filled by forward, for the auxiliary loss and for inspection (tests, analysis)
        self.last_balance_loss: torch.Tensor | None = None
        self.last_router_entropy: torch.Tensor | None = None
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (indices, weights) (T, k)

    def __getstate__(self):
        # the last-forward tensors hold autograd graphs: never copy or pickle them
        state = super().__getstate__()
        return {**state, "last_balance_loss": None, "last_router_entropy": None, "last_routing": None}

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor <= 0:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.local(self.norm(x)).permute(0, 2, 3, 1).reshape(-1, c)  # (T, C)
        # routing in float32: the softmax and the renormalisation must be exact enough to sum to 1
        probs = self.router(tokens).float().softmax(dim=-1)  # (T, E)
        top_weight, top_index = probs.topk(self.top_k, dim=-1)  # (T, k)
        top_weight = top_weight / top_weight.sum(dim=-1, keepdim=True)
        self.last_routing = (top_index.detach(), top_weight.detach())
        self.last_balance_loss = load_balance_loss(probs, top_index, self.n_experts)
        self.last_router_entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()

        capacity = self.capacity(tokens.shape[0])
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            # assignments to expert e; an expert with none still runs on an empty batch, so every
            # parameter takes part in the graph (its gradient is then zero rather than missing)
            token_idx, slot = (top_index == e).nonzero(as_tuple=True)
            weight = top_weight[token_idx, slot]
            if capacity is not None and token_idx.numel() > capacity:
                keep = weight.topk(capacity).indices  # over capacity: keep the strongest routes
                token_idx, weight = token_idx[keep], weight[keep]
            y = expert(tokens.index_select(0, token_idx))  # only this expert's tokens
            out = out.index_add(0, token_idx, y * weight[:, None].to(y.dtype))
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.drop_path(out)

    def aux_loss(self) -> torch.Tensor | None:
        """Weighted auxiliary loss of the last forward (None before any forward)."""
        if self.last_balance_loss is None:
            return None
        loss = self.balance_weight * self.last_balance_loss
        if self.entropy_weight:
            loss = loss + self.entropy_weight * self.last_router_entropy
        return loss
