"""`isc promote` + `isc search` against a real loopback `mlflow server`; the champion is loaded in a fresh process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from PIL import Image

PROJECT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_champion_pulled_from_the_server_in_a_fresh_process_matches_a_copy_to_its_reference(
    mlflow_server, mini_data, tmp_path, monkeypatch, capsys
):
    import torch

    from entrypoints.promote import main as promote_main
    from isc.models import create_model, save_checkpoint
    from tests.test_registry import log_eval_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("ISC_HOME", str(tmp_path / "home"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(mlflow_server.url)

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.pth.tar", create_model("test_efficientnet", input_size=32), epoch=0)
    gt = mini_data.ground_truth("test")
    log_eval_run(gt, 0.42, str(ckpt))
    assert promote_main(["--experiment", "isc", "--ground-truth", str(gt)]) == 0
    assert "is now @champion" in capsys.readouterr().out
    assert promote_main(["--experiment", "isc", "--ground-truth", str(gt)]) == 0  # nothing new to do
    assert "already @champion" in capsys.readouterr().out

    # A copy of reference R000007: downscaled and re-encoded, under a query id of its own.
    references = dict(mini_data.images("reference"))
    queries = tmp_path / "queries"
    queries.mkdir()
    with Image.open(references["R000007"]) as im:
        im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4)).save(queries / "Qcopy.jpg", quality=70)

    index, out_csv = tmp_path / "search" / "ref.index", tmp_path / "search" / "matches.csv"
    cmd = [sys.executable, "-m", "entrypoints.search", "--model", "models:/isc-descriptor@champion",
           "--references", str(mini_data.reference_dir), "--queries", str(queries), "--index", str(index),
           "--output", str(out_csv), "--topk", "3"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONPATH": str(PROJECT)}
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "models:/isc-descriptor/1 (built index" in first.stdout
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["query_id"] for r in rows] == ["Qcopy"] * 3
    assert rows[0]["reference_id"] == "R000007"  # top-1 is the copied reference
    assert float(rows[0]["score"]) > float(rows[1]["score"])
    assert index.is_file() and Path(f"{index}.ids.txt").read_text().split() == sorted(references)

    # the output exists now: refused without --overwrite (nothing silently replaced), reused index with it
    refused = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "already exists; pass --overwrite" in refused.stderr, refused.stderr[-3000:]
    second = subprocess.run(cmd + ["--overwrite", "true"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(reused index" in second.stdout
