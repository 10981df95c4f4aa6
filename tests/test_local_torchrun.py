"""The ``train_stage*`` entry points' launcher listens on 127.0.0.1 only (a real 1-process torchrun).

Plain ``torchrun`` (``--standalone`` or an explicit 127.0.0.1 endpoint) binds its rendezvous store to
every interface; the control case below shows that, so the check is known to catch it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.servers import PROJECT_ROOT, listening_addresses

STAGES = ["train_stage1", "train_stage1b", "train_stage2", "train_stage3", "train_stage4"]

WORKER = """
import os, pathlib, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
out = pathlib.Path(sys.argv[1])
out.joinpath("master").write_text(os.environ["MASTER_ADDR"] + ":" + os.environ["MASTER_PORT"])
out.joinpath("ready").touch()
while not out.joinpath("go").exists():
    time.sleep(0.1)
dist.destroy_process_group()
"""


def _launcher(entry: str) -> list[str]:
    """The entry point's command up to ``-m entrypoints.train``, with nproc_per_node=1."""
    spec = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"][entry]
    head = spec["command"].split(" -m entrypoints.train", 1)[0]
    return shlex.split(head.format(nproc_per_node=1))


def _listeners_while_running(argv: list[str], tmp_path: Path) -> tuple[set, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    proc = subprocess.Popen([*argv, str(script), str(tmp_path)], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "worker never started"
            time.sleep(0.2)
        addrs = listening_addresses(proc.pid)
    finally:
        (tmp_path / "go").touch()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    return addrs, (tmp_path / "master").read_text()


def test_train_stage_entry_points_use_the_loopback_launcher():
    for entry in STAGES:
        argv = _launcher(entry)
        assert "--standalone" not in argv, entry
        assert argv[:3] == ["python", "-m", "isc.local_torchrun"], (entry, argv)
        assert argv[argv.index("--rdzv-endpoint") + 1].startswith("127.0.0.1:"), (entry, argv)
        assert argv[argv.index("--nnodes") + 1] == "1", (entry, argv)


@pytest.mark.slow
def test_one_process_torchrun_of_the_entry_point_listens_on_loopback_only(tmp_path):
    argv = _launcher("train_stage1")
    argv[0] = sys.executable
    addrs, master = _listeners_while_running(argv, tmp_path / "local")
    assert len(addrs) >= 2, addrs  # the rendezvous/agent stores and the worker's gloo listener
    assert {ip for ip, _ in addrs} == {"127.0.0.1"}, addrs
    assert master.startswith("127.0.0.1:"), master

    # Control: plain torchrun --standalone exposes its store on every interface.
    torchrun = str(Path(sys.executable).parent / "torchrun")
    plain, _ = _listeners_while_running(
        [torchrun, "--standalone", "--nproc-per-node", "1"], tmp_path / "plain"
    )
    assert {ip for ip, _ in plain} - {"127.0.0.1", "::1"}, plain
