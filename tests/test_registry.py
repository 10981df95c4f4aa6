"""Registry: the models-from-code descriptor pyfunc and alias-based promotion (real SQLite MLflow store)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from isc.errors import ConfigError, ISCError
from isc.io import read_ground_truth, write_train_descriptors
from isc.metrics import ground_truth_fingerprint

TINY = "test_efficientnet"
MODEL = "isc-descriptor"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny random-init checkpoints (32 px) standing in for three training runs."""
    import torch

    from isc.models import create_model, save_checkpoint

    out = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = create_model(TINY, pretrained=False, input_size=32)
        paths.append(save_checkpoint(out / f"model{seed}.pth.tar", model, epoch=0))
    return paths


def log_eval_run(gt_path: Path, ap: float, model_ref: str, experiment: str = "isc", **extra_tags: str) -> str:
    """An evaluation run as `isc evaluate` writes it (tags + metrics), scored on ``gt_path``."""
    from isc.tracking import tracked_run

    tags = {
        "isc.step": "evaluate",
        "isc.gt_fingerprint": ground_truth_fingerprint(read_ground_truth(gt_path)),
        "isc.gt_path": str(gt_path),
        "isc.protocol": "official",
        "isc.model_ref": model_ref,
        **extra_tags,
    }
    with tracked_run(experiment=experiment, run_name=f"eval-{ap}", tags=tags) as run:
        mlflow.log_metrics({"average_precision": ap, "recall_p90": ap / 2})
    return run.info.run_id


def versions() -> list:
    return mlflow.MlflowClient().search_model_versions(f"name = '{MODEL}'")


def alias(name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(MODEL, name).version)
    except MlflowException:
        return None


@pytest.mark.slow
def test_champion_moves_only_to_a_better_model_keeps_previous_and_reruns_change_nothing(tracking, mini_data, checkpoints):
    from registry.promote import promote, rollback

    gt = mini_data.ground_truth("test")
    run_a = log_eval_run(gt, 0.40, str(checkpoints[0]))

    first = promote(ground_truth=gt)
    assert (first.action, first.version, alias("champion"), alias("previous")) == ("promoted", "1", "1", None)
    again = promote(ground_truth=gt)
    assert again.action == "unchanged" and len(versions()) == 1

    run_b = log_eval_run(gt, 0.55, str(checkpoints[1]))
    small_margin = promote(ground_truth=gt, min_improvement=0.2)  # 0.55 does not beat 0.40 by > 0.2
    assert small_margin.action == "registered" and small_margin.version == "2"
    assert alias("champion") == "1" and len(versions()) == 2
    better = promote(ground_truth=gt, min_improvement=0.1)  # same candidate: no third version
    assert (better.action, alias("champion"), alias("previous"), len(versions())) == ("promoted", "2", "1", 2)

    log_eval_run(gt, 0.50, str(checkpoints[2]))  # worse than the champion: never registered
    assert promote(ground_truth=gt).action == "unchanged" and len(versions()) == 2

    client = mlflow.MlflowClient()
    v2 = client.get_model_version(MODEL, "2")
    assert float(v2.tags["isc.average_precision"]) == pytest.approx(0.55)
    assert float(v2.tags["isc.recall_p90"]) == pytest.approx(0.275)
    assert v2.tags["isc.source_eval_run"] == run_b and v2.tags["isc.model_ref"] == str(checkpoints[1])
    assert v2.tags["isc.gt_fingerprint"] == ground_truth_fingerprint(read_ground_truth(gt))
    assert len(v2.tags["isc.git_commit"]) >= 7
    assert client.get_model_version(MODEL, "1").tags["isc.source_eval_run"] == run_a
    records = [json.loads(v) for k, v in sorted(client.get_registered_model(MODEL).tags.items())
               if k.startswith("isc.promotion.")]
    assert [(r["action"], r["champion"], r["previous"]) for r in records] == [("promote", "1", None), ("promote", "2", "1")]

    back = rollback()
    assert (back.action, alias("champion"), alias("previous")) == ("rolled_back", "1", None)
    assert client.get_model_version(MODEL, "2").tags["isc.rolled_back"] == "true"
    # The rolled-back version is still the best evaluation, but promotion must not silently undo the rollback.
    assert promote(ground_truth=gt).action == "kept" and alias("champion") == "1"
    with pytest.raises(ISCError, match="no @previous"):
        rollback()


