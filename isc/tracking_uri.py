"""Is a tracking URI usable, before any run opens: scheme and database driver (:func:`check_store_uri`),
database reachable (:func:`check_database`), a real MLflow server behind an http(s) URI
(:func:`check_reachable`, credentials from the URI or MLflow's variables, never printed). Each failure is
one ``ConfigError`` naming the URI with its password masked. :func:`isc.tracking.configure` calls them.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from isc.contract import DEFAULT_EXPERIMENT, Tag, experiment_choice, looks_like_run_id  # noqa: F401 (re-exported)
from isc.errors import TrackingUnavailableError
from isc.redact import REDACTED, is_secret_key, redact, safe_value  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)



CODE_ROOT = Path(__file__).resolve().parent.parent  # this checkout (or site-packages): for git, never for outputs




_API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


# SQLAlchemy dialect -> (its default driver module, the pip package). SQLAlchemy 2.1 made psycopg (3)
# the default of a plain ``postgresql://``; the project ships psycopg2-binary, so a plain URI is mapped
# to ``+psycopg2`` when psycopg is absent (the scheme a user types from the README's team-server path).
_DB_DRIVERS = {
    "postgresql": {"": ("psycopg", "psycopg[binary]"), "psycopg": ("psycopg", "psycopg[binary]"),
                   "psycopg2": ("psycopg2", "psycopg2-binary"), "pg8000": ("pg8000", "pg8000")},
    "mysql": {"": ("MySQLdb", "mysqlclient"), "mysqldb": ("MySQLdb", "mysqlclient"),
              "pymysql": ("pymysql", "PyMySQL"), "mysqlconnector": ("mysql.connector", "mysql-connector-python")},
    "mssql": {"": ("pyodbc", "pyodbc"), "pyodbc": ("pyodbc", "pyodbc"), "pymssql": ("pymssql", "pymssql")},
}
_FALLBACK_DRIVER = {"postgresql": "psycopg2", "mysql": "pymysql"}


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user:password@, user, password)`` of an http(s) URI (``None`` when it has none).

    MLflow's own convention for credentials is ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``; a URI that
    carries them instead is honoured the same way, and the password is kept out of the URI (and so out
    of every message, log line and subprocess environment that shows the URI).
    """
    parts = urllib.parse.urlsplit(uri)
    if not is_http(uri) or (parts.username is None and parts.password is None):
        return uri, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    clean = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return clean, user, password


def _client_credentials() -> tuple[str | None, str | None]:
    """MLflow's own username/password resolution: environment first, then ``~/.mlflow/credentials``."""
    try:
        from mlflow.utils.credentials import read_mlflow_creds

        creds = read_mlflow_creds()
        return creds.username, creds.password
    except Exception:  # noqa: BLE001 -- an unreadable credentials file: fall back to the environment
        return os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")


