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


# ---- extract (HDF5) and export (TorchScript / ONNX) on a full disk: before, a segfault (139) and an abort (134)

@pytest.fixture
def tiny_model(tmp_path):
    import torch

    from isc.models import create_model, save_checkpoint

    torch.manual_seed(1)  # ~0.45 MB of weights: an export of it does not fit the 256 KiB tmpfs
    return save_checkpoint(tmp_path / "in" / "model.pth.tar",
                           create_model("test_efficientnet", pretrained=False, input_size=32), epoch=0)


def _isc(tmp_path, module: str, args: list[str], prefix: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ISC_HOME=str(tmp_path / "home"), PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, "-m", module, *args]
    cmd = ["bash", "-c", f'{prefix} exec "$@"', "bash", *cmd] if prefix else cmd
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _one_line(proc, path: Path, reason: str) -> str:
    assert proc.returncode == 2, f"rc {proc.returncode}: {proc.stderr[-3000:]}"  # not 139 (segfault) / 134 (abort)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {reason}"), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("fill_kib", [0, 200, 250])
def test_extract_on_a_full_disk_is_one_line_and_the_earlier_output_survives(tmp_path, tiny_model, mini_data,
                                                                             small_tmpfs, fill_kib):
    """Before: HDF5 reported its failed writes as ignored exceptions and then crashed the process when the
    file was closed (segfault, exit 139), leaving ``.descriptors.h5.*.partial`` and the run RUNNING."""
    if fill_kib:
        (small_tmpfs / "filler").write_bytes(b"\0" * (fill_kib << 10))
    out = small_tmpfs / "ex"
    out.mkdir()
    (out / "descriptors.h5").write_bytes(SENTINEL)
    proc = _isc(tmp_path, "entrypoints.extract", ["--model", str(tiny_model), "--data", str(mini_data.root),
                                                  "--output-dir", str(out), "--workers", "0", "--overwrite"])
    line = _one_line(proc, out / "descriptors.h5", "No space left on device (needs ~")
    assert "MiB free)" in line
    assert (out / "descriptors.h5").read_bytes() == SENTINEL
    assert sorted(p.name for p in out.iterdir()) == ["descriptors.h5"]  # no partial, no train file
    assert _statuses(tmp_path) == ["FAILED"]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_on_a_full_disk_is_one_line_and_the_earlier_file_survives(tmp_path, tiny_model, small_tmpfs, fmt):
    """Before: torch's zip writer ignored the failed write and aborted the process from a destructor
    (c10::Error "unexpected pos", exit 134), leaving a partial file; ONNX's error named no file."""
    out = small_tmpfs / f"m.{fmt}"
    out.write_bytes(SENTINEL)
    proc = _isc(tmp_path, "entrypoints.export", ["--model", str(tiny_model), "--format", fmt, "--output", str(out),
                                                 "--overwrite", "--log-run", "true"])
    _one_line(proc, out, "No space left on device (needs ~")
    assert out.read_bytes() == SENTINEL
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [out.name]
    assert _statuses(tmp_path) == ["FAILED"]


def test_export_over_the_file_size_limit_is_one_line(tmp_path, tiny_model):
    """The free-space check passes, the write itself fails (EFBIG): an OSError naming the file, not an abort."""
    out = tmp_path / "out" / "m.pt"
    out.parent.mkdir()
    proc = _isc(tmp_path, "entrypoints.export", ["--model", str(tiny_model), "--format", "torchscript",
                                                 "--output", str(out)], prefix="ulimit -f 256;")
    _one_line(proc, out, "File too large")
    assert list(out.parent.iterdir()) == []


def test_extract_over_the_file_size_limit_is_one_line(tmp_path, tiny_model, mini_data):
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}").search_experiments()  # ~1 MB store
    out = tmp_path / "out"
    proc = _isc(tmp_path, "entrypoints.extract", ["--model", str(tiny_model), "--data", str(mini_data.root),
                                                  "--output-dir", str(out), "--workers", "0"],
                prefix="ulimit -f 2048;")  # 2 MiB: the store fits, the ~2.6 MiB reservation not
    _one_line(proc, out / "descriptors.h5", "File too large")
    assert not out.exists() or list(out.iterdir()) == []
    assert _statuses(tmp_path) == ["FAILED"]


