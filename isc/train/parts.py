"""What one training stage is built from: model, optimizer and loss (``setup``, ``restore`` from a
checkpoint), the data (``build_dataset``, ``load_data``), the lr schedule (``lr_at``) and the update rule
(``loss_scale``, ``optimizer_step``). :mod:`isc.train.loop` runs the stage from these parts.
"""

from __future__ import annotations

import atexit
import logging
import math
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from isc.errors import ConfigError
from isc.losses import build_loss
from isc.models import create_model, load_weights, resolve_checkpoint
from isc.models.checkpoint import CheckpointError, set_rng_state
from isc.models.head import (
    freeze_batch_norms,
    freeze_leading_blocks,
    init_head_pca,
    pooled_features,
)
from isc.proctree import loader_worker_init
from isc.train import distributed as ddp
from isc.train.config import PAIRS_STAGE, TrainConfig, resolve_pairs_path
from isc.train.datasets import (
    EpochTaggedSampler,
    PairsDataset,
    ResumableShuffleSampler,
    ViewsDataset,
    collate,
    read_positive_pairs,
)

log = logging.getLogger(__name__)





def amp_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.amp in ("true", "on"):
        if device.type != "cuda":
            raise ConfigError("amp", "mixed precision needs a CUDA device")
        return True
    return cfg.amp == "auto" and device.type == "cuda"


def lr_at(cfg: TrainConfig, epoch: int, step: int | None = None) -> float:
    """The lr of ``epoch`` (0-based): constant (v83, v86: their adjust call is commented out), linear
    decay ``lr * (1 - epoch / epochs)`` set each epoch (v98, v107's ``adjust_learning_rate``), or cosine.
    ``step`` (optimizer steps done in this stage) applies the linear warm-up of ``warmup_steps``."""
    if cfg.schedule == "cosine":
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    elif cfg.schedule == "linear":
        lr = cfg.lr * (1.0 - epoch / cfg.epochs)
    else:
        lr = cfg.lr
    if step is not None and cfg.warmup_steps and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def param_groups(model: torch.nn.Module, wd: float) -> list[dict[str, Any]]:
    """Weight decay on weights only: 1-d params (BN/GN gains), biases and ``gain`` tensors get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "gain" in name else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def resolve_on_primary(info: ddp.DistInfo, param: str, ref: str | None) -> Path | None:
    """Resolve a checkpoint reference on rank 0 (the only MLflow client) and share the local path."""
    if not ref:
        return None
    result: tuple[str | None, str | None] = (None, None)
    if info.primary:
        try:
            result = (str(resolve_checkpoint(ref, full_state=param == "resume_from")), None)
        except ConfigError as exc:  # resolve_checkpoint names the generic 'model' parameter: rename it
            text = str(exc)
            result = (None, text[len(exc.param) + 2:] if text.startswith(f"{exc.param}: ") else text)
        except (CheckpointError, FileNotFoundError) as exc:
            result = (None, str(exc))
    path, error = ddp.broadcast_object(info, result)
    if error:
        raise ConfigError(param, error if error.startswith(str(ref)) else f"{ref}: {error}")
    return share_file(info, Path(path))


def share_file(info: ddp.DistInfo, path: Path) -> Path:
    """``path`` on every rank: ranks on another machine that cannot see rank 0's file (a checkpoint it
    downloaded into its own temp folder) get its bytes over the process group, into their own temp folder."""
    if not info.distributed:
        return path
    missing = ddp.all_reduce_sum(info, {"missing": float(not path.is_file())})["missing"]
    if not missing:
        return path
    payload = ddp.broadcast_object(info, path.read_bytes() if info.primary else None)
    if path.is_file():
        return path

    folder = tempfile.mkdtemp(prefix="isc-shared-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a copy for this process only
    local = Path(folder) / path.name
    local.write_bytes(payload)
    log.info("rank %d: %s is not on this machine; received it from rank 0 (%d bytes) as %s",
             info.rank, path, len(payload), local)
    return local


def build_dataset(cfg: TrainConfig, mean: list[float], std: list[float],
                  world_size: int = 1) -> tuple[torch.utils.data.Dataset, dict]:
    """The stage's dataset plus facts worth logging (item count, pairs file)."""
    from isc.data import augment
    from isc.data.disc21 import DISC21

    data = DISC21(cfg.data)
    facts: dict[str, Any] = {}
    negatives: list[Path] = []
    n_negatives = cfg.negatives_at(world_size)
    heldout = data.heldout_references() if n_negatives else set()
    pool = [p for r, p in data.images("reference") if r not in heldout] if n_negatives else []
    if cfg.stage == PAIRS_STAGE:
        pairs_path = resolve_pairs_path(cfg)
        all_pairs = read_positive_pairs(pairs_path, data.root)
        pairs = all_pairs[: cfg.sample_size]
        if n_negatives:
            # v107.py: negatives come from the references that are no positive of any pair of the file
            # (all of it, also when sample_size trains on fewer pairs)
            positive_refs = {r for _, r in all_pairs}
            negatives = [p for p in pool if p not in positive_refs]
        transform = augment.build_eval_transform(cfg.input_size, mean, std)
        ds: torch.utils.data.Dataset = PairsDataset(pairs, transform, cfg.seed, negatives, n_negatives)
        facts["pairs_path"] = str(pairs_path)
    else:
        paths = [p for _, p in data.images("train", limit=cfg.sample_size)]
        if not paths:
            raise ConfigError("data", f"{data.training_dir} holds no images")
        transform = augment.build_train_transform(cfg.stage, cfg.input_size, cfg.ncrops, mean, std, paths,
                                                  views=cfg.views, anchor=cfg.anchor)
        neg_transform = None
        if n_negatives:
            negatives = pool  # minus the held-out splits' references
            # v98.py: the reference negatives get the plain Resize((s, s)) + Normalize, no random view
            neg_transform = augment.build_eval_transform(cfg.input_size, mean, std)
        ds = ViewsDataset(paths, transform, cfg.seed, negatives, n_negatives, neg_transform)
    facts["n_items"] = len(ds)
    facts["n_negative_pool"] = len(negatives)
    facts["n_heldout_references_excluded"] = len(heldout)
    return ds, facts


