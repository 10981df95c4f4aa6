"""Error lines of the hostile round: redaction masks secrets, not words of the message (a path holding
``password`` or ``token=`` stays readable), a file given as ground truth is never printed, and a
checkpoint of random bytes is refused for what it is. Real files, the real CLI path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from entrypoints.cli import run_entrypoint
from isc.io import write_descriptors
from isc.models.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture
def desc(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8)).astype("float32")
    return write_descriptors(tmp_path / "d.h5", x[:3], ["Q0", "Q1", "Q2"], x[3:], ["R0", "R1", "R2"])


def _error_line(argv, capsys) -> str:
    rc = run_entrypoint("entrypoints.evaluate", [str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_path_with_a_secret_word_stays_readable(desc, tmp_path, tracking, capsys):
    gt = tmp_path / "gt" / "password.csv"
    gt.parent.mkdir()
    gt.write_text("query_id,reference_id\n" + "".join(f"Q{i},R{i}\n" for i in range(3)) + ("x\n" * 9)
                  + "Q1,R1,extra\n")  # line 14 has 3 columns
    line = _error_line(["--descriptors", desc, "--ground-truth", gt, "--bootstrap", "0"], capsys)
    assert f"{gt}: line 14: expected 2 columns" in line and "***" not in line, line


def test_a_token_equals_folder_keeps_its_tail(desc, tmp_path, tracking, capsys):
    gt = tmp_path / "token=abc" / "sub" / "gt.csv"
    line = _error_line(["--descriptors", desc, "--ground-truth", gt, "--bootstrap", "0"], capsys)
    assert str(gt) in line and "***" not in line, line


def test_a_passwd_file_as_ground_truth_is_refused_without_printing_it(desc, tmp_path, tracking, capsys):
    fake = tmp_path / "passwd"
    fake.write_text("root:x:0:0:root:/root:/bin/bash\n" * 23 + "alice:x:1000:1000:Alice SECRETMARK,,,:/home/alice:/bin/sh\n")
    sources = [fake] + ([Path("/etc/passwd")] if Path("/etc/passwd").is_file() else [])
    for gt in sources:
        line = _error_line(["--descriptors", desc, "--ground-truth", gt, "--bootstrap", "0"], capsys)
        assert line.startswith(f"error: {gt}: line 1: not an image id"), line
        assert "***" not in line
        for row in gt.read_text().splitlines():
            for field in row.split(":"):
                assert len(field) < 4 or field not in line.removeprefix(f"error: {gt}"), line


def test_random_bytes_checkpoint_is_refused_as_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pth.tar"
    path.write_bytes(b"\x00" + os.urandom(4095))  # neither a zip (PK) nor a pickle (0x80)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "not a PyTorch checkpoint" in msg and "pickled" not in msg, msg


class Opaque:
    """A Python object a checkpoint must not carry (the seed stored its argparse Namespace)."""


def test_a_checkpoint_with_pickled_objects_keeps_its_reason(tmp_path):
    path = tmp_path / "obj.pth.tar"
    torch.save({"state_dict": {}, "args": Opaque()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