def test_reserved_space_is_kept_when_another_writer_fills_the_disk(small_tmpfs):
    """What makes the h5 writes safe: the blocks are the output's before HDF5 writes, so a disk that fills up
    meanwhile fails the other writer, not HDF5 (whose failed writes crash the process)."""
    from isc.fileutil import release_reserved, reserve_space

    out = small_tmpfs / "out.h5"
    out.write_bytes(b"")
    assert reserve_space(out, 160 << 10) is True
    with pytest.raises(OSError) as exc:
        (small_tmpfs / "other").write_bytes(b"\1" * (200 << 10))
    assert exc.value.errno == 28
    (small_tmpfs / "other").unlink()
    (small_tmpfs / "hog").write_bytes(b"\1" * (90 << 10))  # the disk is now full, but for the reservation
    with open(out, "r+b") as fh:
        fh.write(b"\2" * (150 << 10))  # fits in the reserved blocks
    assert out.stat().st_size == 150 << 10
    release_reserved(out)
    (small_tmpfs / "after").write_bytes(b"\3" * (8 << 10))  # the unused part was given back


# Every other writing command on a full disk names the file it was writing (before: "error: a file: No space
# left on device" -- a failed write() names no file -- and `isc search` a faiss RuntimeError traceback).
FULL_DISK_COMMANDS = {
    "match": (250, lambda d, m, o: ["entrypoints.match", "--descriptors", str(d), "--output", str(o / "m.csv")],
              "m.csv"),
    "evaluate": (250, lambda d, m, o: ["entrypoints.evaluate", "--descriptors", str(d), "--ground-truth",
                                       str(m.root / "ground_truth.csv"), "--output-dir", str(o / "ev"),
                                       "--bootstrap", "10"], "ev/"),
    "make-mini": (0, lambda d, m, o: ["entrypoints.make_mini", "make-mini", "--out", str(o / "mini"), "--size",
                                      "tiny"], "mini/"),
    "train": (0, lambda d, m, o: ["entrypoints.train", "--config", str(PROJECT_ROOT / "isc/configs/smoke.yaml"),
                                  "--data", str(m.root), "--output-dir", str(o / "train"), "--epochs", "1"],
              "train/checkpoints/checkpoint_0000.pth.tar"),
    "search": (200, None, "ref.index"),
}


@pytest.mark.parametrize("command", sorted(FULL_DISK_COMMANDS))
def test_every_writer_on_a_full_disk_names_its_file(tmp_path, tracking, tiny_model, mini_data, small_tmpfs, command):
    import mlflow

    fill_kib, args, named = FULL_DISK_COMMANDS[command]
    if fill_kib:
        (small_tmpfs / "filler").write_bytes(b"\0" * (fill_kib << 10))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ISC_HOME=os.environ["ISC_HOME"], PYTHONPATH=str(PROJECT_ROOT))  # the `tracking` fixture's store
    if command == "search":
        from registry.model_logging import log_descriptor_model

        info = log_descriptor_model(tiny_model, registered_model_name="isc-descriptor")
        mlflow.MlflowClient().set_registered_model_alias("isc-descriptor", "champion", info.registered_model_version)
        argv = ["entrypoints.search", "--references", str(mini_data.root / "reference_images"), "--queries",
                str(mini_data.root / "query_images"), "--index", str(small_tmpfs / "ref.index"), "--output", ""]
    else:
        desc = tmp_path / "d.h5"
        if command in ("match", "evaluate"):
            rng = np.random.default_rng(0)
            q = [i for i, _ in mini_data.images("query")]
            r = [i for i, _ in mini_data.images("reference")]
            x = rng.standard_normal((len(q) + len(r), 256)).astype("float32")
            write_descriptors(desc, x[: len(q)], q, x[len(q):], r)
        argv = args(desc, mini_data, small_tmpfs)
    proc = subprocess.run([sys.executable, "-m", *argv], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {small_tmpfs}/{named}"), proc.stderr[-3000:]
    assert "No space left on device" in lines[0]
    assert not [p for p in small_tmpfs.rglob("*") if p.name.endswith(".partial")]
