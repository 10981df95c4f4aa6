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

from isc import tracking
from isc.errors import ConfigError, ISCError
from isc.fileutil import atomic_path
from isc.losses import XBMContrastiveLoss
from isc.models import create_model, load_checkpoint, load_weights, resolve_checkpoint, save_checkpoint
from isc.models.checkpoint import CheckpointError, checkpoint_name, checkpoint_order, set_rng_state
from isc.models.head import freeze_leading_blocks, init_head_pca, keep_frozen_in_eval, pooled_features
from isc.train import distributed as ddp
from isc.train.config import TrainConfig, resolve_pairs_path, validate_config
from isc.train.datasets import (
    EpochTaggedSampler,
    PairsDataset,
    ResumableShuffleSampler,
    ViewsDataset,
    collate,
    read_positive_pairs,
)

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


def build_dataset(cfg: TrainConfig, mean: list[float], std: list[float]) -> tuple[torch.utils.data.Dataset, dict]:
    """The stage's dataset plus facts worth logging (item count, pairs file)."""
    from isc.data import augment
    from isc.data.disc21 import DISC21

    data = DISC21(cfg.data)
    facts: dict[str, Any] = {}
    negatives: list[Path] = []
    if cfg.stage == "v107":
        pairs_path = resolve_pairs_path(cfg)
        pairs = read_positive_pairs(pairs_path, data.root)[: cfg.sample_size]
        if cfg.negatives:
            positive_refs = {r for _, r in pairs}
            negatives = [p for _, p in data.images("reference") if p not in positive_refs]
        transform = augment.build_eval_transform(cfg.input_size, mean, std)
        ds: torch.utils.data.Dataset = PairsDataset(pairs, transform, cfg.seed, negatives, cfg.negatives)
        facts["pairs_path"] = str(pairs_path)
    else:
        paths = [p for _, p in data.images("train", limit=cfg.sample_size)]
        if not paths:
            raise ConfigError("data", f"{data.training_dir} holds no images")
        transform = augment.build_train_transform(cfg.stage, cfg.input_size, cfg.ncrops, mean, std, paths)
        neg_transform = None
        if cfg.negatives:
            negatives = [p for _, p in data.images("reference")]
            # v98.py: the reference negatives get the plain Resize((s, s)) + Normalize, no random view
            neg_transform = augment.build_eval_transform(cfg.input_size, mean, std)
        ds = ViewsDataset(paths, transform, cfg.seed, negatives, cfg.negatives, neg_transform)
    facts["n_items"] = len(ds)
    facts["n_negative_pool"] = len(negatives)
    return ds, facts


