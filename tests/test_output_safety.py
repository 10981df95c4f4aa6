"""Outputs never destroy data silently: an output that is an input is refused (postprocess, match,
baseline, search), an existing postprocess/match output is replaced only with ``--overwrite true``, and
``postprocess --k`` above the number of training descriptors is refused instead of silently clamped.
Real files, a real SQLite MLflow store, the real CLI path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from entrypoints.cli import run_entrypoint
from isc.io import read_descriptors, write_descriptors, write_ground_truth, write_train_descriptors


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    desc = write_descriptors(
        tmp_path / "in" / "descriptors.h5",
        _unit(rng, 5, 16),
        [f"Q{i}" for i in range(5)],
        _unit(rng, 7, 16),
        [f"R{i}" for i in range(7)],
    )
    train = write_train_descriptors(
        tmp_path / "in" / "train_descriptors.h5", _unit(rng, 64, 16), [f"T{i:02d}" for i in range(64)]
    )
    return desc, train


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(entry: str, argv: list, capsys) -> tuple[int, str]:
    try:
        rc = run_entrypoint(f"entrypoints.{entry}", [str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return rc, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _runs(uri: str) -> list:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(exps, run_view_type=ViewType.ALL) if exps else []


def test_postprocess_output_that_is_its_train_descriptors_is_refused(inputs, tracking, capsys):
    desc, train = inputs
    before = _sha(train)
    rc, err = _run(
        "postprocess",
        ["--descriptors", desc, "--train-descriptors", train, "--output", train, "--overwrite", "true"],
        capsys,
    )
    assert rc == 2
    line = _error_line(err)
    assert "output" in line and str(train) in line and "--train-descriptors" in line, line
    assert _sha(train) == before
    assert not (train.parent / "nes_bank.h5").exists()
    assert _runs(tracking) == []


def test_postprocess_bank_next_to_output_that_is_an_input_is_refused(inputs, tracking, capsys):
    desc, train = inputs
    # The training descriptors are themselves called nes_bank.h5 (e.g. a previous run's bank reused).
    bank = train.parent / "nes_bank.h5"
    train.rename(bank)
    before = _sha(bank)
    rc, err = _run(
        "postprocess",
        [
            "--descriptors",
            desc,
            "--train-descriptors",
            bank,
            "--output",
            bank.parent / "nes.h5",
            "--overwrite",
            "true",
        ],
        capsys,
    )
    assert rc == 2
    assert "nes_bank.h5" in _error_line(err)
    assert _sha(bank) == before and not (bank.parent / "nes.h5").exists()


def test_postprocess_never_replaces_an_existing_output_or_bank_without_overwrite(inputs, tracking, capsys):
    desc, train = inputs
    out = desc.parent.parent / "out" / "descriptors_nes.h5"
    argv = ["--descriptors", desc, "--train-descriptors", train, "--output", out]
    assert _run("postprocess", argv, capsys)[0] == 0
    first = {p.name: _sha(p) for p in (out, out.parent / "nes_bank.h5")}

    # A second run into the same folder (another output name, other constants) is refused, naming the bank.
    rc, err = _run(
        "postprocess",
        [
            "--descriptors",
            desc,
            "--train-descriptors",
            train,
            "--output",
            out.parent / "other.h5",
            "--beta",
            "0.9",
        ],
        capsys,
    )
    assert rc == 2
    line = _error_line(err)
    assert "nes_bank.h5" in line and "--overwrite" in line, line
    assert not (out.parent / "other.h5").exists()
    rc, err = _run("postprocess", [*argv, "--beta", "0.9"], capsys)
    assert rc == 2 and str(out) in _error_line(err)
    assert {p.name: _sha(p) for p in (out, out.parent / "nes_bank.h5")} == first

    # --overwrite true replaces both.
    assert _run("postprocess", [*argv, "--beta", "0.9", "--overwrite", "true"], capsys)[0] == 0
    assert _sha(out) != first["descriptors_nes.h5"]
    assert [r.info.status for r in _runs(tracking)] == ["FINISHED", "FINISHED"]


def test_postprocess_k_above_the_training_count_is_refused_naming_both(inputs, tracking, capsys):
    desc, train = inputs
    out = desc.parent.parent / "out" / "n.h5"
    for flag, name in (("--k", "k"), ("--dba-k", "dba_k")):
        rc, err = _run(
            "postprocess",
            ["--descriptors", desc, "--train-descriptors", train, "--output", out, flag, "1000"],
            capsys,
        )
        assert rc == 2
        line = _error_line(err)
        assert line.startswith(f"error: {name}: 1000 > the 64 training descriptors"), line
        assert not out.exists()
    assert _runs(tracking) == []
    # k == the count is legal (every bank row is a neighbour), and logged as given.
    assert (
        _run(
            "postprocess",
            ["--descriptors", desc, "--train-descriptors", train, "--output", out, "--k", "64"],
            capsys,
        )[0]
        == 0
    )
    assert _runs(tracking)[0].data.params["k"] == "64"


def test_match_refuses_its_input_as_output_and_an_existing_csv_without_overwrite(inputs, tracking, capsys):
    desc, _ = inputs
    before = _sha(desc)
    rc, err = _run("match", ["--descriptors", desc, "--output", desc, "--overwrite", "true"], capsys)
    assert rc == 2 and str(desc) in _error_line(err) and "--descriptors" in _error_line(err)
    assert _sha(desc) == before
    read_descriptors(desc)

    csv = desc.parent / "m.csv"
    assert _run("match", ["--descriptors", desc, "--output", csv], capsys)[0] == 0
    first = _sha(csv)
    rc, err = _run("match", ["--descriptors", desc, "--output", csv, "--max-results", "3"], capsys)
    assert rc == 2 and str(csv) in _error_line(err)
    assert _sha(csv) == first
    assert (
        _run("match", ["--descriptors", desc, "--output", csv, "--max-results", "3", "--overwrite"], capsys)[
            0
        ]
        == 0
    )
    assert len(csv.read_text().splitlines()) == 4


def test_baseline_output_that_is_its_ground_truth_is_refused(mini_data, tracking, tmp_path, capsys):
    out = tmp_path / "b"
    gt = write_ground_truth(out / "phash.h5", [("Q00000", None)])  # a GT file where the h5 would go
    before = _sha(gt)
    rc, err = _run("baseline", ["--data", mini_data.root, "--ground-truth", gt, "--output-dir", out], capsys)
    assert rc == 2 and str(gt) in _error_line(err) and "output_dir" in _error_line(err)
    assert _sha(gt) == before
    assert _runs(tracking) == []


def test_search_output_that_is_the_index_or_an_input_image_is_refused(mini_data, tracking, tmp_path, capsys):
    refs, queries = mini_data.root / "reference_images", mini_data.root / "query_images"
    image = sorted(queries.iterdir())[0]
    before = _sha(image)
    index = tmp_path / "s" / "ref.index"
    cases = [
        (["--index", index, "--output", index], "output"),
        (["--index", index, "--output", image], "output"),
        (["--index", image, "--output", tmp_path / "m.csv"], "index"),
    ]
    for extra, name in cases:
        rc, err = _run(
            "search",
            ["--model", tmp_path / "no_model", "--references", refs, "--queries", queries, *extra],
            capsys,
        )
        assert rc == 2
        assert _error_line(err).startswith(f"error: {name}:"), err
    assert _sha(image) == before
    assert not index.exists()
