"""MLflow lineage: experiment kind, datasets, the training run's logged model, upstream params."""

from __future__ import annotations

import json

import mlflow
import pytest

from isc import lineage
from isc.contract import Tag
from isc.train import load_config, train

TINY = dict(backbone="test_efficientnet", input_size=32, batch_size=4, memory_size=64, workers=0,
            max_steps_per_epoch=2, log_every_steps=1, stage="demo", seed=3, lr=0.05, pos_margin=0.1)


def test_folder_digest_changes_with_the_file_list_not_with_the_run(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"1234")
    (tmp_path / "b.jpg").write_bytes(b"12")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = lineage.image_folder_dataset(tmp_path)
    assert ds.profile == {"images": 2}
    again = lineage.image_folder_dataset(tmp_path)
    assert again.digest == ds.digest and len(ds.digest) == 16
    (tmp_path / "b.jpg").write_bytes(b"123")  # same names, one size changed
    assert lineage.image_folder_dataset(tmp_path).digest != ds.digest


def test_ground_truth_dataset_counts_queries_positives_and_split(tmp_path):
    gt = tmp_path / "ground_truth_val.csv"
    gt.write_text("query_id,reference_id\nQ1,R1\nQ2,\nQ3,R9\n")
    ds = lineage.ground_truth_dataset(gt, lineage.split_of(gt))
    assert ds.profile == {"queries": 3, "positive_pairs": 2, "split": "val"}
    assert lineage.split_of(tmp_path / "ground_truth.csv") is None


def test_training_run_has_kind_datasets_logged_model_and_upstream_params(tracking, mini_data):
    result = train(load_config(None, data=str(mini_data.root), epochs=1, experiment_name="lineage", **TINY))
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    # the UI opens the experiment on its runs, not on the GenAI overview
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[lineage.EXPERIMENT_KIND_TAG] == lineage.EXPERIMENT_KIND
    # the Dataset column: the training folder, with its image count
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "mini/training_images"
    assert json.loads(ds.profile) == {"images": len(list((mini_data.root / "training_images").glob("*.jpg")))}
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    # the Model column: an external LoggedModel pointing at the final weights
    model_id = lineage.training_model_id(result.run_id)
    assert model_id is not None
    model = client.get_logged_model(model_id)
    assert model.source_run_id == result.run_id
    assert model.tags[Tag.CHECKPOINT_URI] == f"runs:/{result.run_id}/model/final.pth.tar"
    assert model.params["pos_margin"] == "0.1" and model.params["memory_size"] == "64"
    # the run's own history is not duplicated by the model
    assert [m.step for m in client.get_metric_history(result.run_id, "epoch_loss")] == [0]
    # an evaluation of this model (by run id or <run id>:N) gets its knobs as train.* params
    for ref in (result.run_id, f"{result.run_id}:0"):
        up = lineage.upstream_params(ref)
        assert up["train.pos_margin"] == "0.1" and up["train.lr"] == "0.05"
        assert up["train.memory_size"] == "64" and up["train.run_id"] == result.run_id
    assert lineage.upstream_params("/no/such/file.pth.tar") == {}


@pytest.mark.parametrize("ref", ["models:/isc-descriptor@champion"])
def test_upstream_params_of_a_missing_registry_model_is_empty_not_an_error(tracking, ref):
    assert lineage.upstream_params(ref) == {}


def test_evaluation_links_gt_dataset_upstream_params_and_model_metrics(tracking, mini_data, tmp_path):
    """An evaluation of a training run's model: GT as its dataset, the run's knobs as train.* params, and
    µAP on the training run's LoggedModel (per GT), so the Models tab and parallel coordinates have them."""
    import numpy as np

    from isc.evaluation import run_evaluation
    from isc.io import read_ground_truth, write_descriptors
    from isc.tracking import tracked_run

    result = train(load_config(None, data=str(mini_data.root), epochs=1, experiment_name="lineage", **TINY))
    gt_path = mini_data.root / "ground_truth_val.csv"
    gt = read_ground_truth(gt_path)
    qids = sorted(gt.queries)
    rids = sorted(p.stem for p in (mini_data.root / "reference_images").glob("*.jpg"))
    rng = np.random.default_rng(0)
    desc = write_descriptors(tmp_path / "d.h5", rng.normal(size=(len(qids), 8)).astype(np.float32), qids,
                             rng.normal(size=(len(rids), 8)).astype(np.float32), rids)
    with tracked_run(experiment="lineage", run_name="evaluate") as run:
        out = run_evaluation(desc, gt_path, model_ref=f"{result.run_id}:0", bootstrap=0)
    client = mlflow.MlflowClient()
    ev = client.get_run(run.info.run_id)
    assert ev.data.params["train.pos_margin"] == "0.1" and ev.data.params["train.run_id"] == result.run_id
    (ds_input,) = ev.inputs.dataset_inputs
    assert ds_input.dataset.name == "mini/ground_truth_val.csv"
    assert json.loads(ds_input.dataset.profile)["split"] == "val"
    model = client.get_logged_model(lineage.training_model_id(result.run_id))
    linked = {m.key: m for m in model.metrics}
    assert linked["average_precision"].value == pytest.approx(out["average_precision"])
    assert linked["average_precision"].dataset_name == "mini/ground_truth_val.csv"
    # logged once on the run: linking to the model does not duplicate the run's history
    assert len(client.get_metric_history(run.info.run_id, "average_precision")) == 1


def test_evaluation_records_the_nes_constants_of_its_postprocess_run(tracking, mini_data, tmp_path):
    """A version is packaged with the NES constants its µAP was measured with, not the seed's defaults."""
    import numpy as np

    from isc.contract import Evaluation
    from isc.evaluation import run_evaluation
    from isc.io import read_ground_truth, write_descriptors
    from isc.tracking import tracked_run

    gt_path = mini_data.root / "ground_truth_val.csv"
    qids = sorted(read_ground_truth(gt_path).queries)
    rids = sorted(p.stem for p in (mini_data.root / "reference_images").glob("*.jpg"))
    rng = np.random.default_rng(1)
    desc = write_descriptors(tmp_path / "d.h5", rng.normal(size=(len(qids), 8)).astype(np.float32), qids,
                             rng.normal(size=(len(rids), 8)).astype(np.float32), rids)
    with tracked_run(experiment="lineage", run_name="postprocess") as post:  # what `isc postprocess --k 5` logs
        mlflow.log_params({"k": 5, "beta": 0.3, "num_iter": 2, "dba_k": 10})
    bank = f"runs:/{post.info.run_id}/descriptors/nes_bank.h5"
    with tracked_run(experiment="lineage", run_name="evaluate") as run:
        run_evaluation(desc, gt_path, nes_bank=bank, bootstrap=0)
    back = Evaluation.from_run(mlflow.MlflowClient().get_run(run.info.run_id))
    assert back.nes_bank == bank and back.nes_params == {"k": 5, "beta": 0.3, "num_iter": 2}
    assert lineage.nes_params_of(str(tmp_path / "local_bank.h5")) == {}  # a file: nothing to look up
