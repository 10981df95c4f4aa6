"""Tracking-server faults: unreachable at start (fail fast, name the URI) and dying mid-run (retry with
backoff, keep local outputs). All against real sockets and a real ``mlflow server``."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from isc import tracking, tracking_uri
from isc.errors import TrackingUnavailableError
from isc.io import write_descriptors, write_ground_truth
from tests.servers import PROJECT_ROOT, free_port, listening_addresses, start_mlflow_server


def _closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_unreachable_tracking_uri_fails_within_seconds_naming_it(monkeypatch):
    import mlflow  # noqa: F401 -- imported up front so the timing below measures the probe only

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = _closed_port_uri()
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match="unreachable") as err:
        tracking.configure(uri)
    assert time.monotonic() - t0 < 2.0
    assert uri in str(err.value)
    # Nothing was switched to the dead server.
    assert os.environ.get("MLFLOW_TRACKING_URI") != uri


def test_tracking_server_that_accepts_but_never_answers_times_out_naming_it():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections queue in the backlog; nobody ever reads or answers
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TrackingUnavailableError) as err:
            tracking_uri.check_reachable(uri, timeout=1.0)
        elapsed = time.monotonic() - t0
    assert elapsed < 4.0, elapsed
    assert uri in str(err.value)


def test_entry_point_with_unreachable_tracking_server_exits_2_naming_uri_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    q, r = rng.standard_normal((3, 8)).astype("float32"), rng.standard_normal((4, 8)).astype("float32")
    desc = write_descriptors(tmp_path / "d.h5", q, ["Q0", "Q1", "Q2"], r, ["R0", "R1", "R2", "R3"])
    gt = write_ground_truth(tmp_path / "gt.csv", [("Q0", "R0"), ("Q1", None), ("Q2", "R3")])
    out_dir = tmp_path / "eval_out"
    uri = _closed_port_uri()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, ISC_HOME=str(tmp_path))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.evaluate", "--descriptors", str(desc), "--ground-truth", str(gt),
         "--output-dir", str(out_dir)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and uri in error_lines[0], proc.stderr[-3000:]
    assert proc.stdout.strip() == ""
    assert not out_dir.exists()
    # MLflow's own retry policy (7 retries, backoff 2) would take minutes; we stop after one probe.
    # The bound covers interpreter + torch/mlflow import on a loaded 2-core machine.
    assert elapsed < 60, elapsed


@pytest.mark.slow
def test_metric_logging_retries_across_server_death_and_keeps_local_checkpoint(
    mlflow_server, tmp_path, monkeypatch, caplog
):
    """Server SIGKILLed mid-run: logging degrades to warnings (bounded time), the local checkpoint
    stays intact, and once the server is back (same port/DB) the retries deliver the next metric."""
    import mlflow
    from mlflow import MlflowClient

    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    # MLflow's HTTP layer fails fast; isc.tracking's own backoff loop does the retrying.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    caplog.set_level(logging.WARNING, logger="isc.tracking")

    ckpt = tmp_path / "checkpoint_0000.pth.tar"
    ckpt.write_bytes(np.random.default_rng(1).bytes(65536))
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    restarted: list = []

    with tracking.tracked_run(experiment="faults", run_name="outage") as run:
        run_id = run.info.run_id
        tracking.log_metrics({"loss": 1.0}, step=0)
        mlflow_server.kill()

        t0 = time.monotonic()
        tracking.log_metrics({"loss": 0.5}, step=1, retries=1)
        ok = tracking.log_artifact(ckpt, artifact_path="checkpoints", retries=0)
        outage_s = time.monotonic() - t0
        assert ok is False
        assert outage_s < 15, outage_s
        assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest  # local output untouched
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("could not log metrics" in w for w in warnings), warnings
        assert any("kept locally" in w and str(ckpt) in w for w in warnings), warnings

        def restart() -> None:
            restarted.append(
                start_mlflow_server(
                    mlflow_server.backend_uri, mlflow_server.artifacts_dir, port=mlflow_server.port
                )
            )

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        caplog.clear()
        try:
            tracking.log_metrics({"loss": 0.25}, step=2, retries=8)  # backoff 1,2,4,...,30 s: ~2 min
            thread.join(timeout=180)
            assert restarted, "mlflow server did not come back"
            assert not [r for r in caplog.records if r.levelno == logging.WARNING]
            assert tracking.log_artifact(ckpt, artifact_path="checkpoints") is True
        except BaseException:
            thread.join(timeout=180)
            raise
    try:
        client = MlflowClient(tracking_uri=mlflow_server.url)
        got = client.get_run(run_id)
        assert got.info.status == "FINISHED"
        history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
        assert history == {0: 1.0, 2: 0.25}  # step 1 fell in the outage and was dropped, not duplicated
        stored = list(mlflow_server.artifacts_dir.rglob(ckpt.name))
        assert len(stored) == 1
        assert hashlib.sha256(stored[0].read_bytes()).hexdigest() == digest
        assert mlflow.active_run() is None
        addrs = listening_addresses(restarted[0].proc.pid)
        assert addrs and all(ip == "127.0.0.1" for ip, _ in addrs), addrs
    finally:
        for server in restarted:
            server.stop()
    assert not restarted[0].alive
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        assert s.connect_ex(("127.0.0.1", mlflow_server.port)) != 0  # stop() took every worker down


def test_reuse_reads_params_through_the_shell_quoting_mlflow_run_logs_them_with():
    """`mlflow run` logs every parameter as ``shlex.quote(value)``: a JSON override must still match."""
    import shlex

    from isc.tracking import normalize_param

    for value in ['{"epochs": 0}', '{"lr": 0.05, "memory_size": 256}', "a b", "it's", "plain", "0123abcd:1"]:
        assert normalize_param(shlex.quote(value)) == normalize_param(value) == value
    assert normalize_param("''") == normalize_param(None) == normalize_param("") == ""
    assert normalize_param("'unbalanced") == "'unbalanced"
