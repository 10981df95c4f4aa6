"""Training faults: divergence, unreadable images, bad parameters, and a SIGKILLed process resumed."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from entrypoints.cli import run_entrypoint
from isc.models import load_checkpoint
from isc.train import TrainingDivergedError, load_config, train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(backbone="test_efficientnet", input_size=32, batch_size=4, memory_size=64, workers=0,
            max_steps_per_epoch=2, log_every_steps=1, stage="smoke", seed=5, lr=0.05)


def test_nan_loss_ends_run_failed_with_reason_and_keeps_last_good_checkpoint(tracking, mini_data):
    good = train(load_config(None, data=str(mini_data.root), epochs=1, **TINY))
    # lr 1e30 blows the weights up on the first step: the next loss is NaN
    with pytest.raises(TrainingDivergedError, match="loss is nan") as err:
        train(load_config(None, data=str(mini_data.root), epochs=3, resume_from=good.checkpoint_path,
                          output_dir=str(Path(good.checkpoint_path).parent.parent), **{**TINY, "lr": 1e30}))
    assert good.checkpoint_path in str(err.value)
    failed = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FAILED'",
                                output_format="list")
    assert len(failed) == 1 and "loss is nan" in failed[0].data.tags["isc.error"]
    assert failed[0].data.tags["isc.resumed_from_run"] == good.run_id
    # no checkpoint of the diverged weights was written; the good one still loads
    ckpt_dir = Path(good.checkpoint_path).parent
    assert sorted(p.name for p in ckpt_dir.glob("*.pth.tar")) == ["checkpoint_0000.pth.tar"]
    assert load_checkpoint(good.checkpoint_path)["epoch"] == 1


def test_unreadable_training_image_is_skipped_counted_and_named(tracking, mini_data, tmp_path, caplog):
    root = tmp_path / "data"
    (root / "training_images").mkdir(parents=True)
    for _, p in mini_data.images("train")[:7]:
        shutil.copy(p, root / "training_images" / p.name)
    (root / "training_images" / "T999999.jpg").write_bytes(b"")  # zero-byte file
    with caplog.at_level(logging.WARNING, logger="isc.train.loop"):
        result = train(load_config(None, data=str(root), epochs=1, **TINY))
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["bad_images"] == 1.0
    assert "T999999.jpg" in caplog.text


BAD_PARAMETERS = [
    (["--neg-margin", "-1"], "neg_margin"),
    (["--memory-size", "0"], "memory_size"),
    (["--memory-size", "6"], "memory_size"),  # smaller than one batch of 4 items x 2 views
    (["--backbone", "tf_efficientnetv2_mm"], "backbone"),
    (["--input-size", "0"], "input_size"),
    (["--data", "/nonexistent/isc-data"], "data"),
    (["--stage", "stage4", "--pairs", "/nonexistent/pairs.csv"], "pairs"),
    (["--stage", "v107", "--pairs", "VAL"], "pairs"),  # (v107: stage4's old name, still read)  # the held-out split must never be trained on
    (["--resume-from", "/nonexistent/checkpoint_0001.pth.tar"], "resume_from"),
    (["--init-from", "0123456789abcdef0123456789abcdef"], "init_from"),
    (["--keep-checkpoints", "-1"], "keep_checkpoints"),
    (["--keep-checkpoints", "many"], "keep_checkpoints"),  # a number, or all
    (["--keep-epochs", "4,x"], "keep_epochs"),
]


def test_bad_parameters_are_clear_errors_and_open_no_run(tracking, mini_data, capsys):
    base = ["--data", str(mini_data.root), "--backbone", "test_efficientnet", "--input-size", "32",
            "--batch-size", "4", "--memory-size", "64", "--workers", "0", "--epochs", "1"]
    for argv, param in BAD_PARAMETERS:
        argv = [a.replace("VAL", str(mini_data.ground_truth("val"))) for a in argv]
        assert run_entrypoint("entrypoints.train", base + argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {param}:"), (argv, errors)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.slow
def test_sigkilled_training_resumes_from_its_run_id_in_the_same_run(tracking, mini_data, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "entrypoints.train", "--data", str(mini_data.root), "--backbone",
           "test_efficientnet", "--input-size", "32", "--batch-size", "4", "--memory-size", "64",
           "--workers", "0", "--epochs", "3", "--max-steps-per-epoch", "5", "--checkpoint-every-steps", "1",
           "--keep-checkpoints", "50", "--output-dir", str(out), "--experiment-name", "kill"]
    # keep every checkpoint (none is pruned before the poll below sees it) and leave steps to kill in:
    # on an idle machine the whole run takes ~2 s
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # step 2's file on disk means step 1's checkpoint was already uploaded (uploads follow each write)
    target = out / "checkpoints" / "checkpoint_0000-step000002.pth.tar"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert target.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(killed) == 1 and killed[0].info.status == "RUNNING"
    run_id = killed[0].info.run_id
    # resume by run id alone: the latest uploaded checkpoint and its saved config are used
    done = subprocess.run([sys.executable, "-m", "entrypoints.train", "--resume-from", run_id], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    final = load_checkpoint(out / "model" / "final.pth.tar")
    assert final["epoch"] == 3 and final["mlflow_run_id"] == run_id
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "epoch_loss")]
    assert steps == [0, 1, 2]


def test_resume_logs_the_finished_epochs_metrics_a_crash_kept_from_the_run_once(tracking):
    """Killed between the epoch-end checkpoint and the metric upload: the resume logs them, once."""
    from isc.train.listeners import log_missing_epoch_metrics

    checkpoint = {"epoch": 1, "step": 0, "metrics": {"epoch_loss": 0.75, "epoch_time_s": 2.0}}
    with mlflow.start_run() as run:
        log_missing_epoch_metrics(run.info.run_id, checkpoint, start_epoch=1, start_step=0)
        log_missing_epoch_metrics(run.info.run_id, checkpoint, start_epoch=1, start_step=0)
        log_missing_epoch_metrics(run.info.run_id, {**checkpoint, "step": 2}, start_epoch=1, start_step=2)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "epoch_loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.75)]
