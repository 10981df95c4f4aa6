"""XBM contrastive loss: FIFO bank behaviour and loss values against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from isc.errors import ConfigError
from isc.losses import NEGATIVE_LABEL_OFFSET, XBMContrastiveLoss


def unit(*angles_deg: float) -> torch.Tensor:
    """2-d unit vectors at the given angles: distances between them are easy to compute by hand."""
    a = torch.tensor(angles_deg, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def chord(deg: float) -> float:
    """L2 distance between two unit vectors ``deg`` degrees apart."""
    return 2 * math.sin(math.radians(deg) / 2)


def test_bank_is_fifo_and_wraps_around():
    loss = XBMContrastiveLoss(0.0, 1.0, embedding_size=2, memory_size=5)
    first, second = unit(0, 10, 20), unit(30, 40, 50)
    bank = loss.xbm  # pytorch-metric-learning's CrossBatchMemory: slots, write position, wrapped yet
    loss(first, torch.tensor([1, 2, 3]))
    assert loss.memory_fill == 3 and int(bank.queue_idx) == 3 and not bank.has_been_filled
    assert bank.label_memory[:3].tolist() == [1, 2, 3] and torch.allclose(bank.embedding_memory[:3], first)
    loss(second, torch.tensor([4, 5, 6]))
    assert loss.memory_fill == 5 and bank.has_been_filled
    # the oldest entry (label 1) was overwritten by the newest (label 6), in slot 0
    assert bank.label_memory.tolist() == [6, 2, 3, 4, 5]
    assert torch.allclose(bank.embedding_memory, torch.cat([second[2:], first[1:], second[:2]]))


def test_bank_state_round_trips_through_state_dict():
    a = XBMContrastiveLoss(0.0, 1.0, embedding_size=2, memory_size=4)
    a(unit(0, 90, 180), torch.tensor([0, 0, 1]))
    a(unit(45, 135), torch.tensor([2, 2]))
    b = XBMContrastiveLoss(0.0, 1.0, embedding_size=2, memory_size=4)
    b.load_state_dict(a.state_dict())
    assert b.memory_fill == 4 and int(b.xbm.queue_idx) == int(a.xbm.queue_idx)
    assert torch.equal(a.xbm.embedding_memory, b.xbm.embedding_memory)
    assert torch.equal(a.xbm.label_memory, b.xbm.label_memory)
    batch, labels = unit(10, 20), torch.tensor([3, 3])
    assert float(a(batch, labels)) == float(b(batch, labels))
    with pytest.raises(ConfigError, match="memory_size"):
        XBMContrastiveLoss(0.0, 1.0, embedding_size=2, memory_size=8).load_state_dict(a.state_dict())


def test_loss_equals_hand_computation_on_first_batch():
    # views of image 7 at 0 and 60 deg, image 8 at 180 deg; margins pos 0.0, neg 1.0
    loss = XBMContrastiveLoss(pos_margin=0.0, neg_margin=1.0, embedding_size=2, memory_size=10)
    value = float(loss(unit(0, 60, 180), torch.tensor([7, 7, 8])))
    # positive pairs (both directions): d(0,60) = 1.0 twice -> mean of non-zero = 1.0
    # negative pairs: d(0,180) = 2, d(60,180) = chord(120) = 1.732 -> relu(1 - d) = 0 -> no term
    assert value == pytest.approx(1.0, abs=1e-5)


def test_loss_uses_memory_entries_from_earlier_batches():
    loss = XBMContrastiveLoss(pos_margin=0.0, neg_margin=1.0, embedding_size=2, memory_size=10)
    loss(unit(0, 180), torch.tensor([1, 2]))
    value = float(loss(unit(20, 30), torch.tensor([1, 3])))
    # batch 20deg (label 1) vs memory {0:1, 180:2, 20:1(self, excluded), 30:3}
    # batch 30deg (label 3) vs memory {0:1, 180:2, 20:1, 30:3(self, excluded)}
    pos = [chord(20)]  # 20deg vs 0deg (same image seen in the previous batch)
    neg = [1 - chord(10), 1 - chord(10), 1 - chord(30)]  # 20-30, 30-20, 30-0; 180-deg pairs are beyond 1
    expected = sum(pos) / len(pos) + sum(neg) / len(neg)
    assert value == pytest.approx(expected, abs=1e-5)


def test_positive_margin_and_offset_negative_labels():
    loss = XBMContrastiveLoss(pos_margin=0.2, neg_margin=1.1, embedding_size=2, memory_size=10)
    labels = torch.tensor([5, 5, NEGATIVE_LABEL_OFFSET + 5])
    value = float(loss(unit(0, 30, 60), labels))
    pos = [chord(30) - 0.2] * 2
    neg = [1.1 - chord(60), 1.1 - chord(60), 1.1 - chord(30), 1.1 - chord(30)]
    assert value == pytest.approx(sum(pos) / 2 + sum(neg) / 4, abs=1e-5)


def test_gradient_flows_to_batch_embeddings_only():
    loss = XBMContrastiveLoss(0.0, 1.0, embedding_size=2, memory_size=10)
    x = unit(0, 60, 100).requires_grad_(True)
    loss(x, torch.tensor([0, 0, 1])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not loss.xbm.embedding_memory.requires_grad
    assert loss.grad_scale == 1


def test_bad_parameters_and_oversized_batch_are_config_errors():
    with pytest.raises(ConfigError, match="neg_margin"):
        XBMContrastiveLoss(0.0, -1.0)
    with pytest.raises(ConfigError, match="memory_size"):
        XBMContrastiveLoss(0.0, 1.0, memory_size=0)
    with pytest.raises(ConfigError, match="memory_size"):
        XBMContrastiveLoss(0.0, 1.0, embedding_size=2, memory_size=2)(unit(0, 1, 2), torch.tensor([0, 1, 2]))
