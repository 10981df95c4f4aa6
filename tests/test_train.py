"""Training loop on the tiny mini dataset: real SQLite MLflow store, real images, tiny timm backbone."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from isc.errors import ConfigError
from isc.models import load_checkpoint, load_model
from isc.train import load_config, train

TINY = dict(backbone="test_efficientnet", input_size=32, batch_size=4, memory_size=64, workers=0,
            max_steps_per_epoch=2, log_every_steps=1, stage="smoke", seed=3, lr=0.05)


def tiny_cfg(mini_data, **kw):
    return load_config(None, data=str(mini_data.root), **{**TINY, **kw})


def artifacts(run_id: str, path: str = "") -> set[str]:
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


def test_tiny_run_logs_params_metrics_checkpoints_and_final_model(tracking, mini_data):
    seen = []

    def callback(epoch, model):
        seen.append((epoch, model.training))
        return {"val_score": 0.5 + epoch}

    result = train(tiny_cfg(mini_data, epochs=2, experiment_name="t"), epoch_callback=callback)
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["isc.step"] == "train" and run.data.tags["isc.stage"] == "smoke"
    p = run.data.params
    assert p["backbone"] == "test_efficientnet" and p["lr"] == "0.05" and p["memory_size"] == "64"
    assert p["steps_per_epoch"] == "2" and p["images_per_step"] == "8" and p["world_size"] == "1"
    # per-step xbm fill: 4 items x 2 views = 8 embeddings enqueued per step
    fill = [m.value for m in client.get_metric_history(result.run_id, "xbm_fill")]
    assert fill == [8.0, 16.0, 24.0, 32.0]
    assert len(client.get_metric_history(result.run_id, "loss")) == 4
    epoch_loss = client.get_metric_history(result.run_id, "epoch_loss")
    assert [m.step for m in epoch_loss] == [0, 1] and all(0 < m.value < 3 for m in epoch_loss)
    assert [m.value for m in client.get_metric_history(result.run_id, "val_score")] == [0.5, 1.5]
    assert seen == [(0, True), (1, True)]
    # retention by default: the last checkpoint only (no hand-off epoch, no val_average_precision logged)
    assert artifacts(result.run_id, "checkpoints") == {"checkpoints/checkpoint_0001.pth.tar"}
    assert "model/final.pth.tar" in artifacts(result.run_id, "model")
    assert "summary.csv" in artifacts(result.run_id)
    summary = Path(result.final_model_path).parent.parent / "summary.csv"
    assert summary.read_text().splitlines()[0].startswith("epoch,loss,lr,images_per_s")
    ckpt = load_checkpoint(result.checkpoint_path)
    assert ckpt["epoch"] == 2 and ckpt["mlflow_run_id"] == result.run_id
    assert ckpt["xbm"]["_extra_state"]["queue_idx"] == 32
    assert ckpt["train_config"]["memory_size"] == 64
    # extraction rebuilds the model from the run id alone
    model = load_model(result.run_id)
    assert model.model_config["input_size"] == 32 and not model.training


def test_resume_from_epoch_checkpoint_equals_uninterrupted_run(tracking, mini_data):
    full = train(tiny_cfg(mini_data, epochs=2))
    first = train(tiny_cfg(mini_data, epochs=1))
    resumed = train(tiny_cfg(mini_data, epochs=2, resume_from=first.checkpoint_path))
    a = load_checkpoint(full.final_model_path)["state_dict"]
    b = load_checkpoint(resumed.final_model_path)["state_dict"]
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6
    # the first run had FINISHED: resuming opens a new run that points back to it
    tags = mlflow.MlflowClient().get_run(resumed.run_id).data.tags
    assert resumed.run_id != first.run_id and tags["isc.resumed_from_run"] == first.run_id
    # and resuming really changed the weights vs the epoch-1 checkpoint
    c = load_checkpoint(first.checkpoint_path)["state_dict"]
    assert max(float((c[k].float() - b[k].float()).abs().max()) for k in c) > 1e-4


def test_init_from_run_id_starts_from_that_runs_weights(tracking, mini_data):
    source = train(tiny_cfg(mini_data, epochs=1))
    follow = train(tiny_cfg(mini_data, epochs=1, init_from=source.run_id, lr=1e-9, seed=11))
    run = mlflow.MlflowClient().get_run(follow.run_id)
    assert run.data.params["init_checkpoint"].endswith("final.pth.tar")
    assert run.data.metrics["init_missing_keys"] == 0
    src = load_checkpoint(source.final_model_path)["state_dict"]["fc.weight"]
    dst = load_checkpoint(follow.final_model_path)["state_dict"]["fc.weight"]
    assert float((src - dst).abs().max()) < 1e-5  # lr 1e-9: the weights stay the source's
    with pytest.raises(ConfigError, match="init_from"):
        train(tiny_cfg(mini_data, init_from="f" * 32))


def test_callback_exception_propagates_after_checkpoint_inside_an_active_run(tracking, mini_data):
    class Pruned(Exception):
        pass

    def prune(epoch, model):
        raise Pruned(f"epoch {epoch}")

    with mlflow.start_run() as parent:
        with pytest.raises(Pruned):
            train(tiny_cfg(mini_data, epochs=3), epoch_callback=prune)
        # the stage logged into the caller's run instead of opening its own
        assert artifacts(parent.info.run_id, "checkpoints") == {"checkpoints/checkpoint_0000.pth.tar"}
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1


def test_load_config_packaged_stages_match_the_recipe():
    s1 = load_config("stage1")
    assert (s1.stage, s1.input_size, s1.epochs, s1.lr, s1.wd, s1.batch_size, s1.memory_size, s1.seed) == (
        "stage1", 256, 5, 0.1, 1e-6, 128, 20000, 9)
    assert s1.backbone == "tf_efficientnetv2_m.in21k_ft_in1k" and s1.pretrained is True
    assert (s1.pos_margin, s1.neg_margin, s1.gem_p, s1.gem_eval_p, s1.ncrops) == (0.0, 1.0, 1.0, 1.0, 2)
    s4 = load_config("stage4")
    assert (s4.stage, s4.lr, s4.batch_per_process, s4.memory_size, s4.neg_margin, s4.seed) == (
        "stage4", 0.5, 1, 1000, 1.1, 99999)  # v107: 1 pair per process per step
    assert load_config("stage3").batch_size == 64 and load_config("stage2").input_size == 384
    assert load_config("stage1b").epochs == 10 and load_config("stage1b").seed == 90
    demo = load_config("smoke", epochs=1, **{"neg-margin": "0.9"})
    assert demo.epochs == 1 and demo.neg_margin == 0.9
    with pytest.raises(ConfigError, match="lrr"):
        load_config("smoke", lrr=0.1)
    with pytest.raises(ConfigError, match="config"):
        load_config("no_such_stage")


def test_persistent_workers_see_every_new_epoch_and_match_the_main_process(mini_data):
    """Persistent DataLoader workers keep their own dataset copy; the epoch must still reach them."""
    import torch
    from torch.utils.data import DataLoader

    from isc.train.datasets import EpochTaggedSampler, ResumableShuffleSampler, collate
    from isc.train.parts import build_dataset

    cfg = tiny_cfg(mini_data)
    dataset, _ = build_dataset(cfg, [0.5] * 3, [0.25] * 3)
    sampler = ResumableShuffleSampler(len(dataset), 4, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=4, sampler=EpochTaggedSampler(sampler), num_workers=2,
                        collate_fn=collate, drop_last=True, persistent_workers=True)
    first = {}
    for epoch in range(2):
        sampler.set_epoch(epoch, start_batch=1)
        it = iter(loader)
        images, labels, _ = next(it)  # stop after one batch: the next epoch must not see stale items
        first[epoch] = images
        expected = torch.cat([dataset[(epoch, i)][0] for i in sampler._indices()[:4]])
        assert torch.equal(images, expected)  # worker views == main-process views of (epoch, index)
        assert labels.tolist() == [i for i in sampler._indices()[:4] for _ in range(cfg.ncrops)]
    assert not torch.equal(first[0], first[1])  # a new epoch, new views
    assert loader._iterator is not None and loader._iterator._persistent_workers


@pytest.mark.parametrize("stage", ["demo_stage3", "demo_stage4"])
def test_no_reference_of_val_or_test_is_ever_a_training_negative(mini_data, stage):
    """Stages 3 and 4 draw extra negatives from the reference folder. Before, val's and test's references
    were among them, so the model had seen the photos it was then scored and chosen on -- the queried ones
    (ground-truth positives) and the never-queried regions of the same photos (the manifest's)."""
    import json

    from isc.io import read_ground_truth
    from isc.train.parts import build_dataset

    scored = {r for split in ("val", "test") for _, r in read_ground_truth(mini_data.ground_truth(split)).positives}
    manifest = json.loads((mini_data.root / "mini_manifest.json").read_text())
    held_photos = set(manifest["photo_splits"]["val"]) | set(manifest["photo_splits"]["test"])
    heldout = {r for r, where in manifest["references"].items() if manifest["photos"][where[0]] in held_photos}
    refs = {r for r, _ in mini_data.images("reference")}
    assert scored and scored < heldout < refs  # the tiny data has never-queried regions of held-out photos too
    assert mini_data.heldout_references() == heldout
    cfg = load_config(stage, data=str(mini_data.root), backbone="test_efficientnet", pretrained=False,
                      input_size=32, workers=0)
    dataset, facts = build_dataset(cfg, [0.5] * 3, [0.25] * 3)
    pool = {p.stem for p in dataset.negatives}
    assert pool and not pool & heldout
    assert facts["n_heldout_references_excluded"] == len(heldout)
    if stage == "demo_stage3":  # every other reference stays a negative (v98: all references)
        assert pool == refs - heldout
    else:  # v107: nor any positive of the pairs file (the train split)
        train_refs = {r for _, r in read_ground_truth(mini_data.ground_truth("train")).positives}
        assert pool == refs - heldout - train_refs


def test_a_broken_mini_manifest_is_named(tmp_path):
    from isc.data.disc21 import DISC21

    (tmp_path / "mini_manifest.json").write_text('{"references": {"R0": [7]}, "photos": [], "photo_splits": {}}')
    with pytest.raises(ConfigError, match="mini_manifest.json: unreadable make-mini manifest"):
        DISC21(tmp_path).heldout_references()
    assert DISC21(tmp_path / "elsewhere").heldout_references() == set()  # no split file, no manifest: none
