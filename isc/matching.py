"""The matching track's rows: the globally best (query, reference) pairs of a descriptor file, by id.

The same candidates the isc2021 ``--max_results`` evaluation scores (:func:`isc.knn.global_topk` over
all queries); ``isc match`` writes them as ``query_id,reference_id,score`` with :func:`isc.io.write_matches_csv`.
"""

from __future__ import annotations

import numpy as np

from isc.errors import ConfigError
from isc.io import MAX_MATCHES, Descriptors
from isc.knn import DEFAULT_BATCH_SIZE, global_topk


def match_descriptors(
    desc: Descriptors,
    max_results: int = MAX_MATCHES,
    metric: str = "l2",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[list[str], list[str], np.ndarray]:
    """The ``max_results`` globally best (query, reference) pairs as ids and float32 scores, best first."""
    if max_results <= 0:
        raise ConfigError("max_results", f"must be > 0, got {max_results}")
    top = global_topk(desc.query, desc.reference, max_results, metric, batch_size=batch_size)
    qids = [desc.query_ids[i] for i in top.q_idx]
    rids = [desc.reference_ids[i] for i in top.r_idx]
    return qids, rids, top.score