def _init_head_pca(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Fit the PCA head on the plain views of the first ``head_init_images`` training images."""
    from isc.data import augment
    from isc.data.disc21 import DISC21
    from isc.data.images import load_image

    data = DISC21(cfg.data)
    if cfg.stage == "v107":
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

    tags = {"isc.step": "train", "isc.stage": cfg.stage, **cfg.tags}
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
        tags["isc.resumed_from_run"] = resumed_run
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


def _prune(folder: Path, keep: int, protect: Path | None) -> None:
    ckpts = sorted((p for p in folder.glob("checkpoint_*.pth.tar") if checkpoint_order(p.name)),
                   key=lambda p: checkpoint_order(p.name))
    for old in ckpts[:-keep]:
        if old != protect:
            old.unlink(missing_ok=True)


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
    device = info.device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = _amp_enabled(cfg, device)

    # Pretrained backbone weights are pointless (and may need the network) when the whole network is
    # about to be overwritten by a resumed checkpoint or a previous stage's weights.
    pretrained: bool | str = False
    if resume is None and init_path is None:
        pretrained = cfg.weights_file or cfg.pretrained
    model = create_model(cfg.backbone, pretrained=pretrained, gem_p=cfg.gem_p, gem_eval_p=cfg.gem_eval_p,
                         dim=cfg.dim, input_size=cfg.input_size)
    init_report: dict[str, Any] = {}
    if init_path is not None:
        missing, unexpected = load_weights(model, init_path)
        init_report = {"init_missing_keys": len(missing), "init_unexpected_keys": len(unexpected)}
    model.to(device)
    if resume is None and init_path is None and cfg.head_init == "pca":
        init_report.update(_init_head_pca(cfg, model, device))
    freeze_leading_blocks(model, cfg.freeze_blocks)
    criterion = XBMContrastiveLoss(cfg.pos_margin, cfg.neg_margin, cfg.dim, cfg.memory_size).to(device)
    optimizer = torch.optim.SGD(param_groups(model, cfg.wd), lr=cfg.lr, momentum=cfg.momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_epoch, start_step = 0, 0
    if resume is not None:
        try:
            model.load_state_dict(resume["state_dict"], strict=True)
        except RuntimeError as exc:
            raise ConfigError("resume_from", f"{resume_path}: weights do not fit --backbone "
                                             f"{cfg.backbone}: {str(exc)[:400]}") from exc
        try:
            optimizer.load_state_dict(resume["optimizer"])
            criterion.load_state_dict(resume["xbm"])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ConfigError("resume_from", f"{resume_path}: optimizer/memory state does not fit this "
                                             f"configuration ({str(exc)[:300]})") from exc
        if amp and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        # Crash recovery (same seed) continues the RNG streams; a new stage resumed from a finished one
        # (stage 1b: seed 90 after 1a's seed 9) draws from its own seed, as the seed's --resume does.
        if resume.get("rng") and int((resume.get("train_config") or {}).get("seed", cfg.seed)) == cfg.seed:
            set_rng_state(resume["rng"])
        start_epoch, start_step = int(resume["epoch"]), int(resume.get("step") or 0)

    net = model
    if info.distributed:
        if device.type == "cuda":
            from timm.layers import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
            net = model
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset, facts = build_dataset(cfg, net.model_config["mean"], net.model_config["std"])
    per_rank = cfg.batch_size // info.world_size
    sampler = ResumableShuffleSampler(len(dataset), per_rank, cfg.seed, info.rank, info.world_size)
    steps_per_epoch = sampler.batches_per_epoch
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError("batch_size", f"global batch {cfg.batch_size} is larger than the {len(dataset)} "
                                        f"training items ({info.world_size} process(es), drop_last)")
    loader = DataLoader(dataset, batch_size=per_rank, sampler=EpochTaggedSampler(sampler), num_workers=cfg.workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.workers > 0)

    run_id = run.info.run_id if run is not None else None
    out_default = tracking.project_root() / "outputs" / "train" / (run_id or time.strftime("%Y%m%d-%H%M%S"))
    out_dir = Path(ddp.broadcast_object(info, str(Path(cfg.output_dir) if cfg.output_dir else out_default)))
    ckpt_dir = out_dir / "checkpoints"
    if info.primary:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer(device)
    if run is not None:
        with timer("mlflow"):
            params = {k: v for k, v in cfg.to_dict().items() if k not in ("tags",)}
            params.update(world_size=info.world_size, per_rank_batch=per_rank, steps_per_epoch=steps_per_epoch,
                          num_negatives=cfg.negatives, images_per_step=cfg.batch_size * cfg.images_per_item,
                          device=str(device), amp=amp, output_dir=str(out_dir), **facts)
            if resume_path:
                params["resumed_from_checkpoint"] = str(resume_path)
            if init_path:
                params["init_checkpoint"] = str(init_path)
            tracking.log_params(params)
            import mlflow

            # which checkpoint this stage started from, as the user gave it (run id:N, runs:/ URI, path)
            start = (("resume", cfg.resume_from) if cfg.resume_from else ("init", cfg.init_from) if cfg.init_from
                     else ("pretrained", str(cfg.weights_file or cfg.pretrained)))
            mlflow.set_tags({"isc.start_kind": start[0], "isc.start_checkpoint": start[1]})

            if "pairs_path" in facts:
                mlflow.set_tag("isc.train_pairs", facts["pairs_path"])
            if init_report:
                tracking.log_metrics(init_report, step=0)

    last_ckpt: Path | None = resume_path
    summary_rows: list[dict[str, Any]] = []
    summary_path = out_dir / "summary.csv"
    if info.primary and resume is not None and summary_path.is_file():
        with open(summary_path, newline="") as f:
            summary_rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < start_epoch]
    if info.primary and run is not None and resume is not None and resume.get("mlflow_run_id") == run_id:
        _log_missing_epoch_metrics(run_id, resume, start_epoch, start_step)  # crash recovery, same run only
    epoch_metrics: dict[str, float] = {}
    bad_seen: set[str] = set()
    images_per_rank_step = per_rank * cfg.images_per_item
    epoch = start_epoch

    def save(epoch_done: int, step: int, name: str, metrics: dict[str, float]) -> Path | None:
        """Checkpoint on rank 0 (atomic), upload, prune; every rank waits at the barrier."""
        nonlocal last_ckpt
        ddp.barrier(info)
        path = None
        if info.primary:
            path = save_checkpoint(ckpt_dir / name, model, epoch=epoch_done, step=step, optimizer=optimizer,
                                   scaler=scaler, xbm=criterion.state_dict(), train_config=cfg,
                                   mlflow_run_id=run_id, metrics=metrics)
            last_ckpt = path
            if run is not None and cfg.log_checkpoints:
                with timer("mlflow"):
                    tracking.log_artifact(path, "checkpoints")
            _prune(ckpt_dir, cfg.keep_checkpoints, protect=resume_path)
        ddp.barrier(info)
        return path

    for epoch in range(start_epoch, cfg.epochs):
        first_step = start_step if epoch == start_epoch else 0
        if first_step >= steps_per_epoch:
            continue
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        keep_frozen_in_eval(net, cfg.freeze_blocks)
        sampler.set_epoch(epoch, first_step)  # EpochTaggedSampler hands the epoch to the dataset's items
        loss_sum, loss_n, window_sum, window_n = 0.0, 0, 0.0, 0
        bad_this_epoch: list[str] = []
        t_epoch = time.perf_counter()
        t_window = t_epoch
        steps = range(first_step, steps_per_epoch)
        bar = tqdm(zip(steps, loader, strict=False), total=len(steps), desc=f"epoch {epoch}", disable=not info.primary,
                   leave=False)
        for step, (images, labels, skipped) in bar:
            if skipped:
                new = sorted(set(skipped) - bad_seen)
                if new:
                    log.warning("skipped %d unreadable training image(s): %s", len(new), ", ".join(new[:20]))
                bad_seen.update(new)
                bad_this_epoch += new
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            stage_step = (epoch - start_epoch) * steps_per_epoch + step - start_step if cfg.warmup_steps else None
            if stage_step is not None and stage_step <= cfg.warmup_steps:
                lr = lr_at(cfg, epoch, stage_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            with timer("forward"), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                embeddings = model(images)
            with timer("loss"):
                loss = criterion(embeddings, labels)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"loss is {value} at epoch {epoch} step {step}: training stopped; last good checkpoint: "
                    f"{last_ckpt or 'none (no checkpoint was written yet)'}")
            with timer("backward"):
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss * criterion.grad_scale).backward()
                scaler.step(optimizer)
                scaler.update()
            loss_sum += value
            loss_n += 1
            window_sum += value
            window_n += 1
            done = step + 1
            global_step = epoch * steps_per_epoch + done
            if info.primary:
                bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", xbm=criterion.memory_fill)
            if done % cfg.log_every_steps == 0 and run is not None:
                elapsed = time.perf_counter() - t_window
                with timer("mlflow"):
                    tracking.log_metrics({"loss": window_sum / window_n, "lr": lr,
                                          "images_per_s": window_n * images_per_rank_step * info.world_size / elapsed,
                                          "xbm_fill": criterion.memory_fill}, step=global_step)
                window_sum, window_n, t_window = 0.0, 0, time.perf_counter()
            if cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0 and done < steps_per_epoch:
                save(epoch, done, checkpoint_name(epoch, done), {"loss": loss_sum / loss_n})
        bar.close()
        epoch_time = time.perf_counter() - t_epoch
        reduced = ddp.all_reduce_sum(info, {"bad": float(len(bad_this_epoch))})
        epoch_metrics = {
            "epoch_loss": loss_sum / max(loss_n, 1),
            "epoch_lr": lr,
            "epoch_images_per_s": loss_n * images_per_rank_step * info.world_size / max(epoch_time, 1e-9),
            "epoch_time_s": epoch_time,
            "epoch_xbm_fill": float(criterion.memory_fill),
            "bad_images": reduced["bad"],
        }
        if info.distributed:
            epoch_metrics["xbm_rank_max_abs_diff"] = _xbm_rank_diff(info, criterion)
        path = save(epoch + 1, 0, checkpoint_name(epoch), epoch_metrics)
        callback_metrics: dict[str, float] = {}
        if info.primary:
            if run is not None:
                with timer("mlflow"):
                    tracking.log_metrics(epoch_metrics, step=epoch)
            row = {"epoch": epoch, **{k.replace("epoch_", ""): v for k, v in epoch_metrics.items()}}
            summary_rows.append(row)
            _write_summary(summary_path, summary_rows)
            if run is not None:
                with timer("mlflow"):
                    tracking.log_artifact(summary_path)
            log.info("epoch %d: loss %.4f, %.1f images/s, xbm %d/%d, checkpoint %s", epoch,
                     epoch_metrics["epoch_loss"], epoch_metrics["epoch_images_per_s"], criterion.memory_fill,
                     criterion.memory_size, path)
        stop: BaseException | None = None
        if info.primary and epoch_callback is not None:
            try:
                callback_metrics = dict(epoch_callback(epoch, net) or {})
            except BaseException as exc:  # noqa: BLE001 -- re-raised below, after telling the other ranks
                stop = exc
            if callback_metrics:
                if run is not None:
                    tracking.log_metrics(callback_metrics, step=epoch)
                summary_rows[-1].update(callback_metrics)
                _write_summary(summary_path, summary_rows)
        # the callback runs on rank 0 only: share whether it stopped training so no rank is left waiting
        if ddp.broadcast_object(info, stop is not None):
            if stop is not None:
                raise stop
            return TrainResult(run_id=None, checkpoint_path=str(last_ckpt) if last_ckpt else None,
                               final_model_path=None, epochs_done=epoch + 1, metrics=epoch_metrics)
        epoch_metrics.update(callback_metrics)

    final_path = None
    ddp.barrier(info)
    if info.primary:
        final_path = save_checkpoint(out_dir / "model" / "final.pth.tar", net, epoch=cfg.epochs,
                                     train_config=cfg, mlflow_run_id=run_id, metrics=epoch_metrics,
                                     with_rng=False)
        if run is not None:
            with timer("mlflow"):
                tracking.log_artifact(final_path, "model")
    ddp.barrier(info)
    timings = {f"time_{k}_s": v for k, v in timer.totals.items()}
    return TrainResult(run_id=run_id, checkpoint_path=str(last_ckpt) if last_ckpt else None,
                       final_model_path=str(final_path) if final_path else None, epochs_done=cfg.epochs,
                       metrics={**epoch_metrics, **timings})
