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
from pathlib import Path
from typing import Any

from isc.candidates import Candidate, evaluate_stage, interval_text, settings_phase, tuned_candidate
from isc.contract import CHAMPION, Tag, model_uri
from isc.errors import ConfigError
from isc.fileutil import remove_dead_partials
from isc.metrics import summary_columns
from isc.nodes import Board, Layout
from isc.pipeline import MainJob, Pipeline
from isc.preflight import check_main_inputs
from isc.proctree import children_end_with_us
from isc.recipe import PROFILES, handoff_epochs, settings_plan, stage_overrides, start_reference
from isc.redact import redact
from isc.tracking import default_tracking_uri, project_root
from isc.train.config import parse_overrides
from isc.tune import default_storage_url

log = logging.getLogger("isc.driver")


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

    gts = check_main_inputs(profile, data_dir, extra, n_trials, world_size=layout.world_size,
                            out_root=out_root / "train")
    if layout.nnodes > 1:  # every machine joined and sees the data, the outputs and the store: before stage 0
        pipe.board = Board(layout, join_timeout_s)
        problems = pipe.board.gather(data_dir, out_root)
        if problems:
            pipe.board.stop(ok=False)
            raise ConfigError("nnodes", f"{len(problems)} problem(s) with the other machines: " + "; ".join(problems))
    job = MainJob(pipe, profile, data_dir, out_root, gts.test, gts.select, extra, force)
    try:
        return _run_steps(job, ds, n_trials, model_name, settings_grid)
    except BaseException:
        if pipe.board is not None:
            pipe.board.stop(ok=False)
        raise


def _run_steps(job: MainJob, ds: Any, n_trials: int, model_name: str, settings_grid: dict[str, Any] | None) -> Any:
    """Baseline, the profile's stages, tuning, promotion and search, in order; returns the summary."""
    # The steps in their order, read top to bottom; each step's parameters name the run ids of the steps
    # before it, which is what the reuse of finished runs keys on.
    import mlflow
    import pandas as pd

    active = mlflow.active_run()
    pipe, profile, data_dir, out_root, extra = job.pipe, job.profile, job.data_dir, job.out_root, job.extra
    test_gt, select_gt = job.test_gt, job.select_gt
    rows: list[dict[str, Any]] = []
    base = pipe.run(
        "baseline_phash", "baseline",
        {"data": str(data_dir), "method": "phash", "ground_truth": str(test_gt), "output_dir": str(out_root / "baseline"),
         "overwrite": "true"},
    )
    rows.append({"step": "baseline (pHash)", **summary_columns(base.metrics, interval=interval_text(base.metrics))})

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
        candidates.append(evaluate_stage(job, stage, train.run_id))

    notes: list[str] = []
    if n_trials > 0:
        tuned, note = tuned_candidate(job, stage_runs, n_trials)
        candidates += [tuned] if tuned else []
        notes.append(note)
    if select_gt != test_gt and grid.is_grid():
        notes.append(settings_phase(job, candidates, grid))
    rows += [c.row for c in candidates]

    exp_name = mlflow.get_experiment(active.info.experiment_id).name
    # on_other_gt=keep: a champion scored on another ground truth (older data, another split) cannot be
    # compared with this run's models; keep it and say so instead of failing the job at its last steps.
    prom = pipe.run("promote", "promote", {"experiment": exp_name, "ground_truth": str(select_gt),
                                           "model_name": model_name, "on_other_gt": "keep"})
    champion = _champion(model_name)
    search = pipe.run(
        "search", "search",
        {"model": model_uri(model_name, CHAMPION), "references": str(ds.reference_dir),
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


def _promotion_line(run: Any) -> str:
    """What the promote step decided (its run's tags), for the summary."""
    tags = run.data.tags
    action, message = tags.get(Tag.PROMOTION_ACTION), tags.get(Tag.PROMOTION_MESSAGE)
    return f"promotion: {action}: {message}" if action else f"promotion: see run {run.info.run_id}"


def _champion(model_name: str) -> dict[str, str] | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    return {"version": mv.version, "uri": model_uri(model_name, CHAMPION),
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


    pd_opts = {"index": False, "float_format": lambda x: f"{x:.4f}"}
    text = ["", "== quality (held-out test split) ==", summary.to_string(**pd_opts), "",
            "== steps ==", timing.to_string(index=False), "", champion_line]
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    text += [
        f"MLflow UI:        mlflow server --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        if not uri.startswith("http") else f"MLflow UI:        {uri}",
        f"Optuna dashboard: optuna-dashboard {default_storage_url()} --host 127.0.0.1 --port 8080",
    ]

    report = redact("\n".join(text))  # the tracking URI (and anything else printed) may carry a password
    print(report, flush=True)
    mlflow.log_text(report, "summary/summary.txt")
    mlflow.log_text(summary.to_csv(index=False), "summary/quality.csv")
    mlflow.log_text(timing.to_csv(index=False), "summary/steps.csv")
