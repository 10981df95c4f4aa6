"""Negative embedding subtraction: the faiss implementation against the definition, and the CLI step."""

from __future__ import annotations

from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest

from entrypoints import postprocess as pp_entry
from isc.errors import ConfigError, DescriptorFileError
from isc.io import read_descriptors, read_train_descriptors, write_descriptors, write_train_descriptors
from isc.postprocess import (
    MAX_K,
    MAX_NUM_ITER,
    NESConfig,
    bank_index,
    dba,
    negative_embedding_subtraction,
    postprocess_descriptors,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- the definition, in plain numpy (brute-force similarities, no faiss, no batching) ----


def _ref_topk(x: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = x.astype(np.float64) @ db.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def _ref_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_dba(t: np.ndarray, k: int, alpha: float) -> np.ndarray:
    sims, idx = _ref_topk(t, t, k)
    out = np.zeros(t.shape, dtype=np.float64)
    for i in range(t.shape[0]):
        for j in range(k):
            out[i] += t[idx[i, j]] * sims[i, j] ** alpha
    return _ref_normalize(out)


def _ref_nes(x: np.ndarray, bank: np.ndarray, k: int, beta: float, num_iter: int) -> np.ndarray:
    x = x.astype(np.float64)
    for _ in range(num_iter):
        _, idx = _ref_topk(x, bank, k)
        x = _ref_normalize(x - beta * bank[idx].mean(axis=1))
    return x


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"q": _unit(rng, 57, 32), "r": _unit(rng, 83, 32), "t": _unit(rng, 301, 32)}


def test_dba_equals_definition_itself_included(vectors):
    t = vectors["t"]
    got = dba(t, k=10, alpha=3.0)
    np.testing.assert_allclose(got, _ref_dba(t, 10, 3.0), atol=1e-5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # k=1 keeps only the row itself (sim 1): DBA is then the identity.
    np.testing.assert_allclose(dba(t, k=1, alpha=3.0), t, atol=1e-6)


def test_nes_equals_definition_for_several_iterations(vectors):
    bank = dba(vectors["t"], k=10, alpha=3.0)
    for num_iter, beta, k in [(1, 0.35, 10), (3, 0.5, 4)]:
        got = negative_embedding_subtraction(vectors["q"], bank, k=k, beta=beta, num_iter=num_iter)
        want = _ref_nes(vectors["q"], bank.astype(np.float64), k, beta, num_iter)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # beta 0 or no iteration leaves the descriptors where they were.
    np.testing.assert_allclose(
        negative_embedding_subtraction(vectors["q"], bank, beta=0.0), vectors["q"], atol=1e-6
    )
    np.testing.assert_array_equal(
        negative_embedding_subtraction(vectors["q"], bank, num_iter=0), vectors["q"]
    )


def test_batched_search_gives_the_same_result_as_one_batch(vectors):
    # faiss computes small batches (< 20 rows) without BLAS: identical neighbours, equal values to float eps.
    t, q = vectors["t"], vectors["q"]
    one = postprocess_descriptors(q, vectors["r"], t, batch_size=10_000)
    many = postprocess_descriptors(q, vectors["r"], t, batch_size=7)
    np.testing.assert_allclose(one.bank, many.bank, atol=1e-6)
    np.testing.assert_allclose(one.query, many.query, atol=1e-6)
    np.testing.assert_allclose(one.reference, many.reference, atol=1e-6)
    sims1, idx1 = bank_index(t).search(q, 5, batch_size=10_000)
    sims2, idx2 = bank_index(t).search(q, 5, batch_size=3)
    np.testing.assert_array_equal(idx1, idx2)
    np.testing.assert_allclose(sims1, sims2, atol=1e-6)


def test_full_recipe_equals_definition_for_queries_and_references_separately(vectors):
    cfg = NESConfig(k=10, beta=0.35, num_iter=1, dba_k=10, dba_alpha=3.0)
    res = postprocess_descriptors(vectors["q"], vectors["r"], vectors["t"], cfg)
    bank = _ref_dba(vectors["t"], 10, 3.0)
    np.testing.assert_allclose(res.query, _ref_nes(vectors["q"], bank, 10, 0.35, 1), atol=1e-5)
    np.testing.assert_allclose(res.reference, _ref_nes(vectors["r"], bank, 10, 0.35, 1), atol=1e-5)


def test_fractional_dba_alpha_never_produces_nan():
    # Anti-correlated bank: some of the k neighbours have negative similarity.
    rng = np.random.default_rng(1)
    t = _unit(rng, 12, 3)
    out = dba(t, k=12, alpha=2.5)
    assert np.isfinite(out).all()


def test_subtraction_pushes_descriptors_away_from_the_shared_background_direction():
    # Why NES helps: every vector carries a common component; subtracting the bank mean removes it.
    rng = np.random.default_rng(2)
    common = np.zeros(32, dtype=np.float32)
    common[0] = 3.0
    t = _unit(rng, 200, 32) + common
    q = _unit(rng, 50, 32) + common
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    out = negative_embedding_subtraction(q, dba(t), beta=0.35)
    assert out[:, 0].mean() < q[:, 0].mean() - 0.05


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"query": np.zeros((0, 8), np.float32)}, "query"),
        ({"train": np.ones((5, 4), np.float32)}, "train"),
        ({"reference": np.full((3, 8), np.nan, np.float32)}, "reference"),
    ],
)
def test_bad_arrays_raise_config_error_naming_the_set(kwargs, param):
    rng = np.random.default_rng(3)
    args = {"query": _unit(rng, 4, 8), "reference": _unit(rng, 5, 8), "train": _unit(rng, 20, 8)} | kwargs
    with pytest.raises(ConfigError) as err:
        postprocess_descriptors(**args)
    assert err.value.param == param


