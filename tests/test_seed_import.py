"""`isc import-seed`: the seed's own checkpoint format, read safely, gives the seed's descriptors.

Every seed-format file here is written by the test itself, exactly as the seed's scripts write theirs
(exp/v107.py ``save_checkpoint``): ``torch.save({'epoch', 'arch', 'state_dict', 'optimizer', 'args'})`` with
the DDP-wrapped ISCNet's state dict (``module.`` prefix), the SGD state dict, and the argparse.Namespace.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from isc.errors import ConfigError
from isc.models import create_model, load_checkpoint, load_model, load_weights
from isc.models.seed_import import (
    SeedImportError,
    check_globals,
    import_seed_checkpoint,
    read_seed_checkpoint,
    seed_backbone_name,
)

ARCH = "test_efficientnet"  # a tiny timm EfficientNet; the seed's arch is tf_efficientnetv2_m_in21ft1k
SIZE = 64


class SeedISCNet(nn.Module):
    """The seed's network as its scripts define it (backbone features_only with every level, GeM as a
    function of plain attributes p / eval_p, fc without bias, bn, F.normalize)."""

    def __init__(self, backbone: nn.Module, p: float, eval_p: float):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_info.info[-1]["num_chs"], 256, bias=False)
        self.bn = nn.BatchNorm1d(256)
        nn.init.xavier_normal_(self.fc.weight)
        self.p, self.eval_p = p, eval_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)[-1]
        p = self.p if self.training else self.eval_p
        x = F.avg_pool2d(x.clamp(min=1e-6).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)
        return F.normalize(self.bn(self.fc(x.view(x.shape[0], -1))))


def seed_model(gem_p: float = 1.0, gem_eval_p: float = 1.0) -> SeedISCNet:
    """The seed's network as its extraction builds it: p from the checkpoint's training args, eval p from
    the extraction command (``--gem-eval-p 1.0`` in the final command)."""
    torch.manual_seed(0)
    model = SeedISCNet(timm.create_model(ARCH, features_only=True, pretrained=False), gem_p, gem_eval_p)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so a key mix-up cannot go unnoticed
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def write_seed_checkpoint(path, model: SeedISCNet, args: argparse.Namespace, epoch: int = 10) -> None:
    """What the seed's training writes each epoch (its model is DDP-wrapped: every key has ``module.``)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": no_decay, "weight_decay": 0.0},
                                 {"params": decay, "weight_decay": 1e-6}], lr=0.5, momentum=0.9)
    model.train()
    model(torch.randn(4, 3, SIZE, SIZE)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer state, as after a real epoch
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": epoch, "arch": args.arch, "state_dict": state, "optimizer": optimizer.state_dict(),
                "args": args}, path)


def seed_args(**kw) -> argparse.Namespace:
    """The seed's parsed command line (exp/v107.py's options, the final command's values)."""
    base = dict(data="../input/", arch=ARCH, workers=8, epochs=10, start_epoch=0, batch_size=8, lr=0.5,
                momentum=0.9, weight_decay=1e-6, resume="", world_size=8, rank=0, dist_url="tcp://localhost:10001",
                dist_backend="nccl", seed=99999, gpu=0, multiprocessing_distributed=True, gem_p=1.0,
                gem_eval_p=4.0, mode="train", target_set="qr", dryrun=False, pos_margin=0.0, neg_margin=1.1,
                ncrops=2, input_size=SIZE, sample_size=1000000, weight="v98/train/checkpoint_0001.pth.tar",
                eval_subset=False, memory_size=1000, tta=False, distributed=True)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture
def seed_file(tmp_path):
    model = seed_model()
    path = tmp_path / "checkpoint_0009.pth.tar"
    write_seed_checkpoint(path, model, seed_args())
    return path, model


def test_imported_checkpoint_gives_the_seed_models_descriptors(seed_file, tmp_path):
    path, seed = seed_file
    result = import_seed_checkpoint(path, tmp_path / "out" / "v107.pth.tar")
    assert result.model_config["backbone"] == ARCH and result.model_config["input_size"] == SIZE
    # eval p = the trained p, as the seed's extraction command; not args.gem_eval_p (its parser default)
    assert (result.model_config["gem_p"], result.model_config["gem_eval_p"]) == (1.0, 1.0)
    assert result.args_gem_eval_p == 4.0
    assert result.seed_epoch == 10 and result.defaults == []
    ckpt = load_checkpoint(result.output)  # the project's weights_only reader accepts the output
    assert ckpt["optimizer"] is None and ckpt["imported_from"]["sha256"] == result.sha256
    assert ckpt["imported_from"]["seed_args"]["neg_margin"] == 1.1
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    ours = load_model(result.output)
    seed.eval()
    torch.manual_seed(1)
    x = torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        want, got = seed(x), ours(x)
    cos = (want * got).sum(1)
    assert cos.min().item() > 1 - 1e-5, cos
    assert torch.allclose(want, got, atol=1e-5)
    # the descriptors are not trivially equal: another model's differ
    other = seed_model()
    with torch.no_grad():
        other.fc.weight.normal_()
    assert (other.eval()(x) * got).sum(1).min().item() < 0.99
    # --init-from <imported file>: a new stage starts from exactly these weights (the seed's --weight)
    fresh = create_model(ARCH, pretrained=False, gem_p=1.0, gem_eval_p=1.0, input_size=SIZE)
    assert load_weights(fresh, result.output) == ([], [])
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), want, atol=1e-5)


