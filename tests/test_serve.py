"""Serving: the pyfunc's ``image`` column (base64 image bytes) and a real ``mlflow models serve`` endpoint."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from isc.errors import BadImagesError
from isc.io import read_descriptors, read_train_descriptors, write_train_descriptors

TINY = "test_efficientnet"
MODEL = "isc-descriptor"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def photo_files(folder: Path) -> list[Path]:
    """Three scikit-image photos written as a PNG, an RGBA PNG and a JPEG (the decoder's main paths)."""
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    astronaut = Image.fromarray(skdata.astronaut())
    coffee = Image.fromarray(skdata.coffee()).convert("RGBA")
    coffee.putalpha(200)
    chelsea = Image.fromarray(skdata.chelsea())
    out = [folder / "astronaut.png", folder / "coffee_rgba.png", folder / "chelsea.jpg"]
    astronaut.save(out[0])
    coffee.save(out[1])
    chelsea.save(out[2], quality=90)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from isc.models import create_model, save_checkpoint

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(out / "model.pth.tar", create_model(TINY, pretrained=False, input_size=32), epoch=0)


def test_image_column_gives_the_descriptors_of_the_files_and_names_bad_rows(tracking, checkpoint, tmp_path):
    import pandas as pd

    from isc.tracking import tracked_run
    from registry.model_logging import log_descriptor_model

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(40, 256)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_path = write_train_descriptors(tmp_path / "bank.h5", bank, [f"T{i:06d}" for i in range(40)])
    with tracked_run(experiment="isc"):
        info = log_descriptor_model(checkpoint, bank=bank_path, nes_params={"k": 5})
    assert info.signature.inputs is None  # nothing for the server to reject the `image` column with
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]
    model = mlflow.pyfunc.load_model(info.model_uri)

    paths = photo_files(tmp_path / "photos")
    blobs = [p.read_bytes() for p in paths]
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    by_b64 = model.predict(pd.DataFrame({"image": [b64(b) for b in blobs]}))
    by_bytes = model.predict(pd.DataFrame({"image": blobs}))
    assert by_b64.shape == (3, 256) and by_b64.dtype == np.float32
    np.testing.assert_array_equal(by_b64, by_path)  # same decoder, same transform: bit-identical
    np.testing.assert_array_equal(by_bytes, by_path)
    raw = model.predict(pd.DataFrame({"image": [b64(b) for b in blobs]}), params={"postprocess": False})
    np.testing.assert_array_equal(raw, model.predict([str(p) for p in paths], params={"postprocess": False}))
    assert np.abs(by_b64 - raw).max() > 1e-3  # NES applied to the image column too
    # The stored example is what the server would get; it predicts like any other input.
    ex = model.predict(pd.DataFrame(example["dataframe_split"]["data"], columns=["image"]))
    assert ex.shape == (1, 256) and abs(float(np.linalg.norm(ex)) - 1.0) < 1e-5

    with pytest.raises(ValueError, match=r"image\[1\]: not base64"):
        model.predict(pd.DataFrame({"image": [b64(blobs[0]), "not base64!"]}))
    with pytest.raises(BadImagesError, match=r"image\[1\]: not a recognised image format") as err:
        model.predict(pd.DataFrame({"image": [b64(blobs[0]), b64(b"plain text"), b64(blobs[2][:300])]}))
    assert [str(e.path) for e in err.value.errors] == ["image[1]", "image[2]"]  # every bad row, one pass
    with pytest.raises(ValueError, match="one of them"):
        model.predict(pd.DataFrame({"image": [b64(blobs[0])], "path": [str(paths[0])]}))
    with pytest.raises(TypeError, match=r"image\[0\]: expected a base64 string or bytes"):
        model.predict(pd.DataFrame({"image": [3.5]}))


# ---------------------------------------------------------------------------------------- real server


def post_json(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback http)
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def start_model_server(model_uri: str, tracking_uri: str, workdir: Path, timeout: float = 240.0):
    """``mlflow models serve --env-manager local`` on a free loopback port; returns (proc, url, log path).

    Started in its own process group (uvicorn is a grandchild: mlflow -> bash -> uvicorn) with the
    project *off* PYTHONPATH and a neutral cwd, so the served version runs on the code stored with it.
    """
    from tests.servers import _stop_group, free_port, wait_http_ok

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    log_path = workdir / f"models-serve-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-p", str(port), "-h", "127.0.0.1"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(workdir), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(url + "/ping", proc, log_path, timeout)
    except BaseException:
        _stop_group(proc)
        raise
    return proc, url, log_path


