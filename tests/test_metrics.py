"""The ISC21 scorer against a from-the-definition brute force, and one hand-made case per rule."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from isc.errors import ConfigError, DescriptorFileError, ISCError
from isc.io import Descriptors, GroundTruth, read_descriptors
from isc.metrics import (
    PredictionsError,
    RankedPredictions,
    bootstrap_average_precision,
    evaluate,
    ground_truth_fingerprint,
    score_coded,
)

# ----------------------------------------------------------------------------------------------
# Brute-force reference: written from evaluation.md section 1, loops and Python floats only.


def brute_force_score(preds, gt: GroundTruth, restrict: bool = True) -> dict:
    gt_queries = set(gt.queries)
    rows = [(q, r, float(s)) for q, r, s in preds if (q in gt_queries or not restrict)]
    labelled = [(q, r, s, (q, r) in gt.positives) for q, r, s in rows]
    # pessimistic: higher score first; among equal scores negatives (False) first
    ranked = sorted(labelled, key=lambda t: (-t[2], t[3]))
    n_pos = len(gt.positives)
    tp = 0
    ap = 0.0
    prev_recall = 0.0
    best_recall, threshold = None, None
    for i, (_, _, s, y) in enumerate(ranked, start=1):
        tp += y
        precision, recall = tp / i, tp / n_pos
        ap += (recall - prev_recall) * precision  # the step-sum form
        prev_recall = recall
        if precision >= 0.9 and (best_recall is None or recall > best_recall):
            best_recall, threshold = recall, s
    ranks = []
    for q, _r, s, y in labelled:
        if y:
            ranks.append(sum(1 for q2, _, s2, _ in labelled if q2 == q and s2 >= s))
    return {
        "average_precision": ap,
        "recall_p90": best_recall if best_recall is not None else 0.0,
        "threshold_p90": threshold,
        "recall_at_rank1": sum(k <= 1 for k in ranks) / n_pos,
        "recall_at_rank10": sum(k <= 10 for k in ranks) / n_pos,
        "n_predictions": len(rows),
    }


def assert_matches(m, ref: dict) -> None:
    assert m.average_precision == pytest.approx(ref["average_precision"], abs=1e-9)
    assert m.recall_p90 == pytest.approx(ref["recall_p90"], abs=1e-9)
    if ref["threshold_p90"] is None:
        assert m.threshold_p90 is None
    else:
        assert m.threshold_p90 == pytest.approx(ref["threshold_p90"], abs=1e-9)
    assert m.recall_at_rank1 == pytest.approx(ref["recall_at_rank1"], abs=1e-9)
    assert m.recall_at_rank10 == pytest.approx(ref["recall_at_rank10"], abs=1e-9)
    assert m.n_predictions == ref["n_predictions"]


def score_predictions(qids, rids, scores, gt: GroundTruth, restrict_to_gt_queries: bool = True,
                      return_ranking: bool = False):
    """A flat prediction list scored by the scorer's core, :func:`score_coded`, as :func:`evaluate` does
    after its search: ids become integer codes (GT ids included), predictions of queries outside the GT
    are dropped (DrivenData) or kept as false positives (isc2021 ``--max_results``)."""
    preds = [(q, r, float(s)) for q, r, s in zip(qids, rids, scores, strict=True)]
    if restrict_to_gt_queries:
        preds = [p for p in preds if p[0] in set(gt.queries)]
    qnames = np.array(sorted({p[0] for p in preds} | set(gt.queries)), dtype=object)
    rnames = np.array(sorted({p[1] for p in preds} | {r for _, r in gt.positives}), dtype=object)
    qcode = {q: i for i, q in enumerate(qnames)}
    rcode = {r: i for i, r in enumerate(rnames)}
    qc = np.array([qcode[p[0]] for p in preds], dtype=np.int64)
    rc = np.array([rcode[p[1]] for p in preds], dtype=np.int64)
    s = np.array([p[2] for p in preds], dtype=np.float64)
    pos_q = np.array([qcode[q] for q, _ in gt.positives], dtype=np.int64)
    pos_r = np.array([rcode[r] for _, r in gt.positives], dtype=np.int64)
    metrics, order, ys, precision, recall = score_coded(qc, rc, s, pos_q, pos_r, gt.n_positives,
                                                        names=(qnames, rnames))
    if not return_ranking:
        return metrics
    return metrics, RankedPredictions(qnames[qc[order]], rnames[rc[order]], s[order], ys, precision, recall)


@st.composite
def scoring_problems(draw):
    """GT with positives and distractors, predictions over GT and non-GT queries, many tied scores."""
    nq = draw(st.integers(1, 8))
    nr = draw(st.integers(1, 12))
    queries = [f"Q{i:05d}" for i in range(nq)]
    refs = [f"R{i:06d}" for i in range(nr)]
    positives = set()
    for q in queries:
        if draw(st.booleans()):
            positives.add((q, draw(st.sampled_from(refs))))
    if not positives:
        positives.add((queries[0], refs[0]))
    extra_queries = [f"Q9{i:04d}" for i in range(draw(st.integers(0, 2)))]  # not in the GT
    pairs = [(q, r) for q in queries + extra_queries for r in refs]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=40))
    scores = draw(st.lists(st.integers(-4, 0), min_size=len(chosen), max_size=len(chosen)))
    preds = [(q, r, s / 2.0) for (q, r), s in zip(chosen, scores, strict=True)]
    return preds, GroundTruth(queries, positives)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scoring_problems(), st.booleans())
def test_scorer_equals_brute_force_definition(problem, restrict):
    preds, gt = problem
    q = [p[0] for p in preds]
    r = [p[1] for p in preds]
    s = [p[2] for p in preds]
    m = score_predictions(q, r, s, gt, restrict_to_gt_queries=restrict)
    assert_matches(m, brute_force_score(preds, gt, restrict))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 15), st.integers(0, 3))
def test_official_evaluate_equals_brute_force_on_quantised_descriptors(seed, nq, nr, n_distractor_refs):
    """All pairs enumerated, exact -squared L2 (integer vectors), top 10 x nq kept, then scored."""
    rng = np.random.default_rng(seed)
    nr_total = nr + n_distractor_refs
    query = rng.integers(-1, 2, size=(nq + 2, 3)).astype(np.float32)  # 2 queries outside the GT
    ref = rng.integers(-1, 2, size=(nr_total, 3)).astype(np.float32)
    # a set of one repeated row: evaluate refuses it (any ranking of it is arbitrary), by design
    assume(len(np.unique(query, axis=0)) > 1 and (nr_total == 1 or len(np.unique(ref, axis=0)) > 1))
    qids = [f"Q{i:05d}" for i in range(nq + 2)]
    rids = [f"R{i:06d}" for i in range(nr_total)]
    positives = {(qids[i], rids[int(rng.integers(nr))]) for i in range(nq) if rng.random() < 0.7}
    positives = positives or {(qids[0], rids[0])}
    gt = GroundTruth(qids[:nq], positives)
    res = evaluate(Descriptors(query, qids, ref, rids), gt)

    pairs = []
    for i in range(nq):
        for j in range(nr_total):
            d = float(((query[i].astype(np.int64) - ref[j].astype(np.int64)) ** 2).sum())
            pairs.append((-d, i, j))
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))  # the documented total order at the cut
    top = pairs[: 10 * nq]
    preds = [(qids[i], rids[j], s) for s, i, j in top]
    assert_matches(res.metrics, brute_force_score(preds, gt))
    assert res.n_queries == nq
    assert res.metrics.n_predictions == min(10 * nq, nq * nr_total)


# ----------------------------------------------------------------------------------------------
# One hand-made case per rule.

GT2 = GroundTruth(["Q00000", "Q00001", "Q00002"], {("Q00000", "R000000"), ("Q00001", "R000001")})


def test_ties_put_negatives_before_positives():
    # one positive and one negative at the same score: the positive is ranked 2nd -> precision 1/2
    gt = GroundTruth(["Q00000"], {("Q00000", "R000000")})
    m = score_predictions(["Q00000", "Q00000"], ["R000000", "R000001"], [-1.0, -1.0], gt)
    assert m.average_precision == pytest.approx(0.5)
    assert m.recall_at_rank1 == 0.0  # the tied negative counts ahead of it
    assert m.recall_at_rank10 == 1.0


def test_constant_scores_cannot_earn_a_good_ap():
    gt = GroundTruth(["Q00000"], {("Q00000", "R000000")})
    rids = [f"R{i:06d}" for i in range(10)]
    m = score_predictions(["Q00000"] * 10, rids, [0.0] * 10, gt)
    assert m.average_precision == pytest.approx(0.1)


def test_micro_ap_is_mean_precision_at_true_positive_ranks_over_all_gt_pairs():
    gt = GroundTruth(["Q00000", "Q00001", "Q00002"], {(f"Q0000{i}", f"R00000{i}") for i in range(3)})
    # ranked: TP, FP, TP ; the third GT pair is never predicted
    m = score_predictions(
        ["Q00000", "Q00001", "Q00001"], ["R000000", "R000000", "R000001"], [-0.1, -0.2, -0.3], gt
    )
    assert m.average_precision == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert m.n_true_positives == 2


def test_recall_p90_is_zero_and_threshold_none_when_precision_never_reaches_090():
    m = score_predictions(["Q00000", "Q00000"], ["R000005", "R000000"], [-0.1, -0.2], GT2)
    assert m.recall_p90 == 0.0
    assert m.threshold_p90 is None
    assert m.average_precision == pytest.approx(0.5 / 2)


def test_recall_p90_takes_the_largest_recall_with_precision_at_least_090():
    qs = [f"Q{i:05d}" for i in range(20)]
    gt = GroundTruth(qs, {(q, "R000000") for q in qs})
    # 9 TPs, then 1 FP (precision 0.9 at rank 10), then 1 TP (10/11 >= 0.9), then FPs
    rows = [(qs[i], "R000000", -i) for i in range(9)]
    rows += [
        (qs[9], "R000009", -9),
        (qs[10], "R000000", -10),
        (qs[11], "R000001", -11),
        (qs[12], "R000001", -12),
    ]
    m = score_predictions(*zip(*rows, strict=True), gt)
    assert m.recall_p90 == pytest.approx(10 / 20)
    assert m.threshold_p90 == -10.0


def test_predictions_for_queries_outside_the_ground_truth_are_ignored_officially():
    q, r, s = ["Q00000", "Q77777"], ["R000000", "R000003"], [-0.5, -0.1]
    official = score_predictions(q, r, s, GT2)
    assert official.average_precision == pytest.approx(0.5)  # 1 of 2 GT pairs, at precision 1
    assert official.n_predictions == 1
    capped = score_predictions(q, r, s, GT2, restrict_to_gt_queries=False)  # isc2021 max_results variant
    assert capped.average_precision == pytest.approx(0.25)
    assert capped.n_predictions == 2


def test_distractor_query_predictions_are_false_positives():
    m = score_predictions(["Q00002", "Q00000"], ["R000000", "R000000"], [-0.1, -0.2], GT2)
    assert m.average_precision == pytest.approx(0.5 / 2)


def test_duplicate_prediction_pairs_are_rejected():
    with pytest.raises(PredictionsError, match="duplicate"):
        score_predictions(["Q00000", "Q00000"], ["R000000", "R000000"], [-0.1, -0.2], GT2)


def test_ground_truth_without_positives_is_an_error():
    eye = np.eye(2, dtype=np.float32)
    desc = Descriptors(eye, ["Q00000", "Q00001"], eye, ["R000000", "R000001"])
    with pytest.raises(ConfigError, match="ground_truth"):
        evaluate(desc, GroundTruth(["Q00000"], set()))


def test_recall_at_rank_counts_all_predictions_of_the_query_scored_at_least_as_high():
    qs = ["Q00000", "Q00001"]
    gt = GroundTruth(qs, {("Q00000", "R000000"), ("Q00001", "R000000")})
    rows = [("Q00000", "R000000", -1.0)]  # rank 1
    rows += [("Q00001", f"R00000{i}", -float(i)) for i in range(1, 10)]  # 9 better negatives
    rows += [("Q00001", "R000000", -9.0)]  # ties with R000009 -> rank 10 (pessimistic)
    m = score_predictions(*zip(*rows, strict=True), gt)
    assert m.recall_at_rank1 == pytest.approx(0.5)
    assert m.recall_at_rank10 == pytest.approx(1.0)


def test_official_protocol_caps_candidates_at_ten_per_gt_query_globally():
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    qids, rids = [f"Q{i:05d}" for i in range(5)], [f"R{i:06d}" for i in range(40)]
    gt = GroundTruth(qids[:3], {("Q00000", "R000001")})
    res = evaluate(Descriptors(q, qids, r, rids), gt)
    assert res.n_queries == 3 and res.n_candidates == 30
    assert res.metrics.n_predictions == 30
    assert set(res.ranked.query_ids) <= set(qids[:3])
    assert (res.ranked.scores <= 0).all()  # -squared L2
    capped = evaluate(Descriptors(q, qids, r, rids), gt, protocol="max_results", max_results=17)
    assert capped.n_queries == 5 and capped.metrics.n_predictions == 17
    per_query = evaluate(Descriptors(q, qids, r, rids), gt, protocol="knn", knn=4)
    assert per_query.metrics.n_predictions == 12
    counts = {qq: list(per_query.ranked.query_ids).count(qq) for qq in qids[:3]}
    assert counts == {qq: 4 for qq in qids[:3]}


def test_inner_product_metric_scores_by_dot_product():
    q = np.array([[1, 0], [0, 1]], np.float32)
    r = np.array([[2, 0], [0, 3], [1, 1]], np.float32)
    gt = GroundTruth(["Q00000", "Q00001"], {("Q00000", "R000000"), ("Q00001", "R000001")})
    res = evaluate(
        Descriptors(q, ["Q00000", "Q00001"], r, ["R000000", "R000001", "R000002"]), gt, metric="ip"
    )
    assert res.ranked.scores[:2].tolist() == [3.0, 2.0]
    assert res.metrics.average_precision == pytest.approx(1.0)
    assert res.to_dict()["metric"] == "ip"


def test_gt_ids_missing_from_descriptors_are_named():
    desc = Descriptors(
        np.eye(2, dtype=np.float32), ["Q00000", "Q00001"], np.eye(2, dtype=np.float32), ["R000000", "R000001"]
    )
    with pytest.raises(ISCError, match="Q00042"):
        evaluate(desc, GroundTruth(["Q00000", "Q00042"], {("Q00000", "R000000")}))
    with pytest.raises(ISCError, match="R000077"):
        evaluate(desc, GroundTruth(["Q00000"], {("Q00000", "R000077")}))


def _raw_h5(path, q, r, qids=("Q00000", "Q00001"), rids=("R000000", "R000001"), drop=None):
    with h5py.File(path, "w") as f:
        for name, data in (
            ("query", q),
            ("reference", r),
            ("query_ids", np.array(qids, "S")),
            ("reference_ids", np.array(rids, "S")),
        ):
            if name != drop:
                f.create_dataset(name, data=data)
    return path


def test_bad_descriptor_files_raise_errors_naming_the_file(tmp_path):
    ok = np.ones((2, 4), np.float32)
    with pytest.raises(DescriptorFileError, match="missing dataset 'reference'") as e:
        read_descriptors(_raw_h5(tmp_path / "a.h5", ok, ok, drop="reference"))
    assert "a.h5" in str(e.value)
    big = np.ones((2, 300), np.float32)
    with pytest.raises(DescriptorFileError, match="300 > 256"):
        read_descriptors(_raw_h5(tmp_path / "b.h5", big, big))
    assert read_descriptors(tmp_path / "b.h5", allow_large_dim=True).dim == 300
    nan = ok.copy()
    nan[1, 2] = np.nan
    with pytest.raises(DescriptorFileError, match="NaN"):
        read_descriptors(_raw_h5(tmp_path / "c.h5", nan, ok))
    with pytest.raises(DescriptorFileError, match="duplicate ids"):
        read_descriptors(_raw_h5(tmp_path / "d.h5", ok, ok, qids=("Q00000", "Q00000")))
    with pytest.raises(DescriptorFileError, match="query dim 4 != reference dim 3"):
        read_descriptors(_raw_h5(tmp_path / "e.h5", ok, np.ones((2, 3), np.float32)))


def test_in_memory_descriptors_are_validated_too():
    bad = Descriptors(
        np.full((1, 2), np.inf, np.float32), ["Q00000"], np.ones((1, 2), np.float32), ["R000000"]
    )
    with pytest.raises(DescriptorFileError, match="NaN/inf"):
        evaluate(bad, GroundTruth(["Q00000"], {("Q00000", "R000000")}))
    with pytest.raises(ConfigError, match="protocol"):
        evaluate(bad, GroundTruth(["Q00000"], {("Q00000", "R000000")}), protocol="macro")


def test_ground_truth_fingerprint_depends_on_content_not_order():
    a = GroundTruth(["Q00001", "Q00000"], {("Q00000", "R000001"), ("Q00001", "R000002")})
    b = GroundTruth(["Q00000", "Q00001"], {("Q00001", "R000002"), ("Q00000", "R000001")})
    c = GroundTruth(["Q00000", "Q00001"], {("Q00001", "R000002"), ("Q00000", "R000003")})
    d = GroundTruth(["Q00000", "Q00001", "Q00002"], {("Q00001", "R000002"), ("Q00000", "R000001")})
    assert ground_truth_fingerprint(a) == ground_truth_fingerprint(b)
    assert len({ground_truth_fingerprint(x) for x in (a, c, d)}) == 3
    assert len(ground_truth_fingerprint(a)) == 64


# ----------------------------------------------------------------------------------------------
# Query bootstrap: every replicate must equal scoring a materialised resample (queries copied m times).


def _materialise(preds, gt: GroundTruth, queries: list[str], counts: np.ndarray):
    """The replicate as an ordinary scoring problem: query q drawn m times becomes q#0 .. q#(m-1)."""
    by_query: dict[str, list] = {}
    for q, r, s in preds:
        by_query.setdefault(q, []).append((r, s))
    rows, gt_queries, positives = [], [], set()
    for q, m in zip(queries, counts, strict=True):
        for k in range(int(m)):
            name = f"{q}#{k}"
            gt_queries.append(name)
            rows += [(name, r, s) for r, s in by_query.get(q, [])]
            positives |= {(name, r) for q2, r in gt.positives if q2 == q}
    return rows, GroundTruth(gt_queries, positives)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scoring_problems(), st.integers(0, 2**31 - 1))
