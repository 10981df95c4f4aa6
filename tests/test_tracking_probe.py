"""The tracking-server probe against real servers on 127.0.0.1: a web server that is not MLflow gives one
``error:`` line (no traceback); a basic-auth ``mlflow server`` reached through ``http://user:pw@host``
works, and no message, log line, param or tag holds the password."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest

from entrypoints.cli import run_entrypoint
from isc.io import write_descriptors, write_ground_truth
from tests.servers import LOOPBACK, free_port, start_mlflow_server, wait_http_ok

_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No MLflow variables; whatever configure() sets is undone after the test."""
    for var in _ENV:
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    monkeypatch.setenv("ISC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return monkeypatch


@pytest.fixture
def eval_files(tmp_path):
    rng = np.random.default_rng(0)
    q, r = rng.standard_normal((3, 8)).astype("float32"), rng.standard_normal((4, 8)).astype("float32")
    desc = write_descriptors(tmp_path / "d.h5", q, ["Q0", "Q1", "Q2"], r, ["R0", "R1", "R2", "R3"])
    gt = write_ground_truth(tmp_path / "gt.csv", [("Q0", "R0"), ("Q1", None), ("Q2", "R3")])
    return ["--descriptors", str(desc), "--ground-truth", str(gt), "--bootstrap", "0"]


def _evaluate(argv: list[str], capsys) -> tuple[int, str]:
    import mlflow

    try:
        rc = run_entrypoint("entrypoints.evaluate", argv)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


@contextlib.contextmanager
def _http_server(folder):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", LOOPBACK, "--directory", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http_ok(f"http://{LOOPBACK}:{port}/", proc, None, 30)
        yield f"http://{LOOPBACK}:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("imitates", ["plain", "with-health-file", "with-probe-endpoints"])
def test_non_mlflow_web_server_is_named_in_one_error_line(
    tmp_path, clean_env, eval_files, capsys, imitates
):
    site = tmp_path / "site"
    site.mkdir()
    if imitates != "plain":  # /health answers 200 "OK" like MLflow's; before the fix the client crashed later
        (site / "health").write_text("OK\n")
    if imitates == "with-probe-endpoints":  # the API probe gets JSON too; every later call is a 404
        probe = site / "api" / "2.0" / "mlflow" / "experiments" / "search"
        probe.parent.mkdir(parents=True)
        probe.write_text('{"experiments": []}')
    with _http_server(site) as url:
        clean_env.setenv("MLFLOW_TRACKING_URI", url)
        rc, text = _evaluate(eval_files, capsys)
    assert rc == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and url in errors[0], text[-3000:]
    if imitates != "with-probe-endpoints":
        assert "not an MLflow tracking server" in errors[0], errors[0]


@pytest.mark.slow
def test_password_in_tracking_uri_authenticates_and_is_never_shown(tmp_path, clean_env, eval_files, capsys):
    from mlflow import MlflowClient

    password = "p@ss/w0rd-Zq9"  # '@' and '/' must survive URL quoting and stay out of every message
    quoted = urllib.parse.quote(password, safe="")
    root = tmp_path / "auth"
    with start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", app_name="basic-auth",
                             env={"MLFLOW_AUTH_ADMIN_PASSWORD": password}) as server:  # fmt: skip
        assert server.admin_password == password
        uri = f"http://admin:{quoted}@{LOOPBACK}:{server.port}"
        clean_env.setenv("MLFLOW_TRACKING_URI", uri)
        rc, text = _evaluate(eval_files, capsys)
        assert rc == 0, text[-3000:]
        assert password not in text and quoted not in text, text[-3000:]

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", password
        client = MlflowClient(tracking_uri=server.url)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert runs[0].data.tags["mlflow.user"] == "admin"
        stored = json.dumps({"params": runs[0].data.params, "tags": runs[0].data.tags})
        assert password not in stored and quoted not in stored

        # A wrong password in the URI: one error line naming the server, neither password shown.
        wrong = "Wr0ng@pw/x"
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(var, None)
        clean_env.setenv(
            "MLFLOW_TRACKING_URI",
            f"http://admin:{urllib.parse.quote(wrong, safe='')}@{LOOPBACK}:{server.port}",
        )
        rc, text = _evaluate(eval_files, capsys)
        assert rc == 2, text[-3000:]
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "401" in errors[0] and f"{LOOPBACK}:{server.port}" in errors[0], text
        assert "Traceback" not in text
        for secret in (wrong, urllib.parse.quote(wrong, safe=""), password, quoted):
            assert secret not in text, text
