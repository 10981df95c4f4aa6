"""Malformed inputs give one ``error:`` line and exit status 2 (no traceback, no wrong result, no RUNNING
run): string-typed descriptors, overflowing descriptors, a binary/h5/folder ground truth, crafted descriptor
h5s (external / soft links, impossible declared shapes, dimension 0), training configs that are not UTF-8 or
hold lists / huge values for one-value options. A UTF-8 BOM
ground truth is accepted. Every case runs the real CLI path (``entrypoints.cli.run_entrypoint``) on real files
and a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from entrypoints.cli import run_entrypoint
from isc.io import read_ground_truth, write_descriptors, write_ground_truth

QIDS = [f"Q{i}" for i in range(6)]
RIDS = [f"R{i}" for i in range(8)]
GT_ROWS = [("Q0", "R0"), ("Q1", "R1"), ("Q2", "R2"), ("Q3", None), ("Q4", "R4"), ("Q5", None)]


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def files(tmp_path):
    r = _unit(len(RIDS), 16, 0)
    q = r[[0, 1, 2, 5, 4, 7]] + 0.05 * _unit(len(QIDS), 16, 1)
    desc = write_descriptors(tmp_path / "d.h5", q, QIDS, r, RIDS)
    gt = write_ground_truth(tmp_path / "gt.csv", GT_ROWS)
    return {"desc": desc, "gt": gt, "q": q, "r": r, "dir": tmp_path}


def _raw_h5(path, q, r) -> None:
    with h5py.File(path, "w") as f:
        f["query"], f["reference"] = q.astype("float32"), r.astype("float32")
        f["query_ids"] = np.array([i.encode() for i in QIDS])
        f["reference_ids"] = np.array([i.encode() for i in RIDS])


def _run(entry: str, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = run_entrypoint(f"entrypoints.{entry}", [str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _running(uri: str) -> list[str]:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(exps, "attributes.status = 'RUNNING'", ViewType.ALL) if exps else []
    return [r.info.run_id for r in runs]


def _assert_refused(rc: int, err: str, *names: str) -> str:
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def _evaluate(desc, gt, capsys, *extra):
    return _run("evaluate", ["--descriptors", desc, "--ground-truth", gt, "--bootstrap", "0", *extra], capsys)


def test_string_typed_descriptors_are_refused_naming_the_dataset(files, tracking, capsys):
    bad = files["dir"] / "strings.h5"
    with h5py.File(bad, "w") as f:
        f["query"] = np.array([[b"0.1", b"0.2"]] * len(QIDS))  # strings that even look like numbers
        f["reference"] = np.array([[b"x", b"y"]] * len(RIDS))
        f["query_ids"] = np.array([q.encode() for q in QIDS])
        f["reference_ids"] = np.array([r.encode() for r in RIDS])
    rc, _, err = _evaluate(bad, files["gt"], capsys)
    _assert_refused(rc, err, str(bad), "'query'", "float32")
    assert _running(tracking) == []


def test_overflowing_descriptors_are_refused_not_scored_zero(files, tracking, capsys):
    # 1e29 is finite in float32, but squared distances overflow: before the fix, µAP 0.0 and exit 0.
    huge = files["dir"] / "huge.h5"  # written raw: the project's writer refuses such values too
    _raw_h5(huge, files["q"] * 1e29, files["r"] * 1e29)
    rc, out, err = _evaluate(huge, files["gt"], capsys)
    line = _assert_refused(rc, err, str(huge), "L2-normalise")
    assert "values up to" in line and "e+28" in line, line
    assert out.strip() == ""
    assert _running(tracking) == []
    # The same vectors normalised score well: the refusal is about the scale, not the data.
    rc, out, err = _evaluate(files["desc"], files["gt"], capsys)
    assert rc == 0, err[-2000:]
    assert json.loads(out)["average_precision"] > 0.5


@pytest.mark.parametrize("kind", ["h5", "binary"])
def test_binary_ground_truth_is_refused_naming_it(files, tracking, capsys, kind):
    if kind == "h5":
        gt = files["desc"]  # an HDF5 file given as --ground-truth
    else:
        gt = files["dir"] / "gt.bin"
        gt.write_bytes(bytes(range(256)) * 8)
    rc, _, err = _evaluate(files["desc"], gt, capsys)
    _assert_refused(rc, err, str(gt), "not a ground-truth CSV")
    assert _running(tracking) == []


@pytest.mark.parametrize("kind", ["fifo", "dev-null"])
def test_a_ground_truth_that_is_a_fifo_or_device_is_named_for_what_it_is(files, tracking, capsys, kind):
    """It exists: "no such ground-truth file" (what a hostile round got) sent the user looking for a typo."""
    if kind == "fifo":
        gt = files["dir"] / "gt_fifo.csv"
        os.mkfifo(gt)
    else:
        gt = Path("/dev/null")
    rc, _, err = _evaluate(files["desc"], gt, capsys)
    expected = "is a FIFO, not a ground-truth CSV file" if kind == "fifo" else "is a character device, not a"
    _assert_refused(rc, err, str(gt), expected)
    assert _running(tracking) == []


def test_ground_truth_folder_is_refused_naming_its_split_files(files, tracking, capsys):
    folder = files["dir"] / "data"
    folder.mkdir()
    for split in ("", "_train", "_val", "_test"):
        write_ground_truth(folder / f"ground_truth{split}.csv", GT_ROWS)
    rc, out, err = _evaluate(files["desc"], folder, capsys)
    line = _assert_refused(rc, err, str(folder), "ground_truth_test.csv", "ground_truth_train.csv")
    assert "folder" in line
    assert out.strip() == ""
    # baseline and promote name the parameter for the same mistake
    rc, _, err = _run("promote", ["--ground-truth", folder], capsys)
    _assert_refused(rc, err, "ground_truth", "ground_truth_val.csv")
    assert _running(tracking) == []


def test_utf8_bom_ground_truth_is_accepted(files, tracking, capsys):
    bom = files["dir"] / "gt_bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + files["gt"].read_bytes())
    assert read_ground_truth(bom).queries == read_ground_truth(files["gt"]).queries
    rc, out, err = _evaluate(files["desc"], bom, capsys)
    assert rc == 0, err[-3000:]
    plain_rc, plain_out, _ = _evaluate(files["desc"], files["gt"], capsys)
    assert plain_rc == 0
    assert json.loads(out)["average_precision"] == json.loads(plain_out)["average_precision"]


def test_search_names_a_fifo_query_for_what_it_is(tmp_path):
    from isc.errors import ConfigError
    from registry.image_search import collect_images

    fifo = tmp_path / "q.png"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"q\.png: is a FIFO, not an image file or folder"):
        collect_images([fifo], "queries")


@pytest.mark.parametrize("content", [bytes(range(256)), "stage: smoke\nrun_name: caf\u00e9\n".encode("latin-1")],
                         ids=["binary", "latin1"])
def test_config_file_that_is_not_utf8_is_refused_naming_it(mini_data, tracking, capsys, tmp_path, content):
    """read_yaml caught only YAMLError: a binary or Latin-1 --config was a UnicodeDecodeError traceback."""
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    rc, _, err = _run("train", ["--config", config, "--data", mini_data.root, "--output-dir", tmp_path / "t"], capsys)
    line = _assert_refused(rc, err, "config", str(config), "not UTF-8")
    assert "offset" in line, line
    assert _running(tracking) == [] and not (tmp_path / "t").exists()


def _crafted_h5(path, q, r, reference) -> None:
    """An ISC21 h5 whose ``reference`` is made by ``reference(f, r)``: a link or an oddly declared dataset."""
    with h5py.File(path, "w") as f:
        f["query"] = q.astype("float32")
        f["query_ids"] = np.array([i.encode() for i in QIDS])
        f["reference_ids"] = np.array([i.encode() for i in RIDS])
        reference(f, r)


CRAFTED = {
    # h5py followed it into the named file: a text file, or /etc/passwd (a traceback either way)
    "external_link_to_text": (lambda f, r: f.__setitem__("reference", h5py.ExternalLink("other.txt", "/reference")),
                              "external link (to 'other.txt')"),
    "external_link_abs": (lambda f, r: f.__setitem__("reference", h5py.ExternalLink("/etc/passwd", "/x")),
                          "external link (to '/etc/passwd')"),
    "soft_link_loop": (lambda f, r: f.__setitem__("reference", h5py.SoftLink("/reference")),
                       "soft link (to '/reference')"),
    # 10**10 x 256 float32 declared, no chunk written: h5py allocated 9.3 TiB of fill values (MemoryError)
    "huge_declared_shape": (lambda f, r: f.create_dataset("reference", shape=(10**10, 256), dtype="f4",
                                                          chunks=(1024, 256)),
                            "declares shape (10000000000, 256)"),
    # compressed, so the file size proves nothing: refused by the memory it would take
    "huge_compressed": (lambda f, r: f.create_dataset("reference", shape=(10**10, 256), dtype="f4",
                                                      chunks=(1024, 256), compression="gzip"),
                        "GiB available"),
    "zero_dim": (lambda f, r: f.create_dataset("reference", shape=(len(RIDS), 0), dtype="f4"), "dimension 0"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_descriptor_h5_is_refused_naming_file_and_dataset(files, tracking, capsys, case):
    reference, says = CRAFTED[case]
    (files["dir"] / "other.txt").write_text("not an HDF5 file\n")
    bad = files["dir"] / f"{case}.h5"
    _crafted_h5(bad, files["q"], files["r"], reference)
    assert bad.stat().st_size < 1_000_000
    rc, _, err = _evaluate(bad, files["gt"], capsys, "--output-dir", files["dir"] / "ev")
    line = _assert_refused(rc, err, str(bad), "reference", says)
    assert "all zero" not in line, line
    assert _running(tracking) == [] and not (files["dir"] / "ev").exists()


def _refused_train_config(text: str, mini_data, tracking, capsys, tmp_path, *names: str) -> str:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    rc, _, err = _run("train", ["--config", config, "--data", mini_data.root, "--output-dir", tmp_path / "t"], capsys)
    line = _assert_refused(rc, err, *names)
    assert len(line) < 600, f"{len(line)} characters: {line[:300]}"
    assert _running(tracking) == [] and not (tmp_path / "t").exists()
    return line


def test_config_list_for_a_text_option_is_refused_without_expanding_it(mini_data, tracking, capsys, tmp_path):
    """Nested YAML aliases (10**5 leaves from a few lines) under known text options were str()-coerced and the
    error echoed the whole expansion (522 KB in the hostile case): a list is refused by its key, described."""
    levels = ["run_name: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{key}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]"
               for i, key in enumerate(["experiment_name", "output_dir", "data", "backbone"], start=1)]
    line = _refused_train_config("stage: smoke\n" + "\n".join(levels) + "\n", mini_data, tracking, capsys,
                                 tmp_path, "run_name", "expected a single value")
    assert "a list of 10 item(s)" in line, line


def test_long_config_values_are_cut_in_the_error_line(mini_data, tracking, capsys, tmp_path):
    line = _refused_train_config(f"stage: smoke\nbackbone: {'x' * 100_000}\n", mini_data, tracking, capsys,
                                 tmp_path, "backbone", "(100,000 characters)")
    assert "x" * 200 in line and "x" * 201 not in line, line
    _refused_train_config(f"stage: smoke\nepochs: {'9x' * 50_000}\n", mini_data, tracking, capsys, tmp_path,
                          "epochs")
