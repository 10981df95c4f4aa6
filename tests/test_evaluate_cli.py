"""``isc evaluate`` and ``isc match`` end to end: real SQLite MLflow store, real h5/CSV/PNG files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import fields

import mlflow
import numpy as np
import pytest
from PIL import Image

from entrypoints import evaluate as evaluate_ep
from entrypoints import match as match_ep
from entrypoints.cli import run_entrypoint
from isc.io import read_ground_truth, write_descriptors, write_ground_truth
from isc.metrics import Metrics, ground_truth_fingerprint
from tests.conftest import PROJECT_ROOT

NQ, NR = 6, 20


@pytest.fixture
def eval_inputs(tmp_path):
    """A DISC21-shaped folder (tiny PNGs), a GT with 4 positives + 2 distractors, two descriptor files."""
    rng = np.random.default_rng(0)
    qids, rids = [f"Q{i:05d}" for i in range(NQ)], [f"R{i:06d}" for i in range(NR)]
    ref = rng.normal(size=(NR, 16)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    good = ref[:NQ] + 0.05 * rng.normal(size=(NQ, 16)).astype(np.float32)  # Q0..Q3 copy R0..R3
    good[4:] = 3 * rng.normal(size=(NQ - 4, 16))  # distractor queries: far from every reference
    bad = rng.normal(size=(NQ, 16)).astype(np.float32)  # unrelated descriptors
    root = tmp_path / "data"
    for folder, ids in (("query_images", qids), ("reference_images", rids)):
        (root / folder).mkdir(parents=True)
        for k, i in enumerate(ids):
            Image.new("RGB", (24, 16), (10 * k % 255, 80, 160)).save(root / folder / f"{i}.png")
    gt = write_ground_truth(
        root / "ground_truth.csv", [(qids[i], rids[i] if i < 4 else None) for i in range(NQ)]
    )
    after = write_descriptors(tmp_path / "after.h5", good, qids, ref, rids)
    before = write_descriptors(tmp_path / "before.h5", bad, qids, ref, rids)
    return {"root": root, "gt": gt, "after": after, "before": before}


def _only_evaluate_run():
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`isc.step` = 'evaluate'", output_format="list"
    )
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_evaluate_cli_logs_metrics_tags_and_artifacts(tracking, eval_inputs, capsys, tmp_path):
    with mlflow.start_run() as producer:  # --before comes from an MLflow artifact URI
        mlflow.log_artifact(str(eval_inputs["before"]), artifact_path="descriptors")
    rc = evaluate_ep.main(
        [
            "--descriptors", str(eval_inputs["after"]),
            "--ground-truth", str(eval_inputs["gt"]),
            "--before", f"runs:/{producer.info.run_id}/descriptors/before.h5",
            "--data", str(eval_inputs["root"]),
            "--model-ref", "abc123",
            "--nes_bank", "runs:/xyz/descriptors/train_descriptors.h5",
            "--experiment-name", "eval-test",
            "--output-dir", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else
    # Q0..Q3 are near-copies of R0..R3: each is its query's nearest reference and ranks above
    # every wrong pair, so the official scorer gives a perfect score.
    assert out["average_precision"] == pytest.approx(1.0)
    assert out["recall_p90"] == pytest.approx(1.0)
    assert out["recall_at_rank1"] == pytest.approx(1.0)
    assert out["n_queries"] == NQ and out["n_positives"] == 4
    assert out["n_predictions"] == 10 * NQ
    assert out["before"]["average_precision"] < 0.5
    # Query bootstrap: a perfect ranking stays perfect on every resample; the paired gain over the
    # unrelated descriptors is positive whenever a resample draws a positive query.
    assert (out["average_precision_ci_low"], out["average_precision_ci_high"]) == (1.0, 1.0)
    assert out["before"]["average_precision_ci_low"] <= out["before"]["average_precision"]
    assert out["gain_ci_low"] > 0 and out["p_gain"] > 0.95
    assert out["bootstrap"] == {"replicates": 1000, "confidence": 0.95, "queries": NQ}
    run = _only_evaluate_run()
    m, tags, params = run.data.metrics, run.data.tags, run.data.params
    assert m["average_precision"] == pytest.approx(out["average_precision"])
    assert m["before_average_precision"] == pytest.approx(out["before"]["average_precision"])
    assert m["n_predictions"] == 60
    # every field of Metrics is printed and, where it has a value, logged (as before_<name> for --before)
    names = [f.name for f in fields(Metrics)]
    assert len(names) >= 8 and set(names) <= set(out) and set(names) <= set(out["before"])
    assert {k for k in names if out[k] is not None} <= set(m)
    assert {f"before_{k}" for k in names if out["before"][k] is not None} <= set(m)
    assert m["average_precision_ci_low"] == 1.0 and m["p_gain"] == pytest.approx(out["p_gain"])
    assert m["before_average_precision_ci_high"] == pytest.approx(out["before"]["average_precision_ci_high"])
    assert tags["isc.step"] == "evaluate"
    assert tags["isc.protocol"] == "official"
    assert tags["isc.model_ref"] == "abc123"
    assert tags["isc.nes_bank"] == "runs:/xyz/descriptors/train_descriptors.h5"
    assert tags["isc.gt_fingerprint"] == ground_truth_fingerprint(read_ground_truth(eval_inputs["gt"]))
    assert tags["isc.gt_path"].endswith("ground_truth.csv")
    assert params["eval.protocol"] == "official"
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert names == {"evaluation/metrics.json", "evaluation/pr_curve.png", "evaluation/gallery.png"}
    local = client.download_artifacts(run.info.run_id, "evaluation/metrics.json", str(tmp_path))
    assert json.loads(open(local).read())["average_precision"] == pytest.approx(1.0)
    png = client.download_artifacts(run.info.run_id, "evaluation/gallery.png", str(tmp_path))
    assert Image.open(png).size[1] > 200  # several rows of thumbnails
    assert (tmp_path / "out" / "pr_curve.png").is_file()


def test_evaluate_bad_input_prints_error_line_and_opens_no_run(tracking, eval_inputs, tmp_path, capsys):
    gt = write_ground_truth(tmp_path / "gt_bad.csv", [("Q00000", "R000000"), ("Q99999", None)])
    rc = run_entrypoint(
        "entrypoints.evaluate", ["--descriptors", str(eval_inputs["after"]), "--ground-truth", str(gt)]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and "Q99999" in err and "after.h5" in err
    rc = run_entrypoint(
        "entrypoints.evaluate", ["--descriptors", str(tmp_path / "nope.h5"), "--ground-truth", str(gt)]
    )
    assert rc == 2 and "nope.h5" in capsys.readouterr().err
    assert not (tmp_path / "isc_home" / "mlflow.db").exists()  # validation failed before any run opened


def test_evaluate_module_reports_a_missing_ground_truth_as_one_error_line(tmp_path, eval_inputs):
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.evaluate", "--descriptors", str(eval_inputs["after"]),
         "--ground-truth", str(tmp_path / "missing.csv")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "ISC_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "error:" in proc.stderr and "missing.csv" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_match_cli_writes_capped_best_first_csv_and_logs_row_count(tracking, eval_inputs, tmp_path, capsys):
    out_csv = tmp_path / "preds.csv"
    with mlflow.start_run() as run:
        rc = match_ep.main(
            ["--descriptors", str(eval_inputs["after"]), "--output", str(out_csv), "--max-results", "25"]
        )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["n_matches"] == 25
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 25
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and max(scores) <= 0
    assert len({(r["query_id"], r["reference_id"]) for r in rows}) == 25
    assert (rows[0]["query_id"], rows[0]["reference_id"]) in {(f"Q{i:05d}", f"R{i:06d}") for i in range(NQ)}
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["n_matches"] == 25
    with pytest.raises(Exception, match="500000"):
        match_ep.main(
            ["--descriptors", str(eval_inputs["after"]), "--output", str(out_csv), "--max-results", "600000"]
        )


@pytest.mark.slow
def test_relative_model_ref_is_stored_absolute_so_promote_works_from_another_folder(
        tracking, eval_inputs, tmp_path, monkeypatch, capsys):
    """``--model-ref train/model.pth.tar`` given in one folder, ``isc promote`` run from another: the
    evaluation recorded the path as typed, and promote failed 'no such file'."""
    import torch

    from isc.models import create_model, save_checkpoint

    torch.manual_seed(0)
    (tmp_path / "train").mkdir()
    ckpt = save_checkpoint(tmp_path / "train" / "model.pth.tar",
                           create_model("test_efficientnet", pretrained=False, input_size=32), epoch=0)
    monkeypatch.chdir(tmp_path)
    rc = run_entrypoint("entrypoints.evaluate", ["--descriptors", str(eval_inputs["after"]), "--ground-truth",
                                                 str(eval_inputs["gt"]), "--bootstrap", "0",
                                                 "--model-ref", "train/model.pth.tar"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert _only_evaluate_run().data.tags["isc.model_ref"] == str(ckpt.resolve())
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    rc = run_entrypoint("entrypoints.promote", ["--ground-truth", str(eval_inputs["gt"]), "--model-name", "rel"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert [v.version for v in mlflow.MlflowClient().search_model_versions("name = 'rel'")] == [1]


@pytest.mark.parametrize(("flag", "env"), [("e" * 300, None), (None, "é" * 101)], ids=["flag", "env_utf8"])
def test_experiment_name_too_long_for_its_artifact_folder_is_refused_before_any_run(
        tracking, eval_inputs, monkeypatch, capsys, flag, env):
    """A 300-character name: the run ended FINISHED with exit 0 while every upload failed ENAMETOOLONG
    (warnings only). Now one line naming where the name came from; a 200-byte name still stores artifacts."""
    from mlflow.entities import ViewType

    if env:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", env)
    base = ["--descriptors", str(eval_inputs["after"]), "--ground-truth", str(eval_inputs["gt"]), "--bootstrap", "0"]
    rc = run_entrypoint("entrypoints.evaluate", base + (["--experiment-name", flag] if flag else []))
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: --experiment-name:" if flag else "error: MLFLOW_EXPERIMENT_NAME:"), errors[0]
    assert "202 bytes" in errors[0] if env else "300 bytes" in errors[0], errors[0]
    assert mlflow.search_runs(search_all_experiments=True, run_view_type=ViewType.ALL, output_format="list") == []
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert run_entrypoint("entrypoints.evaluate", base + ["--experiment-name", "e" * 200]) == 0
    assert "evaluation/metrics.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(_only_evaluate_run().info.run_id,
                                                                                  "evaluation")}
