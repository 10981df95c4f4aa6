"""One ``isc main`` over two machines: machine 0 drives, machine 1 runs ``isc join`` (isc/nodes.py).

Both "machines" are processes on this host; where the test may (root with CAP_SYS_ADMIN), machine 1 runs in
its own mount namespace with a folder hidden under an empty tmpfs, as on another machine. The whole main job
on two machines is tests/test_main_full.py (the README's full profile); here: the board, the checks before
stage 0 and the failures.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from isc.nodes import Board, Layout, step_argv
from tests.conftest import PROJECT_ROOT

# A driver that gathers machine 1, says so, and waits to be killed.
DRIVER = """
import sys, time
from pathlib import Path
from isc.nodes import Board, Layout
board = Board(Layout(1, 2, sys.argv[1]), join_timeout_s=60)
print(board.gather(Path(sys.argv[2]), Path(sys.argv[3])), flush=True)
if len(sys.argv) > 4:  # then a step machine 1 starts and waits in, for machine 0's part that never comes
    board.announce(Path(sys.argv[4]), "train", {"config": "isc/configs/smoke.yaml", "data": sys.argv[2],
                                                 "nnodes": 2, "node_rank": 0, "rdzv_endpoint": sys.argv[1]})
    print("announced", flush=True)
time.sleep(600)
"""


def free_port_pair() -> int:
    """A port P with P + 1 also free (the torchrun store and the driver's board)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port pair")


def can_unshare() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def join_process(endpoint: str, node_rank: int, env: dict[str, str], hide: Path | None = None,
          timeout: int = 120) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "entrypoints.join", "--rdzv-endpoint", endpoint, "--node-rank", str(node_rank),
           "--timeout", str(timeout)]
    if hide is not None:  # another machine: machine 0's temp folder is not there
        script = f'mount -t tmpfs tmpfs "{hide}" && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_a_step_is_announced_as_the_module_and_arguments_mlflow_run_would_start():
    params = {"config": "isc/configs/smoke.yaml", "data": "/shared/my data", "nproc_per_node": 8, "nnodes": 2,
              "node_rank": 0, "rdzv_endpoint": "node0:29400"}
    module, args = step_argv(PROJECT_ROOT, "train", params)
    assert module == "entrypoints.train"
    assert args == ["--config", "isc/configs/smoke.yaml", "--data", "/shared/my data", "--init-from", "",
                    "--resume-from", "", "--overrides", ""]
    assert Layout(8, 2, "node0:29400").step_parameters() == {"nnodes": 2, "rdzv_endpoint": "node0:29400",
                                                              "node_rank": 0}
    assert Layout(8).step_parameters() == {}  # one machine: the reuse key of finished runs is unchanged
    assert Layout(8, 2, "node0:29400").board_address == ("node0", 29401)


