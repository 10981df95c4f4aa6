"""MLflow conventions shared by every entry point.

* Default store: an embedded SQLite database ``<project>/mlflow.db`` with an absolute artifact root
  ``<project>/mlartifacts`` (never the deprecated ``./mlruns`` file store). ``MLFLOW_TRACKING_URI``
  overrides it (a team ``mlflow server``, PostgreSQL, ...).
* Runs started by ``mlflow run`` arrive with ``MLFLOW_RUN_ID`` set: :func:`tracked_run` resumes that
  run instead of opening a new one, and :func:`log_params` never re-logs what the launcher logged.
* Only the primary process (global rank 0 under ``torchrun``) talks to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from isc.contract import DEFAULT_EXPERIMENT, Tag, experiment_choice, looks_like_run_id  # noqa: F401 (re-exported)
from isc.errors import ConfigError
from isc.lineage import set_experiment_kind
from isc.redact import install_log_redaction, redact, safe_value
from isc.tracking_uri import check_database, check_reachable, check_store_uri, is_http, split_credentials

log = logging.getLogger(__name__)


CODE_ROOT = Path(__file__).resolve().parent.parent  # this checkout (or site-packages): for git, never for outputs


def project_root() -> Path:
    """Folder of the default store (mlflow.db, mlartifacts/, optuna.db) and outputs/: ``$ISC_HOME``, else
    the current folder -- never the installed package (a pip install would write into site-packages).
    :func:`configure` exports it as ``ISC_HOME``, so steps run elsewhere (``mlflow run`` starts entry
    points in the project folder) keep the caller's home."""
    env = os.environ.get("ISC_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path.cwd().resolve()


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def default_artifact_root() -> str:
    return str(project_root() / "mlartifacts")


def is_primary() -> bool:
    """True on the process that owns MLflow logging (global rank 0, or no ``torchrun`` at all)."""
    return int(os.environ.get("RANK", "0")) == 0


def configure(tracking_uri: str | None = None, check: bool = True) -> str:
    """Point MLflow at ``tracking_uri`` (default: :func:`default_tracking_uri`) and return it.

    Sets the environment variable too, so subprocesses (``mlflow.run`` steps, DataLoader workers,
    torchrun ranks) use the same store.
    """
    import mlflow


    install_log_redaction()  # MLflow's handlers exist once it is imported; they print run URLs with the URI
    os.environ.setdefault("ISC_HOME", str(project_root()))  # one home for this process and its steps
    uri = check_store_uri(tracking_uri or default_tracking_uri())
    if check:
        check_reachable(uri)
        check_database(uri)
    uri, user, password = split_credentials(uri)
    if user is not None:  # MLflow's own convention; keeps the password out of the URI everyone prints
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    # Bound every HTTP call so an outage mid-run turns into retries with backoff, not a hang.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    return uri


# Bytes (UTF-8) of an experiment's artifact folder name under ISC_HOME/mlartifacts. File systems allow 255
# per component; past it MLflow only warns on every upload and the run still ends FINISHED without artifacts.
MAX_EXPERIMENT_FOLDER_BYTES = 200


def get_or_create_experiment(name: str, param: str = "--experiment-name") -> str:
    """Return the id of experiment ``name``, creating it with an absolute artifact root if needed.

    With a direct database URI MLflow would otherwise resolve ``./mlruns`` against whatever the
    creator's working directory was; behind a server the server chooses (proxied artifacts). A name
    whose local artifact folder could not exist is ``ConfigError(param)``, before any run opens.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not is_http(os.environ.get("MLFLOW_TRACKING_URI", default_tracking_uri())):
        folder = name.replace("/", "_")
        size = len(folder.encode("utf-8", "surrogateescape"))
        if size > MAX_EXPERIMENT_FOLDER_BYTES:
            raise ConfigError(param, f"'{name[:40]}...' is {size} bytes (UTF-8); an experiment this platform "
                                     f"creates keeps its artifacts in a folder of that name, at most "
                                     f"{MAX_EXPERIMENT_FOLDER_BYTES} bytes: use a shorter name")
        location = str(Path(default_artifact_root()) / folder)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between our lookup and our create: use theirs.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def experiment_id(explicit: str | None = None, create: bool = True) -> str:
    """The id of the experiment :func:`isc.contract.experiment_choice` picks; created when missing and
    ``create`` (else ``ConfigError('experiment')``). An explicit all-digit text that names no experiment
    is tried as an id."""
    from mlflow import MlflowClient

    kind, text = experiment_choice(explicit)
    client = MlflowClient()
    if kind == "id":
        return text
    exp = client.get_experiment_by_name(text)
    if exp is not None:
        return exp.experiment_id
    if text.isdigit():
        with contextlib.suppress(Exception):  # MlflowException when there is no such id
            return client.get_experiment(text).experiment_id
    if not create:
        raise ConfigError("experiment", f"no MLflow experiment named (or with id) '{text}'")
    return get_or_create_experiment(text, "--experiment-name" if (explicit or "").strip() else "MLFLOW_EXPERIMENT_NAME")


def git_commit(root: str | Path | None = None) -> str | None:
    """HEAD of the checkout at ``root`` (default: this project's), or None outside git."""

    try:
        out = subprocess.run(["git", "-C", str(root or CODE_ROOT), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def tracked_run(
    experiment: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    log_system_metrics: bool | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Start (or resume) the MLflow run of an entry point; yields the active run, or ``None`` off rank 0.

    * Under ``mlflow run`` the launcher's run (``MLFLOW_RUN_ID``) is resumed.
    * ``run_id`` resumes a given run (crash recovery continues the same run).
    * On an exception the run ends FAILED with the error in the ``isc.error`` tag; on Ctrl-C, KILLED.
    """
    import mlflow

    if not is_primary():
        os.environ.pop("MLFLOW_RUN_ID", None)
        yield None
        return
    configure(check=True)
    safe_tags = {k: safe_value(k, str(v)) for k, v in (tags or {}).items()}
    kwargs: dict[str, Any] = {"run_name": run_name, "tags": safe_tags, "nested": nested}
    if log_system_metrics is not None:
        kwargs["log_system_metrics"] = log_system_metrics
    if parent_run_id:
        kwargs["parent_run_id"] = parent_run_id
    resume_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if resume_id:
        kwargs["run_id"] = resume_id
        kwargs.pop("run_name")
    else:
        kwargs["experiment_id"] = experiment_id(experiment)
    run = mlflow.start_run(**kwargs)

    set_experiment_kind(run.info.experiment_id)
    try:
        yield run
    except KeyboardInterrupt:
        _end_interrupted_run()
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):
            mlflow.set_tag(Tag.ERROR, redact(f"{type(exc).__name__}: {exc}")[:4000])
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _end_interrupted_run(tries: int = 4) -> None:
    """End the active run KILLED (tag ``isc.error`` = interrupted), retrying a store that is busy for a moment.

    Why: a SIGTERM to ``isc train`` on a SQLite store once met "database is locked" (the system-metrics
    thread was writing; SQLite answers a lock upgrade that could deadlock at once, without waiting): the tag
    write raised, the command printed a store error with exit 2, and the run stayed RUNNING. The tag is
    best-effort; ending the run is what must happen. MLflow logs each failed try with a traceback
    (``mlflow.store.db.utils``); a try we retry is not an error of the command, so that logger is muted here."""
    import mlflow

    db_log = logging.getLogger("mlflow.store.db.utils")
    level = db_log.level
    db_log.setLevel(logging.CRITICAL)
    try:
        _tag_and_end_killed(mlflow, tries)
    finally:
        db_log.setLevel(level)


def _tag_and_end_killed(mlflow: Any, tries: int) -> None:
    try:
        _retry(lambda: mlflow.set_tag(Tag.ERROR, "interrupted"), tries)
    except Exception:  # noqa: BLE001 -- the tag is best-effort
        log.warning("could not tag the interrupted run", exc_info=True)
    _retry(lambda: mlflow.end_run(status="KILLED"), tries)


def _retry(call: Any, tries: int) -> None:
    """``call()``, tried ``tries`` times with a doubling pause from 0.5 s; the last failure is raised."""
    for attempt in range(tries):
        try:
            call()
            return
        except Exception:  # noqa: BLE001 -- MlflowException / SQLAlchemy errors of a busy store
            if attempt == tries - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log params, skipping keys the run already has with the same value.

    A key the launcher (``mlflow run``) already logged with another value -- e.g. a relative path it
    recorded before we resolved it -- is logged as ``resolved.<key>`` instead of raising
    ``Changing param values is not allowed``. Secrets never reach the store: see :func:`safe_value`.
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    batch: dict[str, str] = {}
    for key, value in params.items():
        key = f"{prefix}{key}"
        text = safe_value(key, _param_text(value))
        if key in existing:
            if normalize_param(existing[key]) != normalize_param(text):
                batch[f"resolved.{key}"] = text
        else:
            batch[key] = text
    if batch:
        mlflow.log_params(batch)


_EMPTY_PARAMS = ("", "''", '""', "None")


def normalize_param(text: str | None) -> str:
    """Param text with every spelling of "not given" folded to ``""``.

    ``mlflow run`` logs an empty MLproject parameter as the shell-quoted ``''``; our CLIs read it as
    ``None``. Reuse checks and re-logging must treat these as the same value. It logs any value that
    needs quoting shell-quoted too (``'{"epochs": 0}'`` for the JSON ``{"epochs": 0}``), so a quoted
    value is compared unquoted: otherwise a step with such a parameter is never reused.
    """
    if text is None or text in _EMPTY_PARAMS:
        return ""
    text = str(text)
    if text.startswith("'"):

        with contextlib.suppress(ValueError):
            parts = shlex.split(text)
            if len(parts) == 1 and shlex.quote(parts[0]) == text:
                return parts[0]
    return text


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    elif isinstance(value, Path):
        text = str(value)
    else:
        text = str(value)
    return text[:6000]


def log_metrics(metrics: Mapping[str, float], step: int | None = None, retries: int = 3,
                model_id: str | None = None, dataset: Any = None) -> None:
    """Log metrics on the primary process; transient store errors are retried with backoff.

    Logging is best-effort: after the retries the failure is logged as a warning and training
    continues, because the local checkpoint (not the metric) is what must never be lost.
    ``model_id`` / ``dataset``: also link the values to an MLflow LoggedModel, measured on that dataset.
    """
    import mlflow

    if not is_primary() or mlflow.active_run() is None:
        return
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    for attempt in range(retries + 1):
        try:
            links = {k: v for k, v in (("model_id", model_id), ("dataset", dataset)) if v is not None}
            mlflow.log_metrics(clean, step=step, **links)
            return
        except Exception as exc:  # noqa: BLE001 -- network/db errors come in many types
            if attempt == retries:
                log.warning("could not log metrics %s after %d tries: %s", sorted(clean), retries + 1, exc)
                return
            time.sleep(min(2**attempt, 30))


def log_artifact(path: str | Path, artifact_path: str | None = None, retries: int = 3) -> bool:
    """Upload a file with retries; returns False (and warns) if the store stays unreachable."""
    import mlflow

    if not is_primary() or mlflow.active_run() is None:
        return False
    for attempt in range(retries + 1):
        try:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
            return True
        except Exception as exc:  # noqa: BLE001
            if attempt == retries:
                log.warning("could not upload %s after %d tries (kept locally): %s", path, retries + 1, exc)
                return False
            time.sleep(min(2**attempt, 30))
    return False


def resolve_artifact(ref: str | Path, default_subpath: str | None = None, dst: str | Path | None = None) -> Path:
    """Turn a local path, a bare run id, ``runs:/``, ``models:/`` or any artifact URI into a local path.

    A bare run id resolves to ``runs:/<id>/<default_subpath>``. Remote artifacts are downloaded.
    Raises ``FileNotFoundError`` naming ``ref`` when nothing is there.
    """
    import mlflow

    text = str(ref)
    local = Path(text).expanduser()
    if local.exists():
        return local.resolve()
    if text.startswith("file://"):
        p = Path(text[len("file://") :])
        if p.exists():
            return p
        raise FileNotFoundError(f"{ref}: no such file")
    if looks_like_run_id(text):
        text = f"runs:/{text}/{default_subpath or ''}".rstrip("/")
    if "://" not in text and not text.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        raise FileNotFoundError(f"{ref}: no such file, and not an MLflow run id or artifact URI")
    configure(check=True)
    try:
        out = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst) if dst else None)
    except Exception as exc:  # noqa: BLE001 -- MlflowException, OSError...
        raise FileNotFoundError(f"{ref}: cannot download ({exc})") from exc
    return Path(out)


def end_job_of_a_dead_driver(driver_pid: str, step_run: str) -> str | None:
    """In a step of ``isc main`` whose driver was SIGKILLed or OOM-killed: mark the job's main run KILLED.

    Why here: nothing runs in a SIGKILLed process, so its main run stayed RUNNING for ever in the MLflow UI;
    the step outlives it for a moment (the kernel sends it SIGTERM: ``PR_SET_PDEATHSIG``). The step's own
    run (``MLFLOW_RUN_ID`` as ``mlflow run`` set it: read at the start, MLflow unsets it when the run ends)
    names the main run as its parent. Returns the main run's id when it was marked, None when there is
    nothing to mark or the store can't be reached."""
    if not looks_like_run_id(step_run):
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        parent = client.get_run(step_run).data.tags.get("mlflow.parentRunId", "")
        if not parent or client.get_run(parent).info.status != "RUNNING":
            return None
        client.set_tag(parent, Tag.ERROR, f"the main job's process (pid {driver_pid}) died without a word "
                                          "(SIGKILL or out of memory); its running step ended KILLED")
        client.set_terminated(parent, "KILLED")
        return parent
    except Exception:  # a step on its way out: the store may be gone too; the step's own run is already ended
        log.debug("could not mark the main run of a dead driver", exc_info=True)
        return None


def report_dead_driver(driver_pid: str, step_run: str) -> None:
    """The main job's process died (SIGKILL, OOM) and its step got SIGTERM from the kernel: end the job's
    main run too and say so in one line on stderr (before: the main run stayed RUNNING, nothing was said)."""
    main_run = end_job_of_a_dead_driver(driver_pid, step_run)
    marked = f"its main run {main_run} and the step's run are" if main_run else "the step's run is"
    print(f"error: the main job's process (pid {driver_pid}) died (SIGKILL or out of memory); {marked} "
          "marked KILLED", file=sys.stderr)
