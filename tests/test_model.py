"""ISCNet, GeM, checkpoints and load_model on a tiny timm backbone (random init, no downloads)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from isc.errors import ConfigError
from isc.models import (
    CheckpointError,
    GeM,
    create_model,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    load_weights,
    save_checkpoint,
)
from isc.models.checkpoint import checkpoint_name, rng_state, set_rng_state

TINY = "test_efficientnet"


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_model(TINY, pretrained=False, gem_p=3.0, gem_eval_p=1.0, dim=256, input_size=32)


def test_descriptors_are_256d_unit_norm_float32(tiny_model):
    tiny_model.eval()
    out = tiny_model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 256) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


def test_head_init_is_xavier_normal_without_bias_and_bn_identity(tiny_model):
    assert tiny_model.fc.bias is None
    fan_in, fan_out = tiny_model.fc.in_features, tiny_model.fc.out_features
    expected_std = (2.0 / (fan_in + fan_out)) ** 0.5
    assert abs(float(tiny_model.fc.weight.detach().std()) - expected_std) / expected_std < 0.1
    assert torch.equal(tiny_model.bn.weight, torch.ones(256)) and torch.equal(tiny_model.bn.bias, torch.zeros(256))


def test_gem_uses_training_p_in_train_mode_and_eval_p_in_eval_mode():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    pool = GeM(p=3.0, eval_p=1.0)
    pool.train()
    assert float(pool(x)) == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3), rel=1e-6)
    pool.eval()
    assert float(pool(x)) == pytest.approx(2.5, rel=1e-6)
    # clamp at 1e-6: negative activations count as ~0, never NaN
    assert float(GeM(3.0, 3.0)(-x)) == pytest.approx(1e-6, rel=1e-3)


def test_model_config_rebuilds_an_identical_network(tiny_model):
    cfg = tiny_model.model_config
    assert cfg["backbone"] == TINY and cfg["dim"] == 256 and cfg["input_size"] == 32
    assert cfg["gem_p"] == 3.0 and cfg["gem_eval_p"] == 1.0
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406]) and len(cfg["std"]) == 3
    again = create_model(**cfg)
    assert again.model_config == cfg
    assert again.state_dict().keys() == tiny_model.state_dict().keys()


def test_unknown_backbone_is_a_config_error_listing_close_names():
    with pytest.raises(ConfigError) as err:
        create_model("tf_efficientnetv2_mm")
    assert err.value.param == "backbone" and "tf_efficientnetv2_m" in str(err.value)


def test_local_weights_file_initialises_the_backbone(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model(TINY, pretrained=False)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = create_model(TINY, pretrained=str(tmp_path / "w.pth"))
    ref = source.state_dict()
    shared = [k for k in model.backbone.state_dict() if k in ref]
    assert len(shared) > 20
    assert all(torch.equal(model.backbone.state_dict()[k], ref[k]) for k in shared)
    with pytest.raises(ConfigError, match="pretrained"):
        create_model(TINY, pretrained=str(tmp_path / "missing.pth"))


def test_checkpoint_round_trips_with_weights_only(tiny_model, tmp_path):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9)
    tiny_model.train()
    tiny_model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / checkpoint_name(3), tiny_model, epoch=4, optimizer=opt,
                           xbm={"embedding_memory": torch.ones(5, 256), "queue_idx": 3},
                           train_config={"lr": 0.1, "data": tmp_path}, mlflow_run_id="abc")
    assert path.name == "checkpoint_0003.pth.tar"
    raw = torch.load(path, weights_only=True)  # must not need any unpickling of code
    assert raw["epoch"] == 4 and raw["arch"] == TINY and raw["mlflow_run_id"] == "abc"
    ckpt = load_checkpoint(path)
    assert ckpt["train_config"]["data"] == str(tmp_path)
    assert ckpt["xbm"]["queue_idx"] == 3
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in ckpt["state_dict"].items())
    opt2 = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    import argparse

    path = tmp_path / "seed_style.pth.tar"  # the seed stored its argparse Namespace: pickled code
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(path)
    truncated = tmp_path / "torn.pth.tar"
    truncated.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(truncated)


def test_rng_state_restores_torch_numpy_and_python_streams():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_load_model_from_path_folder_and_run_id(tiny_model, tmp_path, tracking):
    import mlflow

    ckpt_dir = tmp_path / "checkpoints"
    save_checkpoint(ckpt_dir / checkpoint_name(0), tiny_model, epoch=1)
    save_checkpoint(ckpt_dir / checkpoint_name(1, step=5), tiny_model, epoch=1, step=5)
    save_checkpoint(ckpt_dir / checkpoint_name(1), tiny_model, epoch=2)
    assert latest_checkpoint(ckpt_dir).name == "checkpoint_0001.pth.tar"
    x = torch.randn(2, 3, 32, 32)
    tiny_model.eval()
    expected = tiny_model(x)
    from_path = load_model(ckpt_dir / "checkpoint_0000.pth.tar")
    assert not from_path.training and torch.allclose(from_path(x), expected, atol=1e-6)
    # a registered-model folder keeps the checkpoint under artifacts/
    reg = tmp_path / "registered"
    save_checkpoint(reg / "artifacts" / "checkpoint.pth.tar", tiny_model, epoch=2)
    assert torch.allclose(load_model(reg)(x), expected, atol=1e-6)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(ckpt_dir / "checkpoint_0001.pth.tar"), "checkpoints")
    assert torch.allclose(load_model(run.info.run_id)(x), expected, atol=1e-6)
    assert torch.allclose(load_model(f"runs:/{run.info.run_id}/checkpoints/checkpoint_0001.pth.tar")(x),
                          expected, atol=1e-6)
    with pytest.raises(ConfigError, match="model"):
        load_model("0" * 32)


def test_load_weights_strips_module_prefix_and_reports_missing_keys(tiny_model, tmp_path):
    sd = {f"module.{k}": v.clone() for k, v in tiny_model.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": sd, "model_config": tiny_model.model_config}, tmp_path / "ddp.pth.tar")
    fresh = create_model(**tiny_model.model_config)
    missing, unexpected = load_weights(fresh, tmp_path / "ddp.pth.tar")
    assert missing == ["fc.weight"] and unexpected == []
    assert torch.equal(fresh.bn.running_mean, tiny_model.bn.running_mean)
    assert torch.equal(fresh.backbone.conv_stem.weight, tiny_model.backbone.conv_stem.weight)