@pytest.mark.slow
def test_served_champion_answers_base64_images_with_the_extract_and_postprocess_descriptors(
    tracking, mini_data, checkpoint, tmp_path
):
    from entrypoints.cli import main as isc
    from registry.model_logging import log_descriptor_model
    from tests.servers import _stop_group

    # Reference pipeline, through the project's own commands: isc extract -> isc postprocess.
    extracted, post = tmp_path / "extract", tmp_path / "post"
    assert isc(["extract", "--model", str(checkpoint), "--data", str(mini_data.root), "--output-dir",
                str(extracted), "--workers", "0", "--batch-size", "16"]) == 0
    assert isc(["postprocess", "--descriptors", str(extracted / "descriptors.h5"), "--train-descriptors",
                str(extracted / "train_descriptors.h5"), "--output", str(post / "descriptors_nes.h5"),
                "--k", "10", "--beta", "0.35", "--num-iter", "1"]) == 0
    expected = read_descriptors(post / "descriptors_nes.h5")
    raw = read_descriptors(extracted / "descriptors.h5")
    bank, _ = read_train_descriptors(post / "nes_bank.h5")

    info = log_descriptor_model(checkpoint, bank=post / "nes_bank.h5", nes_params={"k": 10, "beta": 0.35, "num_iter": 1},
                                registered_model_name=MODEL)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(MODEL, "champion", info.registered_model_version)

    queries = dict(mini_data.images("query"))
    ids = expected.query_ids[:6]
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(Path(queries[q]).read_bytes())] for q in ids]}}
    t0 = time.monotonic()
    proc, url, log_path = start_model_server(f"models:/{MODEL}@champion", tracking, tmp_path)
    try:
        started = time.monotonic() - t0
        status, answer = post_json(url + "/invocations", body)
        assert status == 200, (answer, log_path.read_text()[-3000:])
        served = np.asarray(answer["predictions"], dtype=np.float32)
        assert served.shape == (len(ids), 256)
        worst = float(np.abs(served - expected.query[: len(ids)]).max())
        assert worst <= 1e-5, worst
        assert np.abs(served - raw.query[: len(ids)]).max() > 1e-3  # really the subtracted descriptors
        assert bank.shape == (len(mini_data.images("train")), 256)

        status, answer = post_json(url + "/invocations", {**body, "params": {"postprocess": False}})
        assert status == 200, answer
        np.testing.assert_allclose(np.asarray(answer["predictions"], dtype=np.float32), raw.query[: len(ids)],
                                   atol=1e-5, rtol=0)

        # A row that is not an image: a client error that names it, and the server keeps serving.
        bad = {"dataframe_split": {"columns": ["image"], "data": [body["dataframe_split"]["data"][0], [b64(b"hi")]]}}
        status, answer = post_json(url + "/invocations", bad)
        assert status == 400 and "image[1]" in json.dumps(answer), answer
        assert "stack_trace" not in answer and "Traceback" not in json.dumps(answer), answer  # no server internals
        assert post_json(url + "/invocations", body)[0] == 200
    finally:
        _stop_group(proc)
    assert proc.poll() is not None
    print(f"models serve answered /ping after {started:.1f} s; max |served - extract+postprocess| = {worst:.2e}")


# ------------------------------------------------------------------------------------------------ isc serve


def post_raw(url: str, data: bytes, content_type: str, timeout: float = 120.0) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback http)
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def no_internals(body: bytes) -> None:
    text = body.decode("utf-8", "replace")
    assert "stack_trace" not in text and "Traceback" not in text and "File \"" not in text, text[:3000]
    assert "site-packages" not in text and "/tmp" not in text and str(Path.home()) + "/" not in text, text[:3000]


