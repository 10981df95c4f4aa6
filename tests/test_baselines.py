"""Baseline descriptors on real photographs, and ``isc baseline`` end to end on the mini dataset."""

from __future__ import annotations

import io
import json

import h5py
import mlflow
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from entrypoints import baseline as baseline_ep
from isc.baselines import METHODS, compute_descriptors, get_method, thumbnail_vector
from isc.errors import BadImagesError, ConfigError


def _edited_copy(img: Image.Image) -> Image.Image:
    """Half-size, JPEG quality 40, slight brightness change: a typical mild copy edit."""
    small = img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.point(lambda v: min(255, int(v * 1.1))).save(buf, format="JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_edited_copy_is_closer_to_its_source_than_to_unrelated_photos(method):
    fn = get_method(method)
    source = Image.fromarray(skdata.astronaut())
    others = [
        Image.fromarray(skdata.chelsea()),
        Image.fromarray(skdata.coffee()),
        Image.fromarray(skdata.rocket()),
    ]
    copy = fn(_edited_copy(source))
    d_source = float(((copy - fn(source)) ** 2).sum())
    d_others = [float(((copy - fn(o)) ** 2).sum()) for o in others]
    assert copy.dtype == np.float32
    assert np.linalg.norm(copy) == pytest.approx(1.0, abs=1e-5)
    assert d_source < min(d_others), (d_source, d_others)


def test_thumbnail_of_a_flat_image_is_the_zero_vector():
    v = thumbnail_vector(Image.new("RGB", (40, 30), (90, 90, 90)))
    assert v.shape == (256,) and not v.any()


def test_unreadable_images_are_all_reported_and_unknown_methods_rejected(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(skdata.camera()).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(BadImagesError, match="2 unreadable") as e:
        compute_descriptors([good, tmp_path / "empty.jpg", tmp_path / "text.jpg"], "phash")
    assert "empty.jpg" in str(e.value) and "text.jpg" in str(e.value)
    with pytest.raises(ConfigError, match="method"):
        get_method("sift")


@pytest.mark.slow
def test_baseline_cli_writes_h5_and_logs_an_evaluation_on_the_mini_test_split(
    tracking, mini_data, tmp_path, capsys
):
    out_dir = tmp_path / "baseline"
    rc = baseline_ep.main(
        ["--data", str(mini_data.root), "--method", "thumbnail", "--output-dir", str(out_dir)]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    with h5py.File(out_dir / "thumbnail.h5") as f:
        assert f["query"].shape[1] == 256 and f["reference"].dtype == np.float32
        n_queries = f["query"].shape[0]
    test_gt = mini_data.ground_truth("test")
    n_test = len({line.split(",")[0] for line in test_gt.read_text().splitlines()[1:] if line})
    assert out["n_queries"] == n_test < n_queries  # scored on the held-out split only
    assert 0.0 <= out["average_precision"] <= 1.0 and out["n_predictions"] > 0
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.tags["isc.step"] == "baseline" and run.data.tags["isc.baseline"] == "thumbnail"
    assert run.data.tags["isc.gt_path"].endswith("ground_truth_test.csv")
    assert run.data.metrics["average_precision"] == pytest.approx(out["average_precision"])
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/gallery.png" in arts and "evaluation/metrics.json" in arts
