"""The test servers themselves: a real mlflow server and a real PostgreSQL cluster start, serve, stop."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from tests.servers import free_port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _listen_addresses(pid: int) -> set[tuple[str, int]]:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    out = set()
    for p in procs:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                out.add((c.laddr.ip, c.laddr.port))
    return out


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_mlflow_server_logs_runs_and_artifacts_then_stops(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    assert mlflow_server.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(mlflow_server.url + "/health", timeout=5) as resp:
        assert resp.status == 200
    # Bound to loopback only: every listening socket of the server's processes is on 127.0.0.1.
    addrs = _listen_addresses(mlflow_server.proc.pid)
    assert addrs and all(ip == "127.0.0.1" for ip, _ in addrs), addrs
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.create_experiment("servers")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "loss", 0.25, step=3)
    local = tmp_path / "note.txt"
    local.write_text("hello")
    client.log_artifact(run.info.run_id, str(local), artifact_path="notes")
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.metrics == {"loss": 0.25}
    assert got.info.status == "FINISHED"
    # Proxied artifacts land under the server's --artifacts-destination, not in a client-side ./mlruns.
    stored = list(mlflow_server.artifacts_dir.rglob("note.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "hello"
    mlflow_server.stop()
    assert not mlflow_server.alive
    assert not _port_open(mlflow_server.port)


def test_postgres_cluster_listens_on_loopback_and_creates_databases(postgres):
    import sqlalchemy

    assert postgres.url.startswith(f"postgresql+psycopg2://postgres@127.0.0.1:{postgres.port}/")
    url = postgres.new_database()
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select 40 + 2")).scalar() == 42
            listen = conn.execute(sqlalchemy.text("show listen_addresses")).scalar()
            assert listen == "127.0.0.1"
    finally:
        engine.dispose()
    assert _port_open(postgres.port)
