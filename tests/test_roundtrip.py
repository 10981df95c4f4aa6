"""extract -> postprocess -> evaluate through ``mlflow.run`` on the mini dataset, real SQLite store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from isc import tracking as isc_tracking
from isc.io import read_descriptors, read_train_descriptors
from isc.models import create_model, save_checkpoint

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_extract_postprocess_evaluate_chain_through_mlflow_projects(
    mini_data, tmp_path, tracking, monkeypatch
):
    # `mlflow.run(env_manager="local")` runs `python` from PATH: make it this interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    torch.manual_seed(0)
    model = create_model("test_efficientnet", pretrained=False, input_size=48)
    ckpt = save_checkpoint(tmp_path / "checkpoint_0000.pth.tar", model, epoch=0, with_rng=False)
    exp = isc_tracking.get_or_create_experiment("roundtrip")
    client = mlflow.MlflowClient()

    def run(entry: str, **params) -> mlflow.entities.Run:
        sub = mlflow.run(str(PROJECT_ROOT), entry, parameters=params, experiment_id=exp, env_manager="local")
        return client.get_run(sub.run_id)

    ext = run(
        "extract",
        model=str(ckpt),
        data=str(mini_data.root),
        batch_size=32,
        workers=0,
        output_dir=str(tmp_path / "extract"),
    )
    raw = f"runs:/{ext.info.run_id}/descriptors/descriptors.h5"
    post = run(
        "postprocess",
        descriptors=raw,
        train_descriptors=f"runs:/{ext.info.run_id}/descriptors/train_descriptors.h5",
        output=str(tmp_path / "post" / "descriptors_nes.h5"),
    )
    ev = run(
        "evaluate",
        descriptors=f"runs:/{post.info.run_id}/descriptors/descriptors_nes.h5",
        ground_truth=str(mini_data.ground_truth()),
        before=raw,
    )

    for r in (ext, post, ev):
        assert r.info.status == "FINISHED", r.data.tags.get("isc.error")
    assert ext.data.tags["isc.step"] == "extract" and ext.data.tags["isc.model_ref"] == str(ckpt)
    assert ext.data.metrics["n_query"] == 40 and ext.data.metrics["n_train"] == 64
    assert post.data.tags["isc.step"] == "postprocess" and post.data.params["beta"] == "0.35"
    raw_desc = read_descriptors(tmp_path / "extract" / "descriptors.h5")
    nes_desc = read_descriptors(tmp_path / "post" / "descriptors_nes.h5")
    assert nes_desc.query_ids == raw_desc.query_ids
    assert read_train_descriptors(tmp_path / "post" / "nes_bank.h5")[0].shape == (64, 256)
    before, after = ev.data.metrics["before_average_precision"], ev.data.metrics["average_precision"]
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert before != after  # the subtraction really changed the descriptors that were scored
