"""Which checkpoints a training run keeps, in its local folder and in its MLflow ``checkpoints/`` artifacts.

Why: a checkpoint holds the weights, the optimizer and the memory bank (~0.4 GB at the seed's scale), so
keeping every epoch's costs ~14 GB of artifacts per recipe run. One rule, applied after every checkpoint
upload, keeps:

* the newest ``keep_checkpoints`` (default 1: the last one, what ``resume_from=<run id>`` continues);
* the end-of-epoch checkpoints of ``keep_epochs``: the hand-offs later stages start from (``<run id>:N``);
* the end-of-epoch checkpoint of the epoch with the highest ``keep_best`` metric, when the run has that
  metric logged per epoch (step = epoch index; tuning trials log ``val_average_precision``);
* the checkpoint the run was resumed from.

``keep_checkpoints: 0`` (or ``all``) keeps every checkpoint. The local folder and the run's artifacts are each
judged on their own listing, and deletion follows the upload of a newer checkpoint, so a failed upload
never costs the run its newest uploaded checkpoint. A store that cannot delete only earns a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from isc.contract import ARTIFACT_CHECKPOINTS
from isc.models.checkpoint import checkpoint_name, checkpoint_order

log = logging.getLogger(__name__)

ARTIFACT_DIR = ARTIFACT_CHECKPOINTS


@dataclass(frozen=True)
class Retention:
    """The rule. ``keep_last`` 0 = keep everything; ``protect`` = file names never pruned (resume source)."""

    keep_last: int
    keep_epochs: frozenset[int] = frozenset()
    protect: frozenset[str] = frozenset()

    def kept(self, names: Iterable[str], best_epoch: int | None = None) -> set[str]:
        """The checkpoint names of ``names`` to keep (names that are not checkpoints are ignored)."""
        ckpts = sorted({Path(n).name for n in names if checkpoint_order(n)}, key=checkpoint_order)
        if not self.keep_last:
            return set(ckpts)
        wanted = {checkpoint_name(e) for e in self.keep_epochs} | set(self.protect)
        if best_epoch is not None:
            wanted.add(checkpoint_name(best_epoch))
        return set(ckpts[-self.keep_last:]) | (wanted & set(ckpts))


def prune_folder(folder: Path, retention: Retention, best_epoch: int | None = None) -> list[str]:
    """Delete the local checkpoints the rule does not keep; returns the deleted names."""
    names = [p.name for p in folder.glob("checkpoint_*.pth.tar") if checkpoint_order(p.name)]
    keep = retention.kept(names, best_epoch)
    gone = sorted(n for n in names if n not in keep)
    for name in gone:
        (folder / name).unlink(missing_ok=True)
    return gone


def best_epoch(run_id: str, metric: str) -> int | None:
    """The epoch index (metric step) with the highest value of ``metric`` in the run; None if never logged.

    A step logged twice (a crash-resumed run repeats epochs) counts with its latest value; ties go to the
    earlier epoch.
    """
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run_id, metric)
    latest: dict[int, tuple[int, float]] = {}
    for m in history:
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    if not latest:
        return None
    return max(sorted(latest), key=lambda step: latest[step][1])


class ArtifactPruner:
    """Deletes a run's ``checkpoints/`` artifacts the rule does not keep, through the run's artifact
    repository (local file store, ``mlflow-artifacts:`` proxy of ``mlflow server``, S3, ...)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._repo = None
        self._warned: set[str] = set()  # one warning per checkpoint the store would not delete

    def _repository(self):
        if self._repo is None:
            import mlflow
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            uri = mlflow.MlflowClient().get_run(self.run_id).info.artifact_uri
            self._repo = get_artifact_repository(uri, tracking_uri=mlflow.get_tracking_uri())
        return self._repo

    def listing(self) -> dict[str, int]:
        """``{checkpoint file name: bytes}`` of the run's ``checkpoints/`` artifacts."""
        return {Path(f.path).name: int(f.file_size or 0) for f in self._repository().list_artifacts(ARTIFACT_DIR)
                if not f.is_dir and checkpoint_order(f.path)}

    def prune(self, retention: Retention, best: int | None = None) -> list[str]:
        """Delete what the rule drops; returns the deleted names. Never raises: a failure is a warning."""
        failed: dict[str, str] = {}
        try:
            names = self.listing()
            doomed = sorted(set(names) - retention.kept(names, best))
            if not doomed:
                return []
            for name in doomed:
                try:
                    self._repository().delete_artifacts(f"{ARTIFACT_DIR}/{name}")
                except Exception as exc:  # noqa: BLE001 -- permissions, network: the next one may still go
                    failed[name] = f"{type(exc).__name__}: {exc}"
            # MLflow's base repository accepts delete_artifacts and does nothing: check they really went
            for name in set(doomed) & set(self.listing()):
                failed.setdefault(name, f"still listed after delete_artifacts ({type(self._repo).__name__})")
        except Exception as exc:  # noqa: BLE001 -- store unreachable: training goes on, the next pass retries
            log.warning("run %s: could not prune its checkpoint artifacts (%s); training goes on", self.run_id, exc)
            return []
        new = {n: why for n, why in failed.items() if n not in self._warned}
        if new:
            self._warned.update(new)
            log.warning("run %s: could not delete superseded checkpoint artifact(s) %s; training goes on, they "
                        "stay in the store", self.run_id, "; ".join(f"{n} ({why})" for n, why in sorted(new.items())))
        return [n for n in doomed if n not in failed]
