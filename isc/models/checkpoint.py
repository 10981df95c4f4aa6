"""Checkpoints as plain dicts of tensors and builtins, and loading a model from any reference.

A checkpoint is written with ``torch.save`` and read back with ``torch.load(weights_only=True)``: it
never contains pickled code, so loading one from an untrusted run cannot execute anything. Keys:

``state_dict`` (model weights, no ``module.`` prefix), ``model_config`` (rebuilds the network, see
:func:`isc.models.iscnet.model_from_config`), ``arch``, ``epoch`` (number of completed epochs, i.e. the
epoch index to start from -- the seed's convention), ``step`` (batches already done inside epoch
``epoch``; 0 for end-of-epoch checkpoints), ``optimizer``, ``scaler``, ``rng`` (torch/CUDA/numpy/python
RNG states as tensors and lists), ``xbm`` (cross-batch memory bank), ``train_config``,
``mlflow_run_id``, ``metrics``.

File names follow the seed: ``checkpoint_0004.pth.tar`` holds the state after epoch index 4 (5 epochs
done). Mid-epoch checkpoints are ``checkpoint_0004-step000120.pth.tar`` (120 batches of epoch index 4
done); both sort by name in training order.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isc.contract import ARTIFACT_CHECKPOINTS, ARTIFACT_FINAL_MODEL, PYFUNC_CHECKPOINT, ModelRef
from isc.errors import ConfigError, ISCError
from isc.fileutil import atomic_path
from isc.tracking import configure, resolve_artifact

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{4,})(?:-step(\d+))?\.pth\.tar$")
FINAL_MODEL_ARTIFACT = ARTIFACT_FINAL_MODEL
REGISTRY_CHECKPOINT = PYFUNC_CHECKPOINT


class CheckpointError(ISCError):
    """A checkpoint that cannot be read safely (missing, truncated, or holding pickled objects)."""

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


def checkpoint_name(epoch_index: int, step: int | None = None) -> str:
    """``checkpoint_0004.pth.tar`` (end of epoch index 4) or ``checkpoint_0004-step000120.pth.tar``."""
    if step:
        return f"checkpoint_{epoch_index:04d}-step{step:06d}.pth.tar"
    return f"checkpoint_{epoch_index:04d}.pth.tar"


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """Sort key (epoch index, step; end-of-epoch = +inf step) of a checkpoint file name, else None."""
    m = CHECKPOINT_RE.match(Path(name).name)
    if not m:
        return None
    step = int(m.group(2)) if m.group(2) else 1 << 62
    return int(m.group(1)), step


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The most advanced ``checkpoint_*.pth.tar`` in ``folder`` (None when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(checkpoint_order(p.name), p) for p in folder.iterdir() if checkpoint_order(p.name)]
    return max(found)[1] if found else None


def to_builtin(obj: Any) -> Any:
    """Convert configs/RNG states to what ``weights_only`` loading accepts (tensors + builtins)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_builtin(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a weights-only checkpoint")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches, as tensors/lists (restorable with :func:`set_rng_state`)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNGs saved by :func:`rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu().to(torch.uint8) for t in cuda])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DDP/compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` prefix (and torch.compile's ``_orig_mod.``) from state-dict keys."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    epoch: int,
    step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    xbm: Mapping[str, Any] | None = None,
    train_config: Any = None,
    mlflow_run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    with_rng: bool = True,
) -> Path:
    """Write a weights-only-loadable checkpoint atomically (a crash never leaves a torn file)."""
    net = unwrap(model)
    model_config = to_builtin(getattr(net, "model_config", {}))
    ckpt: dict[str, Any] = {
        "arch": model_config.get("backbone"),
        "state_dict": strip_module_prefix({k: v.detach().cpu() for k, v in net.state_dict().items()}),
        "model_config": model_config,
        "epoch": int(epoch),
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": to_builtin(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_state() if with_rng else None,
        "xbm": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else to_builtin(v)) for k, v in xbm.items()}
        if xbm is not None else None,
        "train_config": to_builtin(train_config) if train_config is not None else None,
        "mlflow_run_id": mlflow_run_id,
        "metrics": to_builtin(dict(metrics)) if metrics else {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        # Through a file object: torch.save names the archive's records after a path's stem, and the temporary
        # name holds host and pid, so the same checkpoint would differ in size from one run to the next.
        with open(tmp, "wb") as fh:
            torch.save(ckpt, fh)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; anything holding pickled objects is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read checkpoint ({exc.strerror})") from exc
    # torch.save writes a zip archive (PK\x03\x04); the legacy format starts with a pickle PROTO opcode.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(path, f"not a PyTorch checkpoint: neither a zip archive nor a pickle (first bytes "
                                    f"{head.hex() or 'none: empty file'}); corrupt or another kind of file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- UnpicklingError, RuntimeError (truncated zip), EOFError...
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Unsupported global" in str(exc):
            raise CheckpointError(path, "refused: it holds pickled Python objects, not only tensors and "
                                        f"builtins (weights_only load failed: {text})") from exc
        if "Weights only load failed" in str(exc):
            raise CheckpointError(path, "refused: a pickle the weights-only loader cannot read (corrupt, or "
                                        "written by something other than torch.save)") from exc
        raise CheckpointError(path, f"cannot read checkpoint ({type(exc).__name__}: {text})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(path, "not an isc checkpoint (no 'state_dict' key)")
    return ckpt


def _find_in_dir(folder: Path) -> Path | None:
    """A checkpoint inside a downloaded artifact folder: registry model dir, run ``model/``, ``checkpoints/``."""
    for rel in (f"artifacts/{REGISTRY_CHECKPOINT}", REGISTRY_CHECKPOINT, FINAL_MODEL_ARTIFACT, "final.pth.tar"):
        if (folder / rel).is_file():
            return folder / rel
    for sub in (folder / ARTIFACT_CHECKPOINTS, folder):
        latest = latest_checkpoint(sub)
        if latest is not None:
            return latest
    hits = sorted(folder.rglob("*.pth.tar"))
    return hits[0] if len(hits) == 1 else None


def _run_checkpoint_uri(run_id: str, full_state: bool = False) -> str:
    """``runs:/<id>/model/final.pth.tar`` when the run finished, else its latest epoch checkpoint.

    ``full_state``: always the latest epoch checkpoint (weights + optimizer + memory bank): what
    ``resume_from=<finished run id>`` continues from; the final model holds weights only.
    """
    from mlflow import MlflowClient


    configure(check=True)
    client = MlflowClient()
    try:
        names = set() if full_state else \
            {Path(a.path).name for a in client.list_artifacts(run_id, str(Path(FINAL_MODEL_ARTIFACT).parent))}
        if Path(FINAL_MODEL_ARTIFACT).name in names:
            return f"runs:/{run_id}/{FINAL_MODEL_ARTIFACT}"
        ckpts = [Path(a.path).name for a in client.list_artifacts(run_id, ARTIFACT_CHECKPOINTS)]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("model", f"run {run_id}: cannot list its artifacts ({exc})") from exc
    ckpts = [c for c in ckpts if checkpoint_order(c)]
    if not ckpts:
        what = "no checkpoints/*.pth.tar (full state)" if full_state else \
            f"neither {FINAL_MODEL_ARTIFACT} nor checkpoints/*.pth.tar"
        raise ConfigError("model", f"run {run_id} has {what}")
    return f"runs:/{run_id}/{ARTIFACT_CHECKPOINTS}/{max(ckpts, key=checkpoint_order)}"


def epoch_checkpoint_uri(run_id: str, index: int) -> str:
    """``runs:/<id>/checkpoints/checkpoint_NNNN.pth.tar``: the seed's hand-off files (``checkpoint_0005``
    = the state after epoch index 5) as an MLflow URI."""
    return f"runs:/{run_id}/{ARTIFACT_CHECKPOINTS}/{checkpoint_name(int(index))}"


def resolve_checkpoint(ref: str | Path, dst: str | Path | None = None, full_state: bool = False) -> Path:
    """Local checkpoint file for ``ref`` (any :class:`isc.contract.ModelRef`): a path (file or folder), a
    training run id, ``<run id>:<N>`` (that run's ``checkpoint_000N``), ``runs:/...``,
    ``models:/name@alias`` / ``models:/name/version`` (registered model folder holding
    ``artifacts/checkpoint.pth.tar``), or any MLflow artifact URI. Downloads when remote. ``full_state``:
    a bare run id means its latest full epoch checkpoint, not its weights-only final model (``resume_from``)."""

    parsed = ModelRef.parse(ref)
    text = parsed.text
    if parsed.kind == "run_epoch":
        text = epoch_checkpoint_uri(parsed.run_id, parsed.epoch)
    elif parsed.kind == "run" or (parsed.kind == "runs" and not parsed.path):
        text = _run_checkpoint_uri(parsed.run_id, full_state)
    try:
        path = resolve_artifact(text, dst=dst)
    except FileNotFoundError as exc:
        raise ConfigError("model", str(exc)) from exc
    if path.is_dir():
        found = _find_in_dir(path)
        if found is None:
            raise ConfigError("model", f"{ref}: no checkpoint (*.pth.tar) found in {path}")
        path = found
    return path


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the ISCNet saved at ``ref`` (see :func:`resolve_checkpoint`) in eval mode on ``device``."""
    from isc.models.iscnet import model_from_config

    path = resolve_checkpoint(ref)
    ckpt = load_checkpoint(path)
    if not ckpt.get("model_config"):
        raise CheckpointError(path, "has no model_config; cannot rebuild the network")
    model = model_from_config(ckpt["model_config"])
    try:
        model.load_state_dict(strip_module_prefix(ckpt["state_dict"]), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit its model_config: {exc}") from exc
    model.checkpoint_path = str(path)  # type: ignore[attr-defined]
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, ref: str | Path) -> tuple[list[str], list[str]]:
    """The seed's ``--weight``: copy matching weights from ``ref`` into ``model`` (``module.`` stripped,
    strict=False, shape-mismatched tensors skipped). Returns (missing, unexpected) keys, also logged."""
    path = resolve_checkpoint(ref)
    ckpt = load_checkpoint(path)
    source = strip_module_prefix(ckpt["state_dict"])
    net = unwrap(model)
    target = net.state_dict()
    mismatched = [k for k, v in source.items() if k in target and target[k].shape != v.shape]
    source = {k: v for k, v in source.items() if k not in mismatched}
    result = net.load_state_dict(source, strict=False)
    missing, unexpected = list(result.missing_keys) + mismatched, list(result.unexpected_keys)
    if not any(k in target for k in source):
        raise CheckpointError(path, "no weight in it matches the model (different backbone?)")
    if missing or unexpected:
        log.warning("init from %s: %d missing key(s) %s, %d unexpected key(s) %s", path, len(missing),
                    missing[:8], len(unexpected), unexpected[:8])
    else:
        log.info("init from %s: all %d weights loaded", path, len(source))
    return missing, unexpected
