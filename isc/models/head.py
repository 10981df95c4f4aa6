"""Starting a pretrained descriptor well: a head that begins at the backbone's features, frozen early blocks.

Why: the seed's head (Linear C -> 256, Xavier init, then BatchNorm1d) starts as a random projection of the
backbone's pooled features. With 1M images and 35 GPU-epochs that is repaired; in a few CPU minutes it is
not, and fine-tuning then scores below the backbone it started from. ``init_head_pca`` makes the head
start as the projection of the pooled features on their top principal axes (the best 256-d linear
summary of them), with the BatchNorm set so that it passes that projection through unchanged: no
whitening (fitted on a few hundred images it hurts) and no centring (measured on unseen photos with
Lite0 at 160 px: uncentred 0.288 µAP, as the raw 320-d features; centred 0.243). Fine-tuning then starts
at the pretrained floor instead of below it.
``freeze_leading_blocks`` keeps the generic low-level filters (and their BatchNorm statistics) as
pretrained, and makes each CPU step cheaper: no gradient flows into the frozen blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from isc.errors import ConfigError


@torch.no_grad()
def pooled_features(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """GeM-pooled last feature maps [N, C] (float64) of pre-processed image batches, eval mode."""
    was_training = model.training
    model.eval()
    try:
        feats = []
        for x in batches:
            fmap = model.backbone(x.to(device))
            fmap = fmap[-1] if isinstance(fmap, (list, tuple)) else fmap
            feats.append(model.pool(fmap.float()).double().cpu())
        return torch.cat(feats)
    finally:
        model.train(was_training)


@torch.no_grad()
def init_head_pca(model: nn.Module, feats: torch.Tensor) -> dict[str, float]:
    """Set ``model.fc`` to the top-``dim`` principal axes of ``feats`` and ``model.bn`` to pass them on.

    After this, in eval mode, ``model(x) = normalize(P f(x))`` with P the PCA axes (fitted on centred
    features, applied uncentred); in train mode the BatchNorm uses batch statistics, which on data like the
    fitting set are the same (``freeze_bn`` keeps the stored ones). Needs at least
    2 images; with fewer images than ``dim`` the remaining axes are filled with orthonormal complements.
    Returns the share of the features' variance the head keeps (logged).
    """
    dim, channels = model.fc.weight.shape
    if feats.ndim != 2 or feats.shape[1] != channels or feats.shape[0] < 2:
        raise ConfigError("head_init", f"need [N >= 2, {channels}] features to fit a PCA head, got "
                                       f"{tuple(feats.shape)}")
    mean = feats.mean(0)
    centred = feats - mean
    # Eigen-decomposition of the C x C covariance: works for N < C too and costs nothing at C ~ 1-2k.
    cov = centred.T @ centred / (feats.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    if dim > channels:
        raise ConfigError("dim", f"a PCA head cannot have more axes ({dim}) than the backbone has channels "
                                 f"({channels})")
    axes = evecs[:, :dim].T  # [dim, C], orthonormal rows
    proj_mean = axes @ mean
    proj_var = evals[:dim]
    eps = model.bn.eps
    model.fc.weight.copy_(axes.to(model.fc.weight.dtype))
    model.bn.running_mean.copy_(proj_mean.to(model.bn.running_mean.dtype))
    model.bn.running_var.copy_(proj_var.to(model.bn.running_var.dtype))
    # BN(z) = (z - mean) / sqrt(var + eps) * weight + bias: weight = sqrt(var + eps), bias = mean -> z
    model.bn.weight.copy_(torch.sqrt(proj_var + eps).to(model.bn.weight.dtype))
    model.bn.bias.copy_(proj_mean.to(model.bn.bias.dtype))
    kept = float(proj_var.sum() / evals.sum().clamp_min(1e-12))
    return {"head_init_variance_kept": kept, "head_init_images": float(feats.shape[0])}


def frozen_modules(model: nn.Module, n_blocks: int) -> list[nn.Module]:
    """The stem and the first ``n_blocks`` blocks of an EfficientNet-style backbone (timm features)."""
    if n_blocks <= 0:
        return []
    backbone = model.backbone
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise ConfigError("freeze_blocks", f"{type(backbone).__name__} has no 'blocks' to freeze (EfficientNet-"
                                           f"style timm backbones only)")
    if n_blocks > len(blocks):
        raise ConfigError("freeze_blocks", f"the backbone has {len(blocks)} blocks, got {n_blocks}")
    stem = [m for name in ("conv_stem", "bn1") if (m := getattr(backbone, name, None)) is not None]
    return stem + list(blocks[:n_blocks])


def freeze_leading_blocks(model: nn.Module, n_blocks: int) -> int:
    """Stop gradients into the stem and first ``n_blocks`` blocks; returns the number of frozen tensors.

    Call :func:`keep_frozen_in_eval` after every ``model.train()`` so their BatchNorm statistics stay.
    """
    count = 0
    for module in frozen_modules(model, n_blocks):
        for p in module.parameters():
            p.requires_grad_(False)
            count += 1
    return count


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batch_norms(model: nn.Module) -> int:
    """``freeze_bn``: every BatchNorm keeps its statistics and affine parameters (backbone and head).

    Why: with 8-16 items per step on CPU, batch statistics are noisy and drag a pretrained network (and
    the PCA head) away from where it started; frozen, each BatchNorm is a fixed affine map.
    """
    count = 0
    for m in batch_norms(model):
        for p in m.parameters():
            p.requires_grad_(False)
            count += 1
    return count


def keep_frozen_in_eval(model: nn.Module, n_blocks: int, all_bn: bool = False) -> None:
    """Put the frozen modules back in eval mode (BatchNorm uses its stored running statistics)."""
    for module in frozen_modules(model, n_blocks):
        module.eval()
    if all_bn:
        for m in batch_norms(model):
            m.eval()
