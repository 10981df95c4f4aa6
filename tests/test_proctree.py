"""isc.proctree ends a process tree as a whole: the signal to the direct children, a grace period, then
SIGKILL for what is left -- also processes that ignore SIGTERM and ones whose parent died first (orphans,
no longer below the driver when the grace period ends). Real processes; each case runs in its own Python
process, so nothing of the test runner's own children (servers of other tests) is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import PROJECT_ROOT

# A driver stand-in: starts `bash` trees, then calls stop_children and prints what it saw as JSON.
DRIVER = r"""
import json, os, subprocess, sys, time
from isc.proctree import stop_children
trees = json.loads(sys.argv[1])
procs = [subprocess.Popen(["bash", "-c", t]) for t in trees]
import psutil
# The trees are up once each bash has started its first child (after its traps: every tree sets them
# first). A fixed sleep lost under CI load: a signal that reached the child between fork and exec was
# taken by Python's handler and lost, and bash then waited for ever (SIGKILLed: -9, not 130).
end = time.monotonic() + 60
while not all(psutil.Process(p.pid).children() for p in procs) and time.monotonic() < end:
    time.sleep(0.05)
time.sleep(0.2)
before = sorted(p.pid for p in psutil.Process().children(recursive=True))
t0 = time.monotonic()
pids = stop_children(int(sys.argv[2]), float(sys.argv[3]))
took = time.monotonic() - t0
codes = [p.wait(timeout=10) for p in procs]
print(json.dumps({"before": before, "pids": pids, "took": took, "codes": codes}))
"""


def _run(trees: list[str], sig: int = 15, grace: float = 3.0) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(trees), str(sig), str(grace)],
                          capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_tree_that_obeys_sigterm_ends_within_the_grace_period():
    # like a step's Python process: it ends its own children on SIGTERM, then exits
    out = _run(["trap 'kill $(jobs -p); exit 143' TERM; sleep 300 & sleep 300 & wait"], grace=20.0)
    assert len(out["before"]) == 3 and out["pids"] == out["before"]
    assert out["took"] < 10  # not the whole grace period
    assert out["codes"] == [143]
    time.sleep(0.5)
    assert [p for p in out["pids"] if _alive(p)] == []


def test_processes_that_ignore_sigterm_are_sigkilled_after_the_grace_period():
    out = _run(["trap '' TERM; bash -c \"trap '' TERM; sleep 300\" & sleep 300 & wait"], grace=2.0)
    assert len(out["before"]) >= 3
    assert 2.0 <= out["took"] < 15
    assert out["codes"] == [-9]
    time.sleep(0.5)
    assert [p for p in out["pids"] if _alive(p)] == []


def test_an_orphan_whose_parent_died_first_is_still_ended():
    # the parent exits on SIGTERM at once; its child ignores SIGTERM and is re-parented away from the driver
    out = _run(["bash -c \"trap '' TERM; exec sleep 300\" & wait"], grace=60.0)
    assert len(out["before"]) == 2
    assert out["took"] < 15  # the orphan gets a short wait, not the whole grace period
    time.sleep(0.5)
    assert [p for p in out["pids"] if _alive(p)] == [], out


def test_no_children_is_a_no_op():
    assert _run([], grace=5.0)["pids"] == []


@pytest.mark.parametrize("sig", [2, 15])
def test_the_driver_forwards_its_own_signal(sig):
    # the child reports which signal it got through its exit status (bash: 128 + n for a trapped n)
    out = _run([f"trap 'exit $((128 + {sig}))' {sig}; sleep 300 & wait"], sig=sig, grace=10.0)
    assert out["codes"] == [128 + sig]


def test_stale_partials_of_stopped_writers_are_removed_in_the_whole_tree(tmp_path):
    import socket

    from isc.fileutil import remove_dead_partials

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    gone = tmp_path / "a" / "b" / f".descriptors.h5.@{host}@{dead.pid}.x1.partial"
    live = tmp_path / "a" / f".final.pth.tar.@{host}@{os.getpid()}.x2.partial"
    other_host = tmp_path / f".m.csv.@elsewhere@{dead.pid}.x3.partial"
    plain = tmp_path / "a" / "b" / "descriptors.h5"
    for p in (gone, live, other_host, plain):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert remove_dead_partials(tmp_path) == [gone]
    assert live.exists() and other_host.exists() and plain.exists() and not gone.exists()
