"""make_mini: DISC21 layout, disjoint pools and splits, distractors, determinism, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isc.data.images import load_image
from isc.data.mini import MANIFEST, SIZES, TRAIN_ONLY_PHOTOS, make_mini
from isc.data.regions import partition
from isc.errors import ConfigError
from isc.io import read_ground_truth

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The demo's size (val and test at photo sizes), built once: ~3 s."""
    return make_mini(tmp_path_factory.mktemp("mini_default") / "mini", seed=0, size="default")


@pytest.fixture(params=["tiny", "default"])
def any_data(request):
    return request.getfixturevalue("mini_data" if request.param == "tiny" else "default_data")


def test_tiny_dataset_has_disc21_layout_and_ids(mini_data):
    spec = SIZES["tiny"]
    q = mini_data.images("query")
    r = mini_data.images("reference")
    t = mini_data.images("train")
    assert [i for i, _ in q] == [f"Q{i:05d}" for i in range(spec.n_queries)]
    assert [i for i, _ in r] == [f"R{i:06d}" for i in range(spec.n_references)]
    assert [i for i, _ in t] == [f"T{i:06d}" for i in range(spec.n_train)]
    for _, path in r[:5] + t[:5]:
        img = load_image(path)
        assert max(img.size) == spec.long_side
    for _, path in q:
        assert max(load_image(path).size) <= spec.long_side
    gt = read_ground_truth(mini_data.ground_truth())
    assert gt.queries == [i for i, _ in q]
    ref_ids = {i for i, _ in r}
    assert {ref for _, ref in gt.positives} <= ref_ids


def test_query_splits_are_disjoint_and_each_has_positives_and_distractors(mini_data):
    full = read_ground_truth(mini_data.ground_truth())
    seen: set[str] = set()
    for split in ("train", "val", "test"):
        gt = read_ground_truth(mini_data.ground_truth(split))
        assert not seen & set(gt.queries), f"{split} shares queries with another split"
        seen |= set(gt.queries)
        assert gt.n_positives >= 1
        assert len(gt.queries) - gt.n_positives >= 1
        assert gt.positives <= full.positives
    assert seen == set(full.queries)


def test_distractor_fraction_is_between_20_and_50_percent_and_most_references_never_queried(mini_data):
    gt = read_ground_truth(mini_data.ground_truth())
    frac = 1 - gt.n_positives / len(gt.queries)
    assert 0.2 <= frac <= 0.5
    queried = {r for _, r in gt.positives}
    assert len(queried) < len(mini_data.images("reference")) / 2


def test_pools_come_from_pairwise_non_overlapping_photo_regions(any_data):
    m = _manifest(any_data.root)
    regions = list(m["references"].values()) + list(m["training"].values()) + m["partners"]
    # a distractor source may be copied by several queries (held-out splits at photo sizes): one region
    regions += sorted({tuple(v["source"]) for v in m["queries"].values() if v["reference"] is None})
    assert len(regions) == len({tuple(x) for x in regions})
    by_photo: dict[int, list] = {}
    for photo, *rect in regions:
        by_photo.setdefault(photo, []).append(rect)
    for rects in by_photo.values():
        a = np.array(rects)
        for i in range(len(a)):
            x0, y0, x1, y1 = a[i]
            ox = np.minimum(x1, a[i + 1 :, 2]) - np.maximum(x0, a[i + 1 :, 0])
            oy = np.minimum(y1, a[i + 1 :, 3]) - np.maximum(y0, a[i + 1 :, 1])
            assert not ((ox > 0) & (oy > 0)).any()


def test_val_and_test_queries_copy_photos_no_training_image_was_cut_from(any_data):
    m = _manifest(any_data.root)
    train_photos = {photo for photo, *_ in m["training"].values()} | {photo for photo, *_ in m["partners"]}
    split_of = {q: split for split, qids in m["splits"].items() for q in qids}
    held_out_photos: set[int] = set()
    for qid, q in m["queries"].items():
        photo = q["source"][0]
        if q["reference"] is not None:
            assert m["references"][q["reference"]][0] == photo  # a positive copies its reference's photo
        assert q["split"] == split_of[qid]
        if split_of[qid] in ("val", "test"):
            held_out_photos.add(photo)
    assert held_out_photos and not held_out_photos & train_photos
    # every split has its own photos; a photo's tiles never serve two splits
    groups = {k: {m["photos"].index(p) for p in v} for k, v in m["photo_splits"].items()}
    assert all(groups.values()) and not (groups["val"] & groups["test"]) and not (groups["train"] & groups["test"])
    assert train_photos <= groups["train"]