def test_promotion_refuses_to_compare_runs_scored_on_different_ground_truths(tracking, mini_data, checkpoints):
    from registry.promote import promote

    val, test = mini_data.ground_truth("val"), mini_data.ground_truth("test")
    log_eval_run(val, 0.90, str(checkpoints[0]))
    log_eval_run(test, 0.30, str(checkpoints[1]))
    with pytest.raises(ConfigError, match="different ground truths") as err:
        promote()
    fps = {ground_truth_fingerprint(read_ground_truth(p))[:12] for p in (val, test)}
    assert all(fp in str(err.value) for fp in fps)
    assert promote(ground_truth=test).version == "1"  # choosing one ground truth resolves it
    # The champion was scored on test; a val-scored candidate must not replace it on a bigger number.
    with pytest.raises(ConfigError, match="cannot be compared"):
        promote(ground_truth=val)
    assert alias("champion") == "1" and len(versions()) == 2  # registered, never promoted
    # A pipeline asks to keep the champion instead of failing: same outcome, no exception, and it says how.
    kept = promote(ground_truth=val, on_other_gt="keep")
    assert kept.action == "kept" and kept.version == "2" and alias("champion") == "1" and len(versions()) == 2
    assert "cannot be compared" in kept.message and f"--ground-truth {val} --force" in kept.message
    with pytest.raises(ConfigError, match="on_other_gt"):
        promote(ground_truth=val, on_other_gt="replace")
    assert promote(ground_truth=val, force=True).action == "promoted" and alias("champion") == "2"


@pytest.mark.slow
def test_a_registered_version_says_which_stage_made_it_its_scores_and_how_it_was_tuned(
        tracking, mini_data, checkpoints, tmp_path):
    import shutil

    from isc.tracking import tracked_run
    from registry.promote import promote

    # a training run as the main job's retrained tuned stage leaves it: final model, start and tune tags
    start = "0123456789abcdef0123456789abcdef:1"
    tune_tags = {"isc.tune.study_name": "isc-tune-1-stage4-01234567", "isc.tune.trial": "2",
                 "isc.tune.params": '{"lr": 0.05, "memory_size": 256}', "isc.tune.stage": "stage4",
                 "isc.tune.candidate": "retrain", "isc.tune.study_run": "f" * 32}
    final = tmp_path / "model" / "final.pth.tar"
    final.parent.mkdir()
    shutil.copyfile(checkpoints[0], final)
    with tracked_run(experiment="isc", run_name="train_stage4_tuned",
                     tags={"isc.step": "train", "isc.stage": "stage4", "isc.start_kind": "init",
                           "isc.start_checkpoint": start, **tune_tags}) as run:
        mlflow.log_param("config", "isc/configs/demo_stage4.yaml")
        mlflow.log_artifact(str(final), "model")
    train_id = run.info.run_id
    val, test = mini_data.ground_truth("val"), mini_data.ground_truth("test")
    chosen = log_eval_run(val, 0.3125, train_id)
    log_eval_run(test, 0.4375, train_id)

    result = promote(ground_truth=val)
    version = mlflow.MlflowClient().get_model_version(MODEL, result.version)
    assert {k: version.tags[k] for k in tune_tags} == tune_tags
    assert version.description.splitlines() == [
        f"stage: train_stage4_tuned (demo_stage4.yaml, stage4, the seed's v107), training run {train_id}",
        f"starts from: init {start}",
        "µAP (raw descriptors): ground_truth_test.csv 0.4375, ground_truth_val.csv 0.3125 (chose this version)",
        "serves with: its training size, no TTA (the evaluation recorded no settings)",
        f"tuned: study isc-tune-1-stage4-01234567, trial 2 of stage4, values {tune_tags['isc.tune.params']}; "
        "retrained with these values for the stage's full epochs",
        f"evaluation run {chosen} (official protocol on {val})",
    ]
    # a model given as a file has no training run to describe: the description says so, no tune tags
    log_eval_run(val, 0.5, str(checkpoints[1]))
    other = mlflow.MlflowClient().get_model_version(MODEL, promote(ground_truth=val).version)
    assert other.description.startswith(f"stage: not an MLflow training run (model {checkpoints[1]})")
    assert not any(k.startswith("isc.tune.") for k in other.tags)


