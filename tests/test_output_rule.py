"""The one output rule (``isc.fileutil.check_outputs``), over every command that writes files.

For each command: an existing output is left byte-for-byte intact and refused with one error line that
names it and ``--overwrite`` (no MLflow run opened); an output that is an input is refused even with
``--overwrite``. ``isc search --index`` replaces only an index ``isc search`` wrote. Real files, a real
SQLite store, the real CLI path (``run_entrypoint``, what ``isc <command>`` runs).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from isc.io import read_ground_truth, write_descriptors, write_train_descriptors
from tests.test_output_safety import _error_line, _run, _sha  # one way to run a command and read its error

SENTINEL = b"earlier results: must survive\n"


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def files(tmp_path, mini_data):
    rng = np.random.default_rng(0)
    gt = read_ground_truth(mini_data.ground_truth())
    qids, rids = sorted(gt.queries), [i for i, _ in mini_data.images("reference")]
    desc = write_descriptors(tmp_path / "in" / "descriptors.h5", _unit(rng, len(qids), 16), qids,
                             _unit(rng, len(rids), 16), rids)
    train = write_train_descriptors(tmp_path / "in" / "train.h5", _unit(rng, 64, 16),
                                    [f"T{i:02d}" for i in range(64)])
    return {"desc": desc, "train": train, "gt": mini_data.ground_truth(), "data": mini_data.root,
            "refs": mini_data.reference_dir, "queries": mini_data.query_dir, "out": tmp_path / "out"}


def _run_count(uri: str) -> int:
    """Runs in the SQLite store, read with sqlite3 (opening it with MLflow would migrate a fresh file)."""
    import sqlite3

    db = Path(uri.removeprefix("sqlite:///"))
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select count(*) from runs").fetchone()[0]
        except sqlite3.OperationalError:  # no runs table: no run was ever opened
            return 0


# command, argv (from the fixture's files), the existing output the rule must protect
COMMANDS = {
    "extract": (lambda f: ["--model", f["out"] / "no.pt", "--data", f["data"], "--sets", "qr",
                           "--output-dir", f["out"]], lambda f: f["out"] / "descriptors.h5"),
    "postprocess": (lambda f: ["--descriptors", f["desc"], "--train-descriptors", f["train"],
                               "--output", f["out"] / "nes.h5"], lambda f: f["out"] / "nes.h5"),
    "match": (lambda f: ["--descriptors", f["desc"], "--output", f["out"] / "m.csv"], lambda f: f["out"] / "m.csv"),
    "export": (lambda f: ["--model", f["out"] / "no_model", "--format", "torchscript", "--output",
                          f["out"] / "isc.pt"], lambda f: f["out"] / "isc.pt"),
    "make_mini": (lambda f: ["make-mini", "--out", f["out"], "--size", "tiny"], lambda f: f["out"] / "keep.txt"),
    "search": (lambda f: ["--model", f["out"] / "no_model", "--references", f["refs"], "--queries", f["queries"],
                          "--index", f["out"] / "ref.index", "--output", f["out"] / "matches.csv"],
               lambda f: f["out"] / "matches.csv"),
    "evaluate": (lambda f: ["--descriptors", f["desc"], "--ground-truth", f["gt"], "--bootstrap", "0",
                            "--output-dir", f["out"]], lambda f: f["out"] / "metrics.json"),
    "evaluate ": (lambda f: ["--descriptors", f["desc"], "--ground-truth", f["gt"], "--bootstrap", "0",
                             "--output-dir", f["out"]], lambda f: f["out"] / "pr_curve.png"),
    "baseline": (lambda f: ["--data", f["data"], "--ground-truth", f["gt"], "--output-dir", f["out"]],
                 lambda f: f["out"] / "phash.h5"),
    "baseline ": (lambda f: ["--data", f["data"], "--ground-truth", f["gt"], "--output-dir", f["out"]],
                  lambda f: f["out"] / "phash" / "metrics.json"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_existing_output_is_refused_by_name_and_left_intact(command, files, tracking, capsys):
    argv, target = COMMANDS[command]
    existing = target(files)
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(SENTINEL)
    rc, err = _run(command.strip(), argv(files), capsys)
    assert rc == 2
    line = _error_line(err)
    # make-mini names its folder; every other command names the file itself.
    assert str(existing if command != "make_mini" else files["out"]) in line and "--overwrite" in line, line
    assert existing.read_bytes() == SENTINEL
    assert _run_count(tracking) == 0


def test_evaluate_overwrite_true_replaces_the_earlier_artifacts(files, tracking, capsys):
    out = files["out"]
    out.mkdir(parents=True)
    (out / "metrics.json").write_bytes(SENTINEL)
    argv = ["--descriptors", files["desc"], "--ground-truth", files["gt"], "--bootstrap", "0", "--output-dir", out]
    assert _run("evaluate", [*argv, "--overwrite", "true"], capsys)[0] == 0
    assert b"average_precision" in (out / "metrics.json").read_bytes() and (out / "pr_curve.png").stat().st_size
    import mlflow

    assert [r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")] == [
        "FINISHED"
    ]


def test_evaluate_output_dir_holding_its_own_input_is_refused_even_with_overwrite(files, tracking, capsys):
    out = files["out"]
    out.mkdir(parents=True)
    gt = out / "metrics.json"  # the ground truth, kept under the name evaluate would write
    gt.write_bytes(Path(files["gt"]).read_bytes())
    before = _sha(gt)
    link = out.parent / "gt_link.csv"
    os.symlink(gt, link)  # through a symlink, and spelt with ../
    spelt = out / ".." / out.name
    rc, err = _run("evaluate", ["--descriptors", files["desc"], "--ground-truth", link, "--bootstrap", "0",
                                "--output-dir", spelt, "--overwrite", "true"], capsys)
    assert rc == 2
    line = _error_line(err)
    assert "both an input and an output" in line and "--ground-truth" in line, line
    assert _sha(gt) == before and not (out / "pr_curve.png").exists()
    assert _run_count(tracking) == 0


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_search_never_replaces_a_file_it_did_not_write_at_index(files, tracking, capsys, overwrite):
    out = files["out"]
    out.mkdir(parents=True)
    victim = out / "ground_truth.csv"
    victim.write_bytes(Path(files["gt"]).read_bytes())
    before = _sha(victim)
    rc, err = _run("search", ["--model", out / "no_model", "--references", files["refs"], "--queries",
                              files["queries"], "--index", victim, "--output", out / "m.csv",
                              "--overwrite", overwrite], capsys)
    assert rc == 2
    line = _error_line(err)
    assert line.startswith("error: index:") and str(victim) in line and "not an index written by" in line, line
    assert _sha(victim) == before
    assert sorted(p.name for p in out.iterdir()) == ["ground_truth.csv"]  # no .ids.txt / .meta.json added


def test_search_index_meta_of_another_tool_is_refused(files, tracking, capsys):
    out = files["out"]
    out.mkdir(parents=True)
    (out / "ref.index.meta.json").write_text('{"format": "someone else"}')
    rc, err = _run("search", ["--model", out / "no_model", "--references", files["refs"], "--queries",
                              files["queries"], "--index", out / "ref.index", "--output", ""], capsys)
    assert rc == 2 and "ref.index.meta.json" in _error_line(err)
    assert (out / "ref.index.meta.json").read_text() == '{"format": "someone else"}'


def test_make_mini_out_inside_its_source_is_refused_even_with_overwrite(tmp_path, mini_data, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    photo = next(mini_data.reference_dir.iterdir())
    (src / photo.name).write_bytes(photo.read_bytes())
    for out in (src, src / "mini", src / "sub" / ".."):
        rc, err = _run("make_mini", ["make-mini", "--source", src, "--out", out, "--size", "tiny",
                                     "--overwrite", "true"], capsys)
        assert rc == 2 and "--source" in _error_line(err), err
    assert [p.name for p in src.iterdir()] == [photo.name]


@pytest.mark.parametrize("special", ["fifo", "link-to-fifo", "char-device"])
@pytest.mark.parametrize("command", ["match", "postprocess"])
def test_an_output_that_is_a_device_or_fifo_is_refused_even_with_overwrite(command, special, files, tracking,
                                                                            capsys):
    """--overwrite renames a new regular file onto the output path: a device node there (a hostile round
    replaced a character device with a CSV; postprocess, which resolves links, replaced what a link pointed
    at) or a FIFO would be destroyed, so such outputs are refused. Only nodes made here: a regression must
    not be able to replace the system's /dev/null."""
    argv, target = COMMANDS[command]
    out = target(files)
    out.parent.mkdir(parents=True, exist_ok=True)
    node = out if special != "link-to-fifo" else out.with_name("fifo")
    if special == "char-device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a null device of the test's own
    else:
        os.mkfifo(node)
    if special == "link-to-fifo":
        out.symlink_to(node)
    rc, err = _run(command, [*argv(files), "--overwrite", "true"], capsys)
    assert rc == 2
    line = _error_line(err)
    kind = "character device" if special == "char-device" else "FIFO"
    named = {str(out), str(out.resolve())}  # postprocess names the link's target
    assert any(n in line for n in named) and f"is a {kind}, not a regular file" in line, line
    mode = node.stat().st_mode
    assert stat.S_ISCHR(mode) if special == "char-device" else stat.S_ISFIFO(mode)
    assert out.is_symlink() == (special == "link-to-fifo")
    assert _run_count(tracking) == 0
