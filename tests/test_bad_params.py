"""Bad parameters on every entry point: exit status 2, one ``error:``/usage line naming the parameter (or
the missing file), no work started (no output written, returns within seconds), no MLflow run left
RUNNING. Runs each entry point's CLI path in-process (``entrypoints.cli.run_entrypoint``, what
``python -m entrypoints.X`` and ``isc X`` call) so ~40 cases stay cheap; one case goes through a real
``python -m`` subprocess."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from entrypoints.cli import run_entrypoint
from isc.io import write_descriptors, write_ground_truth, write_train_descriptors
from tests.servers import PROJECT_ROOT

# (entry point, argv template, expected name in the error line, output that must not appear)
# Templates: {mini} mini DISC21 root, {desc} descriptor h5, {train} training h5, {gt} GT csv,
# {out} a fresh folder for outputs, {missing} a path that does not exist.
CASES = [
    ("train", "--data {mini} --pos-margin -1", "pos_margin", None),
    ("train", "--data {mini} --neg-margin -0.5", "neg_margin", None),
    ("train", "--data {mini} --memory-size 0", "memory_size", None),
    ("train", "--data {mini} --memory-size 10000000000000", "memory_size", None),  # an allocator traceback
    ("train", "--data {mini} --backbone no_such_net_v9", "backbone", None),
    ("train", "--data {mini} --input-size 0", "input_size", None),
    ("train", "--data {mini} --input-size 99999999", "input_size", None),  # was a MemoryError traceback
    ("train", "--data {mini} --input-size 1", "input_size", None),  # was a torch LinAlgError traceback
    ("train", "--data {mini} --workers 99999", "workers", None),  # was the OOM killer, run left RUNNING
    ("train", "--data {mini} --seed 18446744073709551616", "seed", None),  # 2**64: a torch traceback
    ("train", "--data {mini} --seed 4611686018427387904", "seed", None),  # 2**62: overflowed mid-epoch
    ("train", "--data {mini} --seed -1", "seed", None),
    ("train", "--data {mini} --epochs -1", "epochs", None),
    ("train", "--data {mini} --head-init random", "head_init", None),
    ("train", "--data {mini} --freeze-blocks -1", "freeze_blocks", None),
    ("train", "--data {mini} --batch-size 1", "batch_size", None),
    ("train", "--data {mini} --pretrained efficientnet-lite7-pytorch-model", "pretrained", None),
    ("train", "--data {mini} --overrides '{{lrr: 1}}'", "overrides", None),
    ("train", "--data {mini} --lr -1", "lr", None),
    ("train", "--data {mini} --ncrops 0", "ncrops", None),
    ("train", "--data {missing}", "{missing}", None),
    ("train", "--data {mini} --config {missing}.yaml", "config", None),
    ("extract", "--model {missing}.pth.tar --data {mini} --output-dir {out}/x", "{missing}", "{out}/x"),
    ("extract", "--model {missing}.pth.tar --data {mini} --input-size -5", "input_size", None),
    ("extract", "--model {missing}.pth.tar --data {mini} --batch-size 0", "batch_size", None),
    ("extract", "--model {missing}.pth.tar --data {mini} --workers 99999", "workers", None),
    ("extract", "--model {missing}.pth.tar --data {mini} --input-size 99999999", "input_size", None),
    ("extract", "--model {missing}.pth.tar --data {mini} --sets xyz", "sets", None),
    ("extract", "--model {missing}.pth.tar --data {mini} --input-size 8", "input_size", None),
    (
        "postprocess",
        "--descriptors {desc} --train-descriptors {train} --output {out}/n.h5 --k 0",
        "k",
        "{out}/n.h5",
    ),
    (
        "postprocess",
        "--descriptors {desc} --train-descriptors {train} --output {out}/n.h5 --beta -1",
        "beta",
        "{out}/n.h5",
    ),
    (
        "postprocess",
        "--descriptors {missing}.h5 --train-descriptors {train} --output {out}/n.h5",
        "{missing}",
        "{out}/n.h5",
    ),
    (
        "postprocess",
        "--descriptors {desc} --train-descriptors {train} --output {out}/n.h5 --num-iter 10000000",
        "num_iter",
        "{out}/n.h5",
    ),  # ran for hours
    ("evaluate", "--descriptors {desc} --ground-truth {gt} --knn 0", "knn", None),
    ("evaluate", "--descriptors {desc} --ground-truth {gt} --bootstrap 100000000", "bootstrap", None),  # ran for ever
    (
        "postprocess",
        "--descriptors {desc} --train-descriptors {train} --output {out}/n.h5 --beta 1e30",
        "beta",
        "{out}/n.h5",
    ),  # wrote all-zero descriptors, exit 0
    ("evaluate", "--descriptors {desc} --ground-truth {gt} --max-results -3", "max_results", None),
    ("evaluate", "--descriptors {desc} --ground-truth {gt} --protocol bogus", "protocol", None),
    (
        "evaluate",
        "--descriptors {desc} --ground-truth {missing}.csv --output-dir {out}/e",
        "{missing}",
        "{out}/e",
    ),
    ("match", "--descriptors {desc} --output {out}/m.csv --max-results 0", "max_results", "{out}/m.csv"),
    ("match", "--descriptors {desc} --output {out}/m.csv --max-results 600000", "max_results", "{out}/m.csv"),
    ("match", "--descriptors {missing}.h5 --output {out}/m.csv", "{missing}", "{out}/m.csv"),
    ("tune", "--data {mini} --n-trials 0", "n_trials", None),
    ("tune", "--data {mini} --split test", "split", None),
    ("tune", "--data {mini} --epochs-per-trial 0", "epochs_per_trial", None),
    ("tune", "--data {mini} --config {missing}.yaml", "config", None),
    ("promote", "--min-improvement -1", "min_improvement", None),
    ("promote", "--ground-truth {missing}.csv", "ground_truth", None),
    ("promote", "--model-name ''", "model_name", None),
    (
        "search",
        "--references {missing} --queries {missing} --output {out}/s.csv",
        "references",
        "{out}/s.csv",
    ),
    ("search", "--references {mini}/reference_images --queries {mini}/query_images --topk 0", "topk", None),
    ("export", "--model {missing}.pth.tar --format tflite --output {out}/e.pt", "format", "{out}/e.pt"),
    ("export", "--model {missing}.pth.tar --format torchscript --output {out}/e.pt", "{missing}", "{out}/e.pt"),
    ("export", "--model {missing}.pth.tar --format torchscript --output {mini}", "output", None),
    ("export", "--format onnx --overwrite maybe", "overwrite", None),
    ("serve", "--port 0", "port", None),
    ("serve", "--port 70000", "port", None),
    ("serve", "--model {missing}", "{missing}", None),
    ("serve", "--trust-model-code maybe", "trust_model_code", None),
    ("baseline", "--data {missing} --output-dir {out}/b", "{missing}", "{out}/b"),
    ("baseline", "--data {mini} --method bogus", "method", None),
    (
        "baseline",
        "--data {mini} --ground-truth {missing}.csv --output-dir {out}/b",
        "ground_truth",
        "{out}/b",
    ),
    ("make_mini", "make-mini --out {out}/mm --seed -1", "seed", "{out}/mm"),
    ("make_mini", "make-mini --out {out}/mm --source {missing}", "source", "{out}/mm"),
    ("make_mini", "make-mini --out {out}/mm --size huge", "size", "{out}/mm"),
    ("main", "--data {mini} --n-trials -1", "n_trials", None),
    ("settings", "--model {missing}.pth.tar --data {mini} --ground-truth {missing}.csv", "{missing}", None),
    ("settings", "--model {missing}.pth.tar --data {mini} --ground-truth {gt} --sizes 12,abc", "sizes", None),
    ("settings", "--model {missing}.pth.tar --data {mini} --ground-truth {gt} --tta maybe", "tta", None),
    ("settings", "--model {missing}.pth.tar --data {mini} --ground-truth {missing}.csv --batch-size 0",
     "batch_size", None),
    ("import_seed", "{missing}.pth.tar --output {out}/seed.pth.tar", "{missing}", "{out}/seed.pth.tar"),
    ("import_seed", "{missing}.pth.tar --input-size -3", "input_size", None),
    ("import_seed", "{missing}.pth.tar --overwrite maybe", "overwrite", None),
    ("import_seed", "{missing}.pth.tar --input-size 8", "input_size", None),
    ("main", "--data {mini} --profile bogus", "profile", None),
    ("main", "--data {mini} --force maybe", "force", None),
    ("main", "--data {mini} --nnodes 2 --rdzv-endpoint node0", "rdzv_endpoint", None),
    ("main", "--data {mini} --nnodes 0", "nnodes", None),
    ("join", "--rdzv-endpoint 127.0.0.1:1 --node-rank 0", "node_rank", None),
    ("join", "--rdzv-endpoint nohost --node-rank 1", "rdzv_endpoint", None),
    ("join", "--rdzv-endpoint 127.0.0.1:1 --node-rank 1 --timeout -1", "timeout", None),
]

ENTRYPOINTS = sorted({c[0] for c in CASES})


def _case_id(case: tuple) -> str:
    entry, argv, name, _ = case
    return f"{entry}-{name.strip('{}')}-{argv.split()[-1].replace('/', '_')[-20:]}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """One SQLite store for the module (a fresh one per case would cost seconds each)."""
    home = tmp_path_factory.mktemp("bad_params_store")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISC_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        yield uri


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, mini_data) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad_params_inputs")
    rng = np.random.default_rng(0)
    q, r = rng.standard_normal((3, 8)).astype("float32"), rng.standard_normal((4, 8)).astype("float32")
    desc = write_descriptors(d / "d.h5", q, ["Q0", "Q1", "Q2"], r, ["R0", "R1", "R2", "R3"])
    train = write_train_descriptors(d / "t.h5", rng.standard_normal((20, 8)).astype("float32"),
                                    [f"T{i:02d}" for i in range(20)])  # fmt: skip
    gt = write_ground_truth(d / "gt.csv", [("Q0", "R0"), ("Q1", None), ("Q2", "R3")])
    root = getattr(mini_data, "root", None) or Path(mini_data.query_dir).parent
    return {"mini": str(root), "desc": str(desc), "train": str(train), "gt": str(gt),
            "missing": str(d / "does_not_exist")}  # fmt: skip


def _running_runs(uri: str) -> list[str]:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not exps:
        return []
    runs = client.search_runs(exps, filter_string="attributes.status = 'RUNNING'", run_view_type=ViewType.ALL)
    return [f"{r.info.run_name} ({r.info.run_id})" for r in runs]


def _names_parameter(line: str, name: str) -> bool:
    return name in line or name.replace("_", "-") in line


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_parameter_exits_2_naming_it_before_any_work(case, store, files, tmp_path):
    import shlex

    entry, template, name, output = case
    values = {**files, "out": str(tmp_path / "out")}
    argv = shlex.split(template.format(**values))
    name = name.format(**values)
    importlib.import_module(f"entrypoints.{entry}")  # import cost is not "work": keep it out of the timing
    err, out = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = run_entrypoint(f"entrypoints.{entry}", argv)
        except SystemExit as exc:  # argparse: usage + error line, status 2
            rc = exc.code
    elapsed = time.monotonic() - t0
    text = err.getvalue()
    assert rc == 2, f"exit {rc}; stderr:\n{text[-3000:]}"
    error_lines = [ln for ln in text.splitlines() if ln.startswith("error:") or ": error: " in ln]
    assert error_lines, text[-3000:]
    assert _names_parameter(error_lines[-1], name), error_lines[-1]
    assert "Traceback" not in text
    assert elapsed < 20, f"{elapsed:.1f}s: work started before validation"
    if output is not None:
        assert not Path(output.format(**values)).exists(), "a bad run wrote output"
    assert _running_runs(store) == []


def test_every_entry_point_with_parameters_is_covered():
    declared = {p.stem for p in (PROJECT_ROOT / "entrypoints").glob("*.py") if not p.stem.startswith("_")}
    declared -= {"cli"}  # the `isc` dispatcher, not an entry point
    assert declared <= set(ENTRYPOINTS), f"add bad-parameter cases for {sorted(declared - set(ENTRYPOINTS))}"


@pytest.mark.slow
def test_bad_parameter_through_python_dash_m_exits_2_with_one_error_line(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ISC_HOME=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.train", "--data", files["mini"], "--memory-size", "0"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: memory_size: must be > 0, got 0"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or _running_runs(env["MLFLOW_TRACKING_URI"]) == []
