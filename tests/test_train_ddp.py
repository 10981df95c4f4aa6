"""Two-process DDP training under torchrun (gloo on CPU): one MLflow run, identical XBM banks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from isc.models import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_rank_torchrun_logs_one_run_and_keeps_xbm_banks_identical(tracking, mini_data, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "entrypoints.train", "--data", str(mini_data.root), "--backbone", "test_efficientnet",
           "--input-size", "32", "--batch-size", "4", "--memory-size", "64", "--workers", "0",
           "--epochs", "2", "--max-steps-per-epoch", "2", "--log-every-steps", "1", "--output-dir", str(out),
           "--experiment-name", "ddp", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["world_size"] == "2" and run.data.params["per_rank_batch"] == "2"
    client = mlflow.MlflowClient()
    # the global batch (2 ranks x 2 items x 2 views) is enqueued on every rank ...
    fill = [m.value for m in client.get_metric_history(run.info.run_id, "xbm_fill")]
    assert fill == [8.0, 16.0, 24.0, 32.0]
    # ... so after every epoch all ranks hold bit-identical banks
    diffs = client.get_metric_history(run.info.run_id, "xbm_rank_max_abs_diff")
    assert [m.step for m in diffs] == [0, 1] and all(m.value == 0.0 for m in diffs)
    ckpt = load_checkpoint(out / "checkpoints" / "checkpoint_0001.pth.tar")
    assert ckpt["xbm"]["_extra_state"]["queue_idx"] == 32 and ckpt["mlflow_run_id"] == run.info.run_id
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
