"""Optuna study over the contrastive-loss margins, the memory-bank size and the learning rate.

Why: the recipe's margins/memory/lr were tuned for 4-8 GPUs and 1M images; on another dataset or
budget they need re-tuning. Each trial trains the base profile (``demo`` by default) for a few epochs
and is scored by µAP (official ISC21 protocol) of its model on the *validation* split
(``ground_truth_val.csv`` queries vs all references) after every epoch, which also drives pruning.
The test split is never used here: a ground truth that shares queries with ``ground_truth_test.csv``
is refused.

MLflow layout (manual logging; optuna-integration's ``MLflowCallback`` is deprecated):

* one *study run* (tags ``isc.step=tune``, ``optuna.study``): search space, study name, storage URL
  (password removed), sampler, pruner as params; best value (metric ``best_value``), best params (tags
  ``best_params.<name>`` + ``optuna/best_params.json``) and Optuna plots as artifacts. Its id is kept in
  the study's user attr ``mlflow_parent_run_id`` so every worker (and a resumed study) nests under it;
* one nested *trial run* per trial (tags ``optuna.study``, ``optuna.trial``, ``optuna.state``): the
  trial params, per-epoch ``val_average_precision``/``val_recall_p90`` (step = epoch) and the final
  ``objective``. Trial state -> run status: COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED (tag
  ``isc.error``). ``trial.user_attrs['mlflow_run_id']`` links back.

Parallel workers: every worker runs the same command against one RDB storage (SQLite next to the
MLflow store by default, PostgreSQL for several machines). Trials are admitted one at a time under a
lock (a file lock beside a SQLite file, a PostgreSQL advisory lock) that is held from the count until
the trial exists, so ``n_trials`` is an exact study-wide total of finished (complete + pruned + failed)
trials however many workers run. (Optuna's ``MaxTrialsCallback`` only checks after a trial ends, so two
workers can overshoot by one each.) Heartbeats mark trials of killed workers FAIL, and
``RetryHeartbeatStaleTrialCallback`` re-enqueues them once with the same params; a retried failure does
not count towards ``n_trials`` (its retry does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isc.contract import Step, Tag, redact
from isc.errors import BadImageError, BadImagesError, ConfigError, DescriptorFileError, ISCError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_TUNE_CONFIG = CONFIG_DIR / "tune.yaml"
PARENT_ATTR = "mlflow_parent_run_id"
OBJECTIVE_METRIC = "val_average_precision"
PARAM_TYPES = ("float", "int", "categorical")
# Errors that would fail every trial the same way (bad option, unreadable data): they stop the worker.
# Anything else (divergence, out of memory, ...) fails only its trial and the study goes on.
SYSTEMATIC_ERRORS = (ConfigError, BadImageError, BadImagesError, DescriptorFileError)


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ParamSpec:
    """One search dimension: ``float``/``int`` in [low, high] (``log`` scale, optional ``step``) or
    ``categorical`` over ``choices``. ``name`` is a :class:`isc.train.config.TrainConfig` field."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log,
                                       step=None if self.step is None else float(self.step))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=1 if self.step is None else int(self.step))
        return trial.suggest_categorical(self.name, list(self.choices or ()))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None and k != "name" and not (k == "log" and not v)}