def test_bootstrap_replicates_equal_scoring_the_resampled_queries(problem, seed):
    preds, gt = problem
    q, r, s = zip(*preds, strict=True) if preds else ((), (), ())
    _, ranked = score_predictions(q, r, s, gt, return_ranking=True)
    boot = bootstrap_average_precision([ranked], gt, n_boot=4, seed=seed)
    assert boot.counts.sum(axis=1).tolist() == [len(set(gt.queries))] * 4
    for b in range(4):
        rows, gt_b = _materialise(preds, gt, boot.queries, boot.counts[b])
        if gt_b.n_positives == 0:
            assert boot.samples[0, b] == 0.0
            continue
        qb, rb, sb = zip(*rows, strict=True) if rows else ((), (), ())
        expected = score_predictions(qb, rb, sb, gt_b).average_precision
        assert boot.samples[0, b] == pytest.approx(expected, abs=1e-9)


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_queries():
    rng = np.random.default_rng(3)

    def problem(nq):
        queries = [f"Q{i:05d}" for i in range(nq)]
        gt = GroundTruth(queries, {(q, f"R{i:06d}") for i, q in enumerate(queries) if i % 3})
        preds = []
        for i, q in enumerate(queries):
            hit = rng.random() < 0.6  # the right reference is retrieved for ~60 % of queries
            preds.append((q, f"R{i:06d}" if hit else f"R9{i:05d}", float(rng.normal(1.0 if hit else 0.0))))
        q, r, s = zip(*preds, strict=True)
        m, ranked = score_predictions(q, r, s, gt, return_ranking=True)
        return m.average_precision, bootstrap_average_precision([ranked], gt, n_boot=400, seed=0)

    ap_small, small = problem(40)
    ap_big, big = problem(1600)
    lo, hi = small.interval()
    assert lo < ap_small < hi
    lo_b, hi_b = big.interval()
    assert lo_b < ap_big < hi_b
    assert (hi_b - lo_b) < (hi - lo) / 3  # width ~ 1/sqrt(n): 40x the queries, ~6x narrower


