"""Batched, streamed descriptor extraction in one process: DISC21 folders -> ISC21 descriptor h5 files.

Why streamed: the real reference and training sets hold 1M images each (1 GB of float32 descriptors
per set at d = 256). Rows are appended to resizable h5 datasets batch by batch, so host memory stays
flat -- the model, one DataLoader's prefetched batches and one batch of descriptors -- however many
images there are. The files are written under temporary names and renamed only when every requested
set succeeded, so a failed or interrupted run never leaves a file that looks complete.

Files written to ``out_dir`` (``sets`` is any combination of ``q``, ``r``, ``t``):

* ``descriptors.h5`` when ``q`` or ``r`` is asked: ``query`` [nq, d] float32 + ``query_ids`` and/or
  ``reference`` [nr, d] float32 + ``reference_ids`` (ASCII bytes), rows sorted by id. Only the asked
  sets are in it: with ``q`` alone it has no ``reference`` dataset (and vice versa), so it is a partial
  file that :func:`isc.io.read_descriptors` rejects until both halves are extracted together.
* ``train_descriptors.h5`` when ``t`` is asked: ``train`` [nt, d] float32 + ``train_ids``.

Each file carries attributes ``isc.model_ref``, ``isc.input_size`` and ``isc.tta`` (ignored by the
ISC21 tooling). The same files across the ranks of a ``torchrun`` job: :mod:`isc.extract.sharded`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from isc import contract, fileutil
from isc.contract import Tag
from isc.data.disc21 import DISC21
from isc.errors import BadImageError, BadImagesError, ConfigError
from isc.extract.decode import eval_transform_for
from isc.extract.describe import (
    check_batching,
    describe_stream,
    describe_tensors,
    model_device,
    resolve_device,
    resolve_input_size,
    tta_load_size,
)
from isc.fileutil import atomic_path

log = logging.getLogger(__name__)

SET_NAMES = {"q": "query", "r": "reference", "t": "train"}
H5_CHUNK_ROWS = 1024


def output_paths(out_dir: str | Path, letters: Sequence[str]) -> list[Path]:
    """The files an extraction of ``letters`` writes into ``out_dir``."""
    names = ([contract.DESCRIPTORS_FILE] if any(c in letters for c in "qr") else []) + (
        [contract.TRAIN_DESCRIPTORS_FILE] if "t" in letters else []
    )
    return [Path(out_dir) / n for n in names]


def check_outputs(
    out_dir: str | Path, letters: Sequence[str], overwrite: bool, inputs: Sequence[str | Path] = ()
) -> list[Path]:
    """The project's output rule (:func:`isc.fileutil.check_outputs`) for this extraction's files.

    Why: ``--sets q`` into a folder that holds a full ``descriptors.h5`` would otherwise replace hours of
    extraction with a query-only file, and exit 0. The error names the file.
    """
    outs = output_paths(out_dir, letters)
    return fileutil.check_outputs({p.name: p for p in outs}, {"--model checkpoint" if i == 0 else f"input {i + 1}": p for i, p in enumerate(inputs)},
                                  overwrite, param="output_dir")


def parse_sets(sets: str) -> list[str]:
    """``"qrt"`` -> ``["q", "r", "t"]`` (order q, r, t; duplicates dropped); ConfigError('sets') otherwise."""
    letters = [c for c in str(sets).strip().lower()]
    bad = sorted({c for c in letters if c not in SET_NAMES})
    if not letters or bad:
        raise ConfigError("sets", f"must be a non-empty combination of q, r, t (got '{sets}')")
    return [c for c in "qrt" if c in letters]


def encode_id(image_id: str) -> bytes:
    """Ids are stored as bytes. DISC21 ids are ASCII, which UTF-8 leaves as they are; a non-ASCII file
    stem (``Qé01``) is stored as its UTF-8 bytes, which :func:`isc.io.read_descriptors` decodes back to
    the same stem (ASCII encoding would crash on it after the model had already run)."""
    return image_id.encode("utf-8")


def id_bytes_len(ids: Sequence[str]) -> int:
    return max((len(encode_id(i)) for i in ids), default=1)


class H5Appender:
    """Append rows to ``<name>`` [n, d] float32 and ``<name>_ids`` (ASCII) in an open h5 file."""

    def __init__(self, f: h5py.File, name: str, dim: int, id_len: int):
        """``id_len``: the longest id in UTF-8 bytes (:func:`id_bytes_len`), so any id of the set fits."""
        self.name = name
        self.x = f.create_dataset(
            name, shape=(0, dim), maxshape=(None, dim), dtype="f4", chunks=(H5_CHUNK_ROWS, dim)
        )
        self.ids = f.create_dataset(
            f"{name}_ids", shape=(0,), maxshape=(None,), dtype=f"S{max(id_len, 1)}", chunks=(H5_CHUNK_ROWS,)
        )
        self.n = 0

    def append(self, x: np.ndarray, ids: Sequence[str]) -> None:
        if x.shape[1] != self.x.shape[1]:
            raise ConfigError("model", f"produced {x.shape[1]}-d descriptors, expected {self.x.shape[1]}")
        n, m = self.n, len(ids)
        self.x.resize(n + m, axis=0)
        self.ids.resize(n + m, axis=0)
        self.x[n : n + m] = x
        self.ids[n : n + m] = np.array([encode_id(i) for i in ids], dtype=self.ids.dtype)
        self.n += m


@dataclass
class ExtractionResult:
    """What :func:`extract_descriptors` wrote and measured."""

    descriptors: Path | None = None  # out_dir/descriptors.h5 (q and/or r asked)
    train_descriptors: Path | None = None  # out_dir/train_descriptors.h5 (t asked)
    counts: dict[str, int] = field(default_factory=dict)  # set name -> rows written
    bad_images: list[BadImageError] = field(default_factory=list)  # skipped files (skip_bad_images)
    seconds: float = 0.0  # wall time of the extraction loop (decode + forward + write)
    images_per_second: float = 0.0
    input_size: int = 0
    dim: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "descriptors": str(self.descriptors) if self.descriptors else None,
            "train_descriptors": str(self.train_descriptors) if self.train_descriptors else None,
            "counts": dict(self.counts),
            "bad_images": [(str(e.path), e.reason) for e in self.bad_images],
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "input_size": self.input_size,
            "dim": self.dim,
            "device": self.device,
        }


@dataclass(frozen=True)
class ExtractRequest:
    """What to extract and how: the options both extraction paths share, named once.

    :func:`extract_descriptors` takes them as keywords; :func:`isc.extract.sharded.extract_descriptors_sharded`
    takes the request itself (its callers build one and may hand the same one to either path)."""

    sets: str = "qrt"  # letters of the DISC21 sets: q(uery), r(eference), t(rain)
    out_dir: str | Path = "outputs/extract"
    input_size: int | None = None  # None: the model's own (resolve_input_size)
    batch_size: int = 64
    workers: int = 2
    skip_bad_images: bool = False
    limit: int | None = None  # first N images (by id) of each set; None or 0 = all
    tta: bool = False
    model_ref: str = ""  # recorded in the files' attributes
    overwrite: bool = False


@dataclass
class Prepared:
    """Everything both extraction paths check and compute before the first image is decoded."""

    letters: list[str]
    listings: dict[str, list[tuple[str, Path]]]
    size: int
    transform: Any
    attrs: dict[str, Any]
    out_dir: Path


def prepare(model: torch.nn.Module, data: DISC21, req: ExtractRequest) -> Prepared:
    """Validate the request and the data, refuse existing outputs, list the images; nothing written."""
    sets, out_dir, input_size, batch_size, workers, limit, tta, model_ref, overwrite = (
        req.sets, req.out_dir, req.input_size, req.batch_size, req.workers, req.limit, req.tta, req.model_ref,
        req.overwrite)  # fmt: skip
    letters = parse_sets(sets)
    check_batching(batch_size, workers)
    if limit is not None and int(limit) < 0:
        raise ConfigError("limit", f"must be >= 0 (0 = all), got {limit}")
    size = resolve_input_size(model, input_size)
    check_outputs(out_dir, letters, overwrite, [getattr(model, "checkpoint_path", "")])
    data.validate("".join(letters))
    listings = {c: data.images(c, limit or None) for c in letters}
    for c, items in listings.items():
        if not items:
            raise ConfigError("data", f"no images in {data.split_dir(c)}")
    transform = eval_transform_for(model, tta_load_size(size) if tta else size)
    attrs = {Tag.MODEL_REF: model_ref, Tag.INPUT_SIZE: size, Tag.TTA: int(bool(tta))}
    return Prepared(letters, listings, size, transform, attrs, Path(out_dir))


def h5_bytes(rows: int, dim: int, id_len: int) -> int:
    """Disk an :class:`H5Appender` dataset pair of ``rows`` rows may take: whole chunks of float32 rows and
    ids (chunks are allocated whole), B-tree and heap metadata, and slack. An over- rather than an
    under-estimate: it is the space reserved before HDF5 writes (:func:`open_h5_output`)."""
    chunks = max(1, math.ceil(rows / H5_CHUNK_ROWS))
    data = chunks * H5_CHUNK_ROWS * (4 * dim + max(id_len, 1))
    return int(data * 1.02) + chunks * 1024 + (256 << 10)


def open_h5_output(stack: contextlib.ExitStack, path: Path, needed: int) -> h5py.File:
    """An h5 file written to a temporary name (renamed onto ``path`` when ``stack`` closes) with ``needed``
    bytes of disk reserved first (:func:`isc.fileutil.reserve_space`).

    Why: HDF5 1.14 crashes the process (segfault, exit 139) when one of its writes fails on a full disk
    and the file is then closed -- also at interpreter exit -- after reporting the failure only as an
    ignored exception. With the space reserved, HDF5's writes cannot fail for lack of it; a disk too small
    for the estimate is one ENOSPC line naming ``path`` before anything is written."""
    tmp = stack.enter_context(atomic_path(path))
    fileutil.reserve_space(tmp, needed, final=path)
    stack.callback(fileutil.release_reserved, tmp)  # after the h5 file is closed (LIFO), before the rename
    return stack.enter_context(h5py.File(tmp, "w"))


def open_outputs(stack: contextlib.ExitStack, out_dir: Path, letters: Sequence[str], attrs: dict[str, Any],
                  needed: dict[str, int]) -> dict[str, h5py.File]:  # fmt: skip
    """``letter -> open h5`` (temp files renamed onto their final names when ``stack`` closes); ``needed``:
    letter -> :func:`h5_bytes` of its set, reserved per file."""
    files: dict[str, h5py.File] = {}
    by_letter: dict[str, h5py.File] = {}
    for c in letters:
        fname = contract.TRAIN_DESCRIPTORS_FILE if c == "t" else contract.DESCRIPTORS_FILE
        if fname not in files:
            size = sum(n for k, n in needed.items() if k in letters and (k == "t") == (c == "t"))
            files[fname] = open_h5_output(stack, out_dir / fname, size)
            files[fname].attrs.update(attrs)
        by_letter[c] = files[fname]
    return by_letter


def stream_into(writer: H5Appender, model: torch.nn.Module, items: Sequence[tuple[str, Path]], transform: Any,
                 batch_size: int, workers: int, tta: bool, skip_bad_images: bool, bad: list[BadImageError],
                 desc: str) -> None:  # fmt: skip
    """Describe ``items`` into ``writer``; bad images go to ``bad``. After the first bad image (unless
    ``skip_bad_images``) the model stops but decoding goes on, so the error lists every bad file."""
    ids = [i for i, _ in items]
    for idx, x, errors in describe_stream(
        model, [p for _, p in items], transform, batch_size, workers, tta, desc,
        run_model=lambda: skip_bad_images or not bad,
    ):  # fmt: skip
        for e in errors:
            log.warning("bad image: %s: %s", e.path, e.reason)
        bad.extend(errors)
        if x is not None and (skip_bad_images or not bad):
            writer.append(x, [ids[i] for i in idx])


def finish_result(result: ExtractionResult, letters: Sequence[str], out_dir: Path, t0: float) -> dict[str, Any]:
    result.seconds = time.perf_counter() - t0
    written = sum(result.counts.values())
    result.images_per_second = written / result.seconds if result.seconds > 0 else 0.0
    if any(c in letters for c in "qr"):
        result.descriptors = out_dir / contract.DESCRIPTORS_FILE
    if "t" in letters:
        result.train_descriptors = out_dir / contract.TRAIN_DESCRIPTORS_FILE
    return result.to_dict()


def extract_descriptors(
    model: torch.nn.Module,
    data: DISC21,
    sets: str = "qrt",
    out_dir: str | Path = "outputs/extract",
    input_size: int | None = None,
    batch_size: int = 64,
    workers: int = 2,
    skip_bad_images: bool = False,
    device: str | torch.device | None = None,
    limit: int | None = None,
    tta: bool = False,
    model_ref: str = "",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Extract the asked DISC21 sets with ``model`` and stream them to h5 files in ``out_dir``.

    An existing output file is an error (:func:`check_outputs`) unless ``overwrite``.

    See the module docstring for the files. Bad images: with ``skip_bad_images=False`` every image of
    every asked set is still decoded (the model stops running after the first bad one) and then one
    :class:`BadImagesError` lists them all, leaving no new file behind; with ``True`` they are skipped
    (their ids are absent from the output) and returned under ``bad_images``. ``limit`` keeps the first
    N images (by id) of each set. Returns :meth:`ExtractionResult.to_dict`.
    """
    dev = resolve_device(device)
    req = ExtractRequest(sets, out_dir, input_size, batch_size, workers, skip_bad_images, limit, tta, model_ref,
                         overwrite)  # fmt: skip
    prep = prepare(model, data, req)
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    dim = int(getattr(model, "model_config", {}).get("dim", 0)) or probe_dim(model, prep.size)
    result = ExtractionResult(input_size=prep.size, dim=dim, device=str(dev))
    bad: list[BadImageError] = []
    log.info("extracting %s (%d images, %d px, batch %d, %d workers) on %s", "".join(prep.letters),
             sum(len(v) for v in prep.listings.values()), prep.size, batch_size, workers, dev)  # fmt: skip
    t0 = time.perf_counter()
    id_lens = {c: id_bytes_len([i for i, _ in prep.listings[c]]) for c in prep.letters}
    needed = {c: h5_bytes(len(prep.listings[c]), dim, id_lens[c]) for c in prep.letters}
    with contextlib.ExitStack() as stack:
        files = open_outputs(stack, prep.out_dir, prep.letters, prep.attrs, needed)
        for c in prep.letters:
            items = prep.listings[c]
            writer = H5Appender(files[c], SET_NAMES[c], dim, id_lens[c])
            stream_into(writer, model, items, prep.transform, batch_size, workers, tta, skip_bad_images, bad,
                         f"extract {SET_NAMES[c]}")
            result.counts[SET_NAMES[c]] = writer.n
            if bad and not skip_bad_images:
                continue  # keep scanning the other sets so the error lists every bad file
            if writer.n == 0:
                raise ConfigError("data", f"every image in {data.split_dir(c)} is unreadable")
        if bad and not skip_bad_images:
            raise BadImagesError(bad)  # the stack closes and deletes every temp file
        # Leaving the stack closes each h5 file, then renames it onto its final name (LIFO order).
    result.bad_images = bad
    if bad:
        log.warning("skipped %d unreadable image(s): %s", len(bad), ", ".join(str(e.path) for e in bad[:20]))
    return finish_result(result, prep.letters, prep.out_dir, t0)


def probe_dim(model: torch.nn.Module, size: int) -> int:
    """Descriptor size of a model without ``model_config['dim']``: one forward on a blank image."""
    device = model_device(model)
    return int(describe_tensors(model, torch.zeros(1, 3, size, size, device=device)).shape[1])
