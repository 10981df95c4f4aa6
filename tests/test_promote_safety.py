"""Promotion is idempotent under concurrency and validates the model name before any work.

Eight ``isc promote`` processes at once, as on eight machines, against a real ``mlflow server`` on
127.0.0.1 (SQLite and PostgreSQL backends) register one version of one evaluation and exit 0; a duplicate made by a promoter on another machine is removed;
a model name MLflow (or a registry filter) cannot take is refused with one error line, before packaging.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from entrypoints.cli import run_entrypoint
from tests.servers import PROJECT_ROOT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from isc.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("test_efficientnet", pretrained=False, input_size=32)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth.tar", model, epoch=0)


def _eval_run(client, experiment_id: str, checkpoint, gt_fp: str = "f" * 64) -> str:
    run = client.create_run(experiment_id, tags={
        "isc.step": "evaluate", "isc.gt_fingerprint": gt_fp, "isc.gt_path": "gt.csv",
        "isc.model_ref": str(checkpoint),
    })  # fmt: skip
    client.log_metric(run.info.run_id, "average_precision", 0.5)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _env(url: str, home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=url, ISC_HOME=str(home), MPLBACKEND="Agg",
               PYTHONPATH=str(PROJECT_ROOT))  # fmt: skip
    return env


PROMOTERS = 8


@pytest.mark.slow
def test_eight_concurrent_promotions_of_one_candidate_register_one_version(sql_mlflow_server, checkpoint, tmp_path):
    """8 ``isc promote`` processes at once, each with its own temp folder, so none sees another's file lock:
    8 machines promoting one candidate. Every one exits 0; the registry ends with one version, its tags,
    one @champion and a record per promotion that moved it."""
    from mlflow import MlflowClient

    from isc.contract import Tag
    from registry.writes import records

    client = MlflowClient(tracking_uri=sql_mlflow_server.url)
    exp = client.create_experiment("race")
    eval_run = _eval_run(client, exp, checkpoint)
    cmd = [sys.executable, "-m", "entrypoints.promote", "--experiment", "race", "--model-name", "racer"]
    procs = []
    for i in range(PROMOTERS):
        host_tmp = tmp_path / f"host{i}"
        host_tmp.mkdir()
        env = {**_env(sql_mlflow_server.url, tmp_path / f"home{i}"), "TMPDIR": str(host_tmp)}
        procs.append(subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert "is now @champion" in out or "is already @champion" in out, out[-3000:]
    versions = client.search_model_versions("name = 'racer'")
    assert [v.version for v in versions] == ["1"], [(v.version, v.tags) for v in versions]
    tags = client.get_model_version("racer", "1").tags
    assert tags[Tag.SOURCE_EVAL_RUN] == eval_run and tags[Tag.MODEL_REF] == str(checkpoint)
    assert float(tags[Tag.AVERAGE_PRECISION]) == 0.5 and tags[Tag.GT_FINGERPRINT] == "f" * 64
    assert tags[Tag.PROMOTED_OVER] == "" and tags[Tag.PROMOTED_AT]
    assert client.get_model_version_by_alias("racer", "champion").version == "1"
    assert not client.get_registered_model("racer").aliases.get("previous")
    moved = sum("is now @champion" in out for out in outs)
    recs = records(client, "racer", Tag.PROMOTION_PREFIX)
    assert moved >= 1 and len(recs) == moved, (moved, recs)
    assert {(r["action"], r["champion"], r["previous"]) for r in recs} == {("promote", "1", None)}
    # A ninth promotion, afterwards, is a no-op.
    again = subprocess.run(cmd, cwd=PROJECT_ROOT, env=_env(sql_mlflow_server.url, tmp_path), text=True,
                           capture_output=True, timeout=600)  # fmt: skip
    assert again.returncode == 0 and "already @champion" in again.stdout, again.stdout + again.stderr
    assert len(client.search_model_versions("name = 'racer'")) == 1


@pytest.mark.slow
def test_duplicate_registered_by_another_machine_is_removed_and_the_lowest_kept(
    mlflow_server, checkpoint, monkeypatch
):
    """The cross-machine half of the guard: the file lock cannot see another host, the re-check can."""
    import mlflow
    from mlflow import MlflowClient

    from isc.contract import Tag
    from registry import promote as pr
    from registry import register as reg

    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    client = MlflowClient()
    exp = client.create_experiment("dup")
    eval_run = _eval_run(client, exp, checkpoint)
    candidate = pr.find_best_evaluation("dup")

    real_register = reg.register_candidate

    def racing_register(cand, name):
        # Another host registers the same evaluation while we package ours (after our locked re-check).
        client.create_registered_model(name)
        source = client.get_run(cand.run_id).info.artifact_uri + "/model"
        client.create_model_version(name, source, run_id=cand.run_id, tags={Tag.SOURCE_EVAL_RUN: cand.run_id})
        return real_register(cand, name)

    monkeypatch.setattr(reg, "register_candidate", racing_register)
    version, registered = reg.register_once(candidate, "dup-model")
    assert (str(version.version), registered) == ("1", False)
    left = client.search_model_versions("name = 'dup-model'")
    assert [v.version for v in left] == ["1"] and left[0].tags[Tag.SOURCE_EVAL_RUN] == eval_run
    dup_runs = client.search_runs([exp], "tags.`isc.duplicate_of` = 'dup-model/1'")
    assert len(dup_runs) == 1


@pytest.mark.parametrize("name", ["alice's model", 'say "hi"', "a/b", "team:model", "m@x", "back\\slash"])
def test_model_name_mlflow_or_a_filter_cannot_take_is_refused_before_any_work(tracking, name, capsys):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    t0 = time.monotonic()
    rc = run_entrypoint("entrypoints.promote", ["--model-name", name])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: model_name:"), err[-3000:]
    assert "Traceback" not in err
    assert time.monotonic() - t0 < 20
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    assert not exps or client.search_runs(exps, run_view_type=ViewType.ALL) == []
