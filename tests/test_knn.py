"""Exactness of the faiss searches against enumerating every (query, reference) pair."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isc.errors import ConfigError
from isc.knn import BACKENDS, FlatIndex, global_topk, knn, knn_backend


def all_pairs_ranked(q: np.ndarray, r: np.ndarray, metric: str):
    """Every pair as (score, q, r), exact integer arithmetic, in the documented total order."""
    qi, ri = q.astype(np.int64), r.astype(np.int64)
    if metric == "l2":
        s = -((qi[:, None, :] - ri[None, :, :]) ** 2).sum(-1)
    else:
        s = (qi[:, None, :] * ri[None, :, :]).sum(-1)
    pairs = [(int(s[i, j]), i, j) for i in range(len(q)) for j in range(len(r))]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return pairs


@settings(max_examples=80, deadline=None)
@given(
    st.integers(0, 100_000),
    st.integers(1, 12),
    st.integers(1, 40),
    st.integers(1, 600),
    st.sampled_from(["l2", "ip"]),
    st.sampled_from([None, 1, 2, 3]),
)
def test_global_topk_equals_brute_force_with_many_ties(seed, nq, nr, k_total, metric, k_per_query):
    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, size=(nq, 3)).astype(np.float32)  # quantised: lots of exact ties
    r = rng.integers(-1, 2, size=(nr, 3)).astype(np.float32)
    top = global_topk(q, r, k_total, metric, batch_size=5, k_per_query=k_per_query, progress=False)
    expect = all_pairs_ranked(q, r, metric)[:k_total]
    assert top.q_idx.tolist() == [t[1] for t in expect]
    assert top.r_idx.tolist() == [t[2] for t in expect]
    assert top.score.tolist() == [float(t[0]) for t in expect]


def test_global_topk_re_searches_a_query_that_owns_most_of_the_top_k():
    rng = np.random.default_rng(0)
    refs = rng.integers(-50, 51, size=(300, 8)).astype(np.float32)
    refs[:60] = rng.integers(-2, 3, size=(60, 8))  # 60 references around the origin
    queries = rng.integers(200, 300, size=(20, 8)).astype(np.float32)  # far from everything
    queries[7] = 0  # query 7 sits in the cluster: it owns the whole global top 50
    top = global_topk(queries, refs, 50, k_per_query=4, progress=False)
    assert top.n_research >= 1
    assert (top.q_idx == 7).all()
    expect = all_pairs_ranked(queries, refs, "l2")[:50]
    assert top.r_idx.tolist() == [t[2] for t in expect]


def test_global_topk_returns_every_pair_when_k_exceeds_the_pair_count():
    q = np.eye(3, dtype=np.float32)
    top = global_topk(q, q, 100, progress=False)
    assert len(top.score) == 9
    assert sorted(zip(top.q_idx.tolist(), top.r_idx.tolist(), strict=True))[:3] == [(0, 0), (0, 1), (0, 2)]


def test_knn_returns_each_querys_k_best_best_first():
    rng = np.random.default_rng(3)
    q = rng.integers(-3, 4, size=(6, 4)).astype(np.float32)
    r = rng.normal(size=(25, 4)).astype(np.float32)  # continuous: no ties inside a query
    qi, ri, s = knn(q, r, 5, "l2", batch_size=4)
    assert qi.tolist() == [i for i in range(6) for _ in range(5)]
    d = ((q[:, None, :].astype(np.float64) - r[None].astype(np.float64)) ** 2).sum(-1)
    for i in range(6):
        assert ri[qi == i].tolist() == np.argsort(d[i])[:5].tolist()
        np.testing.assert_allclose(s[qi == i], -np.sort(d[i])[:5], rtol=1e-4, atol=1e-4)


def test_knn_with_k_larger_than_the_reference_set_returns_all_references():
    qi, ri, _ = knn(np.zeros((2, 2), np.float32), np.eye(2, dtype=np.float32), 10)
    assert len(qi) == 4 and sorted(ri.tolist()) == [0, 0, 1, 1]


def test_search_rejects_bad_parameters():
    index = FlatIndex(np.eye(4, dtype=np.float32))
    with pytest.raises(ConfigError, match="query"):
        index.search(np.zeros((2, 3), np.float32), 1)
    with pytest.raises(ConfigError, match="metric"):
        FlatIndex(np.eye(4, dtype=np.float32), metric="cosine")
    with pytest.raises(ConfigError, match="k_total"):
        global_topk(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), 0)


def _fixed_set(metric: str):
    """Queries near distinct references (no ties at any rank that matters) plus pure-noise queries."""
    rng = np.random.default_rng(21)
    ref = rng.standard_normal((3000, 64)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    q = np.concatenate([ref[:300] + 0.04 * rng.standard_normal((300, 64)), rng.standard_normal((100, 64))])
    q = q.astype(np.float32)
    if metric == "ip":
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, ref


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_and_faiss_backends_return_the_same_neighbours(metric):
    """The paths knn_backend() chooses between: on this CPU machine faiss-cpu vs the torch path on the CPU
    (torch-cuda is the same code on the GPU; faiss-gpu is checked by bench/gpu_check.sh)."""
    q, ref = _fixed_set(metric)
    faiss_idx, torch_idx = FlatIndex(ref, metric, backend="faiss-cpu"), FlatIndex(ref, metric, backend="torch-cpu")
    assert (faiss_idx.backend, torch_idx.backend) == ("faiss-cpu", "torch-cpu")
    s1, i1 = faiss_idx.search(q, 10, batch_size=128)
    s2, i2 = torch_idx.search(q, 10, batch_size=128)
    assert np.array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    assert np.array_equal(i1[:300, 0], np.arange(300))  # the planted neighbours are found
    a = global_topk(q, None, 500, metric, index=faiss_idx, progress=False)
    b = global_topk(q, None, 500, metric, index=torch_idx, progress=False)
    # the same 500 pairs; the order may differ between pairs whose scores differ by float rounding only
    assert set(zip(a.q_idx.tolist(), a.r_idx.tolist(), strict=True)) == set(zip(b.q_idx.tolist(), b.r_idx.tolist(), strict=True))
    np.testing.assert_allclose(a.score, b.score, atol=1e-4)
    # k beyond the reference count: every reference, the rest padded
    s3, i3 = torch_idx.search(q[:2], 3005)
    assert np.array_equal(np.sort(i3[:, :3000], axis=1), np.tile(np.arange(3000), (2, 1))) and (i3[:, 3000:] == -1).all()


def test_backend_choice_without_a_gpu_is_faiss_cpu_and_is_checked():
    assert knn_backend() == "faiss-cpu" and knn_backend(use_gpu=False) == "faiss-cpu"
    assert FlatIndex(np.eye(4, dtype=np.float32)).backend == "faiss-cpu"
    assert set(BACKENDS) == {"faiss-gpu", "torch-cuda", "faiss-cpu", "torch-cpu"}
    with pytest.raises(ConfigError, match="backend"):
        FlatIndex(np.eye(4, dtype=np.float32), backend="annoy")


def test_match_records_the_knn_engine_it_searched_with(tracking, tmp_path):
    """`isc match` inside a run logs `knn_backend` (postprocess: tests/test_postprocess.py)."""
    import mlflow

    from entrypoints import match
    from isc.io import write_descriptors

    q, ref = _fixed_set("ip")
    desc = write_descriptors(tmp_path / "d.h5", q[:20], [f"Q{i:02d}" for i in range(20)], ref[:50],
                             [f"R{i:02d}" for i in range(50)])  # fmt: skip
    with mlflow.start_run() as run:
        assert match.main(["--descriptors", str(desc), "--output", str(tmp_path / "m.csv"), "--max-results", "30"]) == 0
    params = mlflow.get_run(run.info.run_id).data.params
    assert params["knn_backend"] == "faiss-cpu" and params["max_results"] == "30"
