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
