"""Exactness of the faiss searches against enumerating every (query, reference) pair."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isc.errors import ConfigError
from isc.knn import FlatIndex, global_topk, knn


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
