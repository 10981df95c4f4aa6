"""Optuna tuning: nested MLflow runs, pruning, exact trial counts with parallel workers (real SQLite stores)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from isc.errors import ConfigError
from isc.recipe import tuned_stage
from isc.redact import redact
from isc.tune import (
    build_pruner,
    load_tune_config,
    resolve_validation_gt,
    run_study,
    trial_counts,
)

PROJECT = Path(__file__).resolve().parent.parent
# The demo profile shrunk to seconds per trial: 32 px, 1 step of 16 images per epoch, no artifacts.
TINY_TRAIN = {"input_size": 32, "workers": 0, "batch_size": 16, "max_steps_per_epoch": 1, "log_checkpoints": False}


def write_config(tmp_path: Path, **extra) -> Path:
    cfg = {
        "profile": "smoke",
        "stage": "stage1",  # the smoke chain's first stage: no hand-off checkpoint needed
        "epochs_per_trial": 2,
        "train_overrides": TINY_TRAIN,
        "search_space": {
            "pos_margin": {"type": "float", "low": 0.0, "high": 0.3},
            "neg_margin": {"type": "float", "low": 0.6, "high": 1.3},
            "memory_size": {"type": "categorical", "choices": [64, 256]},
            "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        },
        "sampler": {"type": "tpe", "seed": 0},
        "pruner": {"type": "median", "n_startup_trials": 1},
        **extra,
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class PruneTrialNumbers(optuna.pruners.BasePruner):
    """Prunes exactly the given trial numbers at their first report: the pruner's *decision* made
    deterministic, so the test can check how a pruned trial is recorded (Optuna + MLflow)."""

    def __init__(self, numbers: set[int]):
        self.numbers = numbers

    def prune(self, study, trial) -> bool:
        return trial.number in self.numbers


@pytest.mark.slow
def test_study_nests_trials_under_one_study_run_and_records_the_pruned_trial_as_killed(tracking, mini_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = load_tune_config(write_config(tmp_path))
    result = run_study(cfg, mini_data.root, n_trials=3, study_name="tiny", storage=storage,
                       pruner=PruneTrialNumbers({1}))

    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert result.n_trials_here == 3 and result.counts["finished"] == 3
    assert study.user_attrs["mlflow_parent_run_id"] == result.parent_run_id

    client = mlflow.MlflowClient()
    for trial, status in zip(study.trials, ["FINISHED", "KILLED", "FINISHED"], strict=True):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        tags = run.data.tags
        assert run.info.status == status
        assert tags["mlflow.parentRunId"] == result.parent_run_id
        assert (tags["optuna.study"], tags["optuna.trial"]) == ("tiny", str(trial.number))
        assert tags["optuna.state"] == trial.state.name
        assert {k: run.data.params[k] for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        history = client.get_metric_history(run.info.run_id, "val_average_precision")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == sorted(trial.intermediate_values)
        if trial.state == TrialState.COMPLETE:
            assert len(history) == 2 and run.data.metrics["objective"] == pytest.approx(trial.value)
            assert 0.0 <= trial.value <= 1.0
    assert len(study.trials[1].intermediate_values) == 1  # stopped after its first epoch
    # trial 0 runs the stage's own values (smoke stage 1 with TINY_TRAIN): the bar for the sampled ones
    assert study.trials[0].params == {"pos_margin": 0.0, "neg_margin": 1.0, "memory_size": 64, "lr": 0.05}
    assert [client.get_run(t.user_attrs["mlflow_run_id"]).data.params["baseline_trial"] for t in study.trials] == [
        "True", "False", "False"]

    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["isc.step"] == "tune"
    params = parent.data.params
    assert params["study_name"] == "tiny" and params["storage"] == storage
    assert params["validation_split"] == "val" and params["validation_ground_truth"].endswith("ground_truth_val.csv")
    assert '"memory_size": {"type": "categorical", "choices": [64, 256]}' in params["search_space"]
    assert params["pruner"].startswith("PruneTrialNumbers") and params["sampler"].startswith("TPESampler")
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert {k[len("best_params."):]: v for k, v in parent.data.tags.items() if k.startswith("best_params.")} == {
        k: str(v) for k, v in study.best_params.items()}
    arts = {a.path for a in client.list_artifacts(result.parent_run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png", "optuna/best_params.json"} <= arts

    again = run_study(cfg, mini_data.root, n_trials=3, study_name="tiny", storage=storage)  # resumed: target met
    assert again.n_trials_here == 0 and again.parent_run_id == result.parent_run_id
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 3


@pytest.mark.slow
def test_two_worker_processes_finish_exactly_n_trials_without_duplicates(tracking, mini_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = write_config(tmp_path, epochs_per_trial=1)
    mlflow.MlflowClient().search_experiments()  # create the MLflow schema once, before the fan-out
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(PROJECT)}
    cmd = [sys.executable, "-m", "entrypoints.tune", "--config", str(config), "--data", str(mini_data.root),
           "--n-trials", "4", "--study-name", "par", "--storage", storage]
    workers = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    for w, out in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="par", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert trial_counts(study)["finished"] == 4 and all(t.state.is_finished() for t in study.trials)
    ran_here = [int(re.search(r"(\d+) run here", out).group(1)) for out in outputs]
    assert sum(ran_here) == 4
    points = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(points) == 4  # no trial ran twice and the workers did not propose the same point
    run_ids = [t.user_attrs["mlflow_run_id"] for t in study.trials]
    assert len(set(run_ids)) == 4
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = mlflow.MlflowClient()
    for rid in run_ids:
        assert client.get_run(rid).data.tags["mlflow.parentRunId"] == parent
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 4


def test_tuning_refuses_the_test_split_and_anything_sharing_its_queries(mini_data):
    assert resolve_validation_gt(mini_data.root, "val") == mini_data.ground_truth("val")
    with pytest.raises(ConfigError, match="never the test split") as err:
        resolve_validation_gt(mini_data.root, "test")
    assert err.value.param == "split"
    with pytest.raises(ConfigError, match="is the test split"):
        resolve_validation_gt(mini_data.root, "val", mini_data.ground_truth("test"))
    with pytest.raises(ConfigError, match="shares .* queries with the test split"):
        resolve_validation_gt(mini_data.root, "val", mini_data.ground_truth())  # all queries, test included


def test_bad_search_space_and_pruner_are_config_errors_naming_the_entry(tmp_path):
    def bad(**space):
        path = write_config(tmp_path, search_space=space)
        with pytest.raises(ConfigError) as err:
            load_tune_config(path)
        return err.value

    assert bad(margin={"type": "float", "low": 0, "high": 1}).param == "search_space.margin"
    assert "low <= high" in str(bad(lr={"type": "float", "low": 0.5, "high": 0.1}))
    assert "log scale needs low > 0" in str(bad(lr={"type": "float", "low": 0.0, "high": 0.1, "log": True}))
    assert "choices" in str(bad(memory_size={"type": "categorical", "choices": []}))
    assert bad(lr={"type": "normal", "low": 0, "high": 1}).param == "search_space.lr"
    with pytest.raises(ConfigError, match="type must be one of") as err:
        load_tune_config(write_config(tmp_path, pruner={"type": "medain"}))
    assert err.value.param == "pruner"
    median = build_pruner({"type": "median", "n_startup_trials": 3, "n_warmup_steps": 1})
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_startup_trials == 3
    packaged = load_tune_config()
    assert set(packaged.search_space) == {"pos_margin", "neg_margin", "memory_size", "lr"}


def test_storage_url_is_logged_without_its_password():
    assert redact("postgresql://isc:s3cret@db.example:5432/optuna") == "postgresql://isc:***@db.example:5432/optuna"
    assert redact("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


def test_a_failing_trial_ends_its_run_failed_with_the_error_and_the_study_goes_on(tracking):
    from isc.tracking import tracked_run
    from isc.tune.objective import _trial_run

    study = optuna.create_study(direction="maximize")

    def objective(trial):
        with _trial_run("unit", trial) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            if trial.number == 0:
                raise RuntimeError("CUDA out of memory (simulated)")
            return 0.5

    with tracked_run(experiment="isc", run_name="study") as parent:
        study.optimize(objective, n_trials=2, catch=(RuntimeError,))
        assert mlflow.active_run().info.run_id == parent.info.run_id  # the parent is still the active run
    client = mlflow.MlflowClient()
    failed, ok = (client.get_run(t.user_attrs["mlflow_run_id"]) for t in study.trials)
    assert (failed.info.status, failed.data.tags["optuna.state"]) == ("FAILED", "FAIL")
    assert "CUDA out of memory" in failed.data.tags["isc.error"]
    assert (ok.info.status, ok.data.tags["optuna.state"]) == ("FINISHED", "COMPLETE")
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_trials_fine_tune_the_stage_from_its_hand_off_and_score_what_the_pipeline_steps_score(
        tracking, mini_data, tmp_path):
    """Smoke stage 2 tuned from a real stage-1 training run: every trial starts from that run, and the best
    trial's value is exactly the val µAP after NES that the main job's own steps (extract -> postprocess ->
    evaluate) give the trial's model."""
    from entrypoints import evaluate, extract, postprocess
    from isc.train import train
    from isc.train.config import load_config

    stage1 = train(load_config("smoke", data=str(mini_data.root), **TINY_TRAIN)).run_id
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    path = write_config(tmp_path, stage=None, epochs_per_trial=1, pruner={"type": "none"})
    with pytest.raises(ConfigError, match=r"starts from init stage1 final model: pass --start-from <stage1") as err:
        run_study(load_tune_config(path), mini_data.root, n_trials=2, study_name="handoff", storage=storage)
    assert err.value.param == "start_from"
    with pytest.raises(ConfigError, match="Run with id=0+ not found") as err:
        run_study(load_tune_config(path, start_from=f"{'0' * 32}:1"), mini_data.root, 2, "handoff", storage)
    assert err.value.param == "start_from"
    assert not (tmp_path / "optuna.db").exists() or not optuna.get_all_study_names(storage)  # refused before

    result = run_study(load_tune_config(path, start_from=stage1), mini_data.root, n_trials=2, study_name="handoff",
                       storage=storage)
    study = optuna.load_study(study_name="handoff", storage=storage)
    client = mlflow.MlflowClient()
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        tags = run.data.tags
        assert (tags["isc.start_kind"], tags["isc.start_checkpoint"]) == ("init", stage1)
        assert run.data.params["init_from"] == stage1 and run.data.params["tuned_stage"] == "stage2"
        assert (tags["isc.tune.study_name"], tags["isc.tune.trial"]) == ("handoff", str(trial.number))
        assert json.loads(tags["isc.tune.params"]) == trial.params
        assert 0.0 <= run.data.metrics["val_average_precision_raw"] <= 1.0
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["start_from"] == stage1 and "after NES" in parent.data.params["objective"]

    best = client.get_run(result.best_run_id)
    out = tmp_path / "pipeline"
    assert extract.main(["--model", result.best_run_id, "--data", str(mini_data.root), "--sets", "qrt",
                         "--workers", "0", "--output-dir", str(out)]) == 0
    assert postprocess.main(["--descriptors", str(out / "descriptors.h5"), "--train-descriptors",
                             str(out / "train_descriptors.h5"), "--output", str(out / "nes" / "descriptors_nes.h5")]) == 0
    assert evaluate.main(["--descriptors", str(out / "nes" / "descriptors_nes.h5"), "--before",
                          str(out / "descriptors.h5"), "--ground-truth", str(mini_data.ground_truth("val")),
                          "--bootstrap", "0"]) == 0
    ev = client.search_runs([parent.info.experiment_id], "tags.`isc.step` = 'evaluate'")[0]
    assert ev.data.metrics["average_precision"] == pytest.approx(study.best_value, abs=1e-6)
    assert ev.data.metrics["before_average_precision"] == pytest.approx(
        best.data.metrics["val_average_precision_raw"], abs=1e-6)


