"""Shared fixtures. Tests never read ../shared and never download anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# `mlflow run --env-manager local` starts entry points with the first `python` on PATH: make it this venv's,
# even when pytest was started as `.venv/bin/python -m pytest` without activating the venv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# Keep tests quiet and offline: no hub lookups by timm/huggingface.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh embedded SQLite MLflow store (absolute artifact root) for one test."""
    import mlflow

    home = tmp_path / "isc_home"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("ISC_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory: pytest.TempPathFactory):
    """A tiny DISC21-shaped dataset built once per session from scikit-image's bundled photos."""
    from isc.data.mini import make_mini

    out = tmp_path_factory.mktemp("mini") / "mini"
    return make_mini(out, seed=0, size="tiny")


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend + proxied artifacts in tmp), one per test.

    Yields a ``tests.servers.ServerHandle`` (``.url``, ``.stop()``, ``.kill()``, ``.log()``).
    """
    from tests.servers import start_mlflow_server

    root = tmp_path / "mlflow_server"
    root.mkdir()
    server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_mlflow_server(request, tmp_path: Path):
    """A real ``mlflow server`` on 127.0.0.1 over each SQL backend a team server may use (SQLite, PostgreSQL),
    for the registry races whose form depends on the database."""
    from tests.servers import start_mlflow_server

    if request.param == "sqlite":
        backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        backend = request.getfixturevalue("postgres").new_database()
    with start_mlflow_server(backend, tmp_path / "artifacts") as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway PostgreSQL cluster (``tests.servers.PostgresHandle``: ``.url``, ``.new_database()``).

    Skips only where no PostgreSQL server binaries are installed.
    """
    from tests.servers import start_postgres

    handle = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 256 KiB tmpfs (needs root with CAP_SYS_ADMIN; skipped with the reason otherwise): a full disk
    for the disk-fault tests and too little disk for the main job's preflight."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:100]}); the ulimit case still runs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
