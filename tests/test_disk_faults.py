"""Disk faults end in one line naming the file, the tracked run FAILED, and earlier outputs intact
(before: raw tracebacks, a segfault/abort in extract/export, RUNNING runs, partial files).

ENOSPC and EROFS run on a real 256 KiB tmpfs, mounted by the test (needs root with CAP_SYS_ADMIN:
skipped elsewhere); EFBIG runs anywhere with ``ulimit -f``. Real processes, a real SQLite store."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isc.io import write_descriptors, write_train_descriptors
from tests.conftest import PROJECT_ROOT

SENTINEL = b"an earlier run's output\n"


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4064, 256)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    desc = write_descriptors(tmp_path / "in" / "d.h5", x[:2000], [f"Q{i:05d}" for i in range(2000)],
                             x[2000:4000], [f"R{i:06d}" for i in range(2000)])  # ~4 MB out: > tmpfs, > ulimit
    train = write_train_descriptors(tmp_path / "in" / "t.h5", x[4000:], [f"T{i:03d}" for i in range(64)])
    return desc, train


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:100]}); the ulimit case still runs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _postprocess(tmp_path, inputs, out: Path, prefix: str = ""):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ISC_HOME=str(tmp_path / "home"), PYTHONPATH=str(PROJECT_ROOT))
    args = [sys.executable, "-m", "entrypoints.postprocess", "--descriptors", str(inputs[0]),
            "--train-descriptors", str(inputs[1]), "--output", str(out), "--overwrite", "true"]
    cmd = ["bash", "-c", f'{prefix} exec "$@"', "bash", *args] if prefix else args
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _statuses(tmp_path) -> list[str]:
    with sqlite3.connect(tmp_path / "home" / "mlflow.db") as con:
        return [r[0] for r in con.execute("select status from runs")]


def _check(proc, out: Path, reason: str, tmp_path):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(out) in lines[0] and reason in lines[0], proc.stderr[-3000:]
    assert _statuses(tmp_path) == ["FAILED"]
    assert not list(out.parent.glob(".*.partial"))


def test_full_disk_is_one_line_and_the_earlier_output_survives(tmp_path, inputs, small_tmpfs):
    out = small_tmpfs / "nes.h5"
    out.write_bytes(SENTINEL)
    before = hashlib.sha256(SENTINEL).hexdigest()
    proc = _postprocess(tmp_path, inputs, out)
    _check(proc, out, "No space left on device", tmp_path)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_read_only_disk_is_one_line(tmp_path, inputs, small_tmpfs):
    out = small_tmpfs / "nes.h5"
    out.write_bytes(SENTINEL)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    proc = _postprocess(tmp_path, inputs, out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Read-only file system" in lines[0] and str(small_tmpfs) in lines[0], lines
    assert out.read_bytes() == SENTINEL


def test_file_size_limit_is_one_line(tmp_path, inputs):
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}").search_experiments()  # ~1 MB store
    out = tmp_path / "out" / "nes.h5"
    out.parent.mkdir()
    out.write_bytes(SENTINEL)
    proc = _postprocess(tmp_path, inputs, out, prefix="ulimit -f 2048;")  # 2 MiB: the store fits, the h5 not
    _check(proc, out, "File too large", tmp_path)
    assert out.read_bytes() == SENTINEL


def test_a_store_that_cannot_grow_is_one_line_naming_it(tmp_path, inputs):
    out = tmp_path / "out" / "nes.h5"
    proc = _postprocess(tmp_path, inputs, out, prefix="ulimit -f 64;")  # the new SQLite store cannot be created
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(tmp_path / "home" / "mlflow.db") in lines[0], proc.stderr[-3000:]
    assert not out.exists()


def test_an_output_under_proc_is_one_line(tmp_path, inputs):
    env = {**os.environ, "ISC_HOME": str(tmp_path / "home"), "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "entrypoints.match", "--descriptors", str(inputs[0]), "--output",
                           "/proc/version", "--overwrite"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        "error: /proc/version: No such file or directory"
    ], proc.stderr[-3000:]
