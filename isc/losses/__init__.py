"""Metric-learning losses: contrastive loss with cross-batch memory (the recipe's loss), built from config."""

from __future__ import annotations

from typing import Any

from isc.errors import ConfigError
from isc.losses.xbm_contrastive import NEGATIVE_LABEL_OFFSET, XBMContrastiveLoss, gather_in_rank_order

# name -> builder(cfg); a new loss is one entry here plus its module (the loop only calls build_loss)
LOSSES = {
    "xbm_contrastive": lambda cfg: XBMContrastiveLoss(cfg.pos_margin, cfg.neg_margin, cfg.dim, cfg.memory_size),
}


def build_loss(cfg: Any) -> XBMContrastiveLoss:
    """The training loss named by ``cfg.loss`` (default: the recipe's contrastive loss + memory bank)."""

    name = getattr(cfg, "loss", "xbm_contrastive")
    if name not in LOSSES:
        raise ConfigError("loss", f"unknown loss '{name}' (one of {', '.join(LOSSES)})")
    return LOSSES[name](cfg)


__all__ = ["LOSSES", "NEGATIVE_LABEL_OFFSET", "XBMContrastiveLoss", "build_loss", "gather_in_rank_order"]
