"""The README's full-recipe command at tiny scale: ``main`` with ``profile=full`` on exactly the README's
DISC21 files, every training stage and extraction on 2 gloo ranks over two "machines" (``nnodes=2``: machine 1
runs ``isc join``; both are processes on this host, machine 1 in its own mount namespace where machine 0's
temp folder is hidden, where the test may), against a real ``mlflow server``, tuning included.

One run checks what the full profile promises: the seed's hand-off checkpoints, schedules and update rule
(loss scaled by W / W_seed), v107 on the public ground truth's positives (1 pair + 2G-2 negatives per
process), 1b's empty memory bank, only rank 0 talking to MLflow, the tuned stage 4 offered to promotion,
and the champion chosen on the val split, never on pairs stage 4 trained on. Sizes and the backbone are
overridden (TINY_FULL); everything else is the full profile's own configs.
"""

from __future__ import annotations

import json
import os

import mlflow
import pytest
from mlflow import MlflowClient

from isc.contract import Evaluation
from tests.conftest import PROJECT_ROOT
from tests.test_full_profile_inputs import readme_layout
from tests.test_main import TINY_FULL
from tests.test_nodes import can_unshare, free_port_pair, join_process

STAGES = ["stage0", "stage1", "stage1b", "stage2", "stage3", "stage4"]
LR_WORLD_SIZE = {"stage0": 4, "stage1": 4, "stage1b": 4, "stage2": 8, "stage3": 8, "stage4": 8}  # the configs'


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_full_profile_on_two_machines_hands_on_the_seeds_checkpoints_and_promotes_on_val(
    mlflow_server, mini_data, tmp_path, monkeypatch
):
    from isc.tracking import get_or_create_experiment

    data = readme_layout(tmp_path / "disc21", mini_data, with_val=True)
    home, head_tmp = tmp_path / "isc_home", tmp_path / "machine0_tmp"  # shared outputs; machine 0's own temp
    home.mkdir()
    head_tmp.mkdir()
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("ISC_HOME", str(home))
    mlflow.set_tracking_uri(mlflow_server.url)
    endpoint = f"127.0.0.1:{free_port_pair()}"
    hidden = can_unshare()
    agent = join_process(endpoint, 1, {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                         hide=head_tmp if hidden else None, timeout=600)
    monkeypatch.setenv("TMPDIR", str(head_tmp))
    params = {"data": str(data), "profile": "full", "n_trials": 2, "overrides": json.dumps(TINY_FULL),
              "nnodes": 2, "rdzv_endpoint": endpoint, "settings_sizes": "0,48"}  # the val grid at the tiny net's sizes
    exp = get_or_create_experiment("main-full")
    try:
        run = mlflow.run(str(PROJECT_ROOT), "main", parameters=params, experiment_id=exp, env_manager="local",
                         synchronous=True)
        agent_out = agent.communicate(timeout=120)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0 and "machine 0 ended the job (finished)" in agent_out, agent_out[-3000:]
    if hidden:  # a stage's starting checkpoint was in machine 0's temp folder: machine 1's rank got its bytes
        assert "is not on this machine; received it from rank 0" in agent_out
    client = MlflowClient()
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    train = {s: client.get_run(tags[f"isc.step_run.train_{s}"]) for s in STAGES}
    ids = {s: r.info.run_id for s, r in train.items()}

    # every training stage on 2 ranks (one per machine) with the seed's update rule; the ranks' memory banks stay identical
    for stage, r in train.items():
        p = r.data.params
        assert (p["nproc_per_node"], p["nnodes"], p["node_rank"], p["world_size"]) == ("1", "2", "0", "2"), stage
        assert float(p["loss_scale"]) == pytest.approx(2 / LR_WORLD_SIZE[stage]), stage
        assert int(p["lr_world_size"]) == LR_WORLD_SIZE[stage], stage
        assert all(m.value == 0.0 for m in client.get_metric_history(r.info.run_id, "xbm_rank_max_abs_diff")), stage
    assert len(client.get_metric_history(ids["stage4"], "xbm_rank_max_abs_diff")) == 10
    # v107: every positive of the public ground truth, 1 pair + 2G-2 negatives per process
    stage4 = train["stage4"].data.params
    public = data / "public_ground_truth.csv"
    n_public = sum(1 for row in public.read_text().splitlines()[1:] if row.split(",")[1].strip())
    assert stage4["pairs_path"] == str(public) and int(stage4["n_items"]) == n_public
    assert (stage4["per_rank_batch"], stage4["num_negatives"]) == ("1", "2")
    assert train["stage1b"].data.params["resumed_memory_bank"] == "empty"  # the seed's 1b
    # every extraction ran on the 2 ranks too (sharded, merged by rank 0)
    for stage in STAGES:
        ext = client.get_run(tags[f"isc.step_run.extract_{stage}"])
        assert (ext.data.params["nnodes"], ext.data.params["world_size"]) == ("2", "2"), stage

    # the seed's hand-offs and schedules
    start = {s: (r.data.tags["isc.start_kind"], r.data.tags["isc.start_checkpoint"]) for s, r in train.items()}
    assert start["stage0"][0] == "pretrained" and start["stage1"] == ("init", ids["stage0"])
    assert start["stage1b"] == ("resume", f"{ids['stage1']}:4")
    assert start["stage2"] == ("init", f"{ids['stage1b']}:5")
    assert start["stage3"] == ("init", f"{ids['stage2']}:5")
    assert start["stage4"] == ("init", f"{ids['stage3']}:1")
    assert train["stage1b"].data.params["resumed_from_checkpoint"].endswith("checkpoint_0004.pth.tar")
    assert train["stage2"].data.params["init_checkpoint"].endswith("checkpoint_0005.pth.tar")
    # retention: each run keeps its last checkpoint and the hand-offs the driver passed it as keep_epochs
    kept = {s: sorted(a.path[-12:-8] for a in client.list_artifacts(ids[s], "checkpoints")) for s in STAGES}
    assert kept == {"stage0": [], "stage1": ["0004"], "stage1b": ["0005", "0009"], "stage2": ["0005", "0006"],
                    "stage3": ["0001", "0002"], "stage4": ["0009"]}

    def epochs(stage: str, metric: str = "epoch_lr") -> list[tuple[int, float]]:
        return [(m.step, round(m.value, 6)) for m in client.get_metric_history(ids[stage], metric)]

    assert epochs("stage0") == []  # no fine-tuning: the starting model itself
    assert [s for s, _ in epochs("stage1")] == [0, 1, 2, 3, 4]
    assert [s for s, _ in epochs("stage1b")] == [5, 6, 7, 8, 9]  # 1b continues 1a's epochs to 10
    assert {v for _, v in epochs("stage2")} == {0.1}  # v86: constant
    assert epochs("stage3") == [(0, 0.1), (1, round(0.1 * 2 / 3, 6)), (2, round(0.1 / 3, 6))]  # v98: linear
    assert epochs("stage4") == [(e, round(0.5 * (1 - e / 10), 6)) for e in range(10)]  # v107: linear from 0.5
    summary = mlflow.artifacts.load_text(f"runs:/{run.run_id}/summary/summary.txt")
    assert "stage0 (stage1, no fine-tuning)" in summary and "resume stage1 checkpoint_0004" in summary
    assert "init stage3 checkpoint_0001" in summary

    # stage 4 is tuned from its own hand-off (stage 3's checkpoint_0001); trial 0 runs stage 4's own values
    # (those in tune_full.yaml's space), and the best trial's own model is the tuned candidate
    tune = client.get_run(tags["isc.step_run.tune"])
    assert (tune.data.params["tuned_stage"], tune.data.params["start_from"]) == ("stage4", f"{ids['stage3']}:1")
    trials = {int(r.data.tags["isc.tune.trial"]): r for r in client.search_runs(
        [tune.info.experiment_id], f"tags.`mlflow.parentRunId` = '{tune.info.run_id}'")}
    assert sorted(trials) == [0, 1]
    for trial in trials.values():
        assert trial.data.tags["isc.start_checkpoint"] == f"{ids['stage3']}:1" and trial.data.tags["isc.stage"] == "stage4"
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "epoch_lr")] == [0, 1]  # a short trial
    # memory_size 256 (the job's override) is outside the searched choices, so it is sampled even in trial 0
    baseline = json.loads(trials[0].data.tags["isc.tune.params"])
    assert {k: baseline[k] for k in ("pos_margin", "neg_margin", "lr")} == {"pos_margin": 0.0, "neg_margin": 1.1, "lr": 0.5}
    assert trials[0].data.params["baseline_trial"] == "True" and trials[1].data.params["baseline_trial"] == "False"
    best = client.get_run(tune.data.tags["best_trial_run_id"])
    assert best.data.tags["isc.tune.candidate"] == "trial" and best.data.tags["isc.tune.stage"] == "stage4"
    assert "isc.step_run.train_stage4_tuned" not in tags  # no retraining: the trial's model is the candidate
    assert client.get_run(tags["isc.step_run.evaluate_val_stage4_tuned"]).data.tags["isc.model_ref"] == best.info.run_id
    val_ap = client.get_run(tags["isc.step_run.evaluate_val_stage4_tuned"]).data.metrics["average_precision"]
    assert val_ap == pytest.approx(best.data.metrics["objective"], abs=1e-6)  # the trial's value is what evaluate says
    ids["stage4_tuned"] = best.info.run_id
    assert f"stage4 tuned (trial {best.data.tags['isc.tune.trial']})" in summary and "promotion: " in summary

    # only rank 0 talks to MLflow: the main experiment holds the parent and its steps' runs, nothing else
    step_runs = {v for k, v in tags.items() if k.startswith("isc.step_run.")}
    runs = client.search_runs([exp], max_results=1000)
    trial_ids = {r.info.run_id for r in trials.values()}
    assert {r.info.run_id for r in runs} - trial_ids == step_runs | {run.run_id}
    assert all(r.info.status == "FINISHED" for r in runs if r.info.run_id not in trial_ids)

    # the champion: one of the seven candidates, chosen on ground_truth_val.csv (never on stage 4's pairs)
    champion = client.get_model_version_by_alias("isc-descriptor", "champion")
    assert champion.tags["isc.model_ref"] in ids.values()
    assert champion.tags["isc.gt_path"] == str(data / "ground_truth_val.csv")
    assert champion.description.startswith("stage: train_") or champion.description.startswith("stage: trial-")
    assert "starts from: " in champion.description

    # the tuned candidate registered by the promotion code path: its version says how it was made
    from registry.register import register_once

    val = client.get_run(tags["isc.step_run.evaluate_val_stage4_tuned"])
    test = client.get_run(tags["isc.step_run.evaluate_stage4_tuned"])
    version, _ = register_once(Evaluation.from_run(val))
    assert {k: version.tags[k] for k in ("isc.tune.study_name", "isc.tune.trial", "isc.tune.params")} == {
        "isc.tune.study_name": tune.data.params["study_name"], "isc.tune.trial": best.data.tags["isc.tune.trial"],
        "isc.tune.params": best.data.tags["isc.tune.params"]}
    text = client.get_model_version("isc-descriptor", version.version).description
    n = best.data.tags["isc.tune.trial"]
    assert f"stage: trial-{n} (stage4.yaml, stage4, the seed's v107), training run {best.info.run_id}" in text
    assert f"starts from: init {ids['stage3']}:1" in text
    assert (f"ground_truth_test.csv {test.data.metrics['average_precision']:.4f}, ground_truth_val.csv "
            f"{val.data.metrics['average_precision']:.4f} (chose this version)") in text
    assert (f"tuned: study {tune.data.params['study_name']}, trial {n} of stage4, values "
            f"{best.data.tags['isc.tune.params']}; the trial's own model") in text
