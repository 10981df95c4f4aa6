"""Real servers for tests: a loopback ``mlflow server`` and a throwaway PostgreSQL cluster.

Why real processes: the failure modes we guard against (a tracking server that dies mid-run,
basic-auth refusals, concurrent writers on PostgreSQL) only show up against the real thing.
Everything binds ``127.0.0.1`` on a free port and is torn down (whole process group) by ``stop()``.

Public helpers::

    free_port() -> int
    start_mlflow_server(backend_uri, artifacts_dir, port=None, app_name=None, env=None) -> ServerHandle
    start_postgres(tmpdir) -> PostgresHandle     # pytest.skip only when no PostgreSQL binaries exist
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

LOOPBACK = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it; tiny race window before reuse)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of process ``pid`` and its descendants."""
    import psutil

    root = psutil.Process(pid)
    out = set()
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    out.add((conn.laddr.ip, conn.laddr.port))
    return out


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"<no log: {exc}>"


def _stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (uvicorn/gunicorn workers included), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    # Workers may outlive the parent for a moment: make sure the whole group is gone.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class ServerHandle:
    """A running ``mlflow server``. ``url`` is ``http://127.0.0.1:PORT``; use as a context manager."""

    def __init__(
        self,
        proc: subprocess.Popen,
        url: str,
        port: int,
        log_path: Path,
        backend_uri: str,
        artifacts_dir: Path,
        admin_username: str | None = None,
        admin_password: str | None = None,
    ):
        self.proc = proc
        self.url = url
        self.port = port
        self.log_path = log_path
        self.backend_uri = backend_uri
        self.artifacts_dir = artifacts_dir
        self.admin_username = admin_username
        self.admin_password = admin_password

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """The tail of the server's combined stdout/stderr."""
        return _tail(self.log_path)

    def stop(self) -> None:
        """Terminate the server and its workers (idempotent)."""
        _stop_group(self.proc)

    def kill(self) -> None:
        """SIGKILL the whole group at once: the abrupt death a crashed host looks like."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http_ok(url: str, proc: subprocess.Popen | None, log_path: Path | None, timeout: float) -> None:
    """Poll ``url`` until it answers 200; raise RuntimeError with the server log on timeout/exit."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = _tail(log_path) if log_path else ""
            raise RuntimeError(f"server exited with status {proc.returncode} before {url} answered:\n{log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback http)
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    log = _tail(log_path) if log_path else ""
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s (last: {last}); server log:\n{log}")


def _write_auth_config(folder: Path, admin_password: str) -> Path:
    """A basic-auth ini whose user database lives in ``folder`` (not next to the mlflow package)."""
    folder.mkdir(parents=True, exist_ok=True)
    ini = folder / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # PBKDF2 checks cost seconds on a loaded CI machine: verify each credential once.
        "auth_cache_ttl_seconds = 600\n"
    )
    ini.chmod(0o600)
    return ini


def start_mlflow_server(
    backend_uri: str,
    artifacts_dir: str | Path,
    port: int | None = None,
    app_name: str | None = None,
    env: Mapping[str, str] | None = None,
    host: str | None = LOOPBACK,
    timeout: float = 90.0,
) -> ServerHandle:
    """Start the real ``mlflow server`` (one worker, proxied artifacts) and wait for ``/health``.

    ``app_name="basic-auth"`` enables MLflow's basic auth; unless ``env`` brings its own
    ``MLFLOW_AUTH_CONFIG_PATH``, a config with a fresh random admin password is written next to
    ``artifacts_dir`` and exposed as ``handle.admin_username`` / ``handle.admin_password``.
    The server log goes to ``<artifacts_dir>/../mlflow-server-PORT.log``. ``host=None`` passes no
    ``--host`` at all (MLflow's own default binding, which must be loopback).
    """
    artifacts_dir = Path(artifacts_dir).resolve()
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host or LOOPBACK)
    child_env = dict(os.environ)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        child_env.pop(var, None)
    child_env.update(env or {})
    admin_user = admin_pw = None
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts_dir),
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    if host is not None:
        cmd += ["--host", host]
    if app_name:
        cmd += ["--app-name", app_name]
        if app_name == "basic-auth" and "MLFLOW_AUTH_CONFIG_PATH" not in child_env:
            admin_user = "admin"
            admin_pw = child_env.get("MLFLOW_AUTH_ADMIN_PASSWORD") or secrets.token_urlsafe(16)
            child_env.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
            child_env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)
            ini = _write_auth_config(artifacts_dir.parent / f"auth-{port}", admin_pw)
            child_env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        # CSRF protection of the auth app needs a stable secret (one per server is enough here).
        child_env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    log_path = artifacts_dir.parent / f"mlflow-server-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=str(artifacts_dir.parent),
            start_new_session=True,  # own process group: stop() reaches every worker
        )
    url = f"http://{host or LOOPBACK}:{port}"
    handle = ServerHandle(proc, url, port, log_path, backend_uri, artifacts_dir, admin_user, admin_pw)
    try:
        wait_http_ok(url + "/health", proc, log_path, timeout)
    except BaseException:
        handle.stop()
        raise
    return handle


