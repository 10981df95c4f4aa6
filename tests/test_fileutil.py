"""Outputs written atomically get ordinary permissions (umask-respecting), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from isc.fileutil import atomic_path
from isc.io import write_descriptors


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_outputs_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        x = np.eye(2, 4, dtype="float32")
        h5 = write_descriptors(tmp_path / "d.h5", x, ["Q0", "Q1"], x, ["R0", "R1"])
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(h5.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == mode
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("size", [244, 255])
def test_a_legal_long_output_name_is_written_and_its_stale_partials_removed(tracking, tmp_path, capsys, size):
    """``isc match --output <244 bytes>.csv`` failed 'File name too long': the name was legal, its temporary
    ``.<name>.@host@pid.XXXXXXXX.partial`` was not. A killed writer's temporary (same shortened stem) is
    still found and removed by the next writer."""
    import socket
    import subprocess

    from entrypoints.cli import run_entrypoint
    from isc.fileutil import partial_stem

    x = np.eye(3, 8, dtype="float32")
    d = write_descriptors(tmp_path / "d.h5", x, ["Q0", "Q1", "Q2"], x, ["R0", "R1", "R2"])
    out = tmp_path / ("é" * ((size - 4) // 2) + "c" * ((size - 4) % 2) + ".csv")
    assert len(os.fsencode(out.name)) == size
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".{partial_stem(out.name)}.@{socket.gethostname()}@{dead.pid}.abcdefgh.partial"
    stale.write_text("half a CSV")
    rc = run_entrypoint("entrypoints.match", ["--descriptors", str(d), "--output", str(out)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert out.read_text().startswith("query_id") and not stale.exists()
    assert not list(tmp_path.glob(".*.partial"))