def test_refuses_to_overwrite_and_flags_override_the_seed_args(seed_file, tmp_path):
    path, seed = seed_file
    out = tmp_path / "v107.pth.tar"
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        import_seed_checkpoint(path, out)
    assert out.read_bytes() == b"keep me"
    result = import_seed_checkpoint(path, out, overwrite=True, input_size=96, gem_eval_p=3.0)
    assert result.model_config["input_size"] == 96 and result.model_config["gem_eval_p"] == 3.0
    assert "input_size" not in result.from_args and "gem_p" in result.from_args
    # a real GeM (p = 3) at extraction gives the seed network's descriptors with that eval p
    seed.eval_p = 3.0
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(seed.eval()(x), load_model(out)(x), atol=1e-5)


def test_a_checkpoint_without_args_uses_the_seed_parser_defaults_and_says_so(tmp_path):
    path = tmp_path / "bare.pth.tar"
    model = seed_model()
    torch.save({"epoch": 1, "arch": ARCH, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               path)
    result = import_seed_checkpoint(path, tmp_path / "out.pth.tar")
    assert sorted(result.defaults) == ["gem_p", "input_size"]
    assert (result.model_config["gem_p"], result.model_config["gem_eval_p"], result.model_config["input_size"]) \
        == (3.0, 3.0, 224)


class Exploit:
    """A pickle that runs a shell command when loaded by a plain unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["args", "inside_namespace", "state_dict"])
def test_a_code_carrying_pickle_is_refused_naming_the_global_and_nothing_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    model = seed_model()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = {"epoch": 1, "arch": ARCH, "state_dict": state, "optimizer": {}, "args": seed_args()}
    if where == "args":
        ckpt["args"] = Exploit(marker)
    elif where == "inside_namespace":
        ckpt["args"] = seed_args(weight=Exploit(marker))
    else:
        state["module.fc.weight"] = Exploit(marker)
    path = tmp_path / "evil.pth.tar"
    torch.save(ckpt, path)
    for attempt in (lambda: check_globals(path), lambda: read_seed_checkpoint(path),
                    lambda: import_seed_checkpoint(path, tmp_path / "out.pth.tar")):
        with pytest.raises(SeedImportError) as exc:
            attempt()
        assert str(path) in str(exc.value) and ".system'" in str(exc.value), str(exc.value)
    assert not marker.exists() and not (tmp_path / "out.pth.tar").exists()
    # the same file loaded with a plain unpickler does run the command: the test's exploit is real
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_other_data_globals_torch_would_allow_are_refused_too(tmp_path):
    path = tmp_path / "set.pth.tar"
    torch.save({"state_dict": {}, "args": argparse.Namespace(arch=ARCH, extra={1, 2})}, path)
    with pytest.raises(SeedImportError, match=r"refused: the pickle imports the global '(__builtin__|builtins)\.set'"):
        read_seed_checkpoint(path)


def test_the_cli_refuses_an_exploit_with_one_error_line_and_exit_2(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "args": Exploit(marker)}, path)
    proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", "import-seed", str(path), "--output",
                           str(tmp_path / "out.pth.tar")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {path}: refused: the pickle imports the global" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out.pth.tar").exists()


def test_an_isc_checkpoint_is_refused_not_rewritten_with_the_seed_parsers_defaults(seed_file, tmp_path):
    """A hostile round imported a 32-px isc checkpoint: exit 0, and its copy said 224 px and GeM p 3 (the
    seed parser's defaults for the args it lacks)."""
    path, _ = seed_file
    ours = tmp_path / "ours.pth.tar"
    import_seed_checkpoint(path, ours)
    proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", "import-seed", str(ours), "--output",
                           str(tmp_path / "again.pth.tar")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {ours}: already an isc checkpoint (it has model_config)" in proc.stderr, proc.stderr
    assert not (tmp_path / "again.pth.tar").exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "not_a_dict"])
