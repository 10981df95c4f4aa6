"""Metric-learning losses: contrastive loss with cross-batch memory (the recipe's loss)."""

from isc.losses.xbm_contrastive import NEGATIVE_LABEL_OFFSET, XBMContrastiveLoss, gather_in_rank_order

__all__ = ["NEGATIVE_LABEL_OFFSET", "XBMContrastiveLoss", "gather_in_rank_order"]
