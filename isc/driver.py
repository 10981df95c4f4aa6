"""The main job: data -> training stages -> extract -> postprocess -> evaluate -> tune -> promote -> search.

MLflow's multistep-workflow pattern: the driver owns a parent run and launches every step with
``mlflow.run(".", <entry point>, ...)``, so each step is a nested run of its own. Steps hand results on as
artifact URIs (``runs:/<id>/descriptors/descriptors.h5``). A step whose entry point, parameters and code
version match a FINISHED run of the same experiment is reused instead of re-run; because upstream run ids
are part of the downstream parameters (``model=<train run id>``, ``descriptors=runs:/<extract run>/...``),
a change anywhere upstream invalidates everything below it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from isc.contract import CHAMPION, Tag
from isc.errors import ConfigError, ISCError
from isc.nodes import Board, Layout
from isc.recipe import (
    PROFILES,
    SettingsPlan,
    Stage,
    handoff_epochs,
    settings_plan,
    stage_overrides,
    start_label,
    start_reference,
    tuned_stage,
)
from isc.tracking import git_commit, normalize_param
from isc.train.config import parse_overrides

log = logging.getLogger("isc.driver")


@dataclass
class StepRecord:
    step: str
    entry_point: str
    run_id: str
    reused: bool
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)


# Entry points started through isc.launch: each is given the job's process count (nproc_per_node).
LAUNCHED_ENTRY_POINTS = ("train", "extract")


class Pipeline:
    """Runs and reuses MLflow project steps inside the driver's (parent) run."""

    def __init__(self, project_dir: Path, experiment_id: str, force: bool = False, layout: Layout | None = None):
        from mlflow import MlflowClient

        self.layout = layout or Layout()
        self.board: Board | None = None  # the other machines' step board (isc/nodes.py), when nnodes > 1
        self.project_dir = project_dir
        self.experiment_id = experiment_id
        self.force = force
        self.client = MlflowClient()
        self.commit = git_commit(project_dir)
        self.records: list[StepRecord] = []

    def find_finished(self, entry_point: str, parameters: dict[str, Any]) -> Any | None:
        """The newest FINISHED run of ``entry_point`` with exactly these parameters and code version."""
        filt = f"tags.`mlflow.project.entryPoint` = '{entry_point}' and attributes.status = 'FINISHED'"
        runs = self.client.search_runs([self.experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"])
        wanted = {k: normalize_param(str(v)) for k, v in parameters.items()}
        for run in runs:
            if self.commit and run.data.tags.get("mlflow.source.git.commit") not in (self.commit, None):
                continue
            params = run.data.params
            if all(normalize_param(params.get(k)) == v for k, v in wanted.items()):
                return run
        return None

    def step_failed(self, step: str, message: str) -> ISCError:
        """The error of a step whose process failed: the step, its run and the reason its run recorded (the
        ``isc.error`` tag), instead of MLflow's "Run (ID ...) failed", which the command line showed as a
        tracking-store error. A step ended by a signal sent to it alone (its run says "interrupted") is
        marked KILLED again: MLflow 3.17's ``mlflow.run`` overwrites a step's own KILLED with FAILED."""
        import re

        m = re.search(r"Run \(ID '([0-9a-f]+)'\)", message)
        if not m:
            return ISCError(f"step {step} failed ({message})")
        run_id = m.group(1)
        try:
            run = self.client.get_run(run_id)
            reason = run.data.tags.get(Tag.ERROR, "")
            if reason == "interrupted":
                self.client.set_terminated(run_id, "KILLED")
                return ISCError(f"step {step} was interrupted by a signal to its process (run {run_id}, KILLED)")
        except Exception:  # noqa: BLE001 -- the store is unreachable: report what is known
            reason = ""
        return ISCError(f"step {step} failed (run {run_id}){': ' + reason.splitlines()[0] if reason else ''}; "
                        "its output above has the details")

    def run(self, step: str, entry_point: str, parameters: dict[str, Any]) -> StepRecord:
        import mlflow

        parameters = {k: v for k, v in parameters.items()}
        launched = entry_point in LAUNCHED_ENTRY_POINTS
        if launched:  # a part of the reuse key: runs differ in process count (and machines)
            parameters.setdefault("nproc_per_node", self.layout.nproc_per_node)
            parameters.update(self.layout.step_parameters())
        existing = None if self.force else self.find_finished(entry_point, parameters)
        if existing is not None:
            wall = ((existing.info.end_time or 0) - (existing.info.start_time or 0)) / 1000.0
            log.info("step %-22s reusing finished run %s (same entry point, parameters, code)", step, existing.info.run_id)
            rec = StepRecord(step, entry_point, existing.info.run_id, True, 0.0, dict(existing.data.metrics))
            rec.metrics["original_wall_s"] = wall
        else:
            log.info("step %-22s running entry point '%s'", step, entry_point)
            t0 = time.perf_counter()
            from mlflow.exceptions import ExecutionException

            if launched and self.board is not None:  # the other machines start the same step as node 1..
                self.board.announce(self.project_dir, entry_point, parameters)
            try:
                submitted = mlflow.run(
                    str(self.project_dir),
                    entry_point,
                    parameters=parameters,
                    experiment_id=self.experiment_id,
                    env_manager="local",
                    run_name=step,
                    synchronous=True,
                )
            except ExecutionException as exc:
                raise self.step_failed(step, str(exc)) from None
            wall = time.perf_counter() - t0
            run = self.client.get_run(submitted.run_id)
            rec = StepRecord(step, entry_point, submitted.run_id, False, wall, dict(run.data.metrics))
        self.records.append(rec)
        mlflow.log_metric(f"wall_s.{step}", rec.wall_s)
        mlflow.set_tag(f"{Tag.STEP_RUN_PREFIX}{step}", rec.run_id)
        return rec


def run_main(
    data: str,
    source: str | None = None,
    profile: str = "demo",
    n_trials: int = 3,
    force: bool = False,
    model_name: str = "isc-descriptor",
    overrides: str = "",
    layout: Layout | None = None,
    settings_grid: dict[str, Any] | None = None,
    join_timeout_s: float = 900.0,
) -> Any:
    """Run the whole pipeline inside the active MLflow run; returns the summary DataFrame.

    ``settings_grid``: the val grid of extraction settings, any of ``sizes``, ``tta``, ``top``, ``tta_sizes``
    (:class:`Profile`'s ``settings_*``); what is not given is the profile's.

    The arguments are those :func:`check_arguments` accepted (before the run was opened).
    ``layout``: processes (and machines) of every training stage and extraction (torchrun through
    isc.launch); with several machines the others run ``isc join`` and get ``join_timeout_s`` to do so.

    SIGTERM / SIGINT end the step processes as a whole (the step's process, torchrun, ranks, DataLoader
    workers; SIGKILL after a grace period: :mod:`isc.proctree`), mark the step runs still open KILLED and
    remove the temporary files the stopped processes left under ``<home>/outputs``; then the interrupt
    goes on (the main run ends KILLED, one line, exit 143 / 130).
    """
    import mlflow

    from isc.proctree import children_end_with_us
    from isc.tracking import project_root

    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("run_main must run inside an active MLflow run")
    out_root = project_root() / "outputs"  # $ISC_HOME/outputs, next to the default store

    def stopped(pids: list[int]) -> None:
        _end_interrupted(active.info.run_id, out_root)

    quiet = _QuietCancel()
    logging.getLogger("mlflow.projects").addFilter(quiet)
    try:
        with children_end_with_us(stopped):
            return _run_main(data, source, profile, n_trials, force, model_name, overrides, layout or Layout(),
                             settings_grid, out_root, join_timeout_s)
    except KeyboardInterrupt:
        _end_interrupted(active.info.run_id, out_root)  # also when the signal came between two steps
        raise
    finally:
        logging.getLogger("mlflow.projects").removeFilter(quiet)


class _QuietCancel(logging.Filter):
    """Drops MLflow's "Run ... interrupted, cancelling run" ERROR record: the driver has already ended the
    step and the command prints the one line about the interruption."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "interrupted, cancelling run" not in str(record.msg)


def _end_interrupted(main_run_id: str, out_root: Path) -> None:
    """After a signal: every run under the main run (steps, tune trials) still RUNNING ends KILLED, and the
    temporary files of writers that are gone are removed from the job's outputs."""
    from mlflow import MlflowClient

    from isc.fileutil import remove_dead_partials

    client = MlflowClient()
    experiment = client.get_run(main_run_id).info.experiment_id
    parents, seen = [main_run_id], {main_run_id}
    while parents:
        parent = parents.pop()
        for run in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
            if run.info.run_id in seen:
                continue
            seen.add(run.info.run_id)
            parents.append(run.info.run_id)
            # FAILED + "interrupted": a step that marked itself KILLED, which `mlflow.run`'s interrupt path
            # then overwrote (MLflow 3.17 compares the status string with RunStatus ints: never "terminated")
            interrupted = run.info.status == "FAILED" and run.data.tags.get(Tag.ERROR) == "interrupted"
            if run.info.status == "RUNNING" or interrupted:
                client.set_tag(run.info.run_id, Tag.ERROR, "interrupted")
                client.set_terminated(run.info.run_id, "KILLED")
    if out_root.is_dir():
        removed = remove_dead_partials(out_root)
        if removed:
            log.info("removed %d temporary file(s) of stopped steps under %s", len(removed), out_root)


def _run_main(
    data: str,
    source: str | None,
    profile: str,
    n_trials: int,
    force: bool,
    model_name: str,
    overrides: str,
    layout: Layout,
    settings_grid: dict[str, Any] | None,
    out_root: Path,
    join_timeout_s: float,
) -> Any:
    """:func:`run_main`'s steps (``out_root``: where the steps write their files)."""
    # long: the pipeline's steps in their order, read top to bottom; each step's parameters name the run
    # ids of the steps before it, which is what the reuse of finished runs keys on.
    import mlflow

    project_dir = Path(__file__).resolve().parent.parent
    # `mlflow.run(env_manager="local")` runs steps with the `python` first on PATH: make it ours.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    active = mlflow.active_run()
    pipe = Pipeline(project_dir, active.info.experiment_id, force=force, layout=layout)
    data_dir = Path(data).expanduser()
    if not data_dir.is_absolute():
        data_dir = (Path.cwd() / data_dir).resolve()

    from isc.data.disc21 import DISC21

    if not (data_dir / "reference_images").is_dir():
        pipe.run("make_mini", "make_mini", {"source": source or "", "out": str(data_dir), "seed": 0})
    ds = DISC21(data_dir)
    extra = dict(parse_overrides(overrides)) if overrides else {}
    # Every stage's config and input (pairs, ground truths, negatives, disk), checked before the first step:
    # one message naming every problem, not a failure after days of training (isc/preflight.py).
    # The champion is chosen on the validation split and reported on the test split, so the test numbers
    # stay held out (choosing the best stage on test would bias the champion's test µAP upwards). Data
    # without a val split is chosen and reported on the same GT, and the summary says so. Neither is ever
    # a ground truth stage 4 trains on.
    from isc.preflight import check_main_inputs

    gts = check_main_inputs(profile, data_dir, extra, n_trials, world_size=layout.world_size,
                            out_root=out_root / "train")
    test_gt, select_gt = gts.test, gts.select
    if layout.nnodes > 1:  # every machine joined and sees the data, the outputs and the store: before stage 0
        pipe.board = Board(layout, join_timeout_s)
        problems = pipe.board.gather(data_dir, out_root)
        if problems:
            pipe.board.stop(ok=False)
            raise ConfigError("nnodes", f"{len(problems)} problem(s) with the other machines: " + "; ".join(problems))
    try:
        return _run_steps(pipe, profile, data_dir, ds, out_root, extra, n_trials, force, model_name, test_gt,
                          select_gt, settings_grid)
    except BaseException:
        if pipe.board is not None:
            pipe.board.stop(ok=False)
        raise


def _run_steps(pipe: Pipeline, profile: str, data_dir: Path, ds: Any, out_root: Path, extra: dict[str, Any],
               n_trials: int, force: bool, model_name: str, test_gt: Path, select_gt: Path,
               settings_grid: dict[str, Any] | None) -> Any:
    """Baseline, the profile's stages, tuning, promotion and search, in order; returns the summary."""
    # long: the pipeline's steps in their order, read top to bottom; each step's parameters name the run
    # ids of the steps before it, which is what the reuse of finished runs keys on.
    import mlflow
    import pandas as pd

    active = mlflow.active_run()

    rows: list[dict[str, Any]] = []
    base = pipe.run(
        "baseline_phash", "baseline",
        {"data": str(data_dir), "method": "phash", "ground_truth": str(test_gt), "output_dir": str(out_root / "baseline"),
         "overwrite": "true"},
    )
    rows.append({"step": "baseline (pHash)", "uAP": base.metrics.get("average_precision"),
                 "uAP 95% CI": _interval(base.metrics), "recall@P90": base.metrics.get("recall_p90")})

    stage_runs: dict[str, str] = {}
    candidates: list[Candidate] = []
    grid = settings_plan(profile, settings_grid)
    handoffs = handoff_epochs(PROFILES[profile].stages)
    for stage in PROFILES[profile].stages:
        start = start_reference(stage, stage_runs)
        params: dict[str, Any] = {"config": stage.config, "data": str(data_dir),
                                  "init_from": start if stage.start == "init" else "",
                                  "resume_from": start if stage.start == "resume" else ""}
        fixed = stage_overrides(stage, extra, handoffs)
        # always given, also empty: reuse matches only the parameters named here, and a stage without
        # overrides must not match the tuned retraining of the same stage (its overrides: the tuned values)
        params["overrides"] = json.dumps(fixed, sort_keys=True) if fixed else ""
        train = pipe.run(f"train_{stage.name}", "train", params)
        stage_runs[stage.name] = train.run_id
        candidates.append(_evaluate_stage(pipe, stage, train.run_id, data_dir, out_root, test_gt, select_gt))

    notes: list[str] = []
    if n_trials > 0:
        tuned, note = _tune(pipe, profile, stage_runs, data_dir, out_root, test_gt, select_gt, n_trials, extra, force)
        candidates += [tuned] if tuned else []
        notes.append(note)
    if select_gt != test_gt and grid.is_grid():
        notes.append(_settings_phase(pipe, candidates, grid, data_dir, out_root, test_gt, select_gt))
    rows += [c.row for c in candidates]

    exp_name = mlflow.get_experiment(active.info.experiment_id).name
    # on_other_gt=keep: a champion scored on another ground truth (older data, another split) cannot be
    # compared with this run's models; keep it and say so instead of failing the job at its last steps.
    prom = pipe.run("promote", "promote", {"experiment": exp_name, "ground_truth": str(select_gt),
                                           "model_name": model_name, "on_other_gt": "keep"})
    champion = _champion(model_name)
    search = pipe.run(
        "search", "search",
        {"model": f"models:/{model_name}@champion", "references": str(ds.reference_dir),
         "queries": str(ds.query_dir), "index": str(out_root / "search" / f"{model_name}.index"),
         "output": str(out_root / "search" / "matches.csv"), "overwrite": "true"},
    )
    notes.append(_promotion_line(pipe.client.get_run(prom.run_id)))
    del search

    summary = pd.DataFrame(rows)
    timing = pd.DataFrame(
        [{"step": r.step, "run_id": r.run_id, "reused": r.reused, "wall_s": round(r.wall_s, 1)} for r in pipe.records]
    )
    _report(summary, timing, "\n".join([*notes, _champion_line(champion, model_name, select_gt, test_gt)]))
    if pipe.board is not None:
        pipe.board.stop(ok=True)
    return summary


def _tune(pipe: Pipeline, profile: str, stage_runs: dict[str, str], data_dir: Path, out_root: Path, test_gt: Path,
          select_gt: Path, n_trials: int, extra: dict[str, Any], force: bool) -> tuple[Candidate | None, str]:
    """Tune the profile's tuned stage from its hand-off checkpoint; evaluate the tuned model like a stage.

    Returns the candidate (None when no trial completed) and a line about the study. The tuned model is
    the best trial's values retrained for the stage's full epochs, or the trial's own model (the tune
    config's ``candidate``); it is tagged with the study, trial and values, which promotion copies.
    """
    import mlflow

    from isc.tune import load_tune_config

    tune_config = PROFILES[profile].tune_config
    cfg = load_tune_config(Path(pipe.project_dir) / tune_config, profile=profile)
    stage = tuned_stage(profile, cfg.stage)
    start = start_reference(stage, stage_runs)
    active = mlflow.active_run()
    # One study per (experiment, stage, starting model): a plain re-run reuses it, a new hand-off checkpoint
    # is a new problem; --force starts a fresh study (n_trials is a study-wide target).
    study = "-".join(["isc-tune", active.info.experiment_id, stage.name, *([start[:8]] if start else []),
                      *([active.info.run_id[:8]] if force else [])])
    tune = pipe.run("tune", "tune", {
        "config": tune_config, "data": str(data_dir), "n_trials": n_trials, "study_name": study, "profile": profile,
        "stage": stage.name, "start_from": start, "overrides": json.dumps(extra, sort_keys=True) if extra else ""})
    m = tune.metrics
    counts = (f"{int(m.get('n_complete', 0))} complete, {int(m.get('n_pruned', 0))} pruned, "
              f"{int(m.get('n_failed', 0))} failed")
    best_run = pipe.client.get_run(tune.run_id).data.tags.get("best_trial_run_id")
    if not best_run:
        return None, f"tune: study {study} ({counts}): no complete trial, so no tuned candidate"
    best_trial = pipe.client.get_run(best_run)
    best, own_values = best_trial.data.tags, best_trial.data.params.get("baseline_trial") == "True"
    params = json.loads(best[Tag.TUNE_PARAMS])
    provenance = {Tag.TUNE_STUDY: study, Tag.TUNE_TRIAL: best[Tag.TUNE_TRIAL], Tag.TUNE_PARAMS: best[Tag.TUNE_PARAMS],
                  Tag.TUNE_STUDY_RUN: tune.run_id, Tag.TUNE_STAGE: stage.name, Tag.TUNE_CANDIDATE: cfg.candidate}
    model_run = best_run
    if cfg.candidate == "retrain":
        start_kind = {"init_from": start if stage.start == "init" else "", "resume_from": ""}
        train = pipe.run(f"train_{stage.name}_tuned", "train", {
            "config": stage.config, "data": str(data_dir), **start_kind,
            "overrides": json.dumps({**extra, **dict(stage.overrides), **params}, sort_keys=True)})
        model_run = train.run_id
    for key, value in provenance.items():
        pipe.client.set_tag(model_run, key, value)
    label = f"{stage.name} tuned (trial {best[Tag.TUNE_TRIAL]}{', retrained' if cfg.candidate == 'retrain' else ''})"
    cand = _evaluate_stage(pipe, replace(stage, name=f"{stage.name}_tuned"), model_run, data_dir, out_root, test_gt,
                           select_gt, label=label)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    source = "retrained with them for the stage's full epochs" if cfg.candidate == "retrain" else "its own model"
    own = " (the stage's own values)" if own_values else ""
    return cand, (f"tune: study {study}, {stage.name} from {start or 'pretrained'}: {counts}; best trial "
                 f"{best[Tag.TUNE_TRIAL]}{own} val µAP "
                 f"{m.get('best_value', float('nan')):.4f} (after NES, {cfg.epochs_per_trial}-epoch trial) with "
                 f"{shown}; tuned row = {source}")


def _promotion_line(run: Any) -> str:
    """What the promote step decided (its run's tags), for the summary."""
    tags = run.data.tags
    action, message = tags.get(Tag.PROMOTION_ACTION), tags.get(Tag.PROMOTION_MESSAGE)
    return f"promotion: {action}: {message}" if action else f"promotion: see run {run.info.run_id}"


@dataclass
class Candidate:
    """One model the main job offers to promotion: its summary row and what the settings phase needs."""

    name: str  # the stage's name (step names: extract_<name>, ...)
    train_run: str
    row: dict[str, Any]
    val_uap: float | None  # after NES, at the training size: ranks the candidates for the grid
    served: Any  # ExtractionSettings its scored descriptors were extracted with


def _evaluate_stage(pipe: Pipeline, stage: Stage, train_run: str, data_dir: Path, out_root: Path,
                    test_gt: Path, select_gt: Path, label: str | None = None, settings: Any = None) -> Candidate:
    """extract -> postprocess -> evaluate (test; and val, which chooses the champion) of one stage, at its
    training size without TTA, or at ``settings`` (ExtractionSettings: the steps' names end in its key)."""
    from isc.settings import ExtractionSettings

    suffix = f"_{settings.key()}" if settings else ""
    name = f"{stage.name}{suffix}"
    ext = pipe.run(
        f"extract_{name}", "extract",
        # The folder is this step's own (one per training run and setting): a re-run may replace its files.
        {"model": train_run, "data": str(data_dir), "sets": "qrt", "overwrite": "true",
         "output_dir": str(out_root / "extract" / (train_run + suffix)),
         "input_size": settings.input_size if settings else 0, "tta": str(bool(settings and settings.tta)).lower()},
    )
    ext_params = pipe.client.get_run(ext.run_id).data.params
    served = ExtractionSettings(int(ext_params["resolved_input_size"]), ext_params["resolved_tta"] == "true")
    raw = f"runs:/{ext.run_id}/descriptors/descriptors.h5"
    post = pipe.run(
        f"postprocess_{name}", "postprocess",
        {"descriptors": raw, "train_descriptors": f"runs:/{ext.run_id}/descriptors/train_descriptors.h5",
         "output": str(out_root / "postprocess" / ext.run_id / "descriptors_nes.h5"), "overwrite": "true"},
    )  # the folder is this step's own (one per extraction run): a retry after a crash may replace it
    nes = {"descriptors": f"runs:/{post.run_id}/descriptors/descriptors_nes.h5", "before": raw,
           "model_ref": train_run, "nes_bank": f"runs:/{post.run_id}/descriptors/nes_bank.h5"}
    ev = pipe.run(f"evaluate_{name}", "evaluate", {**nes, "ground_truth": str(test_gt), "data": str(data_dir)})
    row = {
        "step": label or f"{stage.name} ({Path(stage.config).stem}{', no fine-tuning' if dict(stage.overrides).get('epochs') == 0 else ''})",
        "starts from": start_label(stage),
        "settings": served.label,
        "uAP before NES": ev.metrics.get("before_average_precision"),
        "recall@P90 before NES": ev.metrics.get("before_recall_p90"),
        "uAP": ev.metrics.get("average_precision"),
        "uAP 95% CI": _interval(ev.metrics),
        "recall@P90": ev.metrics.get("recall_p90"),
    }
    val = None
    if select_gt != test_gt:
        sel = pipe.run(f"evaluate_val_{name}", "evaluate", {**nes, "ground_truth": str(select_gt)})
        val = sel.metrics.get("average_precision")
        row["val uAP (selects)"] = val
    return Candidate(stage.name, train_run, row, val, served)


def _settings_phase(pipe: Pipeline, candidates: list[Candidate], grid: SettingsPlan, data_dir: Path,
                    out_root: Path, test_gt: Path, select_gt: Path) -> str:
    """The val grid for the ``grid.top`` candidates with the best val µAP at their training size (0 = all):
    a ``settings`` step each; a candidate whose val-best setting is not the one it was scored at is extracted,
    post-processed and evaluated again at it, and its summary row shows those numbers (its training-size
    evaluation stays in the experiment: promotion takes the best val µAP over every evaluation, so the
    champion is the best (candidate, setting) seen on val and serves with that setting). Returns the
    summary's line about it."""
    from isc.settings import ExtractionSettings

    ranked = sorted([c for c in candidates if c.val_uap is not None], key=lambda c: -c.val_uap)
    chosen = ranked[: grid.top] if grid.top else ranked
    for cand in candidates:
        if cand not in chosen:
            cand.row["settings"] += " (not in the grid's top)"
    for cand in chosen:
        sel = pipe.run(f"settings_{cand.name}", "settings", {
            "model": cand.train_run, "data": str(data_dir), "ground_truth": str(select_gt), "sizes": grid.sizes,
            "tta": grid.tta, "tta_sizes": grid.tta_sizes})
        params = pipe.client.get_run(sel.run_id).data.params
        best = ExtractionSettings(int(params["chosen_input_size"]), params["chosen_tta"] == "true")
        if best == cand.served:
            cand.row["settings"] += " (val grid's best)"
            continue
        stage = Stage(cand.name, "")
        again = _evaluate_stage(pipe, stage, cand.train_run, data_dir, out_root, test_gt, select_gt, settings=best)
        training = {"uAP at training size": cand.row["uAP"], "val uAP at training size": cand.val_uap}
        cand.row.update({k: v for k, v in again.row.items() if k not in ("step", "starts from")})
        cand.row["settings"] += " (val grid's best)"
        cand.row.update(training)
        cand.val_uap, cand.served = again.val_uap, best
    names = ", ".join(c.name for c in chosen)
    return (f"settings: val grid (sizes {grid.sizes}, TTA {grid.tta}; TTA tried at the best "
            f"{grid.tta_sizes or 'every'} size(s)) for the top {grid.top or 'all'} candidate(s) by val µAP at "
            f"their training size: {names}")


def _interval(metrics: dict[str, float]) -> str | None:
    """The evaluate step's query-bootstrap µAP interval as text (None when it logged none)."""
    lo, hi = metrics.get("average_precision_ci_low"), metrics.get("average_precision_ci_high")
    return None if lo is None or hi is None else f"{lo:.3f}-{hi:.3f}"


def _champion(model_name: str) -> dict[str, str] | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    return {"version": mv.version, "uri": f"models:/{model_name}@{CHAMPION}",
            "source_run": mv.tags.get(Tag.SOURCE_EVAL_RUN, mv.run_id or ""),
            "gt_path": mv.tags.get(Tag.GT_PATH, ""), "gt_fingerprint": mv.tags.get(Tag.GT_FINGERPRINT, ""),
            "serves": (f"{mv.tags[Tag.INPUT_SIZE]} px{' + TTA' if mv.tags.get(Tag.TTA) == 'true' else ''}"
                       if mv.tags.get(Tag.INPUT_SIZE) else "its training size")}


def _champion_line(champion: dict[str, str] | None, model_name: str, select_gt: Path, test_gt: Path) -> str:
    """What the summary says about ``@champion``: where it was chosen, or why it predates this run."""
    from isc.io import read_ground_truth
    from isc.metrics import ground_truth_fingerprint

    if not champion:
        return f"champion: none registered for '{model_name}'"
    head = f"champion: {champion['uri']} = version {champion['version']}"
    if champion["gt_fingerprint"] != ground_truth_fingerprint(read_ground_truth(select_gt)):
        # promote ran with on_other_gt=keep: this champion was scored elsewhere and could not be compared.
        return (f"{head} (kept from before)\nNOTE: @champion was scored on {champion['gt_path']}, not on "
                f"{select_gt}, so this run's best model was registered but not compared with it; to replace it: "
                f"isc promote --ground-truth {select_gt} --force")
    note = ("its stage's test row above is held out" if select_gt != test_gt
            else "the same GT as the rows above: no val split, so they are not held out from the choice")
    return (f"{head} (chosen on {select_gt.name} by evaluation run {champion['source_run']}; {note}), "
            f"serves with {champion.get('serves', 'its training size')}")


def _report(summary: Any, timing: Any, champion_line: str) -> None:
    import mlflow

    from isc.tracking import default_tracking_uri
    from isc.tune import default_storage_url

    pd_opts = {"index": False, "float_format": lambda x: f"{x:.4f}"}
    text = ["", "== quality (held-out test split) ==", summary.to_string(**pd_opts), "",
            "== steps ==", timing.to_string(index=False), "", champion_line]
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    text += [
        f"MLflow UI:        mlflow server --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        if not uri.startswith("http") else f"MLflow UI:        {uri}",
        f"Optuna dashboard: optuna-dashboard {default_storage_url()} --host 127.0.0.1 --port 8080",
    ]
    from isc.redact import redact

    report = redact("\n".join(text))  # the tracking URI (and anything else printed) may carry a password
    print(report, flush=True)
    mlflow.log_text(report, "summary/summary.txt")
    mlflow.log_text(summary.to_csv(index=False), "summary/quality.csv")
    mlflow.log_text(timing.to_csv(index=False), "summary/steps.csv")
