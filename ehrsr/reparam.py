"""Deployment form: a copy of a model with every re-parameterisable branch fused.

Follows timm's ``reparameterize_model``: deep-copy, switch to eval mode, and call ``fuse()`` on
every sub-module that has one (``RepConv`` and the partial large kernel of ``RepMixBlock``). The
original model is left untouched, and the copy computes the same function as ``model.eval()``
(invariant 5 in ``docs/architecture.md``) with fewer parameters and fewer, larger convs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["reparameterize"]


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """Return a fused copy of ``model`` in eval mode; ``model`` itself is not modified."""
    deploy = copy.deepcopy(model)
    deploy.eval()
    for module in list(deploy.modules()):
        fuse = getattr(module, "fuse", None)
        if callable(fuse):
            fuse()
    for param in deploy.parameters():
        param.requires_grad_(False)
    return deploy
