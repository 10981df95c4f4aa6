"""Descriptor extraction: file format, streamed == in-memory vectors, bad images, the CLI step."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch

from entrypoints import extract as extract_entry
from isc.data.disc21 import DISC21
from isc.data.images import load_image
from isc.errors import BadImagesError, ConfigError
from isc.extract.decode import eval_transform_for
from isc.extract.describe import describe_images, describe_tensors
from isc.extract.sharded import SHARD_DIR, extract_descriptors_sharded
from isc.extract.streamed import ExtractRequest, extract_descriptors
from isc.io import read_descriptors, read_train_descriptors
from isc.models import create_model, save_checkpoint

SIZE = 48  # tiny images keep every forward pass in milliseconds


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("test_efficientnet", pretrained=False, input_size=SIZE).eval()


@pytest.fixture(scope="module")
def extracted(model, mini_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("extract")
    res = extract_descriptors(model, mini_data, "qrt", out, batch_size=16, workers=2)
    return res, out


def _small_copy(src: DISC21, dst: Path, n: int = 6) -> DISC21:
    """A DISC21 folder with the first ``n`` images of each split (bad files get added to it)."""
    for split in ("query", "reference", "train"):
        folder = dst / src.split_dir(split).name
        folder.mkdir(parents=True)
        for _, p in src.images(split)[:n]:
            shutil.copy(p, folder / p.name)
    return DISC21(dst)


def _add_bad_images(data: DISC21) -> list[Path]:
    good = data.images("query")[0][1]
    zero = data.query_dir / "Q90000.jpg"
    zero.write_bytes(b"")
    truncated = data.reference_dir / "R900000.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    text = data.training_dir / "T900000.jpg"
    text.write_text("this is not a picture\n")
    return [zero, truncated, text]


def test_extraction_writes_isc21_format_with_sorted_ids_and_unit_float32_rows(extracted, mini_data):
    res, out = extracted
    desc = read_descriptors(out / "descriptors.h5")  # the format validator of isc.io
    train, train_ids = read_train_descriptors(out / "train_descriptors.h5")
    assert desc.query_ids == [i for i, _ in mini_data.images("query")]
    assert desc.reference_ids == [i for i, _ in mini_data.images("reference")]
    assert train_ids == [i for i, _ in mini_data.images("train")]
    assert desc.query_ids == sorted(desc.query_ids) and train_ids == sorted(train_ids)
    with h5py.File(out / "descriptors.h5") as f:
        assert f["query"].dtype == np.float32 and f["reference"].dtype == np.float32
        assert f["query"].shape == (40, 256)
        assert f.attrs["isc.input_size"] == SIZE
    for x in (desc.query, desc.reference, train):
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert res["counts"] == {"query": 40, "reference": 64, "train": 64}
    assert res["input_size"] == SIZE and res["dim"] == 256 and res["images_per_second"] > 0
    assert not list(out.glob("*.partial"))


def test_streamed_vectors_equal_an_in_memory_forward_pass(extracted, model, mini_data):
    _, out = extracted
    desc = read_descriptors(out / "descriptors.h5")
    paths = [p for _, p in mini_data.images("query")][:10]
    transform = eval_transform_for(model, SIZE)
    batch = torch.stack([transform(load_image(p)) for p in paths])
    with torch.inference_mode():
        direct = model(batch).numpy()
    np.testing.assert_allclose(desc.query[:10], direct, atol=1e-5)
    np.testing.assert_allclose(describe_images(model, paths, batch_size=3), direct, atol=1e-5)
    np.testing.assert_allclose(describe_tensors(model, batch), direct, atol=1e-5)


def test_extraction_uses_eval_mode_and_restores_the_callers_mode(model):
    net = create_model("test_efficientnet", pretrained=False, gem_p=3.0, gem_eval_p=1.0, input_size=SIZE)
    net.load_state_dict(model.state_dict())
    net.train()
    x = torch.rand(2, 3, SIZE, SIZE)
    got = describe_tensors(net, x)
    assert net.training  # restored
    with torch.inference_mode():
        want = model.eval()(x).numpy()  # same weights, eval GeM p = 1
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_tta_is_the_seeds_six_passes_three_scales_with_and_without_flip(model):
    """v107 --tta: images loaded at sqrt(2) x s; passes at s / sqrt(2), s and s x sqrt(2), each flipped too."""
    from isc.extract.describe import tta_load_size

    assert tta_load_size(SIZE) == round(SIZE * 2**0.5)
    x = torch.rand(3, 3, tta_load_size(SIZE), tta_load_size(SIZE))
    got = describe_tensors(model, x, tta=True)
    with torch.inference_mode():
        views = []
        for side in (round(SIZE / 2**0.5), SIZE, tta_load_size(SIZE)):
            xs = (
                x
                if side == x.shape[-1]
                else torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
            )
            views += [xs, torch.flip(xs, dims=[3])]
        assert len(views) == 6
        want = torch.nn.functional.normalize(sum(model(v) for v in views), dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, describe_tensors(model, x), atol=1e-3)


def test_query_only_extraction_writes_only_the_query_half(model, mini_data, tmp_path):
    res = extract_descriptors(model, mini_data, "q", tmp_path, batch_size=32, workers=0, limit=5)
    with h5py.File(tmp_path / "descriptors.h5") as f:
        assert set(f.keys()) == {"query", "query_ids"}
        assert f["query"].shape == (5, 256)
    assert not (tmp_path / "train_descriptors.h5").exists()
    assert res["train_descriptors"] is None and res["counts"] == {"query": 5}


def test_bad_images_fail_listing_every_one_and_leave_no_output(model, mini_data, tmp_path):
    data = _small_copy(mini_data, tmp_path / "data")
    bad = _add_bad_images(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "descriptors.h5").write_bytes(b"previous run")
    with pytest.raises(BadImagesError) as err:
        extract_descriptors(model, data, "qrt", out, batch_size=4, workers=0, overwrite=True)
    assert sorted(e.path.name for e in err.value.errors) == sorted(p.name for p in bad)
    for p in bad:
        assert str(p) in str(err.value)
    assert "0 bytes" in str(err.value) and "not a recognised image" in str(err.value)
    # Nothing new: the earlier file is untouched, no train file, no temp files.
    assert (out / "descriptors.h5").read_bytes() == b"previous run"
    assert sorted(p.name for p in out.iterdir()) == ["descriptors.h5"]


def test_skip_bad_images_leaves_them_out_and_lists_them(model, mini_data, tmp_path):
    data = _small_copy(mini_data, tmp_path / "data")
    bad = _add_bad_images(data)
    res = extract_descriptors(
        model, data, "qrt", tmp_path / "out", batch_size=4, workers=0, skip_bad_images=True
    )
    assert sorted(Path(p).name for p, _ in res["bad_images"]) == sorted(p.name for p in bad)
    desc = read_descriptors(res["descriptors"])
    assert "Q90000" not in desc.query_ids and "R900000" not in desc.reference_ids
    assert len(desc.query_ids) == 6 and res["counts"] == {"query": 6, "reference": 6, "train": 6}


def test_describe_images_raises_on_a_bad_file(model, tmp_path):
    p = tmp_path / "x.jpg"
    p.write_text("nope")
    with pytest.raises(BadImagesError, match="x.jpg"):
        describe_images(model, [p])


def test_bad_parameters_are_named(model, mini_data, tmp_path):
    for kwargs, param in [
        ({"sets": "qx"}, "sets"),
        ({"batch_size": 0}, "batch_size"),
        ({"workers": -1}, "workers"),
    ]:
        with pytest.raises(ConfigError) as err:
            extract_descriptors(model, mini_data, out_dir=tmp_path, **({"sets": "q"} | kwargs))
        assert err.value.param == param


def test_cli_extracts_from_a_checkpoint_and_logs_to_mlflow(model, mini_data, tmp_path, tracking):
    data = _small_copy(mini_data, tmp_path / "data", n=5)
    _add_bad_images(data)
    ckpt = save_checkpoint(tmp_path / "ckpt" / "checkpoint_0000.pth.tar", model, epoch=0, with_rng=False)
    out = tmp_path / "out"
    rc = extract_entry.main(
        [
            "--model",
            str(ckpt),
            "--data",
            str(data.root),
            "--output-dir",
            str(out),
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--skip-bad-images",
            "true",
        ]
    )
    assert rc == 0
    desc = read_descriptors(out / "descriptors.h5")
    np.testing.assert_allclose(
        desc.query, describe_images(model, [p for _, p in data.images("query")][:5]), atol=1e-5
    )
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["isc.step"] == "extract" and run.data.tags["isc.model_ref"] == str(ckpt)
    assert run.data.metrics["n_query"] == 5 and run.data.metrics["n_bad_images"] == 3
    assert run.data.metrics["images_per_second"] > 0
    assert run.data.params["resolved_input_size"] == str(SIZE)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "descriptors")}
    assert names == {
        "descriptors/descriptors.h5",
        "descriptors/train_descriptors.h5",
        "descriptors/bad_images.txt",
    }
    listing = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="descriptors/bad_images.txt"
    )
    assert "Q90000.jpg" in Path(listing).read_text()


def test_cli_bad_data_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        extract_entry.main(["--model", "x", "--data", str(tmp_path / "nowhere")])


# ---------------------------------------------------------------- issue 14: nothing lost, no crash


def _cli(argv: list[str]) -> tuple[int, str]:
    """The entry point as `isc extract` runs it: (exit status, stderr)."""
    import contextlib
    import io

    from entrypoints.cli import run_entrypoint

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_entrypoint("entrypoints.extract", argv)
    return rc, err.getvalue()


def test_eval_transform_equals_the_augment_modules_without_importing_augly(model, mini_data):
    from isc.data.augment import build_eval_transform

    img = load_image(mini_data.images("query")[0][1])
    want = build_eval_transform(SIZE, model.model_config["mean"], model.model_config["std"])(img)
    assert torch.equal(eval_transform_for(model, SIZE)(img), want)


def test_cli_refuses_to_replace_an_existing_output_unless_overwrite(model, mini_data, tmp_path, tracking):
    data = _small_copy(mini_data, tmp_path / "data", n=3)
    ckpt = save_checkpoint(tmp_path / "ckpt" / "checkpoint_0000.pth.tar", model, epoch=0, with_rng=False)
    out = tmp_path / "out"
    base = ["--model", str(ckpt), "--data", str(data.root), "--output-dir", str(out), "--workers", "0"]
    assert _cli(base + ["--sets", "qr"])[0] == 0
    full = (out / "descriptors.h5").read_bytes()
    rc, err = _cli(base + ["--sets", "q"])  # the issue: a query-only file replaced the full one, exit 0
    assert rc == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")][-1]
    assert str(out / "descriptors.h5") in line and "--overwrite" in line
    assert (out / "descriptors.h5").read_bytes() == full
    with pytest.raises(ConfigError, match="already exists"):  # the library refuses too
        extract_descriptors(model, data, "q", out, workers=0)
    assert _cli(base + ["--sets", "q", "--overwrite", "true"])[0] == 0
    with h5py.File(out / "descriptors.h5") as f:
        assert set(f.keys()) == {"query", "query_ids"}


def test_an_output_that_is_also_the_input_is_refused_even_with_overwrite(
    model, mini_data, tmp_path, tracking
):
    data = _small_copy(mini_data, tmp_path / "data", n=2)
    out = tmp_path / "out"
    ckpt = save_checkpoint(out / "train_descriptors.h5", model, epoch=0, with_rng=False)  # a silly name
    rc, err = _cli(["--model", str(ckpt), "--data", str(data.root), "--output-dir", str(out), "--overwrite"])
    assert rc == 2 and "both an input and an output" in err and str(ckpt) in err and "Traceback" not in err
    assert ckpt.stat().st_size > 0 and not (out / "descriptors.h5").exists()


def test_a_non_ascii_file_name_is_extracted_under_its_stem(model, mini_data, tmp_path):
    from isc.io import write_descriptors

    data = _small_copy(mini_data, tmp_path / "data", n=3)
    photo = data.images("query")[0][1]
    odd = data.query_dir / "Qé01.jpg"  # a real image, only its name is unusual
    shutil.copy(photo, odd)
    res = extract_descriptors(model, data, "qrt", tmp_path / "out", batch_size=2, workers=1)
    desc = read_descriptors(res["descriptors"])
    assert desc.query_ids[-1] == "Qé01" and len(desc.query_ids) == 4
    np.testing.assert_allclose(desc.query[-1], describe_images(model, [odd])[0], atol=1e-5)
    np.testing.assert_allclose(desc.query[-1], desc.query[0], atol=1e-5)  # same pixels as the original
    # Post-processing rewrites the ids: they must survive that round trip too.
    again = write_descriptors(
        tmp_path / "again.h5", desc.query, desc.query_ids, desc.reference, desc.reference_ids
    )
    assert read_descriptors(again).query_ids == desc.query_ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("world_size", ["1", "2"])
def test_device_cuda_without_a_gpu_is_a_clean_device_error(mini_data, tmp_path, monkeypatch, world_size):
    monkeypatch.setenv("WORLD_SIZE", world_size)  # "2": the torchrun path must fail before set_device
    rc, err = _cli(["--model", str(tmp_path / "m.pth.tar"), "--data", str(mini_data.root), "--device", "cuda",
                    "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: device: CUDA requested but no GPU is visible"
    ]
    with pytest.raises(ConfigError) as exc:
        extract_descriptors(
            torch.nn.Linear(2, 2), mini_data, "q", tmp_path / "o2", input_size=8, device="cuda"
        )
    assert exc.value.param == "device"


# ---------------------------------------------------------------- sharded extraction (torchrun)


def _arrays(out: Path) -> dict[str, np.ndarray]:
    got = {}
    for fname in ("descriptors.h5", "train_descriptors.h5"):
        with h5py.File(out / fname) as f:
            got |= {k: f[k][:] for k in f}
    return got


def _assert_same_files(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k  # bit-identical, same order


@pytest.mark.parametrize("tta", [False, True])
def test_sharded_extraction_in_one_process_writes_what_the_plain_one_writes(model, mini_data, tmp_path, tta):
    plain = extract_descriptors(model, mini_data, "qrt", tmp_path / "plain", batch_size=8, workers=0, tta=tta)
    request = ExtractRequest("qrt", tmp_path / "sharded", batch_size=8, workers=0, tta=tta)
    # shard_size 12 -> 16 images per shard: shard boundaries fall on batch boundaries
    res = extract_descriptors_sharded(model, mini_data, request, shard_size=12)
    _assert_same_files(tmp_path / "plain", tmp_path / "sharded")
    assert res["counts"] == plain["counts"] == {"query": 40, "reference": 64, "train": 64}
    assert not (tmp_path / "sharded" / SHARD_DIR).exists()  # merged shards are deleted


def test_a_rerun_after_a_failure_reuses_finished_shards_and_redoes_stale_ones(model, mini_data, tmp_path):
    data = _small_copy(mini_data, tmp_path / "data", n=12)
    bad = data.reference_dir / "R999999.jpg"  # sorts last: only the last reference shard fails
    bad.write_bytes(b"")
    out = tmp_path / "out"
    request = ExtractRequest("qr", out, batch_size=4, workers=0)
    with pytest.raises(BadImagesError, match="R999999"):
        extract_descriptors_sharded(model, data, request, shard_size=4)
    folder = out / SHARD_DIR
    done = sorted(p.name for p in folder.glob("*.done.json"))
    assert done == [f"query-{k:06d}.done.json" for k in range(3)] + [
        f"reference-{k:06d}.done.json" for k in range(3)
    ]  # the shard holding the bad image has no marker, and no output file exists yet
    assert not (out / "descriptors.h5").exists()
    # Mark one finished shard so a recomputation would show, and make another one stale.
    with h5py.File(folder / "query-000001.h5", "r+") as f:
        f["x"][...] = 0.5
    stale = folder / "reference-000000.done.json"
    stale.write_text(stale.read_text().replace('"batch_size": 4', '"batch_size": 99'))
    bad.unlink()
    (folder / ".query-000002.h5.abc123.partial").write_bytes(b"half a shard")  # what a kill leaves behind
    res = extract_descriptors_sharded(model, data, request, shard_size=4)
    assert not folder.exists()  # merged shards and stale temp files are gone
    plain = extract_descriptors(model, data, "qr", tmp_path / "plain", batch_size=4, workers=0)
    got, want = read_descriptors(res["descriptors"]), read_descriptors(plain["descriptors"])
    assert got.query_ids == want.query_ids and got.reference_ids == want.reference_ids
    assert np.all(got.query[4:8] == 0.5)  # reused, not recomputed
    assert np.array_equal(got.query[:4], want.query[:4]) and np.array_equal(got.query[8:], want.query[8:])
    assert np.array_equal(got.reference, want.reference)  # the stale shard was redone


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_write_what_one_process_writes(model, mini_data, tmp_path):
    import os
    import subprocess
    import sys

    from tests.servers import PROJECT_ROOT

    ckpt = save_checkpoint(tmp_path / "ckpt" / "checkpoint_0000.pth.tar", model, epoch=0, with_rng=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WORLD_SIZE", "RANK"))}
    env.update(ISC_HOME=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # torchrun gives each rank OMP_NUM_THREADS=1; on CPU a different intra-op thread count changes the
    # order of float sums (differences ~1e-7), so the one-process run gets the same setting.
    env["OMP_NUM_THREADS"] = "1"
    args = ["--model", str(ckpt), "--data", str(mini_data.root), "--batch-size", "8", "--workers", "1",
            "--device", "cpu"]  # fmt: skip

    def run(cmd: list[str]) -> None:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr

    run([sys.executable, "-m", "entrypoints.extract", *args, "--output-dir", str(tmp_path / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]  # fmt: skip
    run(
        [
            *torchrun,
            "-m",
            "entrypoints.extract",
            *args,
            "--output-dir",
            str(tmp_path / "two"),
            "--shard-size",
            "16",
        ]
    )
    _assert_same_files(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two" / SHARD_DIR).exists()
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    two = [r for r in runs if r.data.params.get("world_size") == "2"]
    assert len(runs) == 2 and len(two) == 1 and two[0].info.status == "FINISHED"  # one run, from rank 0
    assert two[0].data.metrics["n_reference"] == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_shared_process_group_setup_names_device_when_cuda_is_missing(mini_data):
    from entrypoints.cli import run_entrypoint
    from isc.train import distributed as ddp

    with pytest.raises(ConfigError) as exc:
        ddp.setup("cuda")
    assert exc.value.param == "device"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # `isc train --device cuda` died in set_device before
        rc = run_entrypoint(
            "entrypoints.train", ["--config", "smoke", "--data", str(mini_data.root), "--device", "cuda"]
        )
    assert rc == 2 and "Traceback" not in err.getvalue()
    assert [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")][-1].startswith(
        "error: device"
    )
