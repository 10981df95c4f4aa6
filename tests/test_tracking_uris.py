"""Tracking URIs MLflow cannot use end in one error line naming the URI (password masked), never a
traceback: the file store, unknown schemes, a database driver that is not installed, an unreachable
database. A plain ``postgresql://`` (the README's team-server path) uses the installed psycopg2.
Real processes (``python -m entrypoints.evaluate``), real sockets."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from isc.io import write_descriptors, write_ground_truth
from isc.tracking_uri import check_store_uri
from tests.conftest import PROJECT_ROOT

PW = "S3cretPw9"


@pytest.fixture
def files(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 8)).astype("float32")
    d = write_descriptors(tmp_path / "d.h5", x[:3], ["Q0", "Q1", "Q2"], x[3:], ["R0", "R1", "R2"])
    return d, write_ground_truth(tmp_path / "gt.csv", [("Q0", "R0"), ("Q1", None)])


def _has(module):
    return importlib.util.find_spec(module) is not None


CASES = [
    ("file:///{tmp}/mlruns", "file store is not supported"),
    ("{tmp}/mlruns", "file store is not supported"),
    ("bogus://x", "unsupported scheme 'bogus'"),
    (f"postgresql://u:{PW}@127.0.0.1:1/db", "is unreachable"),  # mapped to psycopg2, then refused
    (f"postgresql+pg8000://u:{PW}@127.0.0.1:1/db", "pip install pg8000" if not _has("pg8000") else "unreachable"),
    (f"postgresql+nodriver://u:{PW}@127.0.0.1:1/db", "unknown postgresql driver 'nodriver'"),
]
if not _has("MySQLdb") and not _has("pymysql"):
    CASES.append((f"mysql://u:{PW}@127.0.0.1:1/db", "pip install mysqlclient"))


@pytest.mark.parametrize(("uri", "expect"), CASES, ids=[c[0].split(":")[0] + str(i) for i, c in enumerate(CASES)])
def test_unusable_tracking_uri_is_one_line_naming_it(tmp_path, files, uri, expect):
    uri = uri.format(tmp=tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.evaluate", "--descriptors", str(files[0]), "--ground-truth",
         str(files[1]), "--bootstrap", "0"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and PW not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    shown = uri.replace(PW, "***")
    assert shown.split("://")[-1].split("@")[-1] in errors[0] and ("***" in errors[0] or PW not in uri), errors[0]
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.skipif(_has("psycopg") or not _has("psycopg2"), reason="psycopg (3) installed: no mapping needed")
def test_plain_postgresql_scheme_is_mapped_to_the_installed_driver():
    assert check_store_uri("postgresql://u:p@h:5432/db") == "postgresql+psycopg2://u:p@h:5432/db"
    assert check_store_uri("postgresql+psycopg2://u:p@h/db") == "postgresql+psycopg2://u:p@h/db"
    assert check_store_uri("sqlite:///x.db") == "sqlite:///x.db"


def _evaluate(tmp_path, files, uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.evaluate", "--descriptors", str(files[0]), "--ground-truth",
         str(files[1]), "--bootstrap", "0"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    return proc, time.monotonic() - start


# (URI, what the error says, what to make first). Before: a second store 'mlflow.db ' silently used;
# 103 s of MLflow retries on a folder; "MLflow's file store is not supported" for databricks.
LOCAL_CASES = [
    ("sqlite:///{tmp}/mlflow.db ", "MLFLOW_TRACKING_URI: 'sqlite:///{tmp}/mlflow.db ' has leading or trailing", None),
    (" sqlite:///{tmp}/mlflow.db", "MLFLOW_TRACKING_URI: ' sqlite:///{tmp}/mlflow.db' has leading or trailing", None),
    ("sqlite:///{tmp}/dir.db", "{tmp}/dir.db is a folder, not a SQLite database file", "dir.db/"),
    ("sqlite:///{tmp}/plain.txt/x.db", "{tmp}/plain.txt is not a folder", "plain.txt"),
    ("databricks", "tracking URI databricks: the 'databricks' scheme is not supported here", None),
    ("databricks://profile", "the 'databricks' scheme is not supported here", None),
]


@pytest.mark.parametrize(("uri", "expect", "make"), LOCAL_CASES, ids=["space", "lead", "dir", "under_file", "dbx",
                                                                      "dbx_url"])
def test_tracking_uri_mistakes_are_one_quick_line_and_create_no_store(tmp_path, files, uri, expect, make):
    if make and make.endswith("/"):
        (tmp_path / make).mkdir()
    elif make:
        (tmp_path / make).write_text("not a folder\n")
    proc, took = _evaluate(tmp_path, files, uri.format(tmp=tmp_path))
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert expect.format(tmp=tmp_path) in errors[0], errors[0]
    assert took < 60, took  # a folder took 103 s of retries
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("mlflow.db") or p.name == "mlartifacts"]
