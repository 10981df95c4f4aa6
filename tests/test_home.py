"""Outputs and artifact roots land under the current folder (or ``$ISC_HOME``), never inside the
installed package: the hostile round found ``<install>/mlartifacts/<exp>`` and ``<install>/outputs/train``.
A real process started in a scratch folder, a real SQLite store."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

from isc.io import write_descriptors, write_ground_truth
from tests.conftest import PROJECT_ROOT


def _evaluate(cwd: Path, env: dict, files) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "entrypoints.evaluate", "--descriptors", str(files[0]), "--ground-truth",
         str(files[1]), "--bootstrap", "0", "--experiment-name", "home-check"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def _artifact_locations(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("select artifact_location from experiments where name = 'home-check'")]


def test_default_store_and_artifacts_are_under_the_current_folder_or_isc_home(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 8)).astype("float32")
    files = (write_descriptors(tmp_path / "d.h5", x[:3], ["Q0", "Q1", "Q2"], x[3:], ["R0", "R1", "R2"]),
             write_ground_truth(tmp_path / "gt.csv", [("Q0", "R0"), ("Q1", None)]))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ISC_HOME"))}
    base["PYTHONPATH"] = str(PROJECT_ROOT)
    work = tmp_path / "work"
    work.mkdir()

    # No ISC_HOME, no MLFLOW_TRACKING_URI: the store and its artifacts are in the current folder.
    proc = _evaluate(work, base, files)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _artifact_locations(work / "mlflow.db") == [str(work / "mlartifacts" / "home-check")]
    assert list((work / "mlartifacts" / "home-check").rglob("metrics.json"))

    # MLFLOW_TRACKING_URI elsewhere: new experiments' artifacts still go under the current folder, not the package.
    other = tmp_path / "other"
    other.mkdir()
    proc = _evaluate(work, {**base, "MLFLOW_TRACKING_URI": f"sqlite:///{other / 'mlflow.db'}"}, files)
    assert proc.returncode == 0, proc.stderr[-3000:]
    locations = _artifact_locations(other / "mlflow.db")
    assert locations == [str(work / "mlartifacts" / "home-check")], locations
    assert not any(loc.startswith(str(PROJECT_ROOT / "mlartifacts")) for loc in locations)

    # ISC_HOME, documented, wins over the current folder.
    home = tmp_path / "home"
    proc = _evaluate(work, {**base, "ISC_HOME": str(home)}, files)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _artifact_locations(home / "mlflow.db") == [str(home / "mlartifacts" / "home-check")]


def test_project_root_is_the_current_folder_not_the_code(monkeypatch, tmp_path):
    from isc import tracking

    monkeypatch.delenv("ISC_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.project_root() == tmp_path.resolve()
    assert tracking.CODE_ROOT != tracking.project_root()