def test_promotion_ignores_failed_runs_and_runs_without_a_model(tracking, mini_data, checkpoints):
    from isc.tracking import tracked_run
    from registry.promote import find_best_evaluation

    gt = mini_data.ground_truth("test")
    good = log_eval_run(gt, 0.20, str(checkpoints[0]))
    log_eval_run(gt, 0.99, "")  # a hash baseline: nothing to register
    log_eval_run(gt, 0.98, str(checkpoints[2]), experiment="other")  # another experiment
    with pytest.raises(RuntimeError):
        with tracked_run(experiment="isc", tags={"isc.step": "evaluate", "isc.model_ref": str(checkpoints[1]),
                                                 "isc.gt_fingerprint": ground_truth_fingerprint(read_ground_truth(gt))}):
            mlflow.log_metric("average_precision", 0.95)
            raise RuntimeError("crashed after logging")
    assert find_best_evaluation(ground_truth=gt).run_id == good


def test_pyfunc_describes_paths_and_tensors_and_subtracts_the_bank(tracking, mini_data, checkpoints, tmp_path):
    import pandas as pd
    import torch

    from isc.extract.describe import describe_images
    from isc.models import load_model
    from isc.tracking import tracked_run
    from registry.model_logging import log_descriptor_model

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(40, 256)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_path = write_train_descriptors(tmp_path / "bank.h5", bank, [f"T{i:06d}" for i in range(40)])
    with tracked_run(experiment="isc"):
        info = log_descriptor_model(checkpoints[0], bank=bank_path, nes_params={"k": 5, "beta": 0.35, "num_iter": 1})
    model = mlflow.pyfunc.load_model(info.model_uri)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert (local / "artifacts" / "checkpoint.pth.tar").is_file() and (local / "artifacts" / "nes_bank.h5").is_file()

    paths = [str(p) for _, p in mini_data.images("reference")[:4]]
    from_df = model.predict(pd.DataFrame({"path": paths}))
    from_list = model.predict(paths)
    raw = model.predict(paths, params={"postprocess": False})
    assert from_df.dtype == np.float32 and from_df.shape == (4, 256)
    np.testing.assert_allclose(np.linalg.norm(from_df, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(from_df, from_list, atol=1e-6)
    expected_raw = describe_images(load_model(checkpoints[0]), paths)
    np.testing.assert_allclose(raw, expected_raw, atol=1e-5)
    assert np.abs(from_df - raw).max() > 1e-3  # the bank was subtracted

    x = torch.randn(3, 3, 32, 32)
    out = model.predict(x.numpy(), params={"postprocess": False})
    np.testing.assert_allclose(out, load_model(checkpoints[0])(x).detach().numpy(), atol=1e-5)
    with pytest.raises(TypeError, match="float32"):
        model.predict(x.double().numpy())
    with pytest.raises(ValueError, match="'path' column"):
        model.predict(pd.DataFrame({"file": paths}))
    with pytest.raises(Exception, match="postprocess"):
        model.predict(paths, params={"postprocess": "maybe"})