def init_head_from_pca(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Fit the PCA head on the plain views of the first ``head_init_images`` training images."""
    from isc.data import augment
    from isc.data.disc21 import DISC21
    from isc.data.images import load_image

    data = DISC21(cfg.data)
    if cfg.stage == PAIRS_STAGE:
        paths = [p for _, p in data.images("reference", limit=cfg.head_init_images)]
    else:
        paths = [p for _, p in data.images("train", limit=cfg.head_init_images)]
    transform = augment.build_eval_transform(cfg.input_size, model.model_config["mean"], model.model_config["std"])
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(load_image(path)))
        except Exception as exc:  # noqa: BLE001 -- an unreadable image is skipped here as in training
            log.warning("head_init: skipped %s (%s)", path, exc)
    batches = (torch.stack(tensors[i:i + 32]) for i in range(0, len(tensors), 32))
    return init_head_pca(model, pooled_features(model, batches, device))


def seed_everything(cfg: TrainConfig, device: torch.device) -> None:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@dataclass
class Parts:
    """What one stage trains: the (maybe DDP-wrapped) model, the bare network, loss, optimizer, AMP scaler."""

    model: torch.nn.Module
    net: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    amp: bool
    loss_scale: float = 1.0  # see loss_scale()
    start_epoch: int = 0
    start_step: int = 0
    init_report: dict[str, float] = field(default_factory=dict)
    bank_restored: bool = False  # resumed with the checkpoint's memory bank and GradScaler (resume_state)


def loss_scale(criterion: torch.nn.Module, lr_world_size: int) -> float:
    """The factor each rank multiplies its loss by before ``backward()``: the one gradient-scale rule.

    Every rank's loss is that of the global batch, but only its local slice of the gathered embeddings
    carries gradients, so its gradient is one share of grad(L); DDP then *averages* over the W ranks.
    Scaling by ``criterion.grad_scale`` (W under DDP, else 1) makes the averaged gradient the full
    grad(L); dividing by ``lr_world_size`` (W_seed) makes it grad(L) / W_seed -- the seed's gradient
    (pml 0.9.99 gathered without scaling, DDP averaged over its W_seed GPUs). So each step is
    ``lr * grad(L) / W_seed`` for 1, W_seed or any number of processes. Weight decay is the optimizer's
    (``wd * p`` added to the gradient after backward), so scaling the loss leaves it as the seed's:
    ``p -= lr * (grad(L) / W_seed + wd * p)`` (+ momentum over that sum, as torch's SGD)."""
    return float(getattr(criterion, "grad_scale", 1)) / lr_world_size


def optimizer_step(parts: Parts, loss: torch.Tensor) -> None:
    """Backward of ``loss * parts.loss_scale`` (through the AMP scaler) and one SGD step."""
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss * parts.loss_scale).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()


def setup(cfg: TrainConfig, info: ddp.DistInfo, weights_given: bool, init_path: Path | None) -> Parts:
    """Build the network (pretrained / init weights / PCA head / frozen blocks), loss, optimizer, scaler."""
    device = info.device
    amp = amp_enabled(cfg, device)
    # Pretrained backbone weights are pointless (and may need the network) when the whole network is
    # about to be overwritten by a resumed checkpoint or a previous stage's weights.
    pretrained = False if weights_given else (cfg.weights_file or cfg.pretrained)
    model = create_model(cfg.backbone, pretrained=pretrained, gem_p=cfg.gem_p, gem_eval_p=cfg.gem_eval_p,
                         dim=cfg.dim, input_size=cfg.input_size)
    report: dict[str, float] = {}
    if init_path is not None:
        missing, unexpected = load_weights(model, init_path)
        report = {"init_missing_keys": len(missing), "init_unexpected_keys": len(unexpected)}
    model.to(device)
    if not weights_given and cfg.head_init == "pca":
        report.update(init_head_from_pca(cfg, model, device))
    freeze_leading_blocks(model, cfg.freeze_blocks)
    if cfg.freeze_bn:
        freeze_batch_norms(model)
    criterion = build_loss(cfg).to(device)
    optimizer = torch.optim.SGD(param_groups(model, cfg.wd), lr=cfg.lr, momentum=cfg.momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    net = model
    if info.distributed:
        model = ddp.wrap_model(model, device)  # SyncBatchNorm on CUDA, then DDP
        net = model.module
    return Parts(model, net, criterion, optimizer, scaler, amp, loss_scale(criterion, cfg.lr_world_size),
                  init_report=report)


def restore(cfg: TrainConfig, parts: Parts, resume: dict, resume_path: Path | None) -> None:
    """Full state of a checkpoint: weights, optimizer, memory bank, scaler, RNG, epoch and step."""
    try:
        parts.net.load_state_dict(resume["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ConfigError("resume_from", f"{resume_path}: weights do not fit --backbone "
                                         f"{cfg.backbone}: {str(exc)[:400]}") from exc
    # Crash recovery (same seed) continues its own checkpoint exactly; a new stage resumed from a finished one
    # (stage 1b: seed 90 after 1a's seed 9) draws from its own seed, as the seed's --resume does, and with
    # resume_state=seed also takes only what the seed's checkpoints hold ({epoch, arch, state_dict, optimizer,
    # args}): its memory bank starts empty and its GradScaler fresh.
    recovering = int((resume.get("train_config") or {}).get("seed", cfg.seed)) == cfg.seed
    parts.bank_restored = recovering or cfg.resume_state == "exact"
    try:
        parts.optimizer.load_state_dict(resume["optimizer"])
        if parts.bank_restored:
            parts.criterion.load_state_dict(resume["xbm"])
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError("resume_from", f"{resume_path}: optimizer/memory state does not fit this "
                                         f"configuration ({str(exc)[:300]})") from exc
    if parts.amp and resume.get("scaler") and parts.bank_restored:
        parts.scaler.load_state_dict(resume["scaler"])
    if resume.get("rng") and recovering:
        set_rng_state(resume["rng"])
    parts.start_epoch, parts.start_step = int(resume["epoch"]), int(resume.get("step") or 0)


@dataclass
class Data:
    dataset: torch.utils.data.Dataset
    facts: dict[str, Any]
    sampler: ResumableShuffleSampler
    loader: DataLoader
    per_rank: int
    steps_per_epoch: int


def load_data(cfg: TrainConfig, info: ddp.DistInfo, net: torch.nn.Module) -> Data:
    """The stage's dataset, its resumable per-rank sampler and the DataLoader (workers persist)."""
    dataset, facts = build_dataset(cfg, net.model_config["mean"], net.model_config["std"], info.world_size)
    per_rank = cfg.per_process_batch(info.world_size)
    sampler = ResumableShuffleSampler(len(dataset), per_rank, cfg.seed, info.rank, info.world_size)
    steps = sampler.batches_per_epoch
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError("batch_size", f"global batch {cfg.global_batch(info.world_size)} is larger than the {len(dataset)} "
                                        f"training items ({info.world_size} process(es), drop_last)")
    loader = DataLoader(dataset, batch_size=per_rank, sampler=EpochTaggedSampler(sampler), num_workers=cfg.workers,
                        collate_fn=collate, pin_memory=info.device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.workers > 0,
                        worker_init_fn=loader_worker_init)  # SIGTERM: the rank ends first (isc.proctree)
    return Data(dataset, facts, sampler, loader, per_rank, steps)
