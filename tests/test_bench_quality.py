"""bench/quality.py's pooled transfer ground truth and bench/val_power.py's per-seed verdict, on real files
and real scores (the benches themselves run whole main jobs: too long for the suite)."""

from __future__ import annotations

import numpy as np

from bench.quality import pooled_ground_truth
from bench.val_power import seed_report
from isc.io import Descriptors, GroundTruth, read_ground_truth
from isc.metrics import evaluate


def test_pooled_ground_truth_is_the_union_of_a_folders_split_files(mini_data):
    val, test = (read_ground_truth(mini_data.ground_truth(k)) for k in ("val", "test"))
    pooled = pooled_ground_truth([mini_data.ground_truth("val"), mini_data.ground_truth("test")])
    assert sorted(pooled.queries) == sorted(val.queries + test.queries)
    assert pooled.positives == val.positives | test.positives
    assert pooled.n_positives == val.n_positives + test.n_positives > 0


def _candidate(noise: float, rng: np.random.Generator, n_ref: int = 40) -> tuple[Descriptors, GroundTruth, GroundTruth]:
    refs = rng.normal(size=(n_ref, 16)).astype(np.float32)
    queries = refs[:20] + noise * rng.normal(size=(20, 16)).astype(np.float32)  # query i copies reference i
    ids_q, ids_r = [f"Q{i:05d}" for i in range(20)], [f"R{i:06d}" for i in range(n_ref)]
    desc = Descriptors(queries, ids_q, refs, ids_r)
    val = GroundTruth(ids_q[:10], {(ids_q[i], ids_r[i]) for i in range(10)})
    test = GroundTruth(ids_q[10:], {(ids_q[i], ids_r[i]) for i in range(10, 20)})
    return desc, val, test


def test_seed_report_names_val_pick_test_best_and_regret():
    rows = []
    for name, noise in (("clean", 0.05), ("noisy", 3.0)):
        desc, val, test = _candidate(noise, np.random.default_rng(0))
        row = {"candidate": name}
        for k, gt in (("val", val), ("test", test)):
            res = evaluate(desc, gt)
            row[k], row[f"_ranked_{k}"] = res.metrics.average_precision, res.ranked
        rows.append(row)
    assert rows[0]["val"] > rows[1]["val"] and rows[0]["test"] > rows[1]["test"]
    rep = seed_report(rows, val, n_boot=200)
    assert rep["pick"] == rep["test_best"] == "clean" and rep["hit"] and rep["stage_hit"] and rep["regret"] == 0.0
    assert rep["val_gap"] > 0 and rep["gap_ci"][0] <= rep["val_gap"] <= rep["gap_ci"][1]
    # val fooled: swap the val scores, and the report counts the miss and what it costs on test
    rows[0]["val"], rows[1]["val"] = rows[1]["val"], rows[0]["val"]
    rows[0]["_ranked_val"], rows[1]["_ranked_val"] = rows[1]["_ranked_val"], rows[0]["_ranked_val"]
    miss = seed_report(rows, val, n_boot=200)
    assert miss["pick"] == "noisy" and not miss["hit"] and not miss["stage_hit"]
    assert miss["regret"] == rows[0]["test"] - rows[1]["test"] > 0