def _get(url: str, auth: tuple[str, str] | None, timeout: float) -> tuple[int, str, bytes]:
    """``(status, content type, first 4 KB of the body)``; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
            return resp.status, resp.headers.get("Content-Type", ""), resp.read(4096)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", "") if exc.headers else "", b""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI (password masked), unless an MLflow tracking server answers there.

    Two probes: ``/health`` (reachable at all?) and one cheap API call that must answer MLflow JSON
    (so another web server on that port is named as such instead of crashing the client later). Basic
    credentials come from the URI's ``user:password@``, else MLflow's own (``MLFLOW_TRACKING_USERNAME``/
    ``_PASSWORD``, ``~/.mlflow/credentials``), else ``MLFLOW_TRACKING_TOKEN`` (Bearer); credentials or a
    token the server refuses (HTTP 401) fail here too. Other auth schemes (``MLFLOW_TRACKING_AUTH``
    plugins, SigV4) cannot be probed: a 401 is then left to the client.
    """
    if not is_http(uri):
        return
    shown = redact(uri)
    base, user, password = split_credentials(uri)
    if user is None:
        user, password = _client_credentials()
    auth = (user, password or "") if user else None
    token = bool(os.environ.get("MLFLOW_TRACKING_TOKEN"))
    base = base.rstrip("/")
    try:
        status, _, _ = _get(base + "/health", auth, timeout)
        if status >= 500:
            raise TrackingUnavailableError(f"MLflow tracking server {shown} answered HTTP {status}")
        if status not in (200, 401, 403):
            raise TrackingUnavailableError(
                f"{shown} is not an MLflow tracking server (GET /health answered HTTP {status}); "
                "check MLFLOW_TRACKING_URI"
            )
        status, ctype, body = _get(base + _API_PROBE, auth, timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking server {shown} is unreachable ({redact(str(exc))}); start it or set "
            "MLFLOW_TRACKING_URI"
        ) from exc
    if status == 401 and not (auth or token):
        return  # no credentials we could send (anonymous, or an auth plugin): the client decides
    if status == 401:
        who = f"user '{user}'" if auth else "MLFLOW_TRACKING_TOKEN"
        raise TrackingUnavailableError(
            f"MLflow tracking server {shown} refused {who} (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or fix them)"
        )
    if status == 403:
        return  # authenticated, but not allowed to list experiments: the real calls will say what is missing
    try:
        ok = status == 200 and isinstance(json.loads(body or b"{}"), dict)
    except ValueError:
        ok = False
    if not ok:
        raise TrackingUnavailableError(
            f"{shown} answers /health but is not an MLflow tracking server (GET {_API_PROBE.split('?')[0]} "
            f"answered HTTP {status} {ctype or 'without a content type'}); check MLFLOW_TRACKING_URI"
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_store_uri(uri: str) -> str:
    """The tracking URI to use, or :class:`TrackingUnavailableError` naming it (password masked).

    Refused before MLflow sees them (it would end in a traceback, or a silent second store): surrounding
    whitespace, schemes it has no store for, Databricks (no credential flow here), the file store (MLflow 3 keeps it in maintenance mode and fails on it), and database URIs whose driver
    is not installed -- a plain ``postgresql://``/``mysql://`` is mapped to an installed driver instead.
    """
    shown = redact(uri)
    if uri != uri.strip():  # 'mlflow.db ' is a legal file name: a silent second store, not an error, below
        raise TrackingUnavailableError(f"MLFLOW_TRACKING_URI: {shown!r} has leading or trailing whitespace; "
                                       "remove it")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme in ("http", "https", "sqlite"):
        return uri
    if (scheme or uri.lower()) in ("databricks", "databricks-uc", "uc"):  # MLflow takes the bare word too
        raise TrackingUnavailableError(
            f"tracking URI {shown}: the '{scheme or uri}' scheme is not supported here; use sqlite:///..., "
            "postgresql://..., mysql://... or http(s)://...")
    if scheme in ("", "file"):
        raise TrackingUnavailableError(
            f"tracking URI {shown}: MLflow's file store is not supported (MLflow 3 keeps it in maintenance mode); "
            "use sqlite:///<folder>/mlflow.db or an http(s):// tracking server")
    dialect, _, driver = scheme.partition("+")
    drivers = _DB_DRIVERS.get(dialect)
    if drivers is None:
        raise TrackingUnavailableError(
            f"tracking URI {shown}: unsupported scheme '{scheme}'; use sqlite:///..., postgresql://..., "
            "mysql://... or http(s)://...")
    if driver not in drivers:
        raise TrackingUnavailableError(f"tracking URI {shown}: unknown {dialect} driver '{driver}' "
                                       f"(known: {', '.join(d for d in drivers if d)})")
    module, package = drivers[driver]
    if _importable(module):
        return uri
    fallback = _FALLBACK_DRIVER.get(dialect) if not driver else None
    if fallback and _importable(drivers[fallback][0]):
        return f"{dialect}+{fallback}://{rest}"
    raise TrackingUnavailableError(f"tracking URI {shown}: the {dialect} driver '{module}' is not installed "
                                   f"(pip install {package})")


def check_database(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when a database store cannot be connected to (refused, unknown host,
    bad password): MLflow would retry and then raise its own traceback."""
    if uri.lower().startswith("sqlite:"):
        check_sqlite_path(uri)
        return
    if uri.partition("://")[0].split("+")[0].lower() not in _DB_DRIVERS:
        return
    import sqlalchemy

    try:
        args = {"connect_timeout": int(timeout)} if uri.lower().startswith("postgresql") else {}
        engine = sqlalchemy.create_engine(uri, connect_args=args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 -- OperationalError, ArgumentError, driver errors...
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise TrackingUnavailableError(f"tracking database {redact(uri)} is unreachable "
                                       f"({redact(first[0]) if first else type(exc).__name__})") from exc


def check_sqlite_path(uri: str) -> None:
    """Refuse a ``sqlite:///`` path that is a folder, or under a file: MLflow retries opening it for
    about 100 s before failing. A missing parent folder is fine (MLflow creates it); in-memory and
    ``file:`` URI forms are left to SQLite."""
    rest = uri.partition("://")[2]
    path = rest[1:].split("?", 1)[0] if rest.startswith("/") else ""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    target = Path(path)
    if target.is_dir():
        raise TrackingUnavailableError(f"tracking URI {redact(uri)}: {path} is a folder, not a SQLite database file")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TrackingUnavailableError(f"tracking URI {redact(uri)}: {parent} is not a folder")
