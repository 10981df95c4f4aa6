"""The main job's full profile at tiny scale with every training stage and extraction on 2 gloo ranks
(``nproc_per_node=2`` through ``mlflow run . -e main``): one MLflow run per step, the seed's update rule."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import PROJECT_ROOT
from tests.test_main import TINY_FULL

STAGES = ["stage0", "stage1", "stage1b", "stage2", "stage3", "stage4"]
LR_WORLD_SIZE = {"stage0": 4, "stage1": 4, "stage1b": 4, "stage2": 8, "stage3": 8, "stage4": 8}  # the configs'


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_full_profile_on_two_gloo_ranks_per_step_through_main(tracking, mini_data):
    from isc.tracking import get_or_create_experiment

    # no tuning: its trials run as one process each, which the one-process full-profile test covers
    params = {"data": str(mini_data.root), "profile": "full", "n_trials": 0, "overrides": json.dumps(TINY_FULL),
              "nproc_per_node": 2}
    exp = get_or_create_experiment("main-full-ddp")
    run = mlflow.run(str(PROJECT_ROOT), "main", parameters=params, experiment_id=exp, env_manager="local",
                     synchronous=True)
    client = MlflowClient()
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    train = {s: client.get_run(tags[f"isc.step_run.train_{s}"]) for s in STAGES}
    ids = {s: r.info.run_id for s, r in train.items()}
    for stage, r in train.items():
        p = r.data.params
        assert (p["nproc_per_node"], p["world_size"], p["per_rank_batch"]) == ("2", "2", "2"), stage
        # each rank's loss is scaled by W / lr_world_size: DDP's average is then grad(L) / W_seed
        assert float(p["loss_scale"]) == pytest.approx(2 / LR_WORLD_SIZE[stage]), stage
        assert int(p["lr_world_size"]) == LR_WORLD_SIZE[stage], stage
        diffs = client.get_metric_history(r.info.run_id, "xbm_rank_max_abs_diff")
        assert all(m.value == 0.0 for m in diffs), stage  # the ranks' memory banks stayed identical
    assert len(client.get_metric_history(ids["stage4"], "xbm_rank_max_abs_diff")) == 10
    # the seed's hand-offs, as with one process
    start = {s: (r.data.tags["isc.start_kind"], r.data.tags["isc.start_checkpoint"]) for s, r in train.items()}
    assert start["stage1b"] == ("resume", f"{ids['stage1']}:4") and start["stage4"] == ("init", f"{ids['stage3']}:1")
    # every extraction ran on the 2 ranks too (sharded, merged by rank 0)
    for stage in STAGES:
        ext = client.get_run(tags[f"isc.step_run.extract_{stage}"])
        assert (ext.data.params["nproc_per_node"], ext.data.params["world_size"]) == ("2", "2"), stage
    # only rank 0 talks to MLflow: the experiment holds the parent and its steps' runs, nothing else
    runs = client.search_runs([exp], max_results=1000)
    step_runs = {v for k, v in tags.items() if k.startswith("isc.step_run.")}
    assert {r.info.run_id for r in runs} == step_runs | {run.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    champion = client.get_model_version_by_alias("isc-descriptor", "champion")
    assert champion.tags["isc.model_ref"] in ids.values()