def test_a_damaged_file_gives_one_clear_error_naming_it(seed_file, tmp_path, damage):
    path, _ = seed_file
    bad = tmp_path / f"{damage}.pth.tar"
    data = path.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        torch.save([torch.zeros(2)], bad)
    with pytest.raises(SeedImportError) as exc:
        import_seed_checkpoint(bad, tmp_path / "out.pth.tar")
    text = str(exc.value)
    assert text.startswith(f"{bad}: ")
    expected = {"truncated": "truncated", "random": "truncated or not written by torch.save",
                "empty": "empty file", "not_a_dict": "not a seed checkpoint"}[damage]
    assert expected in text, text
    assert not (tmp_path / "out.pth.tar").exists()


def test_weights_of_another_architecture_are_refused_before_writing(seed_file, tmp_path):
    path, _ = seed_file
    with pytest.raises(SeedImportError, match="do not fit resnet18"):
        import_seed_checkpoint(path, tmp_path / "out.pth.tar", backbone="resnet18")
    assert not (tmp_path / "out.pth.tar").exists()


def test_the_seed_arch_maps_to_todays_timm_name_with_the_seeds_normalisation_and_keys():
    """The real V2-M: the seed's backbone (features_only, every level) and ours have the same weights."""
    from isc.models import create_model

    name = seed_backbone_name("tf_efficientnetv2_m_in21ft1k")
    assert name == "tf_efficientnetv2_m.in21k_ft_in1k"
    seed_backbone = timm.create_model(name, features_only=True, pretrained=False)
    ours = create_model(name, pretrained=False)
    assert {f"backbone.{k}" for k in seed_backbone.state_dict()} == \
        {k for k in ours.state_dict() if k.startswith("backbone.")}
    assert ours.model_config["mean"] == list(seed_backbone.pretrained_cfg["mean"]) == [0.5, 0.5, 0.5]


def test_register_creates_a_version_without_moving_any_alias(seed_file, tmp_path, tracking):
    from mlflow import MlflowClient

    from entrypoints.import_seed import main

    path, _ = seed_file
    out = tmp_path / "seed.pth.tar"
    assert main([str(path), "--output", str(out), "--register", "isc-seed"]) == 0
    client = MlflowClient()
    versions = client.search_model_versions("name='isc-seed'")
    assert [str(v.version) for v in versions] == ["1"]
    assert "checkpoint_0009.pth.tar" in versions[0].description
    assert client.get_registered_model("isc-seed").aliases == {}
    run = client.get_run(versions[0].run_id)
    assert run.data.params["seed_epoch"] == "10" and run.data.params["gem_eval_p"] == "1.0"
    served = load_model("models:/isc-seed/1")  # the registered version's checkpoint rebuilds the model
    assert served.model_config["input_size"] == SIZE
    # a second import of the same file is a new version; still no alias
    assert main([str(path), "--output", str(out), "--overwrite", "--register", "isc-seed"]) == 0
    assert len(client.search_model_versions("name='isc-seed'")) == 2
    assert client.get_registered_model("isc-seed").aliases == {}


def test_legacy_files_import_and_other_pickle_protocols_are_refused_before_unpickling(seed_file, tmp_path,
                                                                                       monkeypatch):
    """torch < 1.6's non-zip format imports too; a protocol-4 pickle (STACK_GLOBAL, which the scan
    follows through the memo) is refused naming its global; a forced-unsafe torch.load setting changes
    nothing (the scan runs first and weights_only=True is passed explicitly)."""
    path, seed = seed_file
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt = torch.load(path, weights_only=False)
    legacy = tmp_path / "legacy.pth.tar"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    result = import_seed_checkpoint(legacy, tmp_path / "legacy_out.pth.tar")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(seed.eval()(x), load_model(result.output)(x), atol=1e-5)
    marker = tmp_path / "pwned"
    for proto, zip_format in ((2, False), (4, True), (4, False), (5, True)):
        evil = tmp_path / f"evil_{proto}_{zip_format}.pth.tar"
        torch.save({**ckpt, "args": Exploit(marker)}, evil, pickle_protocol=proto,
                   _use_new_zipfile_serialization=zip_format)
        with pytest.raises(SeedImportError, match=r"refused: the pickle imports the global '(posix|nt|os)\.system'"):
            import_seed_checkpoint(evil, tmp_path / "out.pth.tar")
    assert not marker.exists()
    # a clean protocol-4 file: torch's safe loader cannot read protocol 4, and the error says so
    clean4 = tmp_path / "clean4.pth.tar"
    torch.save(ckpt, clean4, pickle_protocol=4)
    with pytest.raises(SeedImportError, match="weights-only unpickler cannot read it safely .*protocol 2"):
        import_seed_checkpoint(clean4, tmp_path / "out.pth.tar")
