"""Contrastive loss with a cross-batch memory (XBM), as in the 1st-place ISC21 recipe.

pytorch-metric-learning's ``ContrastiveLoss(pos_margin, neg_margin)`` (L2 distance on normalised
embeddings; positive pairs pay ``relu(d - pos_margin)``, negative pairs ``relu(neg_margin - d)``, each
averaged over its non-zero terms, the two averages summed) is wrapped in ``CrossBatchMemory``: every
batch is first enqueued into a FIFO bank of the last ``memory_size`` embeddings/labels, then each
batch embedding is compared with every bank entry (itself excluded). Labels are source-image indices,
so the ``ncrops`` views of one image -- and the same image seen in earlier batches -- are positives;
extra negatives carry labels offset by :data:`NEGATIVE_LABEL_OFFSET`.

Under DDP (``torch.distributed`` initialised) the batch is all-gathered first, like pml's
``DistributedLossWrapper`` (pml 0.9.99's ``all_gather``, the seed's, also concatenates in rank order, its
own slice put back with its gradient; pml >= 1.0 puts the local rank first, so every rank would enqueue
the same embeddings in a different order). Each rank therefore computes the loss of the global
batch against its bank, and every rank enqueues the identical global batch, so all banks stay
bit-identical. Only the local slice of the gathered batch carries gradients, so the sum over ranks of
the local-slice gradients is the full gradient grad(L) and DDP's average is grad(L) / W. The training
loop scales the loss by :attr:`XBMContrastiveLoss.grad_scale` (W) over the stage's ``lr_world_size``
(:func:`isc.train.parts.loss_scale`), so every step is the seed's ``lr * grad(L) / W_seed`` whatever W.
The seed's pml 0.9.99 ``DistributedLossWrapper`` did not scale the loss at all (pml >= 1.0 multiplies
it by the world size).
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory
from torch import nn

from isc.errors import ConfigError

NEGATIVE_LABEL_OFFSET = 1_000_000


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_in_rank_order(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather [b, D] embeddings and [b] labels from every rank -> [W*b, D], [W*b] in rank order.

    The local slice keeps its autograd graph; the other ranks' slices are detached copies. Every rank
    must pass the same ``b`` (drop_last + equal per-rank batches guarantee it).
    """
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return embeddings, labels
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    embs = [torch.empty_like(embeddings) for _ in range(world)]
    labs = [torch.empty_like(labels) for _ in range(world)]
    torch.distributed.all_gather(embs, embeddings.detach().contiguous())
    torch.distributed.all_gather(labs, labels.contiguous())
    embs[rank] = embeddings
    return torch.cat(embs), torch.cat(labs)


class XBMContrastiveLoss(nn.Module):
    """``CrossBatchMemory(ContrastiveLoss(pos_margin, neg_margin), embedding_size, memory_size)``.

    forward(embeddings [B, D] float, labels [B] int64) -> scalar loss of the (global) batch against the
    bank (after enqueuing it). ``state_dict()`` holds the bank buffers plus the queue position
    (``_extra_state``), so a checkpoint restores the memory exactly.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, embedding_size: int = 256,
                 memory_size: int = 20000):
        super().__init__()
        if pos_margin < 0:
            raise ConfigError("pos_margin", f"must be >= 0, got {pos_margin}")
        if neg_margin <= 0:
            raise ConfigError("neg_margin", f"must be > 0, got {neg_margin}")
        if memory_size <= 0:
            raise ConfigError("memory_size", f"must be > 0, got {memory_size}")
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.xbm = CrossBatchMemory(ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin),
                                    embedding_size=embedding_size, memory_size=memory_size)

    @property
    def memory_size(self) -> int:
        return int(self.xbm.memory_size)

    @property
    def memory_fill(self) -> int:
        """Number of bank slots holding an embedding (grows by the global batch, caps at memory_size)."""
        return self.memory_size if self.xbm.has_been_filled else int(self.xbm.queue_idx)

    @property
    def grad_scale(self) -> int:
        """Factor that turns DDP's average of the local-slice gradients into grad(L) of the global batch
        (world size under DDP, else 1); the loop divides it by ``lr_world_size``."""
        return torch.distributed.get_world_size() if _distributed() else 1

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings, labels = gather_in_rank_order(embeddings.float(), labels.long())
        if len(embeddings) > self.memory_size:
            raise ConfigError("memory_size", f"{self.memory_size} is smaller than one global batch of "
                                             f"{len(embeddings)} embeddings")
        return self.xbm(embeddings, labels)

    def get_extra_state(self) -> dict[str, Any]:
        return {"queue_idx": int(self.xbm.queue_idx), "has_been_filled": bool(self.xbm.has_been_filled),
                "memory_size": self.memory_size}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if int(state["memory_size"]) != self.memory_size:
            raise ConfigError("memory_size", f"checkpoint bank has {state['memory_size']} slots, "
                                             f"this run asks for {self.memory_size}")
        self.xbm.queue_idx = int(state["queue_idx"])
        self.xbm.has_been_filled = bool(state["has_been_filled"])

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, memory_size={self.memory_size}"