@pytest.mark.slow
def test_isc_serve_answers_like_mlflow_but_never_with_a_stack_trace(tracking, checkpoint, tmp_path):
    """``mlflow models serve`` answers a CSV or Parquet body it cannot parse with a ``stack_trace`` field:
    the server's full traceback and paths (MLflow 3.17 has no switch for it; its JSON errors carry none).
    ``isc serve`` runs MLflow's own scoring app, so a valid request is answered the same, and every error
    answer is stripped of tracebacks and paths. A real server process on 127.0.0.1, real HTTP."""
    import pandas as pd

    from registry.model_logging import log_descriptor_model
    from tests.servers import _stop_group, free_port, listening_addresses, wait_http_ok

    info = log_descriptor_model(checkpoint, registered_model_name=MODEL)
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", info.registered_model_version)
    photos = photo_files(tmp_path / "photos")
    blobs = [p.read_bytes() for p in photos]
    expected = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(
        pd.DataFrame({"image": [b64(b) for b in blobs]}))

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "entrypoints.serve", "--port", str(port)], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(url + "/ping", proc, log_path, 240)
        assert {a for a, _ in listening_addresses(proc.pid)} == {"127.0.0.1"}
        inv = url + "/invocations"
        body = {"dataframe_split": {"columns": ["image"], "data": [[b64(b)] for b in blobs]}}
        status, ctype, raw = post_raw(inv, json.dumps(body).encode(), "application/json")
        assert status == 200 and "json" in ctype, raw[:2000]
        np.testing.assert_allclose(np.asarray(json.loads(raw)["predictions"], dtype=np.float32), expected,
                                   atol=1e-6, rtol=0)

        cases = {
            "malformed JSON": (b"not json", "application/json", 400),
            "truncated JSON": (b'{"dataframe_split": {"columns": ["image"], "data": [[', "application/json", 400),
            "JSON but no frame": (b"[1, 2, 3]", "application/json", 400),
            "unknown key": (b'{"foo": 1}', "application/json", 400),
            "wrong shape": (json.dumps({"dataframe_split": {"columns": ["image", "x"], "data": [[1]]}}).encode(),
                            "application/json", 400),
            "not an image": (json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64(b"hi")]]}}).encode(),
                             "application/json", 400),
            "wrong content type": (b"not json", "text/plain", 415),
            "CSV that is binary": (b"\xff\xfe\x00garbage", "text/csv", 400),
            # MLflow 3.17's own answers to these three carry `stack_trace` (parse_csv_input / parse_parquet_input)
            "malformed CSV": (b'image\n1,2,3\n"x', "text/csv", 400),
            "empty CSV": (b"", "text/csv", 400),
            "not Parquet": (b"not parquet", "application/vnd.apache.parquet", 400),
            "a server path": (json.dumps({"dataframe_split": {"columns": ["path"],
                                                              "data": [["/etc/isc-no-such/x.jpg"]]}}).encode(),
                              "application/json", 400),
            "a server image file": (json.dumps({"dataframe_split": {"columns": ["path"],
                                                                    "data": [[str(photos[0])]]}}).encode(),
                                    "application/json", 400),
            "a list of server paths": (json.dumps({"inputs": [str(photos[0])]}).encode(), "application/json", 400),
            "charset not UTF-8": (b"{}", "application/json; charset=latin-1", 415),
            "not UTF-8 JSON": (b'{"dataframe_split": "\xff"}', "application/json", 400),
        }
        answers = {}
        for name, (data, content_type, want) in cases.items():
            status, ctype, raw = post_raw(inv, data, content_type)
            answers[name] = raw
            assert status == want, (name, status, raw[:2000])
            no_internals(raw)
            if "json" in ctype:
                assert json.loads(raw).get("message"), (name, raw[:2000])
        assert b"image[0]" in answers["not an image"]  # the project's own message still names the row
        assert b"Failed to parse input as a Pandas DataFrame" in answers["malformed CSV"]  # MLflow's message kept
        # files on the server are never opened for a client (before: an existence oracle, and the descriptors
        # of any image the server can read); the refusal is the same for a real image and a missing path
        assert b"bytes only" in answers["a server image file"] and b"bytes only" in answers["a server path"]
        assert b"bytes only" in answers["a list of server paths"]
        assert post_raw(inv, json.dumps(body).encode(), "application/json")[0] == 200  # still serving
        proc.send_signal(signal.SIGTERM)  # a server's normal end: exit 0 (before: killed by the signal, 143)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        assert "isc serve: stopped" in log_path.read_text()
    finally:
        if proc.poll() is None:
            _stop_group(proc)


def test_isc_serve_on_a_port_in_use_is_one_line_before_loading_anything(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "entrypoints.serve", "--port", str(port), "--model",
                               str(tmp_path / "never-loaded")], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: port: cannot listen on 127.0.0.1:{port}"), proc.stderr


def test_error_bodies_lose_tracebacks_and_paths_but_keep_the_message():
    from registry.serving import clean_error_body, clean_message

    body = json.dumps({"error_code": "BAD_REQUEST", "message": "Failed to parse input. Error: 'EOF in string'",
                       "stack_trace": "Traceback (most recent call last):\n  File \"/srv/venv/lib/x.py\", line 1",
                       "error_class": "INVALID_PARAMETER_VALUE"}).encode()
    assert json.loads(clean_error_body(body, "application/json")) == {
        "error_code": "BAD_REQUEST", "message": "Failed to parse input. Error: 'EOF in string'",
        "error_class": "INVALID_PARAMETER_VALUE"}
    text = b"bad request at /home/alice/models/m1/artifacts\nTraceback (most recent call last):\n  File \"/a/b.py\""
    assert clean_error_body(text, "text/plain") == b"bad request at <path>"
    assert clean_message("image[1]: not base64; see https://mlflow.org/docs/x and a/b.csv") == \
        "image[1]: not base64; see https://mlflow.org/docs/x and a/b.csv"  # URLs and relative names stay
    assert clean_message("x" * 5000).endswith(" ... (cut)") and len(clean_message("x" * 5000)) < 4100
