"""ISC21 file formats: descriptor-track h5, training-descriptor h5, ground-truth and match CSVs.

Descriptor-track h5 (the DrivenData submission format): datasets ``query`` [nq, d] float32,
``reference`` [nr, d] float32, ``query_ids`` and ``reference_ids`` (ASCII bytes), rows sorted by id.
Training descriptors (negatives for post-processing) live in their own h5: ``train`` [nt, d] float32
and ``train_ids``.

Every writer is atomic (temp file + rename) and every reader validates and names the file on error.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from isc.errors import DescriptorFileError
from isc.fileutil import atomic_path, special_file_kind

MAX_DIM = 256  # the descriptor track's limit
# Largest |value| accepted in a descriptor. faiss scores in float32: squared L2 distances of rows beyond
# ~1e18 overflow to inf and every candidate is dropped (µAP 0.0, 0 predictions, exit 0). 1e15 keeps
# 4 * d * max|x|^2 finite for any d below 8e7 while leaving raw, unnormalised descriptors usable.
MAX_ABS_VALUE = 1e15


@dataclass
class Descriptors:
    """Query and reference descriptors with their ids (rows aligned with ids)."""

    query: np.ndarray
    query_ids: list[str]
    reference: np.ndarray
    reference_ids: list[str]

    @property
    def dim(self) -> int:
        return int(self.query.shape[1])


@dataclass
class GroundTruth:
    """ISC21 ground truth: every listed query (distractors included) and the positive pairs."""

    queries: list[str]
    positives: set[tuple[str, str]] = field(default_factory=set)

    @property
    def n_positives(self) -> int:
        return len(self.positives)


def _decode_ids(raw: np.ndarray) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in raw.tolist()]


def _encode_ids(ids: Sequence[str]) -> np.ndarray:
    # UTF-8: ASCII ids (all of DISC21) are unchanged, a non-ASCII file stem round-trips instead of crashing.
    return np.array([str(i).encode("utf-8") for i in ids], dtype="S")


def validate_matrix(
    path: str | Path, name: str, x: np.ndarray, ids: Sequence[str], max_dim: int | None = MAX_DIM
) -> None:
    """Shape, dimension, finiteness and id checks shared by readers and writers."""
    if x.ndim != 2:
        raise DescriptorFileError(path, f"dataset '{name}' must be 2-D, got shape {x.shape}")
    if x.shape[0] != len(ids):
        raise DescriptorFileError(path, f"dataset '{name}' has {x.shape[0]} rows but {len(ids)} ids")
    if x.shape[0] == 0:
        raise DescriptorFileError(path, f"dataset '{name}' is empty")
    if x.shape[1] == 0:  # else the all-zero check said "every descriptor is all zero" of a (n, 0) set
        raise DescriptorFileError(path, f"dataset '{name}' has dimension 0 (shape {x.shape}): no descriptor values")
    if max_dim is not None and x.shape[1] > max_dim:
        raise DescriptorFileError(
            path, f"dataset '{name}' has dimension {x.shape[1]} > {max_dim} (pass allow_large_dim to accept)"
        )
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = [ids[i] for i in np.flatnonzero(~finite)[:5]]
        raise DescriptorFileError(path, f"dataset '{name}' has NaN/inf values (ids {bad}...)")
    _check_magnitude(path, name, x, ids)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = [i for i in ids if i in seen or seen.add(i)]
        raise DescriptorFileError(path, f"duplicate ids in '{name}': {dups[:5]}")


def _check_magnitude(path: str | Path, name: str, x: np.ndarray, ids: Sequence[str]) -> None:
    """Refuse values whose distances would overflow float32 (see ``MAX_ABS_VALUE``); O(block) memory."""
    step = 65_536
    for s in range(0, x.shape[0], step):
        block = np.abs(x[s : s + step])
        if block.size and float(block.max()) > MAX_ABS_VALUE:
            rows = s + np.flatnonzero(block.max(axis=1) > MAX_ABS_VALUE)
            bad = [ids[i] for i in rows[:5]]
            raise DescriptorFileError(
                path,
                f"dataset '{name}' has values up to {float(block.max()):.3g} (ids {bad}); |value| must be "
                f"<= {MAX_ABS_VALUE:.0e} so that distances fit in float32: L2-normalise the descriptors",
            )


def _open_h5(path: Path, what: str) -> h5py.File:
    if not path.is_file():
        raise DescriptorFileError(path, f"no such {what} file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DescriptorFileError(path, f"not a readable HDF5 file ({exc})") from exc


def available_memory() -> int:
    """Bytes this machine can still allocate without swapping (MemAvailable; physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_declared_size(path: Path, ds: h5py.Dataset, name: str) -> None:
    """Refuse a dataset whose declared shape cannot be real before h5py allocates it: a 68 KB file declaring
    (10**10, 256) float32 (unwritten chunks read as fill values) was a 9.3 TiB MemoryError traceback, and a
    size just under RAM would really be allocated. Without filters the data must be in the file; compressed
    or not, it (and its float32 copy) must fit in the memory available now."""
    count = int(np.prod(ds.shape, dtype=np.float64)) if ds.shape else 1
    declared = count * ds.dtype.itemsize
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    file_size = path.stat().st_size
    if not filtered and declared > file_size:
        raise DescriptorFileError(path, f"dataset '{name}' declares shape {ds.shape} ({declared:,} bytes) but the "
                                        f"file holds {file_size:,} bytes: truncated or crafted")
    needed = declared + (count * 4 if ds.dtype.kind in "fiub" and ds.dtype != np.float32 else 0)
    if needed > available_memory():
        raise DescriptorFileError(path, f"dataset '{name}' of shape {ds.shape} needs {needed / 2**30:.3g} GiB in "
                                        f"memory, more than the {available_memory() / 2**30:.3g} GiB available")


def _read_dataset(path: Path, f: h5py.File, name: str) -> np.ndarray:
    # Links are checked before anything follows them: an ExternalLink opens another file named by the h5
    # (a text file, /etc/passwd...) and a SoftLink can loop; both were h5py tracebacks. Our writers store
    # every dataset in the file itself.
    link = f.get(name, getlink=True)
    if link is None:
        raise DescriptorFileError(path, f"missing dataset '{name}' (has: {sorted(f.keys())})")
    if isinstance(link, h5py.ExternalLink):
        raise DescriptorFileError(path, f"dataset '{name}' is an HDF5 external link (to {link.filename!r}); "
                                        "only datasets stored in the file itself are read")
    if isinstance(link, h5py.SoftLink):
        raise DescriptorFileError(path, f"dataset '{name}' is an HDF5 soft link (to {link.path!r}); only "
                                        "datasets stored under their own name are read")
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise DescriptorFileError(path, f"'{name}' is an HDF5 group, not a dataset")
    _check_declared_size(path, obj, name)
    return obj[()]


def _read_ids(path: Path, f: h5py.File, name: str) -> list[str]:
    """An id dataset (1-D strings) as ``str``; anything else is refused naming the dataset."""
    raw = _read_dataset(path, f, name)
    if not isinstance(raw, np.ndarray) or raw.ndim != 1:
        shape = getattr(raw, "shape", raw)
        raise DescriptorFileError(path, f"dataset '{name}' must be a 1-D array of ids, got {shape}")
    try:
        return _decode_ids(raw)
    except UnicodeDecodeError as exc:
        raise DescriptorFileError(path, f"dataset '{name}' holds ids that are not UTF-8 ({exc})") from exc


def _read_matrix(path: Path, f: h5py.File, name: str) -> np.ndarray:
    """A numeric dataset as float32; strings, objects or compound types are refused naming the dataset."""
    raw = _read_dataset(path, f, name)
    if not isinstance(raw, np.ndarray) or raw.dtype.kind not in "fiub":
        dtype = getattr(raw, "dtype", type(raw).__name__)
        raise DescriptorFileError(path, f"dataset '{name}' holds {dtype} values, expected float32 numbers")
    return np.asarray(raw, dtype=np.float32)


def read_descriptors(path: str | Path, allow_large_dim: bool = False) -> Descriptors:
    """Read and validate a descriptor-track h5."""
    path = Path(path)
    with _open_h5(path, "descriptor") as f:
        q = _read_matrix(path, f, "query")
        r = _read_matrix(path, f, "reference")
        qids = _read_ids(path, f, "query_ids")
        rids = _read_ids(path, f, "reference_ids")
    max_dim = None if allow_large_dim else MAX_DIM
    validate_matrix(path, "query", q, qids, max_dim)
    validate_matrix(path, "reference", r, rids, max_dim)
    if q.shape[1] != r.shape[1]:
        raise DescriptorFileError(path, f"query dim {q.shape[1]} != reference dim {r.shape[1]}")
    return Descriptors(q, qids, r, rids)


def _sorted(x: np.ndarray, ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    return np.ascontiguousarray(x[order], dtype=np.float32), [ids[i] for i in order]


def write_descriptors(
    path: str | Path,
    query: np.ndarray,
    query_ids: Sequence[str],
    reference: np.ndarray,
    reference_ids: Sequence[str],
    allow_large_dim: bool = False,
) -> Path:
    """Write a descriptor-track h5 (float32, rows sorted by id), atomically."""
    path = Path(path)
    max_dim = None if allow_large_dim else MAX_DIM
    query, reference = np.asarray(query), np.asarray(reference)
    validate_matrix(path, "query", query, list(query_ids), max_dim)
    validate_matrix(path, "reference", reference, list(reference_ids), max_dim)
    if query.shape[1] != reference.shape[1]:
        raise DescriptorFileError(path, f"query dim {query.shape[1]} != reference dim {reference.shape[1]}")
    q, qids = _sorted(query, list(query_ids))
    r, rids = _sorted(reference, list(reference_ids))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("query", data=q)
        f.create_dataset("reference", data=r)
        f.create_dataset("query_ids", data=_encode_ids(qids))
        f.create_dataset("reference_ids", data=_encode_ids(rids))
    return path


def read_train_descriptors(path: str | Path, allow_large_dim: bool = False) -> tuple[np.ndarray, list[str]]:
    """Read training descriptors (``train``/``train_ids``) used as negatives by post-processing."""
    path = Path(path)
    with _open_h5(path, "training-descriptor") as f:
        x = _read_matrix(path, f, "train")
        ids = _read_ids(path, f, "train_ids")
    validate_matrix(path, "train", x, ids, None if allow_large_dim else MAX_DIM)
    return x, ids


def write_train_descriptors(path: str | Path, train: np.ndarray, train_ids: Sequence[str]) -> Path:
    path = Path(path)
    validate_matrix(path, "train", np.asarray(train), list(train_ids), None)
    x, ids = _sorted(np.asarray(train), list(train_ids))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("train", data=x)
        f.create_dataset("train_ids", data=_encode_ids(ids))
    return path


_NOT_AN_ID_RE = re.compile(r"[/\\\x00-\x1f\x7f]")  # an id is a file stem: no folder separator, no control char


def read_ground_truth(path: str | Path) -> GroundTruth:
    """Read ``query_id,reference_id`` (header optional; empty reference = distractor query).

    UTF-8 with or without a byte-order mark (Excel writes one). A folder is refused, naming the split
    files in it: silently picking ``ground_truth.csv`` would score on every split, training pairs included.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.csv"))
        listing = ", ".join(found) if found else "no CSV file"
        raise DescriptorFileError(path, f"is a folder, not a ground-truth CSV (holds: {listing}); name one")
    if not path.is_file():
        kind = special_file_kind(path)  # /dev/null, a FIFO: it exists, so "no such file" would mislead
        raise DescriptorFileError(path, f"is a {kind}, not a ground-truth CSV file" if kind
                                  else "no such ground-truth file")
    queries: list[str] = []
    seen: set[str] = set()
    positives: set[tuple[str, str]] = set()
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            for lineno, row in enumerate(csv.reader(fh), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                if lineno == 1 and row[0].strip() == "query_id":
                    continue
                # Errors give the line number and never the line: a wrong file (/etc/passwd, a key
                # file) given as --ground-truth must not be printed to the terminal or a log.
                if len(row) > 2:
                    raise DescriptorFileError(
                        path, f"line {lineno}: expected 2 columns 'query_id,reference_id', got {len(row)}"
                    )
                q = row[0].strip()
                r = row[1].strip() if len(row) > 1 else ""
                if _NOT_AN_ID_RE.search(q) or _NOT_AN_ID_RE.search(r):
                    raise DescriptorFileError(
                        path, f"line {lineno}: not an image id (ids are file names without a folder or "
                        "control characters); is this a ground-truth CSV?"
                    )
                if q not in seen:
                    seen.add(q)
                    queries.append(q)
                if r:
                    positives.add((q, r))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DescriptorFileError(
            path, f"not a ground-truth CSV: expected UTF-8 text 'query_id,reference_id' ({exc})"
        ) from exc
    if not queries:
        raise DescriptorFileError(path, "ground truth lists no query")
    return GroundTruth(queries, positives)


def write_ground_truth(path: str | Path, rows: Iterable[tuple[str, str | None]]) -> Path:
    """Write ``query_id,reference_id`` rows (``None``/empty reference for distractors), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query_id", "reference_id"])
        for q, r in rows:
            w.writerow([q, r or ""])
    return Path(path)


MAX_MATCHES = 500_000  # the matching track's cap


def write_matches_csv(
    path: str | Path, query_ids: Sequence[str], reference_ids: Sequence[str], scores: Sequence[float]
) -> Path:
    """Matching-track CSV ``query_id,reference_id,score``: best-first, deduplicated, at most 500,000 rows."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    seen: set[tuple[str, str]] = set()
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query_id", "reference_id", "score"])
        for i in order:
            pair = (query_ids[i], reference_ids[i])
            if pair in seen:
                continue
            seen.add(pair)
            w.writerow([pair[0], pair[1], f"{float(scores[i]):.6f}"])
            if len(seen) >= MAX_MATCHES:
                break
    return Path(path)
