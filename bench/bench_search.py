"""Overhead of the official evaluation over a bare faiss search of the same vectors.

Times, in one run and on the same random vectors:

1. ``bare``: ``faiss.IndexFlatL2`` (GPU when present) built on the references, then one ``search`` of
   every GT query with the same per-query ``k'`` our global top-K starts with;
2. ``ours``: :func:`isc.metrics.evaluate` with the official protocol (GT-query subset, exact global
   top ``10 x n queries`` with re-search, then the scorer).

Prints both times and the ratio (goal: <= 1.2). Defaults run on a CPU in well under two minutes;
``--queries 50000 --references 1000000`` is the full DISC21 size (GPU recommended).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_problem(nq: int, nr: int, dim: int, positive_fraction: float, seed: int):
    """Unit-norm random references; a fraction of queries are noisy copies of a reference."""
    from isc.io import Descriptors, GroundTruth

    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((nr, dim), dtype=np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    query = rng.standard_normal((nq, dim), dtype=np.float32)
    n_pos = int(nq * positive_fraction)
    src = rng.choice(nr, size=n_pos, replace=False)
    query[:n_pos] = ref[src] + 0.08 * rng.standard_normal((n_pos, dim), dtype=np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    qids = [f"Q{i:05d}" for i in range(nq)]
    rids = [f"R{i:07d}" for i in range(nr)]
    gt = GroundTruth(qids, {(qids[i], rids[int(src[i])]) for i in range(n_pos)})
    return Descriptors(query, qids, ref, rids), gt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--references", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--positive-fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3, help="best of N timings for each side")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import faiss

    from isc.knn import initial_k
    from isc.metrics import RESULTS_PER_GT_QUERY, evaluate

    desc, gt = make_problem(args.queries, args.references, args.dim, args.positive_fraction, args.seed)
    k_total = RESULTS_PER_GT_QUERY * args.queries
    k_prime = initial_k(k_total, args.queries)  # the k' global_topk starts with
    gpus = faiss.get_num_gpus()
    print(
        f"queries={args.queries} references={args.references} dim={args.dim} K={k_total} k'={k_prime} "
        f"faiss={faiss.__version__} gpus={gpus} threads={faiss.omp_get_max_threads()}"
    )

    def bare() -> None:
        index = faiss.IndexFlatL2(args.dim)
        index.add(desc.reference)
        if gpus:
            index = faiss.index_cpu_to_all_gpus(index)
        for s in range(0, args.queries, args.batch_size):
            index.search(desc.query[s : s + args.batch_size], k_prime)

    result = None

    def ours() -> None:
        nonlocal result
        result = evaluate(desc, gt, protocol="official", batch_size=args.batch_size)

    # Interleaved best-of-N: on a shared machine a load change then hits both sides alike.
    times = {"bare": float("inf"), "ours": float("inf")}
    for _ in range(args.repeat):
        for name, fn in (("bare", bare), ("ours", ours)):
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    m = result.metrics
    print(f"bare faiss IndexFlatL2 build+search k'={k_prime}: {times['bare']:.3f} s")
    print(f"ours evaluate(official) search+scoring:      {times['ours']:.3f} s")
    print(f"ratio ours/bare: {times['ours'] / times['bare']:.3f}  (goal <= 1.2)")
    print(
        f"sanity: uAP={m.average_precision:.4f} R@P90={m.recall_p90:.4f} predictions={m.n_predictions} "
        f"(expected {k_total}) re-searched queries={result.n_research}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
