"""``python -m isc.launch``: how the train/extract steps start (one process, torchrun on one machine, several
machines), and the main job's process-count check before its run opens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from isc.errors import ConfigError
from isc.launch import torchrun_args
from isc.recipe import check_processes
from tests.conftest import PROJECT_ROOT
from tests.test_main import TINY_FULL

WORKER = """
import os, pathlib, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
pathlib.Path(sys.argv[1], f"rank{dist.get_rank()}").write_text(f"{dist.get_world_size()} {t.item():g} {sys.argv[2]}")
dist.destroy_process_group()
"""


def test_torchrun_arguments_per_layout():
    assert torchrun_args(1) is None  # one process: no torchrun, the module itself
    assert torchrun_args(4) == ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
                                "--local-addr", "127.0.0.1", "--nproc-per-node", "4"]
    # several machines: the static rendezvous, so node rank 0 (the machine under `mlflow run`) holds rank 0
    assert torchrun_args(8, 2, "node0:29400", 1) == ["--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "static",
                                                     "--rdzv-endpoint", "node0:29400", "--nproc-per-node", "8"]
    for endpoint in ("", "node0", "node0:port", ":29400", "node0:70000"):
        with pytest.raises(ConfigError, match="rdzv_endpoint: 2 machines need machine 0's HOST:PORT"):
            torchrun_args(8, 2, endpoint)
    with pytest.raises(ConfigError, match=r"node_rank: must be in 0..1 for 2 machines, got 2"):
        torchrun_args(8, 2, "node0:29400", 2)
    with pytest.raises(ConfigError, match="nproc_per_node: must be >= 1"):
        torchrun_args(0)


def _launch(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isc.launch", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_one_process_runs_the_module_itself_and_bad_counts_fail_naming_the_parameter(tmp_path):
    done = _launch(["--nproc-per-node", "1", "--nnodes", "1", "--rdzv-endpoint", "", "-m", "json.tool", "--help"])
    assert done.returncode == 0 and "usage:" in done.stdout and "json.tool" in done.stdout
    bad = _launch(["--nproc-per-node", "two", "-m", "json.tool"])
    assert bad.returncode == 2 and "error: nproc_per_node: expected a whole number, got 'two'" in bad.stderr
    assert _launch(["--gpus", "2", "-m", "json.tool"]).returncode == 2


def test_main_refuses_a_process_count_that_does_not_split_every_stage_batch():
    check_processes("full", 8)  # the seed's counts fit its batches (128, 128, 128, 64; v107: 1 pair + 14 negatives)
    check_processes("full", 2, json.dumps(TINY_FULL))
    with pytest.raises(ConfigError) as err:
        check_processes("full", 3)
    msg = str(err.value)
    assert msg.startswith("nproc_per_node: 3 process(es) per stage do not fit: stage0: batch_size: global batch 128")
    assert "stage3: batch_size: global batch 64 does not split evenly over 3 processes" in msg
    assert "stage4" not in msg  # v107 takes 1 pair per process whatever the count: 4 negatives at G = 3
    # one process: v107's 2G-2 leaves stage 4 without negatives, named before any run opens
    with pytest.raises(ConfigError, match=r"stage4: batch_per_process: a process needs images of two labels"):
        check_processes("full", 1)


@pytest.mark.slow
def test_two_machines_join_one_job(tmp_path):
    """Two launchers with nnodes 2 (here both on this machine) form one 2-rank gloo job."""
    (tmp_path / "two_node_worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{PROJECT_ROOT}"}
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    procs = [subprocess.Popen([sys.executable, "-m", "isc.launch", *common, "--node-rank", str(n), "-m",
                               "two_node_worker", str(tmp_path), f"node{n}"], cwd=PROJECT_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (1, 0)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = sorted((tmp_path / f"rank{r}").read_text() for r in range(2))
    assert [r.split()[:2] for r in results] == [["2", "3"], ["2", "3"]]  # world 2, 1 + 2 summed across machines
    # node rank decides global rank, whichever machine arrived first (node 1 was started first)
    assert [(tmp_path / f"rank{r}").read_text().split()[2] for r in range(2)] == ["node0", "node1"]
