"""Negative embedding subtraction (NES): the 1st-place ISC21 post-processing.

Why: raw descriptors of unrelated images share a common component (the "typical image" direction);
under the descriptor track's L2 matching that makes distances incomparable across queries. Subtracting,
from every query and reference descriptor, a fraction of the mean of its nearest *training* descriptors
(the legal background set, never references) removes that component inside the vectors themselves.

Steps (recipe.md "Post-processing"), all on L2-normalised float32 rows of dimension d:

1. :func:`dba` smooths the training bank T [nt, d]: each row becomes the sum of its ``k`` nearest rows
   by inner product (itself included) weighted by ``sim ** alpha``, then L2-normalised.
2. :func:`negative_embedding_subtraction` applies ``x <- normalise(x - beta * mean(k nearest bank rows))``
   ``num_iter`` times, to queries and references separately with the same constants.

Nearest neighbours come from an exact faiss inner-product index (:class:`isc.knn.FlatIndex`, on
GPU when faiss has one, CPU otherwise);
the vectors being looked up are processed in batches, so memory is O((n + nt) * d) plus
O(batch * k) -- never O(n * nt) -- and a 1M x 1M run fits in a few GB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from isc.contract import DBA_ALPHA, DBA_K, NES_BETA, NES_K, NES_NUM_ITER
from isc.errors import ConfigError
from isc.knn import FlatIndex

log = logging.getLogger(__name__)

# The seed's constants (scripts/postprocess.py), defined with the run contract: the registered pyfunc
# applies the same ones.
DEFAULT_K = NES_K
DEFAULT_BETA = NES_BETA
DEFAULT_NUM_ITER = NES_NUM_ITER
DEFAULT_DBA_K = DBA_K
DEFAULT_DBA_ALPHA = DBA_ALPHA
DEFAULT_BATCH_SIZE = 65_536  # rows searched per faiss call: 65,536 x k results, a few MB

_EPS = 1e-12  # guards the division when a vector is subtracted down to (numerically) zero
# Above this the row itself is < 1% of what is left: every output is (minus) its neighbours' mean, and
# around 1e19 float32 overflows to all-zero rows that still score (µAP of noise, exit 0). The recipe
# uses 0.35; a tuning range never needs more than a few units.
MAX_BETA = 100.0
# Each NES iteration is a full kNN search of every row: --num-iter 10000000 ran for hours (hostile round).
# The seed uses 1 and a second pass barely moves the vectors; 100 is far above any useful value.
MAX_NUM_ITER = 100
# k / dba_k neighbours: each search batch holds batch x k scores and ids (65,536 x 1,000 is ~0.8 GB). The
# seed uses 10; the bank-size check (check_bank) does not bound a large bank.
MAX_K = 1000


@dataclass(frozen=True)
class NESConfig:
    """Every constant of the post-processing, with the seed's values as defaults."""

    k: int = DEFAULT_K
    beta: float = DEFAULT_BETA
    num_iter: int = DEFAULT_NUM_ITER
    dba_k: int = DEFAULT_DBA_K
    dba_alpha: float = DEFAULT_DBA_ALPHA

    def validate(self) -> NESConfig:
        """Raise :class:`ConfigError` naming the first bad constant; return ``self``."""
        if int(self.k) < 1:
            raise ConfigError("k", f"must be >= 1, got {self.k}")
        if int(self.k) > MAX_K:
            raise ConfigError("k", f"{self.k} > {MAX_K}: every search would hold batch x k neighbours; the seed "
                                   "uses 10")
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ConfigError("beta", f"must be a finite number >= 0, got {self.beta}")
        if self.beta > MAX_BETA:
            raise ConfigError("beta", f"{self.beta:g} > {MAX_BETA:g}: the output would be the neighbours' mean "
                                      "alone (or all zero), not the descriptor; the recipe uses 0.35")
        check_num_iter(int(self.num_iter))
        if int(self.dba_k) < 0:
            raise ConfigError("dba_k", f"must be >= 0 (0 disables DBA), got {self.dba_k}")
        if int(self.dba_k) > MAX_K:
            raise ConfigError("dba_k", f"{self.dba_k} > {MAX_K}: every search would hold batch x k neighbours; "
                                       "the seed uses 10")
        if not np.isfinite(self.dba_alpha) or self.dba_alpha < 0:
            raise ConfigError("dba_alpha", f"must be a finite number >= 0, got {self.dba_alpha}")
        return self

    def check_bank(self, n_train: int, source: object) -> None:
        """k and dba_k above the bank size would silently average the whole bank: refuse, naming both."""
        for name, k in (("k", self.k), ("dba_k", self.dba_k)):
            if k > n_train:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(name, f"{k} > the {n_train} training descriptors in {source}; pass {flag} "
                                  f"<= {n_train} or more training descriptors")