def test_a_joined_machine_checks_the_job_refuses_other_commands_and_notices_a_lost_driver(
    tracking, mini_data, tmp_path
):
    port = free_port_pair()
    endpoint = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    # machine 1 uses another tracking store and (where a mount namespace can hide it) does not see the
    # driver's output folder: both named to the driver before stage 0, and machine 1 exits with them
    (tmp_path / "outputs").mkdir()
    hide = tmp_path / "outputs" if can_unshare() else None
    board = Board(Layout(1, 2, endpoint), join_timeout_s=60)
    agent = join_process(endpoint, 1, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}, hide=hide)
    problems = board.gather(mini_data.root, tmp_path / "outputs")
    out = agent.communicate(timeout=60)[0]
    assert len(problems) == (2 if hide else 1) and all(p.startswith("node_rank 1 (") for p in problems)
    assert problems[-1].endswith("MLFLOW_TRACKING_URI differs from machine 0's (every machine must use the same store)")
    if hide:
        assert f"outputs: {tmp_path / 'outputs'} is not the driver's folder here" in problems[0]
    assert agent.returncode == 2 and "error: node_rank 1 cannot take part: " in out and "Traceback" not in out
    assert "sqlite" not in "".join(problems)  # the URI itself is never sent (it may hold a password)
    board.stop(ok=False)
    del board

    # a step that is not train/extract is refused, not run
    port = free_port_pair()
    endpoint = f"127.0.0.1:{port}"
    board = Board(Layout(1, 2, endpoint), join_timeout_s=60)
    marker = tmp_path / "ran"
    agent = join_process(endpoint, 1, env)
    assert board.gather(mini_data.root, tmp_path / "outputs") == []
    board.store.set("step/0", json.dumps({"module": "os", "args": ["-c", f"open('{marker}', 'w')"]}))
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 2 and "refusing a step that is not one of entrypoints.train, entrypoints.extract" in out
    assert not marker.exists()
    del board

    # the driver's process dies mid-job (SIGKILL): machine 1 says so and exits, instead of waiting for ever
    port = free_port_pair()
    endpoint = f"127.0.0.1:{port}"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, endpoint, str(mini_data.root), str(tmp_path / "outputs")],
                              cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    agent = join_process(endpoint, 1, env)
    assert driver.stdout.readline().strip() == "[]"  # machine 1 joined without a problem
    driver.kill()
    driver.wait()
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 2 and f"machine 0's `isc main` at {endpoint} went away before it ended the job" in out
    assert "Traceback" not in out and "frame #" not in out  # one line, not torch's C++ stack

    # nobody at the endpoint
    agent = join_process(f"127.0.0.1:{free_port_pair()}", 1, env, timeout=3)
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 2 and "error: rdzv_endpoint: no `isc main` is waiting for machines at 127.0.0.1:" in out


def test_main_fails_before_any_training_run_when_a_machine_does_not_join(tracking, mini_data):
    from isc.tracking import get_or_create_experiment

    port = free_port_pair()
    exp = get_or_create_experiment("main-nodes-missing")
    params = {"data": str(mini_data.root), "profile": "smoke", "n_trials": 0, "nnodes": 2,
              "rdzv_endpoint": f"127.0.0.1:{port}", "join_timeout": 3}
    t0 = time.monotonic()
    with pytest.raises(mlflow.exceptions.ExecutionException):
        mlflow.run(str(PROJECT_ROOT), "main", parameters=params, experiment_id=exp, env_manager="local",
                   synchronous=True)
    assert time.monotonic() - t0 < 120
    runs = MlflowClient().search_runs([exp])
    assert [r.data.tags.get("mlflow.project.entryPoint") for r in runs] == ["main"]  # no step ran
    assert runs[0].info.status == "FAILED"
    # a layout that cannot work is refused before the run opens
    bad = subprocess.run([sys.executable, "-m", "entrypoints.main", "--data", str(mini_data.root), "--profile",
                          "smoke", "--nnodes", "2"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "error: rdzv_endpoint: 2 machines need machine 0's HOST:PORT" in bad.stderr


def test_a_joined_machine_ends_its_part_of_a_step_when_machine_0_dies_during_it(mini_data, tmp_path):
    import psutil

    endpoint = f"127.0.0.1:{free_port_pair()}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, endpoint, str(mini_data.root), str(tmp_path / "outputs"),
                               str(PROJECT_ROOT)], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    agent = join_process(endpoint, 1, env)
    assert driver.stdout.readline().strip() == "[]" and driver.stdout.readline().strip() == "announced"
    deadline = time.monotonic() + 120  # machine 1's torchrun is up, waiting for machine 0's store
    while time.monotonic() < deadline:
        tree = psutil.Process(agent.pid).children(recursive=True)
        if any("isc.launch" in " ".join(p.cmdline()) for p in tree if p.is_running()):
            break
        time.sleep(0.5)
    assert tree, "machine 1 started no step"
    driver.kill()
    driver.wait()
    out = agent.communicate(timeout=90)[0]
    assert agent.returncode == 2, out[-2000:]
    assert f"machine 0's `isc main` at {endpoint} went away during a step; this machine's part was ended" in out
    time.sleep(1)
    assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []

