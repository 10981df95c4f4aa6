"""The ISC21 scorer: micro average precision, recall at 90 % precision, recall at rank 1/10.

Reimplemented from the definition in ``docs/evaluation.md`` (the DrivenData descriptor-track scorer):

* predictions are a flat list of (query_id, reference_id, score) with *higher score = more similar*;
* ``official``: only queries listed in the ground truth count (distractor queries included, every
  prediction for them is a false positive); candidates are the ``K = 10 x n GT queries`` globally
  best pairs by ``-squared L2``;
* all predictions are ranked together ("micro") by score descending; within equal scores negatives
  come before positives (pessimistic: a constant score cannot earn a good AP);
* ``µAP = (1/N_pos) x sum of precision at the true-positive ranks``, ``N_pos`` = number of GT pairs
  (positives never predicted contribute 0);
* ``recall@P90`` = the largest recall at a cut with precision >= 0.9, ``0.0`` when no cut reaches it
  (then ``threshold_p90`` is ``None``);
* ``recall@rank k`` per GT pair: the rank of the correct reference among that query's predictions,
  counting every prediction with a score >= the correct one (ties pessimistic).

Everything accumulates in float64. Functions are plain functions on arrays returning dataclasses.

Scale: the faiss search runs in float32, where ``||q - r||^2`` of a query scaled by 1e6 (or 1e14)
against unit references loses the ``q . r`` term and the ranking with it. When every query has the
same norm and every reference has the same norm (relative spread <= ``UNIFORM_NORM_RTOL``), the L2
ranking *is* the cosine ranking, so :func:`scoring_copies` searches unit-norm copies when the two
norms differ enough to cost precision (the scores are then the copies'; even float64 cannot hold the
ranking of ``-||q - r||^2`` at 1e14): µAP does not depend on the scale. Descriptors of mixed norms are searched as given (their scale is information).
A set whose rows are all the same vector (all zero, say) is refused: its ranking is arbitrary.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy.special import digamma

from isc.errors import ConfigError, ISCError
from isc.io import MAX_DIM, Descriptors, GroundTruth, validate_matrix
from isc.knn import DEFAULT_BATCH_SIZE, FlatIndex, global_topk
from isc.knn import knn as per_query_knn  # `knn` is also evaluate()'s k

log = logging.getLogger(__name__)

PROTOCOLS = ("official", "max_results", "knn")
RESULTS_PER_GT_QUERY = 10  # the DrivenData cap: K = 10 x number of GT queries
P90 = 0.9
UNIFORM_NORM_RTOL = 1e-5  # float32 rounding of a scaled unit vector moves its norm by ~1e-7
NORM_RATIO_EXACT = 4.0  # float32 L2 loses ~ratio/2 of cos resolution; up to 4x is searched as given


def check_not_constant(source: str, name: str, x: np.ndarray) -> None:
    """Refuse a set of >= 2 descriptors that are all one vector: every distance ties, µAP is noise."""
    if x.shape[0] >= 2 and not np.any(x != x[0]):
        what = "all zero" if not np.any(x[0]) else "one constant vector"
        raise ISCError(f"{source}: every {name} descriptor is {what} ({x.shape[0]} rows); any ranking of "
                       "them is arbitrary -- check the extraction / post-processing that wrote them")


def _uniform_norms(x: np.ndarray) -> float | None:
    """The common L2 norm of the rows of ``x`` (float64), or None when the norms differ."""
    norms = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
    lo, hi = float(norms.min()), float(norms.max())
    return hi if lo > 0 and hi - lo <= UNIFORM_NORM_RTOL * hi else None


def scoring_copies(query: np.ndarray, reference: np.ndarray, metric: str, source: str = "descriptors",
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(query, reference)`` to search (see the module doc).

    For L2 when each side has one common norm and the two norms differ by more than
    ``NORM_RATIO_EXACT`` (float32 -- and at 1e14 even float64 -- would lose the ``q . r`` term):
    unit-norm copies, whose ranking is the inputs' ranking; the scores (and ``threshold_p90``) are then
    those of the copies, and a warning says so. Otherwise the inputs, unchanged.
    """
    if metric != "l2":
        return query, reference
    cq, cr = _uniform_norms(query), _uniform_norms(reference)
    if cq is None or cr is None or max(cq, cr) / min(cq, cr) <= NORM_RATIO_EXACT:
        return query, reference
    log.warning("%s: queries have norm %.3g and references %.3g: scored on unit-norm copies (the same "
                "L2 ranking, exact); scores and threshold_p90 are those of the copies", source, cq, cr)

    def unit(x: np.ndarray) -> np.ndarray:
        x64 = np.asarray(x, dtype=np.float64)
        return np.ascontiguousarray(x64 / np.linalg.norm(x64, axis=1, keepdims=True), dtype=np.float32)

    return unit(query), unit(reference)


class PredictionsError(ISCError):
    """Predictions that cannot be scored (a duplicate (query, reference) pair)."""


@dataclass
class Metrics:
    """The scalar results of :func:`score_coded` (recalls and precisions are fractions in [0, 1])."""

    average_precision: float = field(metadata={"column": "uAP"})  # "column": shown in the main job's summary
    recall_p90: float = field(metadata={"column": "recall@P90"})
    threshold_p90: float | None  # score at the P90 cut; None when precision never reaches 0.9
    recall_at_rank1: float
    recall_at_rank10: float
    n_positives: int  # GT positive pairs (the recall denominator)
    n_predictions: int  # predictions scored (after dropping non-GT queries)
    n_true_positives: int  # predictions that are GT pairs


def summary_columns(metrics: dict[str, Any], before: bool = False, interval: str | None = None) -> dict[str, Any]:
    """The summary table's columns for one evaluate run's logged metrics, from :class:`Metrics`' ``column``
    metadata (a metric marked there appears in every row; nothing else to edit). ``before``: the
    ``before_``-prefixed values (descriptors before NES), labelled so; ``interval``: the µAP's bootstrap
    interval text, placed right after the µAP."""
    columns: dict[str, Any] = {}
    for f in fields(Metrics):
        label = f.metadata.get("column")
        if label is None:
            continue
        columns[f"{label} before NES" if before else label] = metrics.get(f"before_{f.name}" if before else f.name)
        if f.name == "average_precision" and not before:
            columns[f"{label} 95% CI"] = interval
    return columns


@dataclass
class RankedPredictions:
    """Predictions in scoring order (score desc, negatives first within ties) with their labels."""

    query_ids: np.ndarray  # object [n]
    reference_ids: np.ndarray  # object [n]
    scores: np.ndarray  # float64 [n]
    labels: np.ndarray  # bool [n]
    precision: np.ndarray  # float64 [n] precision of the prefix ending at each rank
    recall: np.ndarray  # float64 [n] recall of that prefix

    def __len__(self) -> int:
        return int(self.scores.size)


@dataclass
class EvalResult:
    """Metrics of one descriptor file under one protocol, with the ranking for plots."""

    metrics: Metrics
    protocol: str
    metric: str
    n_queries: int  # queries searched (GT queries for official/knn, all queries for max_results)
    n_candidates: int  # the search cap: K for official/max_results, k per query for knn
    ranked: RankedPredictions = field(repr=False)
    n_research: int = 0  # queries global_topk searched again with a larger k' (exactness guard)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays). ``threshold_p90`` is ``None`` when P90 is never reached."""
        # Every field of Metrics, by its own name: a metric added there reaches metrics.json and (through
        # isc.evaluation.METRIC_KEYS) the run's metrics with no list to extend here.
        return {
            **{f.name: getattr(self.metrics, f.name) for f in fields(Metrics)},
            "n_queries": self.n_queries,
            "n_candidates": self.n_candidates,
            "protocol": self.protocol,
            "metric": self.metric,
        }


def score_coded(
    qc: np.ndarray,
    rc: np.ndarray,
    s: np.ndarray,
    pos_q: np.ndarray,
    pos_r: np.ndarray,
    n_pos: int,
    names: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Metrics, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The scorer on integer-coded predictions (:func:`evaluate` codes them by query and reference row).

    ``qc``/``rc`` [n] int64 query/reference codes (any non-negative ints), ``s`` [n] scores, ``pos_q``/
    ``pos_r`` the codes of the GT pairs that can occur, ``n_pos`` the number of GT pairs (recall
    denominator). ``names`` (code -> id arrays) only makes the duplicate error readable.
    Returns ``(metrics, order, labels_in_order, precision, recall)`` with ``order`` the pessimistic ranking.
    """
    s = np.asarray(s, dtype=np.float64)
    n = s.size
    width = int(max(rc.max(initial=-1), pos_r.max(initial=-1))) + 1
    pair = qc.astype(np.int64) * width + rc
    if n:
        sorted_pairs = np.sort(pair)
        dup_mask = sorted_pairs[1:] == sorted_pairs[:-1]
        if dup_mask.any():
            dup = np.unique(sorted_pairs[1:][dup_mask])
            shown = [(int(p // width), int(p % width)) for p in dup[:5]]
            if names is not None:
                shown = [(names[0][a], names[1][b]) for a, b in shown]
            raise PredictionsError(
                f"predictions: {dup.size} duplicate (query, reference) pairs, e.g. {shown}"
            )
    y = np.isin(pair, pos_q.astype(np.int64) * width + pos_r)

    # Global ranking: score descending, negatives before positives within ties.
    order = np.lexsort((y, -s))
    ys = y[order]
    tp = np.cumsum(ys, dtype=np.float64)
    precision = tp / np.arange(1, n + 1, dtype=np.float64)
    recall = tp / float(n_pos)
    ap = float(precision[ys].sum() / n_pos)

    valid = precision >= P90
    if valid.any():
        best = int(np.argmax(np.where(valid, recall, -1.0)))  # first cut with the largest recall
        recall_p90, threshold = float(recall[best]), float(s[order][best])
    else:
        recall_p90, threshold = 0.0, None

    r1, r10 = _recall_at_ranks(qc.astype(np.int64), s, y, n_pos, ranks=(1, 10))
    metrics = Metrics(ap, recall_p90, threshold, r1, r10, n_pos, int(n), int(ys.sum()))
    return metrics, order, ys, precision, recall


def _recall_at_ranks(qc: np.ndarray, s: np.ndarray, y: np.ndarray, n_pos: int, ranks: Sequence[int]):
    """Fraction of GT pairs whose reference ranks <= k among its query's predictions (ties pessimistic).

    rank = number of predictions of the same query with a score >= the correct one's.
    """
    if not y.any():
        return tuple(0.0 for _ in ranks)
    _, srank = np.unique(-s, return_inverse=True)  # 0 = best score; equal scores share a rank
    width = int(srank.max()) + 2
    key = qc * width + srank.astype(np.int64)
    key_sorted = np.sort(key)
    pos = np.flatnonzero(y)
    upto = np.searchsorted(key_sorted, key[pos], side="right")
    start = np.searchsorted(key_sorted, qc[pos] * width, side="left")
    rank = upto - start
    return tuple(float((rank <= k).sum() / n_pos) for k in ranks)


def ground_truth_fingerprint(gt: GroundTruth) -> str:
    """sha256 of the sorted query list and sorted positive pairs: equal iff two GTs score alike.

    Promotion refuses to compare runs whose fingerprints differ.
    """
    h = hashlib.sha256()
    h.update(b"queries\n")
    for q in sorted(set(gt.queries)):
        h.update(q.encode() + b"\n")
    h.update(b"positives\n")
    for q, r in sorted(gt.positives):
        h.update(f"{q},{r}\n".encode())
    return h.hexdigest()


def check_ground_truth_ids(desc: Descriptors, gt: GroundTruth, source: str = "descriptors") -> None:
    """Every GT query must have a query descriptor and every GT reference a reference descriptor."""
    qset, rset = set(desc.query_ids), set(desc.reference_ids)
    missing_q = [q for q in gt.queries if q not in qset]
    if missing_q:
        raise ISCError(
            f"{source}: {len(missing_q)} ground-truth queries have no descriptor, e.g. {missing_q[:5]}"
        )
    missing_r = sorted({r for _, r in gt.positives if r not in rset})
    if missing_r:
        raise ISCError(
            f"{source}: {len(missing_r)} ground-truth references have no descriptor, e.g. {missing_r[:5]}"
        )


def evaluate(
    descriptors: Descriptors,
    gt: GroundTruth,
    protocol: str = "official",
    max_results: int = 500_000,
    knn: int = 10,
    metric: str = "l2",
    batch_size: int = DEFAULT_BATCH_SIZE,
    allow_large_dim: bool = False,
    source: str = "descriptors",
) -> EvalResult:
    """Search ``descriptors`` and score them against ``gt`` under ``protocol``.

    * ``official`` (DrivenData): GT queries only, global top ``10 x n GT queries``, score -squared L2.
    * ``max_results`` (isc2021 ``compute_metrics.py``): all queries, global top ``max_results``.
    * ``knn`` (SSCD ``disc_eval.py`` default): GT queries only, ``knn`` results per query.

    ``metric="ip"`` ranks by inner product instead. ``source`` names the file in error messages.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", f"must be one of {PROTOCOLS}, got '{protocol}'")
    if metric not in ("l2", "ip"):
        raise ConfigError("metric", f"must be 'l2' or 'ip', got '{metric}'")
    if max_results <= 0:
        raise ConfigError("max_results", f"must be > 0, got {max_results}")
    if knn <= 0:
        raise ConfigError("knn", f"must be > 0, got {knn}")
    max_dim = None if allow_large_dim else MAX_DIM
    validate_matrix(source, "query", np.asarray(descriptors.query), descriptors.query_ids, max_dim)
    validate_matrix(
        source, "reference", np.asarray(descriptors.reference), descriptors.reference_ids, max_dim
    )
    if descriptors.query.shape[1] != descriptors.reference.shape[1]:
        raise ISCError(
            f"{source}: query dim {descriptors.query.shape[1]} != reference dim {descriptors.reference.shape[1]}"
        )
    check_ground_truth_ids(descriptors, gt, source)
    check_not_constant(source, "query", np.asarray(descriptors.query))
    check_not_constant(source, "reference", np.asarray(descriptors.reference))

    qids_all = np.asarray(descriptors.query_ids, dtype=object)
    rids = np.asarray(descriptors.reference_ids, dtype=object)
    if protocol == "max_results":
        rows = np.arange(qids_all.size)
    else:
        gt_q = set(gt.queries)
        rows = np.array([i for i, q in enumerate(descriptors.query_ids) if q in gt_q], dtype=np.int64)
    query, reference = scoring_copies(np.asarray(descriptors.query)[rows], descriptors.reference, metric, source)
    index = FlatIndex(reference, metric)
    n_research = 0
    if protocol == "knn":
        q_idx, r_idx, score = per_query_knn(query, None, knn, metric, batch_size, index=index)
        cap = knn
    else:
        cap = RESULTS_PER_GT_QUERY * rows.size if protocol == "official" else max_results
        top = global_topk(query, None, cap, metric, batch_size=batch_size, index=index)
        q_idx, r_idx, score, n_research = top.q_idx, top.r_idx, top.score, top.n_research
    if not np.isfinite(score).all():
        raise ISCError(f"{source}: the search returned non-finite scores (overflowing descriptor values?)")
    # Integer fast path: codes are query rows of the searched subset and reference rows.
    qrow = {q: i for i, q in enumerate(qids_all[rows])}
    rrow = {r: i for i, r in enumerate(descriptors.reference_ids)}
    pos = [(qrow[q], rrow[r]) for q, r in gt.positives if q in qrow]
    pos_q = np.array([p[0] for p in pos], dtype=np.int64)
    pos_r = np.array([p[1] for p in pos], dtype=np.int64)
    if gt.n_positives == 0:
        raise ConfigError("ground_truth", "has no positive pair; average precision is undefined")
    metrics, order, ys, precision, recall = score_coded(q_idx, r_idx, score, pos_q, pos_r, gt.n_positives)
    ranked = RankedPredictions(
        qids_all[rows][q_idx[order]],
        rids[r_idx[order]],
        np.asarray(score, np.float64)[order],
        ys,
        precision,
        recall,
    )
    return EvalResult(metrics, protocol, metric, int(rows.size), int(cap), ranked, n_research)


# ------------------------------------------------------------------------------------ uncertainty
@dataclass
class BootstrapResult:
    """Query-bootstrap distribution of µAP for one or more rankings scored on the same ground truth.

    ``samples[k, b]`` is ranking ``k``'s µAP on bootstrap replicate ``b``; every ranking sees the same
    resampled queries (paired), so differences between rankings are meaningful replicate by replicate.
    """

    samples: np.ndarray  # float64 [n_rankings, n_boot]
    queries: list[str]  # the GT queries, sorted; columns of ``counts``
    counts: np.ndarray  # int32 [n_boot, n_queries]: how often replicate b drew each query
    confidence: float

    def interval(self, k: int = 0) -> tuple[float, float]:
        """Percentile interval of ranking ``k``'s µAP at ``confidence``."""
        a = (1.0 - self.confidence) / 2
        lo, hi = np.quantile(self.samples[k], [a, 1.0 - a])
        return float(lo), float(hi)

    def difference(self, a: int = 0, b: int = 1) -> tuple[float, float, float]:
        """``(low, high, p_better)`` of µAP[a] - µAP[b]: its interval and the share of replicates a > b."""
        d = self.samples[a] - self.samples[b]
        q = (1.0 - self.confidence) / 2
        lo, hi = np.quantile(d, [q, 1.0 - q])
        return float(lo), float(hi), float((d > 0).mean())


def bootstrap_average_precision(
    rankings: Sequence[RankedPredictions],
    gt: GroundTruth,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Resample the GT queries (distractors included) with replacement and re-score each ranking.

    Why: a mini or validation split has tens of queries, and µAP moves by several points when a few
    of them change; an interval says whether "A beats B" is a finding or noise. A replicate draws
    ``n`` of the ``n`` GT queries with replacement; a query drawn ``m`` times weighs ``m`` in the global
    ranking (its predictions count ``m`` times) and in the number of positives. The global order and the
    official ``10 x n`` candidate list are kept from the full evaluation (its cap is not recomputed per
    replicate, which is exact in expectation). Rankings come from :func:`evaluate` (``.ranked``).
    """
    if n_boot < 1:
        raise ConfigError("n_boot", f"must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError("confidence", f"must be in (0, 1), got {confidence}")
    queries = sorted(set(gt.queries))
    if not queries or gt.n_positives == 0:
        raise ConfigError("ground_truth", "has no positive pair; average precision is undefined")
    qindex = {q: i for i, q in enumerate(queries)}
    pos_per_query = np.zeros(len(queries), dtype=np.float64)
    for q, _ in gt.positives:
        pos_per_query[qindex[q]] += 1
    rng = np.random.default_rng(seed)
    # Multiplicities [n_boot, n_queries]: how often each query is drawn in each replicate.
    draws = rng.integers(0, len(queries), size=(n_boot, len(queries)))
    counts = np.zeros((n_boot, len(queries)), dtype=np.int32)
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1)
    del draws
    n_pos = counts @ pos_per_query  # [n_boot]
    out = np.zeros((len(rankings), n_boot), dtype=np.float64)
    for k, r in enumerate(rankings):
        rows = np.array([qindex.get(q, -1) for q in r.query_ids], dtype=np.int64)
        keep = rows >= 0  # predictions of non-GT queries (max_results protocol) do not count
        rows, y = rows[keep], np.asarray(r.labels, dtype=bool)[keep]
        # Chunks of replicates bound memory at ~ chunk x n_predictions floats.
        chunk = max(1, min(n_boot, 2_000_000 // max(1, rows.size)))
        for s in range(0, n_boot, chunk):
            w = counts[s : s + chunk][:, rows].astype(np.float64)  # [c, n]
            wy = w * y
            seen_before = np.cumsum(w, axis=1) - w
            fp_before = seen_before - (np.cumsum(wy, axis=1) - wy)
            # A positive drawn m times is m consecutive hits after `seen` predictions of which `fp` were
            # false: sum_{j=1..m} (seen - fp + j) / (seen + j) = m - fp * (psi(seen + m + 1) - psi(seen + 1)).
            hits = wy - fp_before * (digamma(seen_before + wy + 1) - digamma(seen_before + 1))
            ap = np.where(wy > 0, hits, 0.0).sum(axis=1)
            out[k, s : s + chunk] = np.divide(ap, n_pos[s : s + chunk], out=np.zeros_like(ap),
                                              where=n_pos[s : s + chunk] > 0)
    return BootstrapResult(out, queries, counts, float(confidence))
