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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from isc import tracking
from isc.contract import ARTIFACT_CHECKPOINTS, Step, Tag
from isc.errors import ConfigError, ISCError
from isc.models import load_checkpoint, save_checkpoint
from isc.models.checkpoint import checkpoint_name
from isc.models.head import keep_frozen_in_eval
from isc.train import distributed as ddp
from isc.train.config import TrainConfig, validate_config
from isc.train.listeners import (
    EpochListener,
    MlflowListener,
    Timer,
    log_missing_epoch_metrics,
    write_summary,
    xbm_rank_diff,
)
from isc.train.parts import (
    Data,
    Parts,
    load_data,
    lr_at,
    optimizer_step,
    resolve_on_primary,
    restore,
    seed_everything,
    setup,
)
from isc.train.retention import Retention, prune_folder

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
        resume_path = resolve_on_primary(info, "resume_from", cfg.resume_from)
        init_path = resolve_on_primary(info, "init_from", cfg.init_from)
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
    seed_everything(cfg, info.device)
    parts = setup(cfg, info, resume is not None or init_path is not None, init_path)
    if resume is not None:
        restore(cfg, parts, resume, resume_path)
    data = load_data(cfg, info, parts.net)
    loop = _Loop(cfg, info, parts, data, run, resume_path, epoch_callback)
    loop.begin(resume, init_path)
    for epoch in range(parts.start_epoch, cfg.epochs):
        first_step = parts.start_step if epoch == parts.start_epoch else 0
        if first_step >= data.steps_per_epoch:
            continue
        metrics = loop.run_epoch(epoch, first_step)
        if loop.end_epoch(epoch, metrics):  # the epoch callback asked to stop (e.g. a pruned trial)
            return loop.result(epoch + 1, final=False)
    return loop.finish()


class _Loop:
    """The training loop's state (one run of one recipe stage): output folders, the listener, checkpoints written, the per-epoch summary."""

    def __init__(self, cfg: TrainConfig, info: ddp.DistInfo, parts: Parts, data: Data, run: Any,
                 resume_path: Path | None, epoch_callback: EpochCallback | None):
        self.cfg, self.info, self.parts, self.data = cfg, info, parts, data
        self.run_id = run.info.run_id if run is not None else None
        self.resume_path, self.callback = resume_path, epoch_callback
        out_default = tracking.project_root() / "outputs" / "train" / (self.run_id or time.strftime("%Y%m%d-%H%M%S"))
        self.out_dir = Path(ddp.broadcast_object(info, str(Path(cfg.output_dir) if cfg.output_dir else out_default)))
        self.ckpt_dir = self.out_dir / ARTIFACT_CHECKPOINTS
        if info.primary:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.timer = Timer(info.device)
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
            log_missing_epoch_metrics(self.run_id, resume, parts.start_epoch, parts.start_step)

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
            metrics["xbm_rank_max_abs_diff"] = xbm_rank_diff(info, p.criterion)
        return metrics

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Checkpoint, log, summary row, then the epoch callback (rank 0). True = stop training now."""
        path = self.save(epoch + 1, 0, checkpoint_name(epoch), metrics)
        self.epoch_metrics = metrics
        if self.info.primary:
            self.summary_rows.append({"epoch": epoch, **{k.replace("epoch_", ""): v for k, v in metrics.items()}})
            write_summary(self.summary_path, self.summary_rows)
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
                write_summary(self.summary_path, self.summary_rows)
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
