"""Registering an evaluated model as a version of the registered model, exactly once.

:func:`register_once` logs the candidate's checkpoint as the descriptor pyfunc and registers it, tagged
``isc.source_eval_run=<run>``; a version with that tag already existing is reused, so a second promotion
creates no duplicate. Concurrent registrations are guarded twice: a file lock serialises them on one
machine (:func:`registration_lock`), and after registering each looks again -- when several versions of
one evaluation exist, the lowest wins and the others delete their own. The version's description says
what it is and which extraction settings it serves with (:func:`version_description`).
:mod:`registry.promote` decides whether ``@champion`` moves to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from isc.contract import DEFAULT_MODEL_NAME, Evaluation, ModelRef, Step, Tag
from isc.errors import ConfigError
from isc.tracking import (
    configure,
    default_tracking_uri,
    git_commit,
    log_params,
    resolve_artifact,
    tracked_run,
)
from isc.train.config import SEED_SCRIPTS
from registry.model_logging import log_descriptor_model
from registry.writes import RegistryWriter

log = logging.getLogger(__name__)


# Locks this process holds (path -> depth): promote() holds the lock around register_once(), which takes it
# too; flock on a second open file of the same path would wait for ourselves.
_HELD_LOCKS: dict[Path, int] = {}


# Tags of a training run that say it was tuned; promotion copies them onto the registered version.
TUNE_TAGS = (Tag.TUNE_STUDY, Tag.TUNE_TRIAL, Tag.TUNE_PARAMS, Tag.TUNE_STUDY_RUN, Tag.TUNE_STAGE, Tag.TUNE_CANDIDATE)


def registry_client():
    """A client of the configured tracking store (checked: a bad URI is one clear error)."""
    from mlflow import MlflowClient


    configure(check=True)
    return MlflowClient()


def search_all_runs(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    """Every run the filter matches, page by page, best µAP first."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token,
            order_by=["metrics.average_precision DESC"],
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def all_versions(client: Any, model_name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        return []
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{model_name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def versions_of(client: Any, model_name: str, eval_run_id: str) -> list[Any]:
    """Versions of ``model_name`` registered from evaluation run ``eval_run_id``, lowest first."""
    found = [v for v in all_versions(client, model_name) if v.tags.get(Tag.SOURCE_EVAL_RUN) == eval_run_id]
    return sorted(found, key=lambda v: int(v.version))


@contextlib.contextmanager
def registration_lock(model_name: str) -> Iterator[None]:
    """Serialise registrations and promotions of ``model_name`` on this store among the processes of this
    machine (re-entrant within a process). Promoters on other machines are not seen by it: for them the
    lowest-version rule of :func:`register_once` and the :class:`RegistryWriter` keep the registry right."""
    import fcntl


    key = hashlib.sha256(f"{default_tracking_uri()}\0{model_name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"isc-promote-{key}.lock"
    if _HELD_LOCKS.get(path):
        _HELD_LOCKS[path] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[path] -= 1
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _HELD_LOCKS[path] = 1
        try:
            yield
        finally:
            _HELD_LOCKS.pop(path, None)
            fcntl.flock(fh, fcntl.LOCK_UN)


def register_once(candidate: Evaluation, model_name: str = DEFAULT_MODEL_NAME) -> tuple[Any, bool]:
    """``(version, registered_now)``: the one version of ``model_name`` for ``candidate``'s evaluation run.

    Reuses an existing version; otherwise registers under a machine-wide lock, then resolves a race with
    promoters on other machines: the lowest version of this evaluation wins, a higher one of our own
    making is deleted (its promote run is tagged ``isc.duplicate_of``).
    """
    client = registry_client()
    existing = versions_of(client, model_name, candidate.run_id)
    if existing:
        return existing[0], False
    with registration_lock(model_name):
        existing = versions_of(client, model_name, candidate.run_id)
        if existing:
            return existing[0], False
        mine = register_candidate(candidate, model_name)
    winner = versions_of(client, model_name, candidate.run_id)[0]
    if str(winner.version) == str(mine.version):
        return mine, True
    log.warning("evaluation run %s was registered concurrently as %s v%s; deleting our duplicate v%s",
                candidate.run_id, model_name, winner.version, mine.version)
    client.delete_model_version(model_name, str(mine.version))
    if mine.run_id:
        with contextlib.suppress(Exception):
            client.set_tag(mine.run_id, Tag.DUPLICATE_OF, f"{model_name}/{winner.version}")
    return winner, False


def _training_run(client: Any, model_ref: str) -> Any | None:
    """The MLflow run that trained ``model_ref`` when the reference names one (run id, ``<id>:N``, runs:/)."""
    from mlflow.exceptions import MlflowException


    try:
        run_id = ModelRef.parse(model_ref).run_id
        return client.get_run(run_id) if run_id else None
    except (ConfigError, MlflowException):
        return None


def _scores(client: Any, candidate: Evaluation) -> list[tuple[str, float, str]]:
    """``(ground truth file, µAP, run id)`` of the newest FINISHED evaluation of the candidate's descriptors
    (same model and NES bank) on each ground truth: the val score that chose it and the held-out test one."""
    eval_run = client.get_run(candidate.run_id)
    runs = search_all_runs(client, eval_run.info.experiment_id,
                            f"attributes.status = 'FINISHED' and tags.`{Tag.STEP}` = '{Step.EVALUATE}'")
    newest: dict[str, Any] = {}
    for r in runs:
        tags = r.data.tags
        if (tags.get(Tag.MODEL_REF) != candidate.model_ref or (tags.get(Tag.NES_BANK) or None) != candidate.nes_bank
                or "average_precision" not in r.data.metrics):
            continue
        gt = tags.get(Tag.GT_PATH, "?")
        if gt not in newest or r.info.start_time > newest[gt].info.start_time:
            newest[gt] = r
    return [(Path(gt).name, r.data.metrics["average_precision"], r.info.run_id) for gt, r in sorted(newest.items())]


def version_description(client: Any, candidate: Evaluation, train_run: Any | None) -> str:
    """The registered version's description: which stage trained it, from what, its µAPs and, when tuned,
    the study, trial and values (what a reader of the registry needs without opening the runs)."""
    lines = []
    if train_run is not None:
        tags, params = train_run.data.tags, train_run.data.params

        config, stage = params.get("config", "?"), tags.get(Tag.STAGE, "?")
        seed = f", the seed's {SEED_SCRIPTS[stage]}" if SEED_SCRIPTS.get(stage) else ""
        lines.append(f"stage: {train_run.info.run_name} ({Path(config).name}, {stage}{seed}), "
                     f"training run {train_run.info.run_id}")
        lines.append(f"starts from: {tags.get(Tag.START_KIND, '?')} {tags.get(Tag.START_CHECKPOINT, '')}".rstrip())
    else:
        lines.append(f"stage: not an MLflow training run (model {candidate.model_ref})")
    chosen = Path(candidate.gt_path).name
    scores = ", ".join(f"{gt} {ap:.4f}" + (" (chose this version)" if run_id == candidate.run_id else "")
                       for gt, ap, run_id in _scores(client, candidate))
    nes = "after NES" if candidate.nes_bank else "raw descriptors"
    lines.append(f"µAP ({nes}): {scores or f'{chosen} {candidate.average_precision:.4f}'}")
    settings = candidate_settings(candidate)
    lines.append(f"serves with: {settings.label} (the extraction settings of the evaluation that chose it)"
                 if settings else "serves with: its training size, no TTA (the evaluation recorded no settings)")
    tags = train_run.data.tags if train_run is not None else {}
    if Tag.TUNE_STUDY in tags:
        how = ("retrained with these values for the stage's full epochs" if tags.get(Tag.TUNE_CANDIDATE) == "retrain"
               else "the trial's own model")
        lines.append(f"tuned: study {tags[Tag.TUNE_STUDY]}, trial {tags.get(Tag.TUNE_TRIAL, '?')} of "
                     f"{tags.get(Tag.TUNE_STAGE, '?')}, values {tags.get(Tag.TUNE_PARAMS, '{}')}; {how}")
    lines.append(f"evaluation run {candidate.run_id} ({candidate.protocol} protocol on {candidate.gt_path})")
    return "\n".join(lines)


def candidate_settings(candidate: Evaluation) -> Any:
    """The extraction settings the candidate was scored with (its evaluation run's ``isc.input_size`` /
    ``isc.tta``); None for runs that predate them (the version then serves at the training size)."""
    from isc.settings import ExtractionSettings

    if not candidate.input_size:
        return None
    return ExtractionSettings(int(candidate.input_size), bool(candidate.tta))


def register_candidate(candidate: Evaluation, model_name: str = DEFAULT_MODEL_NAME) -> Any:
    """Package the candidate's checkpoint (+ NES bank) as the pyfunc and register a new version.

    Logs into a ``promote`` run (tag ``isc.step=promote``) of the candidate's experiment, or into the
    run ``mlflow run`` started. Returns the ``ModelVersion`` with its provenance tags set.
    """
    import mlflow

    from isc.models import resolve_checkpoint

    client = registry_client()
    eval_run = client.get_run(candidate.run_id)
    experiment = client.get_experiment(eval_run.info.experiment_id).name
    checkpoint = resolve_checkpoint(candidate.model_ref)
    bank = None
    if candidate.nes_bank:
        try:
            bank = resolve_artifact(candidate.nes_bank)
        except FileNotFoundError as exc:
            raise ConfigError("nes_bank", f"evaluation run {candidate.run_id}: {exc}") from exc
    with tracked_run(experiment=experiment, run_name=f"promote-{candidate.run_id[:8]}",
                     tags={Tag.STEP: Step.PROMOTE}) as run:
        log_params({"model_name": model_name, "source_eval_run": candidate.run_id, "model_ref": candidate.model_ref})
        settings = candidate_settings(candidate)
        if settings is not None:
            log_params({"input_size": settings.input_size, "tta": str(settings.tta).lower()}, prefix="serves.")
        info = log_descriptor_model(checkpoint, bank=bank, nes_params=candidate.nes_params, settings=settings)
        tags = {
            Tag.AVERAGE_PRECISION: f"{candidate.average_precision:.6f}",
            Tag.GT_FINGERPRINT: candidate.gt_fingerprint,
            Tag.GT_PATH: candidate.gt_path,
            Tag.SOURCE_EVAL_RUN: candidate.run_id,
            Tag.MODEL_REF: candidate.model_ref,
            Tag.GIT_COMMIT: candidate.git_commit or git_commit() or "unknown",
        }
        if candidate.recall_p90 is not None:
            tags[Tag.RECALL_P90] = f"{candidate.recall_p90:.6f}"
        if settings is not None:  # what the version serves with (also its pyfunc's model_config)
            tags[Tag.INPUT_SIZE], tags[Tag.TTA] = str(settings.input_size), str(settings.tta).lower()
        if candidate.nes_bank:
            tags[Tag.NES_BANK] = candidate.nes_bank
            tags[Tag.NES_PARAMS] = json.dumps(candidate.nes_params, sort_keys=True)
        train_run = _training_run(client, candidate.model_ref)
        if train_run is not None:  # a tuned model: which study, trial and values made it
            tags.update({k: train_run.data.tags[k] for k in TUNE_TAGS if k in train_run.data.tags})
        version = mlflow.register_model(info.model_uri, model_name, tags=tags)
        RegistryWriter(client).set_version_description(model_name, str(version.version),
                                                       version_description(client, candidate, train_run))
        if run is not None:
            mlflow.set_tags({Tag.REGISTERED_MODEL: model_name, Tag.REGISTERED_VERSION: str(version.version)})
    log.info("registered %s version %s from evaluation run %s", model_name, version.version, candidate.run_id)
    return client.get_model_version(model_name, version.version)
