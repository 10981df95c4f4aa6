"""The training loop shared by every recipe stage (``isc train`` and ``isc.train.train``).

One call = one stage: validate -> (resume / init weights) -> open or join the MLflow run -> epochs of
SGD on the XBM contrastive loss -> per-epoch checkpoint + ``summary.csv`` -> ``model/final.pth.tar``.
Only global rank 0 talks to MLflow; every rank computes the same global loss (see
:mod:`isc.losses.xbm_contrastive`), so divergence is detected on all ranks at the same step.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from isc import lineage, tracking
from isc.contract import ARTIFACT_CHECKPOINTS, Step, Tag
from isc.errors import ConfigError, ISCError
from isc.fileutil import atomic_path
from isc.losses import XBMContrastiveLoss, build_loss
from isc.models import create_model, load_checkpoint, load_weights, resolve_checkpoint, save_checkpoint
from isc.models.checkpoint import CheckpointError, checkpoint_name, set_rng_state
from isc.models.head import (
    freeze_batch_norms,
    freeze_leading_blocks,
    init_head_pca,
    keep_frozen_in_eval,
    pooled_features,
)
from isc.proctree import loader_worker_init
from isc.train import distributed as ddp
from isc.train.config import PAIRS_STAGE, TrainConfig, resolve_pairs_path, validate_config
from isc.train.datasets import (
    EpochTaggedSampler,
    PairsDataset,
    ResumableShuffleSampler,
    ViewsDataset,
    collate,
    read_positive_pairs,
)
from isc.train.retention import ArtifactPruner, Retention, best_epoch, prune_folder

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, torch.nn.Module], "dict[str, float] | None"]


class TrainingDivergedError(ISCError):
    """The loss became NaN/inf: training stopped; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What one training stage produced (paths are local files; ``run_id`` is None off rank 0)."""

    run_id: str | None
    checkpoint_path: str | None
    final_model_path: str | None
    epochs_done: int
    metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- helpers


def _amp_enabled(cfg: TrainConfig, device: torch.device) -> bool:
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


def _resolve_on_primary(info: ddp.DistInfo, param: str, ref: str | None) -> Path | None:
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
    return Path(path)


def build_dataset(cfg: TrainConfig, mean: list[float], std: list[float],
                  world_size: int = 1) -> tuple[torch.utils.data.Dataset, dict]:
    """The stage's dataset plus facts worth logging (item count, pairs file)."""
    from isc.data import augment
    from isc.data.disc21 import DISC21

    data = DISC21(cfg.data)
    facts: dict[str, Any] = {}
    negatives: list[Path] = []
    n_negatives = cfg.negatives_at(world_size)
    if cfg.stage == PAIRS_STAGE:
        pairs_path = resolve_pairs_path(cfg)
        all_pairs = read_positive_pairs(pairs_path, data.root)
        pairs = all_pairs[: cfg.sample_size]
        if n_negatives:
            # v107.py: negatives come from the references that are no positive of any pair of the file
            # (all of it, also when sample_size trains on fewer pairs)
            positive_refs = {r for _, r in all_pairs}
            negatives = [p for _, p in data.images("reference") if p not in positive_refs]
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
            negatives = [p for _, p in data.images("reference")]
            # v98.py: the reference negatives get the plain Resize((s, s)) + Normalize, no random view
            neg_transform = augment.build_eval_transform(cfg.input_size, mean, std)
        ds = ViewsDataset(paths, transform, cfg.seed, negatives, n_negatives, neg_transform)
    facts["n_items"] = len(ds)
    facts["n_negative_pool"] = len(negatives)
    return ds, facts


