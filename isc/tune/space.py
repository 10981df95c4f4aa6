"""The search space and the tune YAML: what a study samples, and how each dimension is validated.

Why its own module: the schema is read by ``isc tune`` before any study or run exists (a typo in a
search-space name must fail first), and by the driver to know which stage it tunes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isc.contract import parse_bool
from isc.errors import ConfigError
from isc.train.config import FIELDS, load_config
from isc.yamlfile import read_yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_TUNE_CONFIG = CONFIG_DIR / "tune.yaml"
PARAM_TYPES = ("float", "int", "categorical")


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

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this dimension (a trial can be enqueued with it)."""
        if self.type == "categorical":
            return value in (self.choices or ())
        return isinstance(value, (int, float)) and float(self.low) <= float(value) <= float(self.high)


def parse_param_spec(name: str, raw: Any) -> ParamSpec:
    """Validate one ``search_space`` entry; errors name ``search_space.<name>``."""

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


CANDIDATES = ("trial", "retrain")


@dataclass
class TuneConfig:
    """Everything ``isc tune`` needs besides data, trial count, study name and storage.

    A trial fine-tunes ``stage`` of the driver profile ``profile`` (:data:`isc.recipe.PROFILES`) from
    ``start_from``, that stage's hand-off checkpoint, for ``epochs_per_trial`` epochs. Its training
    options, lowest precedence first: the stage's YAML < ``train_overrides`` (this file: short trials) <
    ``job_overrides`` (the main job's ``overrides``, fixed on every stage) < the sampled values.
    """

    search_space: dict[str, ParamSpec]
    profile: str = "demo"  # the driver profile whose stage is tuned
    stage: str | None = None  # a stage of that profile; None = its last fine-tuning stage
    start_from: str | None = None  # the stage's hand-off checkpoint (<run id>:N); None for a pretrained start
    epochs_per_trial: int = 2
    split: str = "val"
    ground_truth: str | None = None  # explicit validation GT file (default: ground_truth_<split>.csv)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # fixed on top of the stage config
    job_overrides: dict[str, Any] = field(default_factory=dict)  # the main job's overrides (sampled values win)
    candidate: str = "trial"  # what the main job evaluates: trial (the best trial's model) | retrain
    baseline_trial: bool = True  # the study's first trial runs the stage's own values (those in the space)
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

    def tuned_stage(self) -> Any:
        """The :class:`isc.recipe.Stage` the trials fine-tune (validated by :func:`load_tune_config`)."""
        from isc.recipe import tuned_stage

        return tuned_stage(self.profile, self.stage)

    def trial_train_config(self, data: str, params: Mapping[str, Any]) -> Any:
        """The :class:`isc.train.config.TrainConfig` of one trial with sampled ``params`` (class doc)."""

        stage = self.tuned_stage()
        values = {**dict(stage.overrides), **self.train_overrides, **self.job_overrides, **params,
                  "epochs": int(self.epochs_per_trial), "data": data}
        if self.start_from:
            values["init_from"] = self.start_from
        return load_config(stage_config_path(stage), **values)

    def stage_values(self, data: str) -> dict[str, Any]:
        """The searched options' values the stage trains with untuned (those inside the search space)."""
        train = self.trial_train_config(data, {})
        return {name: getattr(train, name) for name, spec in self.search_space.items()
                if spec.contains(getattr(train, name))}


def stage_config_path(stage: Any) -> Path:
    """A profile stage's training YAML: relative to this checkout, so ``isc tune`` works from anywhere."""
    path = Path(stage.config)
    return path if path.is_absolute() else CONFIG_DIR.parent.parent / path


def check_start(cfg: TuneConfig) -> None:
    """``start_from`` is given exactly when the tuned stage starts from a hand-off checkpoint."""
    stage = cfg.tuned_stage()
    if stage.source is None:
        if cfg.start_from:
            raise ConfigError("start_from", f"{stage.name} of profile '{cfg.profile}' starts from pretrained "
                                            f"weights, not a hand-off checkpoint; got '{cfg.start_from}'")
        return
    if not cfg.start_from:
        from isc.recipe import start_label

        ckpt = f":{stage.checkpoint}" if stage.checkpoint is not None else ""
        raise ConfigError("start_from", f"{stage.name} of profile '{cfg.profile}' starts from {start_label(stage)}"
                                        f": pass --start-from <{stage.source} train run id>{ckpt}")


def load_tune_config(path: str | Path | None = None, **overrides: Any) -> TuneConfig:
    """Read a tune YAML (default ``isc/configs/tune.yaml``); keyword overrides win (``None`` = keep)."""

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
    for key in ("train_overrides", "job_overrides"):
        if not isinstance(getattr(cfg, key), Mapping):
            raise ConfigError(key, f"expected a mapping of training options, got {getattr(cfg, key)!r}")
    clash = set(cfg.search_space) & set(cfg.train_overrides)
    if clash:
        raise ConfigError("train_overrides", f"{sorted(clash)} are also in search_space")
    try:
        cfg.baseline_trial = parse_bool(cfg.baseline_trial)
    except ValueError as exc:
        raise ConfigError("baseline_trial", str(exc)) from exc
    if cfg.candidate not in CANDIDATES:
        raise ConfigError("candidate", f"must be one of {CANDIDATES}, got '{cfg.candidate}'")
    cfg.tuned_stage()  # the profile and stage exist (start_from is checked by run_study: the driver sets it later)
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
