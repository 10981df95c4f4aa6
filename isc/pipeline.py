"""Runs and reuses the main job's steps: each an MLflow project entry point launched with ``mlflow.run``
inside the driver's (parent) run, or a FINISHED run of the same entry point, parameters and code version
reused instead (:class:`Pipeline`). The order of the steps is :mod:`isc.driver`'s."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isc.contract import Tag
from isc.errors import ISCError
from isc.nodes import Board, Layout
from isc.tracking import git_commit, normalize_param

log = logging.getLogger("isc.driver")  # the main job's lines, whichever module logs them


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


@dataclass
class MainJob:
    """What every step of one main job shares, handed to the driver's helpers as one object: the pipeline
    that runs the steps, the profile, the data, where the steps write, the ground truths that score
    (``test_gt``) and choose (``select_gt``), the job's training overrides and ``--force``."""

    pipe: Pipeline
    profile: str
    data_dir: Path
    out_root: Path
    test_gt: Path
    select_gt: Path
    extra: dict[str, Any] = field(default_factory=dict)
    force: bool = False
