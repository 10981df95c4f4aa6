"""Security: basic-auth tracking server, no secrets in params/tags, loopback binding, safe checkpoints."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from isc import tracking as isc_tracking
from isc.redact import REDACTED, is_secret_key
from isc.redact import redact as redact_secrets
from tests.servers import PROJECT_ROOT, listening_addresses, start_mlflow_server

DB_PASSWORD = "pg-S3cret-xyz"
DB_URL = f"postgresql+psycopg2://isc:{DB_PASSWORD}@db.internal:5432/optuna"


# ------------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DB_URL, f"postgresql+psycopg2://isc:{REDACTED}@db.internal:5432/optuna"),
        ("http://admin:pw%40x@10.0.0.5:5000", f"http://admin:{REDACTED}@10.0.0.5:5000"),
        ("https://h/x?token=abc123&n=1", f"https://h/x?token={REDACTED}&n=1"),
        ("MLFLOW_TRACKING_PASSWORD=hunter2 rest", f"MLFLOW_TRACKING_PASSWORD={REDACTED} rest"),
        (
            "a postgresql://u:p@h/db and mysql://v:q@k/db",
            f"a postgresql://u:{REDACTED}@h/db and mysql://v:{REDACTED}@k/db",
        ),
    ],
)
def test_redact_secrets_masks_passwords_in_urls_and_assignments(text, expected):
    assert redact_secrets(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////abs/path/mlflow.db",
        "postgresql+psycopg2://isc@127.0.0.1:5432/mlflow",  # user, no password
        "http://127.0.0.1:5000",
        "runs:/0123456789abcdef0123456789abcdef/descriptors",
        "models:/isc-descriptor@champion",
        "max_tokens=5 margin=0.5",
    ],
)
def test_redact_secrets_leaves_secret_free_text_unchanged(text):
    assert redact_secrets(text) == text


def test_secret_param_names_are_recognised_without_false_positives():
    for key in ("db_password", "MLFLOW_TRACKING_PASSWORD", "api_key", "aws.secret_access_key", "token"):
        assert is_secret_key(key), key
    for key in ("max_tokens", "tokenizer", "storage", "data", "pos_margin", "keyframe"):
        assert not is_secret_key(key), key


def _all_values(run) -> str:
    return json.dumps({"params": run.data.params, "tags": run.data.tags})


def test_logged_params_and_tags_never_hold_passwords(tracking):
    from mlflow import MlflowClient

    with isc_tracking.tracked_run(
        experiment="security", tags={"isc.storage": DB_URL, "db_password": DB_PASSWORD}
    ) as run:
        isc_tracking.log_params({"storage": DB_URL, "db_password": DB_PASSWORD, "margin": 0.5})
        run_id = run.info.run_id
    got = MlflowClient().get_run(run_id)
    assert DB_PASSWORD not in _all_values(got)
    assert got.data.params["storage"] == f"postgresql+psycopg2://isc:{REDACTED}@db.internal:5432/optuna"
    assert got.data.params["db_password"] == REDACTED
    assert got.data.params["margin"] == "0.5"
    assert got.data.tags["isc.storage"].endswith(f":{REDACTED}@db.internal:5432/optuna")


def test_failed_run_error_tag_has_no_password(tracking):
    from mlflow import MlflowClient

    with pytest.raises(RuntimeError):
        with isc_tracking.tracked_run(experiment="security") as run:
            run_id = run.info.run_id
            raise RuntimeError(f"could not connect to {DB_URL}")
    got = MlflowClient().get_run(run_id)
    assert got.info.status == "FAILED"
    assert DB_PASSWORD not in got.data.tags["isc.error"]
    assert "db.internal" in got.data.tags["isc.error"]


# ------------------------------------------------------------------------------- basic auth


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 (loopback)
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_basic_auth_server_refuses_anonymous_clients_and_accepts_admin(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "auth_server"
    # host=None: no --host flag, so this also proves MLflow's own default binding is loopback-only.
    with start_mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", app_name="basic-auth", host=None
    ) as server:
        addrs = listening_addresses(server.proc.pid)
        assert addrs and all(ip == "127.0.0.1" for ip, _ in addrs), addrs
        user, password = server.admin_username, server.admin_password
        api = server.url + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 401
        assert _get(api, (user, password + "x")) == 401
        assert _get(api, (user, password)) == 200

        # The real client without credentials is refused too.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(MlflowException) as err:
            MlflowClient(tracking_uri=server.url).search_experiments()
        assert "401" in str(err.value) or "Unauthorized" in str(err.value) or "credentials" in str(err.value)

        # With MLFLOW_TRACKING_USERNAME/PASSWORD the platform's own helpers work end to end.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        with isc_tracking.tracked_run(
            experiment="secure", run_name="authed", tags={"isc.storage": DB_URL}
        ) as run:
            isc_tracking.log_params(
                {"storage": DB_URL, "tracking_uri": f"http://{user}:{password}@127.0.0.1"}
            )
            isc_tracking.log_metrics({"average_precision": 0.75})
            run_id = run.info.run_id
        got = MlflowClient(tracking_uri=server.url).get_run(run_id)
        assert got.info.status == "FINISHED"
        assert got.data.metrics == {"average_precision": 0.75}
        stored = _all_values(got)
        assert password not in stored and DB_PASSWORD not in stored
        assert got.data.tags["mlflow.user"] == user  # runs are attributed to the authenticated user


# ------------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_checkpoint_is_refused_without_running_its_code(tmp_path):
    import torch

    models = pytest.importorskip("isc.models.checkpoint")
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint_0000.pth.tar"
    torch.save({"state_dict": {}, "epoch": 1, "payload": _Payload(str(marker))}, evil)

    with pytest.raises(models.CheckpointError, match="refused") as err:
        models.load_checkpoint(evil)
    assert str(evil) in str(err.value)
    assert not marker.exists()
    with pytest.raises(models.CheckpointError):
        models.load_model(evil)
    assert not marker.exists()

    # Control: the payload is real -- an unsafe load in a child process does run it.
    code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, timeout=120)
    assert marker.exists()
