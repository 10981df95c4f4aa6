"""One ``isc main`` over two machines: machine 0 drives, machine 1 runs ``isc join`` (isc/nodes.py).

Both "machines" are processes on this host. Where the test may (root with CAP_SYS_ADMIN), machine 1 runs in
its own mount namespace with machine 0's temp folder hidden under an empty tmpfs: what rank 0 downloads there
(stage 2's starting checkpoint, from a real ``mlflow server`` with proxied artifacts) reaches machine 1's rank
only over the process group, as on two real machines.
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
time.sleep(600)
"""


def _free_port_pair() -> int:
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


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def _join(endpoint: str, node_rank: int, env: dict[str, str], hide: Path | None = None,
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
    port = _free_port_pair()
    endpoint = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    # machine 1 uses another tracking store and (where a mount namespace can hide it) does not see the
    # driver's output folder: both named to the driver before stage 0, and machine 1 exits with them
    (tmp_path / "outputs").mkdir()
    hide = tmp_path / "outputs" if _can_unshare() else None
    board = Board(Layout(1, 2, endpoint), join_timeout_s=60)
    agent = _join(endpoint, 1, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}, hide=hide)
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
    port = _free_port_pair()
    endpoint = f"127.0.0.1:{port}"
    board = Board(Layout(1, 2, endpoint), join_timeout_s=60)
    marker = tmp_path / "ran"
    agent = _join(endpoint, 1, env)
    assert board.gather(mini_data.root, tmp_path / "outputs") == []
    board.store.set("step/0", json.dumps({"module": "os", "args": ["-c", f"open('{marker}', 'w')"]}))
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 2 and "refusing a step that is not one of entrypoints.train, entrypoints.extract" in out
    assert not marker.exists()
    del board

    # the driver's process dies mid-job (SIGKILL): machine 1 says so and exits, instead of waiting for ever
    port = _free_port_pair()
    endpoint = f"127.0.0.1:{port}"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, endpoint, str(mini_data.root), str(tmp_path / "outputs")],
                              cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    agent = _join(endpoint, 1, env)
    assert driver.stdout.readline().strip() == "[]"  # machine 1 joined without a problem
    driver.kill()
    driver.wait()
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 2 and f"machine 0's `isc main` at {endpoint} went away before it ended the job" in out
    assert "Traceback" not in out and "frame #" not in out  # one line, not torch's C++ stack

    # nobody at the endpoint
    agent = _join(f"127.0.0.1:{_free_port_pair()}", 1, env, timeout=3)
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 2 and "error: rdzv_endpoint: no `isc main` is waiting for machines at 127.0.0.1:" in out


def test_main_fails_before_any_training_run_when_a_machine_does_not_join(tracking, mini_data):
    from isc.tracking import get_or_create_experiment

    port = _free_port_pair()
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


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_main_on_two_machines_trains_and_extracts_as_one_job_and_promotes(mlflow_server, mini_data, tmp_path,
                                                                         monkeypatch):
    from isc.tracking import get_or_create_experiment

    home = tmp_path / "isc_home"  # shared storage: data and outputs
    head_tmp = tmp_path / "machine0_tmp"  # machine 0's own temp folder (downloads land here)
    home.mkdir()
    head_tmp.mkdir()
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("ISC_HOME", str(home))
    mlflow.set_tracking_uri(mlflow_server.url)
    port = _free_port_pair()
    endpoint = f"127.0.0.1:{port}"
    hidden = _can_unshare()
    agent = _join(endpoint, 1, {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, hide=head_tmp if hidden else None,
                  timeout=600)
    monkeypatch.setenv("TMPDIR", str(head_tmp))
    exp = get_or_create_experiment("main-two-machines")
    params = {"data": str(mini_data.root), "profile": "smoke", "n_trials": 0, "nnodes": 2,
              "rdzv_endpoint": endpoint, "join_timeout": 300}
    try:
        run = mlflow.run(str(PROJECT_ROOT), "main", parameters=params, experiment_id=exp, env_manager="local",
                         synchronous=True)
        out = agent.communicate(timeout=120)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, out[-3000:]
    client = MlflowClient()
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    # every training stage and extraction ran as one 2-rank job over both machines, logged once (by rank 0)
    for step in ("train_stage1", "train_stage2", "extract_stage1", "extract_stage2"):
        p = client.get_run(tags[f"isc.step_run.{step}"]).data.params
        assert (p["nnodes"], p["node_rank"], p["world_size"]) == ("2", "0", "2"), step
    entry_points = [r.data.tags.get("mlflow.project.entryPoint") for r in client.search_runs([exp])]
    assert entry_points.count("train") == 2 and entry_points.count("extract") == 2
    assert "machine 0 ended the job (finished)" in out
    assert client.get_model_version_by_alias("isc-descriptor", "champion").tags["isc.model_ref"] in (
        tags["isc.step_run.train_stage1"], tags["isc.step_run.train_stage2"])
    if hidden:  # stage 2's starting checkpoint was in machine 0's temp folder: machine 1 got its bytes
        assert "is not on this machine; received it from rank 0" in out
