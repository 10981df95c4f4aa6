"""Where a study lives and who may add a trial: RDB storage, the admission gate, trial counts.

Why: several workers share one study; ``n_trials`` is an exact study-wide total only if admission
(count, then create the trial) is atomic across processes -- see :class:`AdmissionGate`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from isc.contract import redact
from isc.errors import ConfigError
from isc.tracking import project_root
from isc.tune.space import TuneConfig

log = logging.getLogger(__name__)


def default_storage_url() -> str:
    """``sqlite:///<project>/optuna.db``, next to the default MLflow store."""

    return f"sqlite:///{project_root() / 'optuna.db'}"


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite:"):
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:":
        return None
    return Path(path)


def make_storage(url: str, cfg: TuneConfig) -> Any:
    """RDBStorage with heartbeats, stale-trial retry and a SQLite busy timeout (see module doc)."""
    import optuna

    kwargs: dict[str, Any] = {}
    db = _sqlite_file(url)
    if url.startswith("sqlite:"):
        kwargs["connect_args"] = {"timeout": float(cfg.sqlite_timeout)}
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith(("postgresql", "mysql")):
        kwargs["pool_pre_ping"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=int(cfg.heartbeat_interval),
                grace_period=int(cfg.grace_period),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=int(cfg.max_retry)
                ),
            )
        except Exception as exc:  # noqa: BLE001 -- sqlalchemy errors of many kinds
            raise ConfigError("storage", f"cannot open Optuna storage {redact(url)}: {exc}") from exc


class AdmissionGate:
    """A cross-process lock held from "count the trials" until "the new trial exists".

    SQLite: ``fcntl.flock`` on ``<db>.admission.lock`` (the database is a local file anyway).
    PostgreSQL: a session advisory lock keyed by the study name. Other URLs: no lock (the count can
    then overshoot by one per extra worker; logged once).
    """

    def __init__(self, url: str, study_name: str):
        self.url = url
        self.study_name = study_name
        self._fh: Any = None
        self._conn: Any = None
        self._engine: Any = None
        self._held = False
        db = _sqlite_file(url)
        self._lock_path = db.with_name(db.name + ".admission.lock") if db is not None else None
        if self._lock_path is None and not url.startswith("postgresql"):
            log.warning("no cross-process admission lock for %s: run one worker per study", redact(url))

    def acquire(self) -> None:
        if self._held:
            return
        if self._lock_path is not None:
            import fcntl

            self._fh = open(self._lock_path, "a+")  # noqa: SIM115 -- closed in release()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        elif self.url.startswith("postgresql"):
            import sqlalchemy

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect()
            key = zlib.crc32(f"isc-tune:{self.study_name}".encode()) & 0x7FFFFFFF
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            self._key = key
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        if self._conn is not None:
            import sqlalchemy

            with contextlib.suppress(Exception):
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


def trial_counts(study: Any) -> dict[str, int]:
    """Finished/running counts; a FAIL trial that was re-enqueued (heartbeat retry) is not counted."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried: set[int] = set()
    for t in trials:
        retried.update(int(n) for n in t.system_attrs.get("retry_history", []))
    counts = {"complete": 0, "pruned": 0, "failed": 0, "retried": 0, "running": 0, "waiting": 0}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif t.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif t.state == TrialState.FAIL:
            counts["retried" if t.number in retried else "failed"] += 1
        elif t.state == TrialState.RUNNING:
            counts["running"] += 1
        elif t.state == TrialState.WAITING:
            counts["waiting"] += 1
    counts["finished"] = counts["complete"] + counts["pruned"] + counts["failed"]
    return counts
