"""ISC21 file formats: round trips, sorting, validation errors naming the file, atomic writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from isc.errors import DescriptorFileError
from isc.fileutil import atomic_path
from isc.io import (
    read_descriptors,
    read_ground_truth,
    read_train_descriptors,
    write_descriptors,
    write_ground_truth,
    write_matches_csv,
    write_train_descriptors,
)


def _rand(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_write_descriptors_sorts_rows_by_id_and_round_trips(tmp_path):
    q = _rand(3)
    r = _rand(4, seed=1)
    path = write_descriptors(tmp_path / "d.h5", q, ["Q2", "Q0", "Q1"], r, ["R3", "R1", "R0", "R2"])
    d = read_descriptors(path)
    assert d.query_ids == ["Q0", "Q1", "Q2"]
    assert d.reference_ids == ["R0", "R1", "R2", "R3"]
    np.testing.assert_array_equal(d.query[0], q[1])
    np.testing.assert_array_equal(d.reference[3], r[0])
    with h5py.File(path) as f:
        assert f["query"].dtype == np.float32
        assert f["query_ids"].dtype.kind == "S"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.__delitem__("reference"), "missing dataset 'reference'"),
        (lambda f: (f.__delitem__("query"), f.create_dataset("query", data=np.full((2, 8), np.nan, np.float32))), "NaN/inf"),
        (lambda f: (f.__delitem__("query_ids"), f.create_dataset("query_ids", data=np.array([b"Q0", b"Q0"]))), "duplicate ids"),
        (lambda f: (f.__delitem__("reference"), f.create_dataset("reference", data=np.zeros((2, 4), np.float32))), "dim"),
        (lambda f: (f.__delitem__("query"), f.create_dataset("query", data=np.zeros((2, 300), np.float32))), "300 > 256"),
    ],
)
def test_read_descriptors_rejects_bad_files_naming_them(tmp_path, mutate, message):
    path = write_descriptors(tmp_path / "bad.h5", _rand(2), ["Q0", "Q1"], _rand(2, seed=3), ["R0", "R1"])
    with h5py.File(path, "a") as f:
        mutate(f)
    with pytest.raises(DescriptorFileError) as err:
        read_descriptors(path)
    assert message in str(err.value)
    assert "bad.h5" in str(err.value)


def test_large_dimension_accepted_only_when_allowed(tmp_path):
    path = write_descriptors(tmp_path / "big.h5", _rand(2, 512), ["Q0", "Q1"], _rand(2, 512), ["R0", "R1"], allow_large_dim=True)
    assert read_descriptors(path, allow_large_dim=True).dim == 512
    with pytest.raises(DescriptorFileError, match="512 > 256"):
        read_descriptors(path)


def test_not_an_hdf5_file_is_named(tmp_path):
    path = tmp_path / "oops.h5"
    path.write_text("hello")
    with pytest.raises(DescriptorFileError, match="oops.h5.*not a readable HDF5"):
        read_descriptors(path)


def test_failed_write_keeps_previous_file_and_leaves_no_partial(tmp_path):
    path = write_train_descriptors(tmp_path / "t.h5", _rand(3), ["T0", "T1", "T2"])
    before = path.read_bytes()
    bad = _rand(2)
    bad[1, 0] = np.inf
    with pytest.raises(DescriptorFileError):
        write_train_descriptors(path, bad, ["T0", "T1"])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]
    x, ids = read_train_descriptors(path)
    assert ids == ["T0", "T1", "T2"] and x.shape == (3, 8)


def test_atomic_path_removes_temp_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_ground_truth_keeps_distractors_and_positive_pairs(tmp_path):
    path = write_ground_truth(tmp_path / "gt.csv", [("Q0", "R5"), ("Q1", None), ("Q2", "R1")])
    gt = read_ground_truth(path)
    assert gt.queries == ["Q0", "Q1", "Q2"]
    assert gt.positives == {("Q0", "R5"), ("Q2", "R1")}
    headerless = tmp_path / "nohdr.csv"
    headerless.write_text("Q7,R1\nQ8,\n")
    assert read_ground_truth(headerless).queries == ["Q7", "Q8"]


def test_ground_truth_errors_name_the_file(tmp_path):
    with pytest.raises(DescriptorFileError, match="missing.csv"):
        read_ground_truth(tmp_path / "missing.csv")
    bad = tmp_path / "three.csv"
    bad.write_text("query_id,reference_id\nQ0,R1,0.5\n")
    with pytest.raises(DescriptorFileError, match="three.csv: line 2"):
        read_ground_truth(bad)


def test_matches_csv_is_best_first_deduplicated(tmp_path):
    path = write_matches_csv(tmp_path / "m.csv", ["Q0", "Q0", "Q1", "Q0"], ["R0", "R1", "R0", "R0"], [0.1, 0.9, 0.5, 0.05])
    lines = path.read_text().splitlines()
    assert lines[0] == "query_id,reference_id,score"
    assert lines[1:] == ["Q0,R1,0.900000", "Q1,R0,0.500000", "Q0,R0,0.100000"]
