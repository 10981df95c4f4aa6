"""The study driver: open or resume the study and its MLflow run, admit trials, log the summary.

Why its own module: what every worker does around the trials (the parent run, the admission loop,
plots and best-trial tags once the trials are in) is independent of what a trial computes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isc.contract import BASELINE_TRIAL_PARAM, BEST_TRIAL_RUN_TAG, ModelRef, Step, Tag, redact
from isc.errors import ConfigError
from isc.tracking import configure, experiment_id, log_params, tracked_run
from isc.tune.objective import (
    BASELINE_ATTR,
    OBJECTIVE_METRIC,
    SYSTEMATIC_ERRORS,
    ValidationSet,
    _objective_factory,
    resolve_validation_gt,
)
from isc.tune.space import TuneConfig, build_pruner, build_sampler, check_start, describe_component
from isc.tune.storage import AdmissionGate, default_storage_url, make_storage, trial_counts

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"


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


def _open_parent_run(study: Any, study_name: str, experiment: str | None) -> tuple[str, bool]:
    """The study run id (created and stored in the study on first use) and whether we created it."""
    import mlflow


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
        client.set_tag(run_id, BEST_TRIAL_RUN_TAG, str(best.user_attrs.get("mlflow_run_id", "")))
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


def _open_study(cfg: TuneConfig, url: str, study_name: str, pruner_obj: Any, gate: AdmissionGate,
                baseline: dict[str, Any]) -> tuple[Any, str]:
    """Create or load the study (maximising) and its MLflow study run id, under the admission lock.

    The worker that creates the study enqueues ``baseline`` (the stage's own values) as its first trial,
    so the best trial is measured against what the stage does untuned, under the same short budget.
    """
    import optuna

    with gate.hold():  # workers starting together must not race on creating the tables or the study
        optuna_storage = make_storage(url, cfg)
        study = optuna.create_study(storage=optuna_storage, study_name=study_name, direction="maximize",
                                    load_if_exists=True, sampler=build_sampler(cfg.sampler), pruner=pruner_obj)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ConfigError("study_name", f"study '{study_name}' exists and minimises; µAP must be maximised")
        parent_id, first = _open_parent_run(study, study_name, cfg.experiment or None)
        if first and baseline and not study.trials:
            study.enqueue_trial(baseline, user_attrs={BASELINE_ATTR: True})
    if not first:
        # Another worker owns the sampler seed: decorrelate ours so workers do not propose the same points.
        study.sampler = build_sampler(cfg.sampler, seed_offset=os.getpid())
    return study, parent_id


def _run_trials(study: Any, objective: Callable[[Any], float], gate: AdmissionGate, errors: list[BaseException],
                n_trials: int) -> int:
    """Admit and run one trial at a time until the study holds ``n_trials``; the number run here."""
    import optuna

    ran = 0
    while True:
        gate.acquire()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            counts = trial_counts(study)
            if counts["finished"] + counts["running"] >= n_trials:
                return ran
            errors.clear()
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            ran += 1
        finally:
            gate.release()
        systematic = [e for e in errors if isinstance(e, SYSTEMATIC_ERRORS)]
        if systematic:
            raise systematic[0]  # bad config/data would fail every trial: stop now (this trial is FAIL)


def _check_start_checkpoint(start_from: str | None) -> None:
    """The hand-off checkpoint exists and is readable (before any study exists: every trial needs it)."""
    if not start_from:
        return
    from isc.models.checkpoint import CheckpointError, resolve_checkpoint

    try:
        resolve_checkpoint(ModelRef.parse(start_from).text)  # parse first: it names a malformed reference
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        raise ConfigError("start_from", f"{start_from}: {str(exc).split(': ', 1)[-1]}") from exc


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
    once with the same arguments; see the package doc for what they share.
    """
    import mlflow


    if n_trials < 1:
        raise ConfigError("n_trials", f"must be >= 1, got {n_trials}")
    if not study_name:
        raise ConfigError("study_name", "empty study name")
    data = str(Path(data).expanduser().resolve())
    gt_path = resolve_validation_gt(data, cfg.split, cfg.ground_truth)
    val = ValidationSet(data, gt_path, cfg.eval_batch_size)
    stage = cfg.tuned_stage()
    check_start(cfg)
    cfg.trial_train_config(data, {})  # bad stage config/override names fail before any study exists
    _check_start_checkpoint(cfg.start_from)
    url = storage or default_storage_url()
    configure(check=True)
    pruner_obj = pruner if pruner is not None else build_pruner(cfg.pruner)
    gate = AdmissionGate(url, study_name)
    baseline = cfg.stage_values(data) if cfg.baseline_trial else {}
    study, parent_id = _open_study(cfg, url, study_name, pruner_obj, gate, baseline)
    run_id = os.environ.get("MLFLOW_RUN_ID") or parent_id
    errors: list[BaseException] = []
    with tracked_run(run_id=run_id) as run:
        client = mlflow.MlflowClient()
        client.set_tag(run.info.run_id, Tag.STEP, Step.TUNE)
        client.set_tag(run.info.run_id, "optuna.study", study_name)
        if run.info.run_id != parent_id:
            client.set_tag(run.info.run_id, Tag.TUNE_STUDY_RUN, parent_id)
        client.set_tag(run.info.run_id, Tag.TUNE_N_TRIALS, str(n_trials))
        client.set_tag(run.info.run_id, Tag.TUNE_STAGE, stage.name)
        log_params({
            "study_name": study_name, "storage": redact(url), "search_space": cfg.search_space_dict(),
            "sampler": describe_component(build_sampler(cfg.sampler)), "pruner": describe_component(pruner_obj),
            "profile": cfg.profile, "tuned_stage": stage.name, "config": stage.config,
            "start_from": cfg.start_from or "", "epochs_per_trial": cfg.epochs_per_trial,
            "validation_split": cfg.split, "validation_ground_truth": str(gt_path),
            "objective": f"{OBJECTIVE_METRIC}: official protocol, after NES {val.nes}",
            "train_overrides": cfg.train_overrides, "job_overrides": cfg.job_overrides, "candidate": cfg.candidate,
            BASELINE_TRIAL_PARAM: baseline,
            "direction": "maximize",
        })
        objective = _objective_factory(cfg, data, study_name, val, gate, errors)
        ran = _run_trials(study, objective, gate, errors, n_trials)
        summary = log_study_summary(study, run.info.run_id)
        if run.info.run_id != parent_id:
            log_study_summary(study, parent_id)
    counts = summary["counts"]
    log.info("study %s: %d trial(s) run here; %s; best %s", study_name, ran, counts, summary["best_value"])
    return TuneResult(study_name, redact(url), parent_id, ran, counts, summary["best_value"],
                      summary["best_params"], summary["best_trial"], summary["best_run_id"])