def test_bad_constants_are_rejected_by_name():
    for field, value in [("k", 0), ("beta", -1.0), ("num_iter", -1), ("dba_alpha", float("nan"))]:
        with pytest.raises(ConfigError) as err:
            NESConfig(**{field: value}).validate()
        assert err.value.param == field


def test_constants_above_their_stated_maximum_are_refused():
    """--num-iter 10000000 ran for hours (hostile round); k / dba_k above MAX_K hold batch x k neighbours per
    search. The bound itself is accepted; the pyfunc's path (negative_embedding_subtraction) refuses too."""
    for field, top in [("num_iter", MAX_NUM_ITER), ("k", MAX_K), ("dba_k", MAX_K)]:
        NESConfig(**{field: top}).validate()
        with pytest.raises(ConfigError, match=rf"{field}: {top + 1}.* {top}\b") as err:
            NESConfig(**{field: top + 1}).validate()
        assert err.value.param == field
    rng = np.random.default_rng(5)
    with pytest.raises(ConfigError, match="num_iter: 10000000 is outside"):
        negative_embedding_subtraction(_unit(rng, 3, 8), _unit(rng, 20, 8), num_iter=10_000_000)


# ---- the entry point ----


def _write_inputs(tmp: Path, d: int = 16, nt: int = 120) -> tuple[Path, Path]:
    rng = np.random.default_rng(4)
    desc = tmp / "descriptors.h5"
    train = tmp / "train_descriptors.h5"
    write_descriptors(
        desc,
        _unit(rng, 9, d),
        [f"Q{i:05d}" for i in range(9)],
        _unit(rng, 13, d),
        [f"R{i:06d}" for i in range(13)],
    )
    write_train_descriptors(train, _unit(rng, nt, d), [f"T{i:06d}" for i in range(nt)])
    return desc, train


def test_cli_writes_subtracted_descriptors_and_bank_and_logs_them(tmp_path, tracking):
    desc, train = _write_inputs(tmp_path)
    out = tmp_path / "out" / "nes.h5"
    rc = pp_entry.main(
        [
            "--descriptors",
            str(desc),
            "--train-descriptors",
            str(train),
            "--output",
            str(out),
            "--beta",
            "0.5",
            "--dba_k",
            "5",
        ]
    )
    assert rc == 0
    raw = read_descriptors(desc)
    got = read_descriptors(out)
    t, tids = read_train_descriptors(train)
    want = postprocess_descriptors(raw.query, raw.reference, t, NESConfig(beta=0.5, dba_k=5))
    assert got.query_ids == raw.query_ids and got.reference_ids == raw.reference_ids
    np.testing.assert_allclose(got.query, want.query, atol=1e-6)
    np.testing.assert_allclose(got.reference, want.reference, atol=1e-6)
    bank, bank_ids = read_train_descriptors(out.parent / "nes_bank.h5")
    assert bank_ids == tids
    np.testing.assert_allclose(bank, want.bank, atol=1e-6)

    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["isc.step"] == "postprocess"
    assert run.data.params["beta"] == "0.5" and run.data.params["dba_k"] == "5"
    assert run.data.params["knn_backend"] == "faiss-cpu"  # no GPU here (issue 21: one chooser, recorded)
    assert run.data.metrics["n_query"] == 9 and run.data.metrics["n_train"] == 120
    assert 0.0 < run.data.metrics["nes_query_cos_to_raw"] < 1.0
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "descriptors")}
    assert names == {"descriptors/descriptors_nes.h5", "descriptors/nes_bank.h5"}


def test_cli_reads_inputs_from_mlflow_run_ids(tmp_path, tracking):
    desc, train = _write_inputs(tmp_path)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(desc), "descriptors")
        mlflow.log_artifact(str(train), "descriptors")
    out = tmp_path / "o.h5"
    run_id = run.info.run_id
    rc = pp_entry.main(
        [
            "--descriptors",
            run_id,
            "--train-descriptors",
            f"runs:/{run_id}/descriptors/train_descriptors.h5",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    assert read_descriptors(out).query.shape == (9, 16)


def _nan_descriptor_file(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["query"] = np.full((2, 16), np.nan, np.float32)
        f["reference"] = np.ones((2, 16), np.float32) / 4
        f["query_ids"] = np.array([b"Q00000", b"Q00001"])
        f["reference_ids"] = np.array([b"R000000", b"R000001"])
    return path


@pytest.mark.parametrize("problem", ["dim_mismatch", "nan", "missing_train", "empty_train"])
def test_cli_bad_input_names_the_file_and_writes_nothing(tmp_path, tracking, problem):
    desc, train = _write_inputs(tmp_path)
    culprit = train
    if problem == "dim_mismatch":
        _, train = _write_inputs(tmp_path / "other", d=8)
        culprit = train
    elif problem == "nan":
        desc = culprit = _nan_descriptor_file(tmp_path / "nan.h5")
    elif problem == "missing_train":
        train = culprit = tmp_path / "nope.h5"
    else:
        with h5py.File(train, "w") as f:
            f.create_dataset("train", shape=(0, 16), dtype="f4")
            f.create_dataset("train_ids", shape=(0,), dtype="S7")
    out = tmp_path / "out" / "nes.h5"
    with pytest.raises((DescriptorFileError, ConfigError)) as err:
        pp_entry.main(["--descriptors", str(desc), "--train-descriptors", str(train), "--output", str(out)])
    assert str(culprit) in str(err.value)
    assert not out.exists() and not (out.parent / "nes_bank.h5").exists()


def test_cli_rejects_bad_constants_before_reading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pp_entry.main(["--descriptors", "x", "--train-descriptors", "y", "--k", "0"])
    assert "--k" in capsys.readouterr().err
