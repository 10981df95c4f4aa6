"""Generalised-mean (GeM) pooling with separate exponents for training and evaluation.

The recipe trains with ``p = --gem-p`` and extracts with ``p = --gem-eval-p`` (both 1.0 in the final
commands, i.e. plain average pooling). Keeping both on the module means ``model.eval()`` alone switches
the pooling, so extraction can never forget to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gem(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """GeM over the spatial dims: ``mean(clamp(x, eps) ** p) ** (1 / p)``.

    x: [B, C, H, W] feature map -> [B, C]. ``eps`` keeps the power of non-positive activations defined.
    """
    if p == 1.0:
        return F.adaptive_avg_pool2d(x.clamp(min=eps), 1).flatten(1)
    return F.adaptive_avg_pool2d(x.clamp(min=eps).pow(p), 1).pow(1.0 / p).flatten(1)


class GeM(nn.Module):
    """GeM pooling: ``p`` while training, ``eval_p`` in eval mode. Both are fixed (not learned)."""

    def __init__(self, p: float = 3.0, eval_p: float = 4.0, eps: float = 1e-6):
        super().__init__()
        if p <= 0 or eval_p <= 0:
            raise ValueError(f"GeM exponents must be > 0, got p={p}, eval_p={eval_p}")
        self.p = float(p)
        self.eval_p = float(eval_p)
        self.eps = float(eps)

    @property
    def current_p(self) -> float:
        return self.p if self.training else self.eval_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.current_p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, eval_p={self.eval_p}, eps={self.eps}"
