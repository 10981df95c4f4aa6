"""Concurrent writers on the team setup: a real PostgreSQL server, a real ``mlflow server`` on it, and
real worker processes that start at the same instant. Counts must come out exact: nothing lost,
nothing duplicated. (SQLite is single-writer; see docs/operations.md.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import PROJECT_ROOT, start_mlflow_server

N_RUNS = 3  # per worker
N_STEPS = 5  # metric steps per run
N_TRIALS = 6  # Optuna trials per worker

MLFLOW_WORKER = f"""
import sys, time, pathlib
from isc import tracking
wid, go, ready = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
tracking.configure()
ready.touch()
while not go.exists():
    time.sleep(0.02)
for i in range({N_RUNS}):
    with tracking.tracked_run(experiment="concurrent", run_name=f"w{{wid}}-r{{i}}", tags={{"worker": wid}}):
        tracking.log_params({{"worker": wid, "index": i}})
        for step in range({N_STEPS}):
            tracking.log_metrics({{"loss": 1.0 / (step + 1), "worker": float(wid)}}, step=step)
print("done", wid)
"""

TRAIN_WORKER = """
import sys, time, pathlib
from isc import tracking
from entrypoints import train
wid, data, out, go, ready = sys.argv[1], sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4]), pathlib.Path(sys.argv[5])
tracking.configure()
ready.touch()
while not go.exists():
    time.sleep(0.02)
rc = train.main(["--config", "isc/configs/smoke.yaml", "--data", data, "--experiment-name", "concurrent-train",
                 "--run-name", f"train-{wid}", "--seed", wid, "--output-dir", out])
assert rc == 0, rc
print("done", wid)
"""

OPTUNA_WORKER = f"""
import sys, time, pathlib
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage, go, ready = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
study = optuna.load_study(study_name="concurrent", storage=storage)
ready.touch()
while not go.exists():
    time.sleep(0.02)
study.optimize(lambda t: (t.suggest_float("x", -10, 10) - 2) ** 2, n_trials={N_TRIALS})
print("done")
"""


def _run_together(script: str, args_per_worker: list[list[str]], tmp: Path, env: dict[str, str]) -> None:
    """Start one process per ``args`` entry, release them at the same instant, require rc 0 from all."""
    go = tmp / "go"
    procs, readies = [], []
    for i, args in enumerate(args_per_worker):
        ready = tmp / f"ready{i}"
        readies.append(ready)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *args, str(go), str(ready)],
                cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while not all(r.exists() for r in readies):
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            outs = [p.communicate()[1][-2000:] for p in procs]
            raise AssertionError(f"workers did not get ready: {outs}")
        time.sleep(0.05)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1].startswith("done"), out


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
    env.update(extra)
    return env


@pytest.mark.slow
def test_two_processes_logging_to_mlflow_server_on_postgres_lose_and_duplicate_nothing(postgres, tmp_path):
    from mlflow import MlflowClient

    root = tmp_path / "pg_server"
    with start_mlflow_server(postgres.new_database(), root / "artifacts") as server:
        _run_together(MLFLOW_WORKER, [["1"], ["2"]], tmp_path, _clean_env(MLFLOW_TRACKING_URI=server.url))

        client = MlflowClient(tracking_uri=server.url)
        # Both workers raced to create the experiment: exactly one exists.
        assert [e.name for e in client.search_experiments() if e.name == "concurrent"] == ["concurrent"]
        exp = client.get_experiment_by_name("concurrent")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        names = sorted(r.info.run_name for r in runs)
        assert names == sorted(f"w{w}-r{i}" for w in (1, 2) for i in range(N_RUNS))
        for run in runs:
            assert run.info.status == "FINISHED"
            assert run.data.params == {"worker": run.data.tags["worker"], "index": run.info.run_name[-1]}
            history = client.get_metric_history(run.info.run_id, "loss")
            assert sorted(m.step for m in history) == list(range(N_STEPS))
            assert run.data.metrics["worker"] == float(run.data.tags["worker"])


@pytest.mark.slow
def test_two_training_runs_at_once_on_one_store_keep_their_own_metrics_and_checkpoints(postgres, mini_data, tmp_path):
    from mlflow import MlflowClient

    with start_mlflow_server(postgres.new_database(), tmp_path / "artifacts") as server:
        args = [[w, str(mini_data.root), str(tmp_path / f"out{w}")] for w in ("1", "2")]
        _run_together(TRAIN_WORKER, args, tmp_path, _clean_env(MLFLOW_TRACKING_URI=server.url))
        client = MlflowClient(tracking_uri=server.url)
        exp = client.get_experiment_by_name("concurrent-train")
        runs = client.search_runs([exp.experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["train-1", "train-2"]
        for run in runs:
            assert run.info.status == "FINISHED"
            assert run.data.params["seed"] == run.info.run_name[-1]
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
            assert steps == sorted(set(steps)) and steps, "loss history lost or duplicated"
            logged = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
            assert logged == {"checkpoints/checkpoint_0000.pth.tar"}
            assert (tmp_path / f"out{run.info.run_name[-1]}").exists()


@pytest.mark.slow
def test_two_optuna_workers_on_postgres_storage_run_exactly_the_requested_trials(postgres, tmp_path):
    import optuna

    storage = postgres.new_database()
    # Create the study (and its tables) once, before the fan-out.
    optuna.create_study(study_name="concurrent", storage=storage, direction="minimize")
    _run_together(OPTUNA_WORKER, [[storage], [storage]], tmp_path, _clean_env())

    study = optuna.load_study(study_name="concurrent", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2 * N_TRIALS
    assert sorted(t.number for t in trials) == list(range(2 * N_TRIALS))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t._trial_id for t in trials}) == 2 * N_TRIALS
    assert study.best_value == min(t.value for t in trials)