def test_positive_queries_differ_from_their_reference_pixelwise(mini_data):
    gt = read_ground_truth(mini_data.ground_truth())
    different = 0
    for q, r in gt.positives:
        qi = load_image(mini_data.query_dir / f"{q}.jpg")
        ri = load_image(mini_data.reference_dir / f"{r}.jpg").resize(qi.size)
        diff = np.abs(np.asarray(qi, dtype=np.float32) - np.asarray(ri, dtype=np.float32)).mean()
        different += diff > 8.0  # mean absolute difference in grey levels (0-255)
    assert different >= 0.8 * gt.n_positives


def test_queries_use_varied_edit_chains_of_one_to_four_edits(mini_data):
    m = _manifest(mini_data.root)
    chains = [v["edits"] for v in m["queries"].values()]
    assert all(1 <= len(c) <= 4 for c in chains)
    assert len({e for c in chains for e in c}) >= 12


def test_default_val_and_test_are_photos_at_native_size_each_copied_several_times(default_data):
    """Issue 19: held-out images at photo sizes (native pixels, 192-512 px), not 256-px upscaled tiles."""
    m = _manifest(default_data.root)
    lo, hi = SIZES["default"].heldout_side
    split_of_ref = {q["reference"]: q["split"] for q in m["queries"].values() if q["reference"]}
    by_split: dict[str, list[str]] = {}
    for rid, (_, x0, y0, x1, y1) in m["references"].items():
        size = load_image(default_data.reference_dir / f"{rid}.jpg").size
        split = split_of_ref.get(rid, "train")  # unqueried references are the train split's
        by_split.setdefault(split, []).append(rid)
        if split == "train":
            assert max(size) == SIZES["default"].long_side
        elif max(x1 - x0, y1 - y0) <= hi:
            assert size == (x1 - x0, y1 - y0)  # the photo's own pixels, never resized
        else:
            assert max(size) == hi and max(x1 - x0, y1 - y0) > hi  # only ever downscaled
        if split != "train":
            assert lo <= max(size) <= hi
    for split in ("val", "test"):
        qids = m["splits"][split]
        assert len(qids) == 90
        per_ref: dict[str, int] = {}
        per_source: dict[tuple, int] = {}
        for q in qids:
            v = m["queries"][q]
            if v["reference"]:
                per_ref[v["reference"]] = per_ref.get(v["reference"], 0) + 1
            else:
                per_source[tuple(v["source"])] = per_source.get(tuple(v["source"]), 0) + 1
            assert max(load_image(default_data.query_dir / f"{q}.jpg").size) <= hi
        # every held-out reference is queried, each about equally often, several times over
        assert sorted(per_ref) == sorted(by_split[split])
        assert max(per_ref.values()) - min(per_ref.values()) <= 1 and min(per_ref.values()) >= 2
        assert max(per_source.values()) - min(per_source.values()) <= 1 and sum(per_source.values()) == 32
        assert len(per_ref) >= 5 and len(per_source) >= 2
    # val and test are everyday photographs: the telescope, microscope and scanner images train only
    held_out = {Path(p).name for k in ("val", "test") for p in m["photo_splits"][k]}
    assert held_out and not held_out & TRAIN_ONLY_PHOTOS
    assert TRAIN_ONLY_PHOTOS <= {Path(p).name for p in m["photo_splits"]["train"]}
    # the reference set still holds many never-queried references (the train split's)
    queried = {v["reference"] for v in m["queries"].values() if v["reference"]}
    assert len(m["references"]) - len(queried) >= 50


def test_partition_tiles_the_photo_exactly_without_overlap():
    import random

    rects = partition(300, 200, 40, random.Random(3))
    cover = np.zeros((200, 300), dtype=np.int32)
    for x0, y0, x1, y1 in rects:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert len(rects) > 10


def _photo_folder(root: Path, n: int = 6) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        # smooth random colour fields: never flat, never alike
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((720, 540), Image.Resampling.BICUBIC).save(root / f"p{i}.png")
    (root / "notes.txt").write_text("not a photo")
    return root