def test_paired_bootstrap_difference_of_a_ranking_with_itself_is_zero_and_orders_a_clear_winner():
    queries = [f"Q{i:05d}" for i in range(30)]
    gt = GroundTruth(queries, {(q, f"R{i:06d}") for i, q in enumerate(queries)})
    good = score_predictions(queries, [f"R{i:06d}" for i in range(30)], np.linspace(1, 2, 30), gt,
                           return_ranking=True)[1]
    bad = score_predictions(queries, [f"R{(i + 1) % 30:06d}" for i in range(30)], np.linspace(1, 2, 30), gt,
                          return_ranking=True)[1]
    boot = bootstrap_average_precision([good, bad, good], gt, n_boot=200)
    assert boot.samples[0].min() == 1.0 and boot.samples[1].max() == 0.0
    assert boot.difference(0, 1) == (1.0, 1.0, 1.0)
    assert boot.difference(0, 2)[:2] == (0.0, 0.0) and boot.difference(0, 2)[2] == 0.0


def test_bootstrap_rejects_bad_parameters():
    gt = GroundTruth(["Q0"], {("Q0", "R0")})
    _, ranked = score_predictions(["Q0"], ["R0"], [1.0], gt, return_ranking=True)
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_average_precision([ranked], gt, n_boot=0)
    with pytest.raises(ConfigError, match="confidence"):
        bootstrap_average_precision([ranked], gt, confidence=1.0)
    with pytest.raises(ConfigError, match="ground_truth"):
        bootstrap_average_precision([ranked], GroundTruth(["Q0"]))


def test_summary_columns_come_from_the_metrics_fields_marked_for_it():
    """The main job's summary rows take their metric columns from Metrics' ``column`` metadata, in field
    order, the interval right after the µAP, and the ``before_`` values under "... before NES"."""
    from dataclasses import fields

    from isc.metrics import Metrics, summary_columns

    logged = {"average_precision": 0.61, "recall_p90": 0.42, "before_average_precision": 0.55,
              "before_recall_p90": 0.31, "recall_at_rank1": 0.7}
    assert list({**summary_columns(logged, before=True), **summary_columns(logged, interval="0.50-0.70")}.items()) == [
        ("uAP before NES", 0.55), ("recall@P90 before NES", 0.31), ("uAP", 0.61), ("uAP 95% CI", "0.50-0.70"),
        ("recall@P90", 0.42)]
    marked = [f.name for f in fields(Metrics) if "column" in f.metadata]
    assert marked == ["average_precision", "recall_p90"]
    assert summary_columns({}) == {"uAP": None, "uAP 95% CI": None, "recall@P90": None}  # a metric not logged