def _init_head_pca(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
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


@contextlib.contextmanager
def _run_context(cfg: TrainConfig, info: ddp.DistInfo, resumed_run: str | None) -> Iterator[Any]:
    """Join the active run (tuning), resume the crashed run of the checkpoint, or open a new one.

    * an MLflow run is already active in this process -> log into it (the caller ends it);
    * resuming a checkpoint whose run is not FINISHED, outside ``mlflow run`` -> continue that run;
    * otherwise a new run (the launcher's under ``mlflow run``), tagged ``isc.resumed_from_run``.
    """
    import mlflow

    tags = {Tag.STEP: Step.TRAIN, Tag.STAGE: cfg.stage, **cfg.tags}
    if not info.primary:
        os.environ.pop("MLFLOW_RUN_ID", None)
        yield None
        return
    active = mlflow.active_run()
    continue_id = None
    if resumed_run and active is None and not os.environ.get("MLFLOW_RUN_ID"):
        try:
            tracking.configure(check=True)
            status = mlflow.MlflowClient().get_run(resumed_run).info.status
        except Exception:  # noqa: BLE001 -- run deleted / another store: start a new run
            status = None
        if status is not None and status != "FINISHED":
            continue_id = resumed_run
    if resumed_run and continue_id is None:
        tags[Tag.RESUMED_FROM_RUN] = resumed_run
    if active is not None:
        mlflow.set_tags(tags)
        yield active
        return
    with tracking.tracked_run(experiment=cfg.experiment_name, run_name=cfg.run_name, tags=tags,
                              log_system_metrics=True, run_id=continue_id) as run:
        yield run


class _Timer:
    """Accumulates wall time per phase (CUDA-synchronised so GPU work is charged to its phase)."""

    def __init__(self, device: torch.device):
        self.totals: dict[str, float] = {}
        self.sync = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """timm-style per-epoch ``summary.csv`` (rewritten atomically each epoch)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _log_missing_epoch_metrics(run_id: str, resume: dict, start_epoch: int, start_step: int) -> None:
    """Log the finished epoch's metrics from its checkpoint when the run never received them.

    The epoch-end checkpoint is written before the epoch's metrics are logged, so a crash between the
    two would otherwise lose that epoch's ``epoch_*`` metrics; the checkpoint carries them.
    """
    import mlflow

    metrics = resume.get("metrics") or {}
    if start_step or start_epoch == 0 or "epoch_loss" not in metrics:
        return
    history = mlflow.MlflowClient().get_metric_history(run_id, "epoch_loss")
    if all(m.step != start_epoch - 1 for m in history):
        tracking.log_metrics(metrics, step=start_epoch - 1)


def _xbm_rank_diff(info: ddp.DistInfo, criterion: XBMContrastiveLoss) -> float:
    """Max |bank_r - bank_0| over ranks: 0.0 proves every rank holds the identical memory."""
    bank = torch.cat([criterion.xbm.embedding_memory.float().flatten(),
                      criterion.xbm.label_memory.float(), torch.tensor([float(criterion.xbm.queue_idx)],
                                                                       device=criterion.xbm.label_memory.device)])
    banks = ddp.all_gather_tensor(info, bank)
    return max(float((b - banks[0]).abs().max()) for b in banks)


# ------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig, epoch_callback: EpochCallback | None = None) -> TrainResult:
    """Train one stage as configured. Validates everything before any work or MLflow run.

    ``epoch_callback(epoch_index, model)`` runs on rank 0 after each epoch's checkpoint is written (model
    = the bare network, left in whatever mode the callback sets); a returned dict is logged at
    ``step=epoch_index``; its exceptions (e.g. ``optuna.TrialPruned``) propagate.
    """
    info = ddp.setup(cfg.device)
    try:
        validate_config(cfg, info.world_size)
        resume_path = _resolve_on_primary(info, "resume_from", cfg.resume_from)
        init_path = _resolve_on_primary(info, "init_from", cfg.init_from)
        resume = load_checkpoint(resume_path) if resume_path else None
        if resume is not None:
            if int(resume.get("epoch", 0)) >= cfg.epochs and not resume.get("step"):
                raise ConfigError("epochs", f"{resume_path} already holds {resume['epoch']} epoch(s); "
                                            f"ask for more than that to continue")
            if resume.get("xbm") is None:
                raise ConfigError("resume_from", f"{resume_path} is a weights-only file; use init_from")
        resumed_run = resume.get("mlflow_run_id") if resume else None
        with _run_context(cfg, info, resumed_run) as run:
            return _train(cfg, info, run, resume, resume_path, init_path, epoch_callback)
    finally:
        ddp.teardown(info)


def _train(cfg: TrainConfig, info: ddp.DistInfo, run: Any, resume: dict | None, resume_path: Path | None,
           init_path: Path | None, epoch_callback: EpochCallback | None) -> TrainResult:
    """Setup -> restore -> (run one epoch -> end of epoch)* -> final model. Each part is a function below."""
    _seed(cfg, info.device)
    parts = _setup(cfg, info, resume is not None or init_path is not None, init_path)
    if resume is not None:
        _restore(cfg, parts, resume, resume_path)
    data = _data(cfg, info, parts.net)
    stage = _Stage(cfg, info, parts, data, run, resume_path, epoch_callback)
    stage.begin(resume, init_path)
    for epoch in range(parts.start_epoch, cfg.epochs):
        first_step = parts.start_step if epoch == parts.start_epoch else 0
        if first_step >= data.steps_per_epoch:
            continue
        metrics = stage.run_epoch(epoch, first_step)
        if stage.end_epoch(epoch, metrics):  # the epoch callback asked to stop (e.g. a pruned trial)
            return stage.result(epoch + 1, final=False)
    return stage.finish()


def _seed(cfg: TrainConfig, device: torch.device) -> None:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@dataclass
class _Parts:
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


def optimizer_step(parts: _Parts, loss: torch.Tensor) -> None:
    """Backward of ``loss * parts.loss_scale`` (through the AMP scaler) and one SGD step."""
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss * parts.loss_scale).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()


def _setup(cfg: TrainConfig, info: ddp.DistInfo, weights_given: bool, init_path: Path | None) -> _Parts:
    """Build the network (pretrained / init weights / PCA head / frozen blocks), loss, optimizer, scaler."""
    device = info.device
    amp = _amp_enabled(cfg, device)
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
        report.update(_init_head_pca(cfg, model, device))
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
    return _Parts(model, net, criterion, optimizer, scaler, amp, loss_scale(criterion, cfg.lr_world_size),
                  init_report=report)


def _restore(cfg: TrainConfig, parts: _Parts, resume: dict, resume_path: Path | None) -> None:
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
class _Data:
    dataset: torch.utils.data.Dataset
    facts: dict[str, Any]
    sampler: ResumableShuffleSampler
    loader: DataLoader
    per_rank: int
    steps_per_epoch: int


def _data(cfg: TrainConfig, info: ddp.DistInfo, net: torch.nn.Module) -> _Data:
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
    return _Data(dataset, facts, sampler, loader, per_rank, steps)


class EpochListener:
    """What the loop tells the outside world. The base class does nothing (non-primary ranks, no run)."""

    def on_start(self, params: dict[str, Any], tags: dict[str, str], metrics: dict[str, float]) -> None: ...
    def on_steps(self, metrics: dict[str, float], step: int) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...
    def best_epoch(self, metric: str) -> int | None: ...
    def on_retain(self, retention: Retention, best: int | None) -> None: ...
    def on_epoch(self, metrics: dict[str, float], epoch: int, summary_path: Path | None) -> None: ...
    def on_final(self, path: Path) -> None: ...


class MlflowListener(EpochListener):
    """Logs to the active MLflow run (rank 0), timed as the "mlflow" phase."""

    def __init__(self, cfg: TrainConfig, timer: _Timer, run_id: str):
        self.cfg, self.timer, self.run_id = cfg, timer, run_id
        self.pruner = ArtifactPruner(run_id)

    def on_start(self, params, tags, metrics):
        import mlflow

        with self.timer("mlflow"):
            tracking.log_params(params)
            mlflow.set_tags(tags)
            if metrics:
                tracking.log_metrics(metrics, step=0)
            lineage.log_disc21_inputs(self.cfg.data, "t")

    def on_steps(self, metrics, step):
        with self.timer("mlflow"):
            tracking.log_metrics(metrics, step=step)

    def on_checkpoint(self, path):
        if self.cfg.log_checkpoints:
            with self.timer("mlflow"):
                tracking.log_artifact(path, ARTIFACT_CHECKPOINTS)

    def best_epoch(self, metric):
        with self.timer("mlflow"):
            try:
                return best_epoch(self.run_id, metric)
            except Exception as exc:  # noqa: BLE001 -- store unreachable: keep no best this time
                log.warning("could not read metric %s of run %s: %s", metric, self.run_id, exc)
                return None

    def on_retain(self, retention, best):
        """Delete superseded ``checkpoints/`` artifacts (after the newer one's upload); warns on failure."""
        if self.cfg.log_checkpoints:
            with self.timer("mlflow"):
                self.pruner.prune(retention, best)

    def on_epoch(self, metrics, epoch, summary_path):
        with self.timer("mlflow"):
            tracking.log_metrics(metrics, step=epoch)
            if summary_path is not None:
                tracking.log_artifact(summary_path)

    def on_final(self, path):
        import mlflow

        with self.timer("mlflow"):
            tracking.log_artifact(path, "model")
            run = mlflow.active_run()
            if run is not None:  # the run's Model column: an external LoggedModel pointing at this file
                lineage.register_training_model(run.info.run_id, self.cfg.run_name or self.cfg.stage,
                                                self.cfg.to_dict())


class _Stage:
    """One stage's loop state: output folders, the listener, checkpoints written, the per-epoch summary."""

    def __init__(self, cfg: TrainConfig, info: ddp.DistInfo, parts: _Parts, data: _Data, run: Any,
                 resume_path: Path | None, epoch_callback: EpochCallback | None):
        self.cfg, self.info, self.parts, self.data = cfg, info, parts, data
        self.run_id = run.info.run_id if run is not None else None
        self.resume_path, self.callback = resume_path, epoch_callback
        out_default = tracking.project_root() / "outputs" / "train" / (self.run_id or time.strftime("%Y%m%d-%H%M%S"))
        self.out_dir = Path(ddp.broadcast_object(info, str(Path(cfg.output_dir) if cfg.output_dir else out_default)))
        self.ckpt_dir = self.out_dir / ARTIFACT_CHECKPOINTS
        if info.primary:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.timer = _Timer(info.device)
        self.listener = MlflowListener(cfg, self.timer, self.run_id) if run is not None else EpochListener()
        # the resume source's name is protected: only it can carry that name here (later checkpoints sort after)
        self.retention = Retention(cfg.keep_checkpoints, frozenset(cfg.keep_epochs),
                                   frozenset({resume_path.name} if resume_path else ()))
        self.last_ckpt: Path | None = resume_path
        self.summary_path = self.out_dir / "summary.csv"
        self.summary_rows: list[dict[str, Any]] = []
        self.bad_seen: set[str] = set()
        self.epoch_metrics: dict[str, float] = {}

    def begin(self, resume: dict | None, init_path: Path | None) -> None:
        """Log the stage's parameters and where it started; pick up the summary of a resumed run."""
        cfg, data, parts = self.cfg, self.data, self.parts
        params = {k: v for k, v in cfg.to_dict().items() if k not in ("tags",)}
        params.update(world_size=self.info.world_size, per_rank_batch=data.per_rank, loss_scale=parts.loss_scale,
                      steps_per_epoch=data.steps_per_epoch, num_negatives=cfg.negatives_at(self.info.world_size),
                      images_per_step=data.per_rank * cfg.images_per_item_at(self.info.world_size) * self.info.world_size,
                      device=str(self.info.device),
                      amp=parts.amp, output_dir=str(self.out_dir), **data.facts)
        if self.resume_path:
            params["resumed_from_checkpoint"] = str(self.resume_path)
            params["resumed_memory_bank"] = "restored" if parts.bank_restored else "empty"
        if init_path:
            params["init_checkpoint"] = str(init_path)
        # which checkpoint this stage started from, as the user gave it (<run id>:N, runs:/ URI, path)
        kind, ref = (("resume", cfg.resume_from) if cfg.resume_from else ("init", cfg.init_from) if cfg.init_from
                     else ("pretrained", str(cfg.weights_file or cfg.pretrained)))
        tags = {Tag.START_KIND: kind, Tag.START_CHECKPOINT: ref}
        if "pairs_path" in data.facts:
            tags[Tag.TRAIN_PAIRS] = data.facts["pairs_path"]
        self.listener.on_start(params, tags, parts.init_report)
        if not self.info.primary or resume is None:
            return
        if self.summary_path.is_file():
            with open(self.summary_path, newline="") as f:
                self.summary_rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < parts.start_epoch]
        if self.run_id is not None and resume.get("mlflow_run_id") == self.run_id:  # crash recovery, same run
            _log_missing_epoch_metrics(self.run_id, resume, parts.start_epoch, parts.start_step)

    def save(self, epoch_done: int, step: int, name: str, metrics: dict[str, float]) -> Path | None:
        """Checkpoint on rank 0 (atomic), upload, prune; every rank waits at the barrier."""
        p = self.parts
        ddp.barrier(self.info)
        path = None
        if self.info.primary:
            path = save_checkpoint(self.ckpt_dir / name, p.model, epoch=epoch_done, step=step, optimizer=p.optimizer,
                                   scaler=p.scaler, xbm=p.criterion.state_dict(), train_config=self.cfg,
                                   mlflow_run_id=self.run_id, metrics=metrics)
            self.last_ckpt = path
            self.listener.on_checkpoint(path)
            self.retain()
        ddp.barrier(self.info)
        return path

    def retain(self) -> None:
        """Prune the run's checkpoint artifacts, then the local folder, by the retention rule (rank 0)."""
        if not self.retention.keep_last:
            return
        # only an epoch callback measures per-epoch metrics such as val µAP (tuning trials log one)
        best = self.listener.best_epoch(self.cfg.keep_best) if self.cfg.keep_best and self.callback else None
        self.listener.on_retain(self.retention, best)
        prune_folder(self.ckpt_dir, self.retention, best)

    def _skipped(self, skipped: list[str], bad_this_epoch: list[str]) -> None:
        new = sorted(set(skipped) - self.bad_seen)
        if new:
            log.warning("skipped %d unreadable training image(s): %s", len(new), ", ".join(new[:20]))
        self.bad_seen.update(new)
        bad_this_epoch += new

    def _set_lr(self, lr: float) -> float:
        for group in self.parts.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int) -> float:
        """One optimizer step; the loss value (NaN/inf stops training, naming the last good checkpoint)."""
        p, device, timer = self.parts, self.info.device, self.timer
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with timer("forward"), torch.autocast(device.type, dtype=torch.float16, enabled=p.amp):
            embeddings = p.model(images)
        with timer("loss"):
            loss = p.criterion(embeddings, labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"loss is {value} at epoch {epoch} step {step}: training stopped; last good checkpoint: "
                f"{self.last_ckpt or 'none (no checkpoint was written yet)'}")
        with timer("backward"):
            optimizer_step(p, loss)
        return value

    def run_epoch(self, epoch: int, first_step: int) -> dict[str, float]:
        """Steps ``first_step..steps_per_epoch`` of ``epoch``; per-window metrics; mid-epoch checkpoints."""
        cfg, info, p, d = self.cfg, self.info, self.parts, self.data
        lr = self._set_lr(lr_at(cfg, epoch))
        p.model.train()
        keep_frozen_in_eval(p.net, cfg.freeze_blocks, all_bn=cfg.freeze_bn)
        d.sampler.set_epoch(epoch, first_step)  # EpochTaggedSampler hands the epoch to the dataset's items
        images_per_step = d.per_rank * cfg.images_per_item_at(info.world_size) * info.world_size
        loss_sum, loss_n, window_sum, window_n = 0.0, 0, 0.0, 0
        bad_this_epoch: list[str] = []
        t_epoch = t_window = time.perf_counter()
        steps = range(first_step, d.steps_per_epoch)
        bar = tqdm(zip(steps, d.loader, strict=False), total=len(steps), desc=f"epoch {epoch}",
                   disable=not info.primary, leave=False)
        for step, (images, labels, skipped) in bar:
            if skipped:
                self._skipped(skipped, bad_this_epoch)
            stage_step = (epoch - p.start_epoch) * d.steps_per_epoch + step - p.start_step
            if cfg.warmup_steps and stage_step <= cfg.warmup_steps:
                lr = self._set_lr(lr_at(cfg, epoch, stage_step))
            value = self._step(images, labels, epoch, step)
            loss_sum, loss_n, window_sum, window_n = loss_sum + value, loss_n + 1, window_sum + value, window_n + 1
            done = step + 1
            if info.primary:
                bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", xbm=p.criterion.memory_fill)
            if done % cfg.log_every_steps == 0:
                elapsed = time.perf_counter() - t_window
                self.listener.on_steps({"loss": window_sum / window_n, "lr": lr,
                                        "images_per_s": window_n * images_per_step / elapsed,
                                        "xbm_fill": p.criterion.memory_fill}, epoch * d.steps_per_epoch + done)
                window_sum, window_n, t_window = 0.0, 0, time.perf_counter()
            if cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0 and done < d.steps_per_epoch:
                self.save(epoch, done, checkpoint_name(epoch, done), {"loss": loss_sum / loss_n})
        bar.close()
        epoch_time = time.perf_counter() - t_epoch
        reduced = ddp.all_reduce_sum(info, {"bad": float(len(bad_this_epoch))})
        metrics = {"epoch_loss": loss_sum / max(loss_n, 1), "epoch_lr": lr,
                   "epoch_images_per_s": loss_n * images_per_step / max(epoch_time, 1e-9),
                   "epoch_time_s": epoch_time, "epoch_xbm_fill": float(p.criterion.memory_fill),
                   "bad_images": reduced["bad"]}
        if info.distributed:
            metrics["xbm_rank_max_abs_diff"] = _xbm_rank_diff(info, p.criterion)
        return metrics

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Checkpoint, log, summary row, then the epoch callback (rank 0). True = stop training now."""
        path = self.save(epoch + 1, 0, checkpoint_name(epoch), metrics)
        self.epoch_metrics = metrics
        if self.info.primary:
            self.summary_rows.append({"epoch": epoch, **{k.replace("epoch_", ""): v for k, v in metrics.items()}})
            _write_summary(self.summary_path, self.summary_rows)
            self.listener.on_epoch(metrics, epoch, self.summary_path)
            crit = self.parts.criterion
            log.info("epoch %d: loss %.4f, %.1f images/s, xbm %d/%d, checkpoint %s", epoch, metrics["epoch_loss"],
                     metrics["epoch_images_per_s"], crit.memory_fill, crit.memory_size, path)
        stop: BaseException | None = None
        extra: dict[str, float] = {}
        if self.info.primary and self.callback is not None:
            try:
                extra = dict(self.callback(epoch, self.parts.net) or {})
            except BaseException as exc:  # noqa: BLE001 -- re-raised below, after telling the other ranks
                stop = exc
            if extra:
                self.listener.on_epoch(extra, epoch, None)
                self.summary_rows[-1].update(extra)
                _write_summary(self.summary_path, self.summary_rows)
            if stop is None and self.cfg.keep_best:
                self.retain()  # the callback may have logged this epoch's keep_best metric: a new best
        # the callback runs on rank 0 only: share whether it stopped training so no rank is left waiting
        if ddp.broadcast_object(self.info, stop is not None):
            if stop is not None:
                raise stop
            return True
        self.epoch_metrics = {**metrics, **extra}
        return False

    def finish(self) -> TrainResult:
        """``model/final.pth.tar`` (weights + config, no optimizer/RNG), uploaded; the stage's result."""
        final_path = None
        ddp.barrier(self.info)
        if self.info.primary:
            final_path = save_checkpoint(self.out_dir / "model" / "final.pth.tar", self.parts.net, epoch=self.cfg.epochs,
                                         train_config=self.cfg, mlflow_run_id=self.run_id, metrics=self.epoch_metrics,
                                         with_rng=False)
            self.listener.on_final(final_path)
        ddp.barrier(self.info)
        return self.result(self.cfg.epochs, final=True, final_path=final_path)

    def result(self, epochs_done: int, final: bool, final_path: Path | None = None) -> TrainResult:
        timings = {f"time_{k}_s": v for k, v in self.timer.totals.items()} if final else {}
        return TrainResult(run_id=self.run_id if final else None,
                           checkpoint_path=str(self.last_ckpt) if self.last_ckpt else None,
                           final_model_path=str(final_path) if final_path else None, epochs_done=epochs_done,
                           metrics={**self.epoch_metrics, **timings})