def parse_param_spec(name: str, raw: Any) -> ParamSpec:
    """Validate one ``search_space`` entry; errors name ``search_space.<name>``."""
    from isc.train.config import FIELDS

    where = f"search_space.{name}"
    if name not in FIELDS:
        raise ConfigError(where, f"not a training option (known: {', '.join(sorted(FIELDS))})")
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping with 'type', got {raw!r}")
    unknown = set(raw) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise ConfigError(where, f"unknown keys {sorted(unknown)}")
    kind = str(raw.get("type", ""))
    if kind not in PARAM_TYPES:
        raise ConfigError(where, f"type must be one of {PARAM_TYPES}, got '{kind}'")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(where, "categorical needs a non-empty 'choices' list")
        return ParamSpec(name, kind, choices=tuple(choices))
    try:
        low, high = float(raw["low"]), float(raw["high"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(where, f"{kind} needs numeric 'low' and 'high' ({exc})") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(where, f"needs finite low <= high, got [{low}, {high}]")
    use_log = bool(raw.get("log", False))
    if use_log and low <= 0:
        raise ConfigError(where, f"log scale needs low > 0, got {low}")
    step = raw.get("step")
    if step is not None and (float(step) <= 0 or use_log):
        raise ConfigError(where, "step must be > 0 and cannot be combined with log")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ConfigError(where, f"int bounds must be integers, got [{low}, {high}]")
    return ParamSpec(name, kind, low, high, use_log, None if step is None else float(step))


@dataclass
class TuneConfig:
    """Everything ``isc tune`` needs besides data, trial count, study name and storage."""

    search_space: dict[str, ParamSpec]
    profile: str = "demo_stage1"  # base training profile (packaged name or YAML path)
    epochs_per_trial: int = 2
    split: str = "val"
    ground_truth: str | None = None  # explicit validation GT file (default: ground_truth_<split>.csv)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # fixed on top of the profile
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median", "n_startup_trials": 2})
    heartbeat_interval: int = 60  # s between heartbeats of a running trial
    grace_period: int = 180  # s without heartbeat before a RUNNING trial is declared dead (FAIL)
    max_retry: int = 1  # re-runs of a trial whose worker died
    sqlite_timeout: float = 60.0  # s a SQLite writer waits for the lock
    eval_batch_size: int = 64
    experiment: str | None = None

    def search_space_dict(self) -> dict[str, dict[str, Any]]:
        return {name: spec.to_dict() for name, spec in self.search_space.items()}


def load_tune_config(path: str | Path | None = None, **overrides: Any) -> TuneConfig:
    """Read a tune YAML (default ``isc/configs/tune.yaml``); keyword overrides win (``None`` = keep)."""
    from isc.train.config import read_yaml

    path = Path(path) if path else DEFAULT_TUNE_CONFIG
    if not path.is_file() and (CONFIG_DIR / f"{path}.yaml").is_file():
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError("config", f"{path}: no such tune config")
    raw = read_yaml(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(TuneConfig)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError("config", f"{path}: unknown keys {sorted(unknown)} (known: {sorted(names)})")
    space = raw.get("search_space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("search_space", f"{path}: needs a non-empty search_space mapping")
    raw["search_space"] = {str(k): parse_param_spec(str(k), v) for k, v in space.items()}
    cfg = TuneConfig(**raw)
    if int(cfg.epochs_per_trial) < 1:
        raise ConfigError("epochs_per_trial", f"must be >= 1, got {cfg.epochs_per_trial}")
    for key in ("heartbeat_interval", "grace_period"):
        if int(getattr(cfg, key)) < 1:
            raise ConfigError(key, f"must be >= 1 s, got {getattr(cfg, key)}")
    if cfg.grace_period <= cfg.heartbeat_interval:
        raise ConfigError("grace_period", f"must exceed heartbeat_interval ({cfg.heartbeat_interval} s)")
    clash = set(cfg.search_space) & set(cfg.train_overrides)
    if clash:
        raise ConfigError("train_overrides", f"{sorted(clash)} are also in search_space")
    build_pruner(cfg.pruner)  # validate now, before any study exists
    return cfg


# ------------------------------------------------------------------------------ sampler / pruner


def build_sampler(spec: Mapping[str, Any], seed_offset: int = 0) -> Any:
    """``{type: tpe|random|cmaes|qmc, seed, ...kwargs}`` -> an Optuna sampler (seed + ``seed_offset``)."""
    import optuna

    spec = dict(spec or {})
    kind = str(spec.pop("type", "tpe")).lower()
    seed = spec.pop("seed", None)
    if seed is not None:
        spec["seed"] = int(seed) + int(seed_offset)
    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "cmaes": optuna.samplers.CmaEsSampler, "qmc": optuna.samplers.QMCSampler}
    if kind not in classes:
        raise ConfigError("sampler", f"type must be one of {sorted(classes)}, got '{kind}'")
    try:
        return classes[kind](**spec)
    except TypeError as exc:
        raise ConfigError("sampler", f"bad options for {kind}: {exc}") from exc


def build_pruner(spec: Mapping[str, Any] | None) -> Any:
    """``{type: median|percentile|hyperband|successive_halving|threshold|patient|none, ...kwargs}``."""
    import optuna

    spec = dict(spec or {"type": "none"})
    kind = str(spec.pop("type", "median")).lower()
    p = optuna.pruners
    classes: dict[str, Callable[..., Any]] = {
        "median": p.MedianPruner, "percentile": p.PercentilePruner, "hyperband": p.HyperbandPruner,
        "successive_halving": p.SuccessiveHalvingPruner, "threshold": p.ThresholdPruner,
        "none": p.NopPruner, "nop": p.NopPruner,
    }
    if kind == "patient":
        inner = build_pruner(spec.pop("wrapped", {"type": "median"}))
        try:
            return p.PatientPruner(inner, **spec)
        except TypeError as exc:
            raise ConfigError("pruner", f"bad options for patient: {exc}") from exc
    if kind not in classes:
        raise ConfigError("pruner", f"type must be one of {sorted([*classes, 'patient'])}, got '{kind}'")
    try:
        return classes[kind](**spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError("pruner", f"bad options for {kind}: {exc}") from exc


def describe_component(obj: Any) -> str:
    """``MedianPruner(n_startup_trials=2, ...)``-style text for the study run's params."""
    attrs = {k.lstrip("_"): v for k, v in vars(obj).items()
             if not k.startswith("__") and isinstance(v, (int, float, str, bool, type(None)))}
    inner = ", ".join(f"{k}={v}" for k, v in sorted(attrs.items()))[:400]
    return f"{type(obj).__name__}({inner})"


# ------------------------------------------------------------------------------------- storage


def default_storage_url() -> str:
    """``sqlite:///<project>/optuna.db``, next to the default MLflow store."""
    from isc.tracking import project_root

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


# ---------------------------------------------------------------------------------- validation


def resolve_validation_gt(data: str | Path, split: str = "val", ground_truth: str | Path | None = None) -> Path:
    """The ground truth trials are scored on; refuses the test split or anything sharing its queries."""
    from isc.data.disc21 import DISC21
    from isc.io import read_ground_truth

    ds = DISC21(data)
    if split in ("test", "all", "") and not ground_truth:
        raise ConfigError("split", f"tuning on '{split or 'all'}' is refused: trials must be scored on a "
                                   "validation split (ground_truth_val.csv), never the test split")
    path = Path(ground_truth).expanduser() if ground_truth else ds.ground_truth(split)
    if not path.is_file():
        raise ConfigError("ground_truth" if ground_truth else "split",
                          f"{path}: no such ground-truth file (`isc data make-mini` writes ground_truth_val.csv)")
    test = ds.ground_truth("test")
    if test.is_file():
        if path.resolve() == test.resolve():
            raise ConfigError("ground_truth", f"{path} is the test split; tuning on it is refused")
        shared = set(read_ground_truth(path).queries) & set(read_ground_truth(test).queries)
        if shared:
            raise ConfigError("ground_truth", f"{path} shares {len(shared)} queries with the test split {test} "
                                              f"(e.g. {sorted(shared)[:3]}); tuning on it is refused")
    elif path.name.endswith("_test.csv"):
        raise ConfigError("ground_truth", f"{path} is named as a test split; tuning on it is refused")
    return path


class ValidationSet:
    """Validation queries (those listed in the GT) vs all references, scored by the official protocol."""

    def __init__(self, data: str | Path, gt_path: str | Path, batch_size: int = 64):
        from isc.data.disc21 import DISC21
        from isc.io import read_ground_truth

        ds = DISC21(data)
        ds.validate("qr")
        self.gt_path = Path(gt_path)
        self.gt = read_ground_truth(self.gt_path)
        queries = dict(ds.images("query"))
        missing = [q for q in self.gt.queries if q not in queries]
        if missing:
            raise ConfigError("ground_truth", f"{self.gt_path}: {len(missing)} queries have no image in "
                                              f"{ds.query_dir} (e.g. {missing[:3]})")
        self.query_ids = sorted(self.gt.queries)
        self.query_paths = [queries[q] for q in self.query_ids]
        refs = ds.images("reference")
        self.reference_ids = [r for r, _ in refs]
        self.reference_paths = [p for _, p in refs]
        self.batch_size = int(batch_size)

    def score(self, model: Any) -> Any:
        """``EvalResult`` of ``model`` (any ISCNet, train or eval mode; its mode is restored)."""
        from isc.extract import describe_images
        from isc.io import Descriptors
        from isc.metrics import evaluate

        q = describe_images(model, self.query_paths, batch_size=self.batch_size)
        r = describe_images(model, self.reference_paths, batch_size=self.batch_size)
        desc = Descriptors(q, self.query_ids, r, self.reference_ids)
        return evaluate(desc, self.gt, protocol="official", source=f"validation ({self.gt_path.name})")


# -------------------------------------------------------------------------------------- study


@dataclass
class TuneResult:
    study_name: str
    storage: str  # redacted
    parent_run_id: str
    n_trials_here: int
    counts: dict[str, int]
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    best_run_id: str | None


def _train_trial(cfg: Any, epoch_callback: Callable[[int, Any], Any]) -> Any:
    """Seam to the training loop (``isc.train.train``); trials run it in-process."""
    from isc.train import train

    return train(cfg, epoch_callback=epoch_callback)


@contextlib.contextmanager
def _trial_run(study_name: str, trial: Any) -> Iterator[Any]:
    """Nested MLflow run of one trial; pruned -> KILLED (tag optuna.state=PRUNED), error -> FAILED.

    (``mlflow.start_run`` as a context manager would end a pruned trial FAILED.)
    """
    import mlflow
    import optuna

    parent = mlflow.active_run()
    run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                           experiment_id=parent.info.experiment_id if parent is not None else None,
                           tags={"optuna.study": study_name, "optuna.trial": str(trial.number),
                                 Tag.STEP: Step.TUNE_TRIAL, "optuna.state": "RUNNING"})
    run_id = run.info.run_id
    client = mlflow.MlflowClient()

    def finish(state: str, status: str, error: str | None = None) -> None:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "optuna.state", state)
            client.set_tag(run_id, Tag.STEP, Step.TUNE_TRIAL)  # the training loop tagged it "train"
            if error:
                client.set_tag(run_id, Tag.ERROR, error[:4000])
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status=status)
        else:  # the training loop already closed it: set the status without touching the parent
            client.set_terminated(run_id, status=status)

    try:
        yield run
    except optuna.TrialPruned as exc:
        finish("PRUNED", "KILLED", f"pruned: {exc}")
        raise
    except KeyboardInterrupt:
        finish("FAIL", "KILLED", "interrupted")
        raise
    except BaseException as exc:
        finish("FAIL", "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    else:
        finish("COMPLETE", "FINISHED")


def _objective_factory(cfg: TuneConfig, data: str, study_name: str, val: ValidationSet, gate: AdmissionGate,
                       errors: list[BaseException]) -> Callable[[Any], float]:
    import optuna

    from isc.tracking import log_metrics, log_params
    from isc.train.config import load_config

    def objective(trial: Any) -> float:
        gate.release()  # the trial exists now: other workers may be admitted
        params = {name: spec.suggest(trial) for name, spec in cfg.search_space.items()}
        try:
            with _trial_run(study_name, trial) as run:
                trial.set_user_attr("mlflow_run_id", run.info.run_id)
                log_params({**params, "epochs_per_trial": cfg.epochs_per_trial, "profile": cfg.profile,
                            "validation_split": cfg.split, "validation_ground_truth": str(val.gt_path)})
                overrides = {**cfg.train_overrides, **params, "epochs": int(cfg.epochs_per_trial), "data": data}
                train_cfg = load_config(cfg.profile, **overrides)
                last: dict[str, float] = {}

                def on_epoch(epoch: int, model: Any) -> dict[str, float]:
                    res = val.score(model)
                    value = float(res.metrics.average_precision)
                    last["value"] = value
                    metrics = {OBJECTIVE_METRIC: value, "val_recall_p90": float(res.metrics.recall_p90)}
                    log_metrics(metrics, step=int(epoch))
                    trial.report(value, int(epoch))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"epoch {epoch}: val µAP {value:.4f} below the pruner's bar")
                    return None  # already logged (step = epoch)

                _train_trial(train_cfg, on_epoch)
                if "value" not in last:
                    raise ISCError("training finished without an epoch callback: no validation score")
                log_metrics({"objective": last["value"]})
                return last["value"]
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            errors.append(exc)
            raise

    return objective


def _open_parent_run(study: Any, study_name: str, experiment: str | None) -> tuple[str, bool]:
    """The study run id (created and stored in the study on first use) and whether we created it."""
    import mlflow

    from isc.tracking import experiment_id

    existing = study.user_attrs.get(PARENT_ATTR)
    if existing:
        return str(existing), False
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        run_id = env_run
    else:
        run_id = mlflow.MlflowClient().create_run(
            experiment_id(experiment), run_name=f"study-{study_name}", tags={Tag.STEP: Step.TUNE, "optuna.study": study_name}
        ).info.run_id
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id, True


def log_study_summary(study: Any, run_id: str) -> dict[str, Any]:
    """Best value/params/trial on the study run ``run_id`` + Optuna plots (PNG) and a trials CSV."""
    import mlflow
    from optuna.trial import TrialState

    client = mlflow.MlflowClient()
    counts = trial_counts(study)
    summary: dict[str, Any] = {"counts": counts, "best_value": None, "best_params": {}, "best_trial": None,
                               "best_run_id": None}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    metrics = {f"n_{k}": float(v) for k, v in counts.items()}
    if complete:
        best = study.best_trial
        summary.update(best_value=float(best.value), best_params=dict(best.params), best_trial=best.number,
                       best_run_id=best.user_attrs.get("mlflow_run_id"))
        metrics.update(best_value=float(best.value), best_trial=float(best.number))
        for name, value in best.params.items():
            client.set_tag(run_id, f"best_params.{name}", str(value))
        client.set_tag(run_id, "best_trial_run_id", str(best.user_attrs.get("mlflow_run_id", "")))
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    with tempfile.TemporaryDirectory(prefix="isc-tune-") as tmp:
        out = Path(tmp)
        files = [out / "best_params.json"]
        files[0].write_text(json.dumps(summary, indent=2, default=str))
        try:
            study.trials_dataframe().to_csv(out / "trials.csv", index=False)
            files.append(out / "trials.csv")
        except Exception as exc:  # noqa: BLE001 -- pandas/optuna version quirks must not lose the study
            log.warning("could not write trials.csv: %s", exc)
        files += _save_plots(study, out, len(complete))
        for f in files:
            try:
                client.log_artifact(run_id, str(f), "optuna")
            except Exception as exc:  # noqa: BLE001 -- store hiccup: the study itself is safe in its storage
                log.warning("could not upload %s: %s", f.name, exc)
    return summary


def _save_plots(study: Any, out: Path, n_complete: int) -> list[Path]:
    """Optuna's matplotlib plots as PNG: history always, intermediate values, importances with >= 2."""
    if n_complete < 1:
        return []
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    plots: list[tuple[str, Callable[[Any], Any]]] = [
        ("optimization_history.png", ovm.plot_optimization_history),
        ("intermediate_values.png", ovm.plot_intermediate_values),
    ]
    if n_complete >= 2:
        plots.append(("param_importances.png", ovm.plot_param_importances))
    written = []
    for name, fn in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.savefig(out / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(out / name)
        except Exception as exc:  # noqa: BLE001 -- a plot must never lose a finished study
            log.warning("could not draw %s: %s", name, exc)
    return written


def run_study(
    cfg: TuneConfig,
    data: str | Path,
    n_trials: int,
    study_name: str = "isc-tune",
    storage: str | None = None,
    pruner: Any = None,
) -> TuneResult:
    """Run trials of ``study_name`` until the study holds ``n_trials`` finished trials (all workers).

    ``storage``: RDB URL (default :func:`default_storage_url`). ``pruner``: an Optuna pruner object that
    replaces ``cfg.pruner`` (for callers that build their own). Several processes may call this at
    once with the same arguments; see the module doc for what they share.
    """
    import mlflow
    import optuna

    from isc.tracking import configure, log_params, tracked_run

    if n_trials < 1:
        raise ConfigError("n_trials", f"must be >= 1, got {n_trials}")
    if not study_name:
        raise ConfigError("study_name", "empty study name")
    data = str(Path(data).expanduser().resolve())
    gt_path = resolve_validation_gt(data, cfg.split, cfg.ground_truth)
    val = ValidationSet(data, gt_path, cfg.eval_batch_size)
    from isc.train.config import load_config

    load_config(cfg.profile, **cfg.train_overrides)  # bad profile/override names fail before any study exists
    url = storage or default_storage_url()
    configure(check=True)
    pruner_obj = pruner if pruner is not None else build_pruner(cfg.pruner)
    gate = AdmissionGate(url, study_name)
    with gate.hold():  # workers starting together must not race on creating the tables or the study
        optuna_storage = make_storage(url, cfg)
        study = optuna.create_study(storage=optuna_storage, study_name=study_name, direction="maximize",
                                    load_if_exists=True, sampler=build_sampler(cfg.sampler), pruner=pruner_obj)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ConfigError("study_name", f"study '{study_name}' exists and minimises; µAP must be maximised")
        parent_id, first = _open_parent_run(study, study_name, cfg.experiment or None)
    if not first:
        # Another worker owns the sampler seed: decorrelate ours so workers do not propose the same points.
        study.sampler = build_sampler(cfg.sampler, seed_offset=os.getpid())
    run_id = os.environ.get("MLFLOW_RUN_ID") or parent_id
    errors: list[BaseException] = []
    ran = 0
    with tracked_run(run_id=run_id) as run:
        client = mlflow.MlflowClient()
        client.set_tag(run.info.run_id, Tag.STEP, Step.TUNE)
        client.set_tag(run.info.run_id, "optuna.study", study_name)
        if run.info.run_id != parent_id:
            client.set_tag(run.info.run_id, Tag.TUNE_STUDY_RUN, parent_id)
        client.set_tag(run.info.run_id, Tag.TUNE_N_TRIALS, str(n_trials))
        log_params({
            "study_name": study_name, "storage": redact(url), "search_space": cfg.search_space_dict(),
            "sampler": describe_component(build_sampler(cfg.sampler)), "pruner": describe_component(pruner_obj),
            "profile": cfg.profile, "epochs_per_trial": cfg.epochs_per_trial, "validation_split": cfg.split,
            "validation_ground_truth": str(gt_path), "objective": f"{OBJECTIVE_METRIC} (official protocol)",
            "train_overrides": cfg.train_overrides, "direction": "maximize",
        })
        objective = _objective_factory(cfg, data, study_name, val, gate, errors)
        while True:
            gate.acquire()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                counts = trial_counts(study)
                if counts["finished"] + counts["running"] >= n_trials:
                    break
                errors.clear()
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
                ran += 1
            finally:
                gate.release()
            systematic = [e for e in errors if isinstance(e, SYSTEMATIC_ERRORS)]
            if systematic:
                raise systematic[0]  # bad config/data would fail every trial: stop now (this trial is FAIL)
        summary = log_study_summary(study, run.info.run_id)
        if run.info.run_id != parent_id:
            log_study_summary(study, parent_id)
    counts = summary["counts"]
    log.info("study %s: %d trial(s) run here; %s; best %s", study_name, ran, counts, summary["best_value"])
    return TuneResult(study_name, redact(url), parent_id, ran, counts, summary["best_value"],
                      summary["best_params"], summary["best_trial"], summary["best_run_id"])