def check_num_iter(num_iter: int) -> int:
    """``num_iter`` in [0, MAX_NUM_ITER], else a ConfigError stating the bound (the CLI and the pyfunc)."""
    if num_iter < 0 or num_iter > MAX_NUM_ITER:
        raise ConfigError("num_iter", f"{num_iter} is outside [0, {MAX_NUM_ITER}]: each iteration searches every "
                                      "row again; the seed uses 1")
    return num_iter


def _as_matrix(name: str, x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 copy-if-needed of a non-empty, finite 2-D array, or ConfigError naming it."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(name, f"must be a 2-D [n, d] array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ConfigError(name, f"is empty (shape {x.shape})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ConfigError(name, f"has NaN/inf values in {int(bad.sum())} row(s), e.g. rows {rows}")
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float32, [n, d]); an all-zero row stays zero instead of NaN."""
    x = np.asarray(x, dtype=np.float32)
    # float64 norms: squares of large float32 rows overflow to inf and would turn the row into zeros.
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(norms, _EPS)).astype(np.float32)


def bank_index(bank: np.ndarray, use_gpu: bool | None = None) -> FlatIndex:
    """Exact inner-product index over ``bank`` [nt, d] (GPU when faiss has one), reusable across sets."""
    return FlatIndex(_as_matrix("bank", bank), metric="ip", use_gpu=use_gpu)


def _topk(index: FlatIndex, x: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sims [n, k'], idx [n, k'])`` with ``k' = min(k, index.ntotal)``, best first."""
    return index.search(x, min(int(k), index.ntotal), batch_size=batch_size)


def _batches(n: int, batch_size: int, desc: str):
    """Start offsets of ``batch_size`` blocks of ``n`` rows, with a tqdm bar when there are several."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, unit="batch", disable=len(starts) < 2)


def dba(
    train: np.ndarray,
    k: int = DEFAULT_DBA_K,
    alpha: float = DEFAULT_DBA_ALPHA,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_gpu: bool | None = None,
) -> np.ndarray:
    """Database-side augmentation of the training bank.

    ``train``: [nt, d] L2-normalised descriptors. Each row t becomes
    ``normalise(sum_j T[j] * sim_j ** alpha)`` over its ``k`` nearest rows by inner product, t itself
    included (sim 1). Smoothing makes the bank's neighbourhoods less noisy before they are subtracted.
    ``k == 0`` returns the bank unchanged (DBA off). Returns [nt, d] float32.

    For an integer ``alpha`` (the seed's 3.0) this is exactly ``sim ** alpha``; for a fractional one
    negative similarities are clipped to 0 first, because a negative base has no real fractional power.
    """
    train = _as_matrix("train", train)
    if k < 0:
        raise ConfigError("dba_k", f"must be >= 0, got {k}")
    if alpha < 0 or not np.isfinite(alpha):
        raise ConfigError("dba_alpha", f"must be a finite number >= 0, got {alpha}")
    if k == 0:
        return train.copy()
    index = bank_index(train, use_gpu=use_gpu)
    out = np.empty_like(train)
    integer_alpha = float(alpha).is_integer()
    for s in _batches(train.shape[0], batch_size, "DBA"):
        block = train[s : s + batch_size]
        sims, idx = _topk(index, block, k, batch_size)
        if not integer_alpha:
            sims = np.clip(sims, 0.0, None)
        weights = np.power(sims, np.float32(alpha)).astype(np.float32)  # [b, k]
        # sum_j w_j * T[idx_j] without materialising [b, k, d] for large k: loop over the k columns.
        acc = np.zeros_like(block)
        for j in range(idx.shape[1]):
            acc += weights[:, j : j + 1] * train[idx[:, j]]
        out[s : s + batch_size] = l2_normalize(acc)
    return out


def negative_embedding_subtraction(
    x: np.ndarray,
    bank: np.ndarray | FlatIndex,
    k: int = DEFAULT_K,
    beta: float = DEFAULT_BETA,
    num_iter: int = DEFAULT_NUM_ITER,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_gpu: bool | None = None,
) -> np.ndarray:
    """Subtract ``beta`` x the mean of the ``k`` nearest bank vectors from each row, ``num_iter`` times.

    ``x``: [n, d] descriptors (queries *or* references -- call once per set). ``bank``: [nt, d] the
    (DBA-smoothed) training descriptors, or :func:`bank_index` of them to reuse one faiss index for
    both sets. Each iteration re-searches with the updated rows. Returns [n, d] float32, L2-normalised
    (``num_iter == 0`` returns ``x`` unchanged).
    """
    x = _as_matrix("descriptors", x)
    if k < 1:
        raise ConfigError("k", f"must be >= 1, got {k}")
    check_num_iter(num_iter)
    if beta < 0 or not np.isfinite(beta) or beta > MAX_BETA:
        raise ConfigError("beta", f"must be a finite number in [0, {MAX_BETA:g}], got {beta}")
    index = bank if isinstance(bank, FlatIndex) else None
    vectors = bank.reference if isinstance(bank, FlatIndex) else _as_matrix("bank", bank)
    if vectors.shape[1] != x.shape[1]:
        raise ConfigError("bank", f"dimension {vectors.shape[1]} != descriptor dimension {x.shape[1]}")
    if index is not None and index.metric != "ip":
        raise ConfigError("bank", f"the bank index must use inner product, not '{index.metric}'")
    if num_iter == 0:
        return x.copy()
    index = index or bank_index(vectors, use_gpu=use_gpu)
    out = x.copy()
    beta32 = np.float32(beta)
    for it in range(num_iter):
        for s in _batches(out.shape[0], batch_size, f"NES iter {it + 1}/{num_iter}"):
            block = out[s : s + batch_size]
            _, idx = _topk(index, block, k, batch_size)
            mean = np.zeros_like(block)
            for j in range(idx.shape[1]):  # sum of k rows without a [b, k, d] temporary
                mean += vectors[idx[:, j]]
            mean /= np.float32(idx.shape[1])
            out[s : s + batch_size] = l2_normalize(block - beta32 * mean)
    zero = ~np.any(out, axis=1) & np.any(x, axis=1)
    if zero.any():  # a row subtracted down to nothing scores as noise: refuse instead of writing it
        raise ConfigError("beta", f"beta={beta:g}, k={k} subtract {int(zero.sum())} row(s) down to zero "
                                  f"(e.g. rows {np.flatnonzero(zero)[:5].tolist()}); lower --beta")
    return out


@dataclass
class NESResult:
    """Post-processed descriptors plus the DBA-smoothed bank that produced them."""

    query: np.ndarray  # [nq, d] float32
    reference: np.ndarray  # [nr, d] float32
    bank: np.ndarray  # [nt, d] float32 (DBA-smoothed training descriptors)


def postprocess_descriptors(
    query: np.ndarray,
    reference: np.ndarray,
    train: np.ndarray,
    config: NESConfig | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_gpu: bool | None = None,
) -> NESResult:
    """The whole recipe: DBA on ``train`` [nt, d], then NES on ``query`` [nq, d] and ``reference`` [nr, d].

    One faiss index over the smoothed bank serves both sets. Shapes are checked first, so a dimension
    mismatch fails before any work.
    """
    cfg = (config or NESConfig()).validate()
    query = _as_matrix("query", query)
    reference = _as_matrix("reference", reference)
    train = _as_matrix("train", train)
    if query.shape[1] != reference.shape[1]:
        raise ConfigError("reference", f"dimension {reference.shape[1]} != query dimension {query.shape[1]}")
    if train.shape[1] != query.shape[1]:
        raise ConfigError(
            "train", f"dimension {train.shape[1]} != query/reference dimension {query.shape[1]}"
        )
    bank = dba(train, k=cfg.dba_k, alpha=cfg.dba_alpha, batch_size=batch_size, use_gpu=use_gpu)
    index = bank_index(bank, use_gpu=use_gpu)
    q = negative_embedding_subtraction(query, index, cfg.k, cfg.beta, cfg.num_iter, batch_size)
    r = negative_embedding_subtraction(reference, index, cfg.k, cfg.beta, cfg.num_iter, batch_size)
    return NESResult(q, r, bank)
