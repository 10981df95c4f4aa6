"""What the training loop reports each epoch: the MLflow listener (metrics, checkpoints, summary.csv),
the step timer and the ranks' memory-bank check. :mod:`isc.train.loop` calls them; only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from isc import lineage, tracking
from isc.contract import ARTIFACT_CHECKPOINTS
from isc.fileutil import atomic_path
from isc.losses import XBMContrastiveLoss
from isc.train import distributed as ddp
from isc.train.config import TrainConfig
from isc.train.retention import ArtifactPruner, Retention, best_epoch

log = logging.getLogger(__name__)





class Timer:
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


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """timm-style per-epoch ``summary.csv`` (rewritten atomically each epoch)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def log_missing_epoch_metrics(run_id: str, resume: dict, start_epoch: int, start_step: int) -> None:
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


def xbm_rank_diff(info: ddp.DistInfo, criterion: XBMContrastiveLoss) -> float:
    """Max |bank_r - bank_0| over ranks: 0.0 proves every rank holds the identical memory."""
    bank = torch.cat([criterion.xbm.embedding_memory.float().flatten(),
                      criterion.xbm.label_memory.float(), torch.tensor([float(criterion.xbm.queue_idx)],
                                                                       device=criterion.xbm.label_memory.device)])
    banks = ddp.all_gather_tensor(info, bank)
    return max(float((b - banks[0]).abs().max()) for b in banks)


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

    def __init__(self, cfg: TrainConfig, timer: Timer, run_id: str):
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
