"""The main job end to end (smoke profile) through `mlflow run`, and its reuse path."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import PROJECT_ROOT

STEPS = [  # every main job of the smoke profile; the val grid's steps depend on the scores (checked below)
    "baseline_phash", "train_stage1", "extract_stage1", "postprocess_stage1", "evaluate_stage1",
    "evaluate_val_stage1", "train_stage2", "extract_stage2", "postprocess_stage2", "evaluate_stage2",
    "evaluate_val_stage2", "tune", "train_stage2_tuned", "extract_stage2_tuned",
    "postprocess_stage2_tuned", "evaluate_stage2_tuned", "evaluate_val_stage2_tuned", "promote", "search",
]
CANDIDATES = ("stage1", "stage2", "stage2_tuned")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_main_runs_every_step_nested_then_reuses_them_all(tracking, mini_data, capsys):
    from isc.tracking import get_or_create_experiment, normalize_param

    params = {"data": str(mini_data.root), "profile": "smoke", "n_trials": 2}
    exp = get_or_create_experiment("main-e2e")  # absolute artifact root (the launcher would use ./mlruns)
    first = mlflow.run(str(PROJECT_ROOT), "main", parameters=params, experiment_id=exp,
                       env_manager="local", synchronous=True)
    client = MlflowClient()
    parent = client.get_run(first.run_id)
    assert parent.info.status == "FINISHED"
    prefix = "isc.step_run."
    step_runs = {k.removeprefix(prefix): v for k, v in parent.data.tags.items() if k.startswith(prefix)}
    assert set(STEPS) <= set(step_runs)
    for step, run_id in step_runs.items():
        child = client.get_run(run_id)
        assert child.info.status == "FINISHED", step
        assert child.data.tags.get("mlflow.parentRunId") == first.run_id, step
    # stage 2 starts from stage 1's run, and evaluation points at the model that produced the descriptors
    train2 = client.get_run(step_runs["train_stage2"])
    assert train2.data.params["init_from"] == step_runs["train_stage1"]
    ev2 = client.get_run(step_runs["evaluate_stage2"])
    assert ev2.data.tags["isc.model_ref"] == step_runs["train_stage2"]
    assert 0.0 <= ev2.data.metrics["average_precision"] <= 1.0
    assert "before_average_precision" in ev2.data.metrics
    m = ev2.data.metrics  # the query-bootstrap interval brackets the point estimate
    assert m["average_precision_ci_low"] <= m["average_precision"] <= m["average_precision_ci_high"]
    # a champion was promoted from one of the stages, chosen on the val split (the test split stays held out)
    champion = client.get_model_version_by_alias("isc-descriptor", "champion")
    trained = (step_runs["train_stage1"], step_runs["train_stage2"], step_runs["train_stage2_tuned"])
    assert champion.tags["isc.model_ref"] in trained
    assert champion.tags["isc.gt_path"].endswith("ground_truth_val.csv")
    # the val grid ran for the top 2 candidates by val µAP at their training size (smoke: sizes 0,64, TTA at the
    # better); one whose val-best setting is not its training size was extracted and evaluated again at it
    at_train = {c: client.get_run(step_runs[f"evaluate_val_{c}"]).data.metrics["average_precision"]
                for c in CANDIDATES}
    top = sorted(CANDIDATES, key=lambda c: -at_train[c])[:2]
    assert {c for c in CANDIDATES if f"settings_{c}" in step_runs} == set(top)
    val_runs = [client.get_run(step_runs[f"evaluate_val_{c}"]) for c in CANDIDATES]
    for c in top:
        grid_run = client.get_run(step_runs[f"settings_{c}"])
        chosen, grid = grid_run.data.params, grid_run.data.metrics
        scored = {k.removeprefix("val_uAP_"): v for k, v in grid.items() if k.startswith("val_uAP_")}
        train_size = chosen["train_input_size"]
        plain = {k: v for k, v in scored.items() if not k.endswith("_tta")}
        assert sorted(plain, key=int) == sorted({train_size, "64"}, key=int)
        assert [k for k in scored if k.endswith("_tta")] == [max(plain, key=lambda k: (plain[k], -int(k))) + "_tta"]
        cost = {k: int(k.split("_")[0]) ** 2 * (7 if k.endswith("_tta") else 1) for k in scored}  # a tie: cheaper
        best = max(scored, key=lambda k: (round(scored[k], 6), -cost[k]))
        key = f"{chosen['chosen_input_size']}{'_tta' if chosen['chosen_tta'] == 'true' else ''}"
        assert best == key
        if key == train_size:  # kept: no second extraction
            assert not [s for s in step_runs if s.startswith(f"extract_{c}_")]
            continue
        extract = client.get_run(step_runs[f"extract_{c}_{key}"]).data.params
        assert (extract["resolved_input_size"], extract["resolved_tta"]) == (chosen["chosen_input_size"],
                                                                             chosen["chosen_tta"])
        ev = client.get_run(step_runs[f"evaluate_val_{c}_{key}"])
        assert (ev.data.tags["isc.input_size"], ev.data.tags["isc.tta"]) == (chosen["chosen_input_size"],
                                                                             chosen["chosen_tta"])
        assert client.get_run(step_runs[f"evaluate_{c}_{key}"]).data.tags["isc.gt_path"].endswith("test.csv")
        val_runs.append(ev)
    # the champion is the best (candidate, setting) on val, and serves with that setting: the version's tags,
    # its pyfunc's model_config and its description
    val_ap = {r.info.run_id: r.data.metrics["average_precision"] for r in val_runs}
    source = client.get_run(champion.tags["isc.source_eval_run"])
    assert val_ap[source.info.run_id] == max(val_ap.values())
    served = (source.data.tags["isc.input_size"], source.data.tags["isc.tta"])
    assert (champion.tags["isc.input_size"], champion.tags["isc.tta"]) == served
    config = mlflow.models.get_model_info(f"models:/isc-descriptor/{champion.version}").flavors[
        "python_function"]["config"]
    assert (config["input_size"], config["tta"]) == (int(served[0]), served[1] == "true")
    assert f"serves with: {served[0]} px{' + TTA' if served[1] == 'true' else ''}" in champion.description
    assert client.get_run(step_runs["evaluate_stage1"]).data.tags["isc.gt_path"].endswith("ground_truth_test.csv")
    summary = mlflow.artifacts.load_text(f"runs:/{first.run_id}/summary/summary.txt")
    assert "champion: models:/isc-descriptor@champion" in summary and ", serves with " in summary
    assert "val grid's best" in summary and "settings: val grid (sizes 0,64" in summary
    assert "chosen on ground_truth_val.csv" in summary and "held out" in summary
    assert "baseline (pHash)" in summary
    # the tuned stage (smoke: stage 2, from stage 1's final model) is retrained with the best trial's values
    tune = client.get_run(step_runs["tune"])
    assert (tune.data.params["tuned_stage"], tune.data.params["start_from"]) == ("stage2", step_runs["train_stage1"])
    # every trial has a run of its own under the step's run (the first one once resumed the step's run itself)
    assert tune.data.tags["isc.step"] == "tune" and "optuna.trial" not in tune.data.tags
    trial_runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{tune.info.run_id}'")
    assert sorted(r.data.tags["isc.tune.trial"] for r in trial_runs) == ["0", "1"]
    tuned = client.get_run(step_runs["train_stage2_tuned"])
    best = client.get_run(tune.data.tags["best_trial_run_id"])
    assert tuned.data.params["init_from"] == step_runs["train_stage1"]
    assert tuned.data.tags["isc.tune.params"] == best.data.tags["isc.tune.params"]
    overrides = normalize_param(tuned.data.params["overrides"])  # `mlflow run` logs it shell-quoted
    assert json.loads(overrides) == json.loads(best.data.tags["isc.tune.params"])
    # smoke stage 2 is one 2-step epoch, as a smoke trial: retraining with the trial's values gives its model back
    # (the same descriptors; its val µAP at the training size equals the trial's objective)
    from isc.extract.describe import describe_images
    from isc.models import load_model

    images = [p for _, p in mini_data.images("reference")[:4]]
    np.testing.assert_allclose(describe_images(load_model(step_runs["train_stage2_tuned"]), images),
                               describe_images(load_model(best.info.run_id), images), atol=1e-5)
    assert at_train["stage2_tuned"] == pytest.approx(best.data.metrics["objective"], abs=1e-6)
    assert f"stage2 tuned (trial {best.data.tags['isc.tune.trial']}, retrained)" in summary
    assert "tune: study isc-tune-" in summary and "2 complete, 0 pruned, 0 failed" in summary
    assert "promotion: promoted: isc-descriptor v1" in summary  # the decision, as the promote step made it
    quality = mlflow.artifacts.load_text(f"runs:/{first.run_id}/summary/quality.csv")
    assert "uAP 95% CI" in quality.splitlines()[0]
    # lineage a user can click: named main run, an experiment that opens on runs, datasets, models, knobs
    assert parent.info.run_name.startswith("main-smoke-")
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    assert [d.dataset.name for d in train2.inputs.dataset_inputs] == ["mini/training_images"]
    ext2 = client.get_run(step_runs["extract_stage2"])
    assert {d.dataset.name for d in ext2.inputs.dataset_inputs} == {
        "mini/query_images", "mini/reference_images", "mini/training_images"}
    assert ev2.data.params["train.run_id"] == step_runs["train_stage2"] and "train.memory_size" in ev2.data.params
    assert [d.dataset.name for d in ev2.inputs.dataset_inputs] == ["mini/ground_truth_test.csv"]
    models = client.search_logged_models([exp], filter_string=f"source_run_id = '{step_runs['train_stage2']}'")
    assert len(models) == 1 and {m.key for m in models[0].metrics} >= {"average_precision", "recall_p90"}

    exp_id = parent.info.experiment_id
    n_runs_before = len(client.search_runs([exp_id], max_results=1000))
    second = mlflow.run(str(PROJECT_ROOT), "main", parameters=params, experiment_id=exp,
                        env_manager="local", synchronous=True)
    rerun = client.get_run(second.run_id)
    assert rerun.info.status == "FINISHED"
    assert {k.removeprefix(prefix): v for k, v in rerun.data.tags.items() if k.startswith(prefix)} == step_runs
    # nothing but the new parent run was created: every step was reused
    assert len(client.search_runs([exp_id], max_results=1000)) == n_runs_before + 1
    reused = mlflow.artifacts.load_text(f"runs:/{second.run_id}/summary/steps.csv")
    assert reused.count("True") == len(step_runs)


def test_champion_line_says_where_the_champion_was_chosen_or_why_it_was_kept(tmp_path):
    from isc.driver import _champion_line
    from isc.io import read_ground_truth, write_ground_truth
    from isc.metrics import ground_truth_fingerprint

    val = write_ground_truth(tmp_path / "ground_truth_val.csv", [("Q1", "R1"), ("Q2", None)])
    test = write_ground_truth(tmp_path / "ground_truth_test.csv", [("Q3", "R3")])
    champ = {"uri": "models:/m@champion", "version": "2", "source_run": "abc",
             "gt_path": str(val), "gt_fingerprint": ground_truth_fingerprint(read_ground_truth(val))}
    line = _champion_line(champ, "m", val, test)
    assert "version 2 (chosen on ground_truth_val.csv by evaluation run abc" in line and "held out" in line
    assert "not held out" in _champion_line({**champ, "gt_fingerprint": ground_truth_fingerprint(
        read_ground_truth(test))}, "m", test, test)
    kept = _champion_line({**champ, "gt_path": "/old/gt.csv", "gt_fingerprint": "0" * 64}, "m", val, test)
    assert "(kept from before)" in kept and "scored on /old/gt.csv" in kept and f"--ground-truth {val} --force" in kept
    assert _champion_line(None, "m", val, test) == "champion: none registered for 'm'"


# The full profile at a tiny scale: the same driver path and stage configs (the seed's epochs, schedules and
# hand-off checkpoints), only sizes and the backbone overridden; one step per epoch (tests/test_main_full.py).
TINY_FULL = {"backbone": "test_efficientnet", "pretrained": False, "input_size": 32, "batch_size": 4,
             "memory_size": 256, "num_negatives": 2, "max_steps_per_epoch": 1, "workers": 0, "amp": "false",
             "log_every_steps": 1}


def test_summary_artifact_never_holds_the_tracking_password(tracking, monkeypatch, capsys):
    """The summary prints how to open the MLflow UI: a password in MLFLOW_TRACKING_URI is masked there."""
    import pandas as pd

    from isc.driver import _report

    with mlflow.start_run() as run:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2@mlflow.internal:5000")
        _report(pd.DataFrame([{"step": "stage1", "uAP": 0.5}]), pd.DataFrame([{"step": "x", "wall_s": 1.0}]),
                "champion: none registered for 'm'")
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary/summary.txt")
    assert "hunter2" not in text and "hunter2" not in capsys.readouterr().out
    assert "http://alice:***@mlflow.internal:5000" in text