# --------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` holding ``initdb``, or the one on PATH."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            try:
                found.append((float(Path(d).parent.name), Path(d)))
            except ValueError:
                found.append((0.0, Path(d)))
    if found:
        return max(found)[1]
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


class PostgresHandle:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust auth.

    ``url`` points at the database ``isc_test``; :meth:`new_database` makes an empty one per test
    so session-scoped clusters still give every test a clean store.
    """

    def __init__(self, bin_dir: Path, base: Path, data_dir: Path, port: int, run_as: list[str], user: str):
        self.bin_dir = bin_dir
        self.base = base
        self.data_dir = data_dir
        self.port = port
        self.run_as = run_as
        self.user = user
        self.host = LOOPBACK
        self.url = self.url_for("isc_test")
        self._stopped = False

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def new_database(self, name: str | None = None) -> str:
        """Create an empty database (random name unless given) and return its SQLAlchemy URL."""
        import psycopg2

        name = name or f"db_{secrets.token_hex(6)}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url_for(name)

    def log(self) -> str:
        return _tail(self.base / "postgres.log")

    def stop(self) -> None:
        """Fast shutdown of the cluster, then delete its files (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        subprocess.run(
            [
                *self.run_as,
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_postgres(tmpdir: str | Path | None = None, timeout: float = 60.0) -> PostgresHandle:
    """``initdb`` + ``pg_ctl start`` a private cluster listening only on 127.0.0.1:<free port>.

    initdb refuses to run as root, so as root the cluster is created by the ``postgres`` OS user
    (``runuser -u postgres --``) in a fresh ``/tmp`` folder it owns (pytest's tmp dirs are 0700
    root-only). Skips the calling test only when no PostgreSQL binaries are installed.
    """
    import pytest

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb/pg_ctl); scripts/test.sh installs them as root")
    run_as: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' OS user to run initdb")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot drop privileges for initdb")
        run_as = [runuser, "-u", "postgres", "--"]
        base = Path(tempfile.mkdtemp(prefix="isc-pg-", dir="/tmp"))
        os.chown(base, pw.pw_uid, pw.pw_gid)
    else:
        parent = Path(tmpdir) if tmpdir else None
        base = Path(tempfile.mkdtemp(prefix="isc-pg-", dir=str(parent) if parent else None))
    data_dir = base / "data"
    user = "postgres"
    init = subprocess.run(
        [*run_as, str(bin_dir / "initdb"), "-D", str(data_dir), "-U", user, "--auth=trust",
         "-E", "UTF8", "--no-sync", "--no-instructions"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(
            f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}"
        )
    last_err = ""
    for _ in range(3):  # a free port can be taken between free_port() and bind: retry
        port = free_port()
        opts = (
            f"-c listen_addresses={LOOPBACK} -c port={port} -c unix_socket_directories={base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        start = subprocess.run(
            [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(base / "postgres.log"),
             "-o", opts, "-w", "-t", str(int(timeout)), "start"],
            capture_output=True, text=True, timeout=timeout + 30, check=False,
        )  # fmt: skip
        if start.returncode == 0:
            handle = PostgresHandle(bin_dir, base, data_dir, port, run_as, user)
            try:
                handle.new_database("isc_test")
            except BaseException:
                handle.stop()
                raise
            return handle
        last_err = f"{start.stdout[-1000:]}\n{start.stderr[-1000:]}\n{_tail(base / 'postgres.log', 2000)}"
    shutil.rmtree(base, ignore_errors=True)
    raise RuntimeError(f"pg_ctl start failed:\n{last_err}")