def test_same_seed_gives_identical_dataset_and_other_seed_differs(tmp_path):
    src = _photo_folder(tmp_path / "photos")
    a = make_mini(tmp_path / "a", source=src, seed=5, size="tiny")
    b = make_mini(tmp_path / "b", source=src, seed=5, size="tiny")
    c = make_mini(tmp_path / "c", source=src, seed=6, size="tiny")
    assert a.ground_truth().read_text() == b.ground_truth().read_text()
    for split in ("query", "reference", "train"):
        for (ia, pa), (ib, pb) in zip(a.images(split), b.images(split), strict=True):
            assert ia == ib and pa.read_bytes() == pb.read_bytes()
    assert a.ground_truth().read_text() != c.ground_truth().read_text()


def test_source_folder_without_images_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "no_photos"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(ConfigError, match="no_photos"):
        make_mini(tmp_path / "out", source=empty, size="tiny")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial").exists()


def test_refuses_to_overwrite_a_non_empty_output_unless_asked(tmp_path):
    src = _photo_folder(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="overwrite"):
        make_mini(out, source=src, size="tiny")
    assert (out / "precious.txt").read_text() == "keep me"
    make_mini(out, source=src, size="tiny", overwrite=True)
    assert not (out / "precious.txt").exists()
    assert (out / "ground_truth_test.csv").is_file()


def test_unknown_size_is_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="size"):
        make_mini(tmp_path / "out", size="huge")
    assert not (tmp_path / "out").exists()


def test_cli_builds_dataset_and_reports_counts(tmp_path):
    src = _photo_folder(tmp_path / "photos")
    out = tmp_path / "cli_out"
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "data", "make-mini", "--source", str(src), "--out", str(out),
         "--seed", "1", "--size", "tiny"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"n_queries={SIZES['tiny'].n_queries}" in proc.stdout
    assert (out / "ground_truth_val.csv").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "entrypoints.make_mini", "make-mini", "--source", str(tmp_path / "missing"),
         "--out", str(tmp_path / "x"), "--size", "tiny"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "error: source:" in bad.stderr and "missing" in bad.stderr


def test_entrypoint_logs_counts_to_mlflow_when_tracked(tmp_path, tracking):
    import mlflow

    from entrypoints.make_mini import main

    src = _photo_folder(tmp_path / "photos")
    assert main(["make-mini", "--source", str(src), "--out", str(tmp_path / "o"), "--size", "tiny",
                 "--track", "true"]) == 0  # fmt: skip
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["size"] == "tiny"
    assert run.data.metrics["n_queries"] == SIZES["tiny"].n_queries
    assert run.data.metrics["n_references"] == SIZES["tiny"].n_references
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "data")}
    assert "data/ground_truth_test.csv" in arts


def test_two_make_mini_at_once_on_one_out_leave_one_complete_dataset(tmp_path):
    """Two ``isc data make-mini --out o`` at once both failed and built nothing: they shared ``o.partial``,
    each deleting the other's. Now each builds in its own folder and one rename wins; the other exits 0 or
    with one line naming ``out``. A killed build's folder (dead pid) is removed."""
    import os
    import socket

    out = tmp_path / "o"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".o.@{socket.gethostname()}@{dead.pid}.abcdefgh.partial"
    (stale / "query_images").mkdir(parents=True)
    cmd = [sys.executable, "-m", "entrypoints.cli", "data", "make-mini", "--out", str(out), "--size", "tiny"]
    env = {**os.environ, "ISC_HOME": str(tmp_path), "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in done)[0] == 0, [err[-2000:] for _, err in done]
    for rc, err in done:
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert rc == 0 or (rc == 2 and len(errors) == 1 and errors[0].startswith(f"error: out: {out} ")), err[-2000:]
    assert len(_manifest(out)["queries"]) == SIZES["tiny"].n_queries and (out / "ground_truth_val.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_250_byte_out_name_is_built_and_overwritten(tmp_path):
    """``--out <250 bytes>`` failed 'File name too long' on ``<out>.partial``, and --overwrite on its
    ``<out>.old-<pid>`` swap folder: both temporaries now fit wherever the name itself fits."""
    import os

    out = tmp_path / ("m" * 250)
    cmd = [sys.executable, "-m", "entrypoints.cli", "data", "make-mini", "--out", str(out), "--size", "tiny"]
    env = {**os.environ, "ISC_HOME": str(tmp_path), "PYTHONPATH": str(PROJECT_ROOT)}
    for extra in ([], ["--overwrite", "true"]):
        proc = subprocess.run(cmd + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (out / "ground_truth_val.csv").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