def test_the_tuned_stage_is_the_profiles_last_fine_tuning_stage_unless_named():
    assert tuned_stage("demo").name == "stage4" and tuned_stage("demo").config.endswith("demo_stage4.yaml")
    assert (tuned_stage("full").source, tuned_stage("full").checkpoint) == ("stage3", 1)
    assert tuned_stage("smoke").name == "stage2" and tuned_stage("demo", "stage2").checkpoint == 5
    for stage in ("stage0", "stage1b"):  # no fine-tuning / resumes another stage's optimizer and memory bank
        with pytest.raises(ConfigError, match="cannot be tuned") as err:
            tuned_stage("demo", stage)
        assert err.value.param == "stage"
    with pytest.raises(ConfigError, match="has no stage 'stage9'"):
        tuned_stage("demo", "stage9")
    with pytest.raises(ConfigError, match="unknown profile 'demo_stage1'") as err:
        load_tune_config(None, profile="demo_stage1")  # the old meaning of `profile:` (a training config)
    assert err.value.param == "profile"
    with pytest.raises(ConfigError, match="must be one of") as err:
        load_tune_config(None, candidate="best")
    assert err.value.param == "candidate"
    cfg = load_tune_config(None, start_from="0" * 32 + ":1", job_overrides={"input_size": 64, "lr": 0.9})
    train = cfg.trial_train_config("data/mini", {"lr": 0.05, "memory_size": 128})
    # stage YAML < train_overrides (short trials) < the job's overrides < the sampled values
    assert (train.stage, train.neg_margin, train.input_size, train.lr, train.memory_size) == ("stage4", 1.1, 64, 0.05, 128)
    assert (train.epochs, train.max_steps_per_epoch, train.init_from) == (2, 2, "0" * 32 + ":1")
    # the baseline trial: the stage's own values of the searched options, those inside the space
    assert load_tune_config(None).stage_values("data/mini") == {
        "pos_margin": 0.0, "neg_margin": 1.1, "memory_size": 256, "lr": 0.1}
    assert "lr" not in cfg.stage_values("data/mini")  # the job's lr 0.9 is outside [0.02, 0.3]: sampled
    with pytest.raises(ConfigError, match="expected a boolean") as err:
        load_tune_config(None, baseline_trial="sometimes")
    assert err.value.param == "baseline_trial"
