"""Sharded extraction: :func:`isc.extract.streamed.extract_descriptors` split over the ranks of a
``torchrun`` job, resumable per shard (each rank streams its shards to files with done-markers; rank 0
merges them into the very files one process writes)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import torch

from isc.data.disc21 import DISC21
from isc.errors import BadImageError, BadImagesError, ConfigError, ISCError
from isc.extract.describe import model_device
from isc.extract.streamed import (
    SET_NAMES,
    ExtractionResult,
    ExtractRequest,
    H5Appender,
    finish_result,
    h5_bytes,
    id_bytes_len,
    open_h5_output,
    open_outputs,
    prepare,
    probe_dim,
    stream_into,
)
from isc.fileutil import atomic_path

log = logging.getLogger(__name__)


class ExtractionFailedError(ISCError):
    """A rank of a sharded extraction failed (its message is reported by every rank), or a shard file is
    inconsistent with its done-marker."""


SHARD_DIR = ".extract_shards"
DEFAULT_SHARD_SIZE = 8192  # images per shard file: ~250 shards for 2M images, minutes of work each


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of the model's weights: finished shards are reused only for the very same network."""

    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", copy=True).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class _Shard:
    letter: str
    index: int
    start: int
    stop: int

    @property
    def stem(self) -> str:
        return f"{SET_NAMES[self.letter]}-{self.index:06d}"


def _plan_shards(listings: dict[str, list[tuple[str, Path]]], shard_size: int) -> list[_Shard]:
    return [
        _Shard(c, k, start, min(start + shard_size, len(items)))
        for c, items in listings.items()
        for k, start in enumerate(range(0, len(items), shard_size))
    ]


def _shard_fingerprint(shard: _Shard, ids: Sequence[str], common: dict[str, Any]) -> dict[str, Any]:
    return {**common, "set": SET_NAMES[shard.letter], "start": shard.start, "n": shard.stop - shard.start,
            "first_id": ids[shard.start], "last_id": ids[shard.stop - 1]}  # fmt: skip


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _DiscardShard(Exception):
    """A shard with a bad image when bad images are fatal: its temp file is dropped, no marker written."""


def _extract_shard(model, shard: _Shard, items, transform, batch_size, workers, tta, skip_bad_images,
                   dim: int, id_len: int, folder: Path, fingerprint: dict[str, Any]) -> list[BadImageError]:  # fmt: skip
    """Stream one shard to ``folder/<set>-<k>.h5`` (atomic), then write its done-marker (atomic).

    The marker is written last, so after a kill a shard is either done (marker + file) or redone.
    """

    bad: list[BadImageError] = []
    try:
        with contextlib.ExitStack() as stack:
            f = open_h5_output(stack, folder / f"{shard.stem}.h5", h5_bytes(shard.stop - shard.start, dim, id_len))
            writer = H5Appender(f, "x", dim, id_len)
            stream_into(writer, model, items[shard.start : shard.stop], transform, batch_size, workers, tta,
                         skip_bad_images, bad, f"extract {shard.stem}")
            if bad and not skip_bad_images:
                raise _DiscardShard()
    except _DiscardShard:
        return bad
    marker = {**fingerprint, "rows": writer.n, "bad": [[str(e.path), e.reason] for e in bad]}
    with atomic_path(folder / f"{shard.stem}.done.json") as tmp:
        tmp.write_text(json.dumps(marker))
    return bad


def extract_descriptors_sharded(
    model: torch.nn.Module,
    data: DISC21,
    request: ExtractRequest,
    info: Any = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> dict[str, Any]:
    """:func:`isc.extract.streamed.extract_descriptors` of ``request`` split over the ranks of a ``torchrun``
    job (``info``: a :class:`isc.train.distributed.DistInfo`; ``None`` = one process), resumable per shard.

    Every set is cut into shards of ``shard_size`` images (rounded up to a multiple of ``batch_size``, so
    each batch holds exactly the images a single process would put in it and the descriptors come out
    bit-identical); shard k goes to rank k mod world size among the shards still to do. Each rank streams
    its shards to ``out_dir/.extract_shards/<set>-<k>.h5`` plus a done-marker; rank 0 then merges them in
    id order into the same ``descriptors.h5`` / ``train_descriptors.h5`` a single process writes (atomic),
    and deletes the shards. A re-run after a kill reuses every shard whose marker matches the model's
    weights, the input size, TTA, batch and shard size, and the shard's ids. ``out_dir`` must be one
    folder that every rank sees (a shared file system across nodes). Must be called on every rank; the
    model must already be on the rank's device. Returns :meth:`ExtractionResult.to_dict` on every rank.
    """
    from isc.train import distributed as ddp

    info = info or ddp.DistInfo(device=model_device(model))
    if int(shard_size) < 1:
        raise ConfigError("shard_size", f"must be >= 1, got {shard_size}")
    prep = prepare(model, data, request)
    batch_size, workers, tta, skip_bad_images = request.batch_size, request.workers, request.tta, request.skip_bad_images
    letters, listings, size, transform, out_dir = prep.letters, prep.listings, prep.size, prep.transform, prep.out_dir
    shard_size = -(-int(shard_size) // int(batch_size)) * int(batch_size)
    dev = model_device(model)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    dim = int(getattr(model, "model_config", {}).get("dim", 0)) or probe_dim(model, size)
    id_lens = {c: id_bytes_len([i for i, _ in items]) for c, items in listings.items()}
    folder = out_dir / SHARD_DIR
    shards = _plan_shards(listings, shard_size)
    t0 = time.perf_counter()

    common = {"weights": weights_digest(model), "input_size": size, "tta": bool(tta),
              "batch_size": int(batch_size), "shard_size": shard_size, "dim": dim}  # fmt: skip
    # Rank 0 decides what is left to do and tells everyone, so all ranks agree even while others write.
    todo = ddp.broadcast_object(info, _shards_todo(folder, shards, listings, common) if info.primary else None)
    mine = todo[info.rank :: info.world_size]
    log.info("rank %d/%d: %d of %d shard(s) to extract (%d already done), %d images per shard, on %s",
             info.rank, info.world_size, len(mine), len(shards), len(shards) - len(todo), shard_size, dev)  # fmt: skip
    bad: list[BadImageError] = []
    failure = ""
    try:
        for j in mine:
            s = shards[j]
            ids = [i for i, _ in listings[s.letter]]
            bad += _extract_shard(model, s, listings[s.letter], transform, batch_size, workers, tta,
                                  skip_bad_images, dim, id_lens[s.letter], folder,
                                  _shard_fingerprint(s, ids, common))  # fmt: skip
    except ISCError as exc:  # reported by every rank below, instead of leaving the others waiting
        failure = f"rank {info.rank}: {exc}"
    _raise_on_any_rank(info, failure, bad, skip_bad_images)

    result = ExtractionResult(input_size=size, dim=dim, device=str(dev))
    merged: dict[str, Any] = {}
    if info.primary:
        merged = _merge_shards(out_dir, folder, letters, shards, listings, prep.attrs, dim, id_lens)
    merged = ddp.broadcast_object(info, merged)
    result.counts = merged["counts"]
    result.bad_images = [BadImageError(p, r) for p, r in merged["bad"]]
    return finish_result(result, letters, out_dir, t0)


def _shards_todo(folder: Path, shards: Sequence[_Shard], listings, common: dict[str, Any]) -> list[int]:
    """Rank 0: indices of the shards without a done-marker matching ``common`` and their ids."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.partial"):  # half-written by a killed run; nobody writes yet
        stale.unlink(missing_ok=True)
    todo = []
    for j, s in enumerate(shards):
        ids = [i for i, _ in listings[s.letter]]
        marker = _read_marker(folder / f"{s.stem}.done.json")
        fp = _shard_fingerprint(s, ids, common)
        if not (marker and {k: marker.get(k) for k in fp} == fp and (folder / f"{s.stem}.h5").is_file()):
            todo.append(j)
    return todo


def _raise_on_any_rank(info: Any, failure: str, bad: list[BadImageError], skip_bad_images: bool) -> None:
    """Every rank raises the same error when any rank failed or (unless skipped) met a bad image."""
    status = _all_gather_object(info, (failure, [(str(e.path), e.reason) for e in bad]))
    failures = [f for f, _ in status if f]
    if failures:
        raise ExtractionFailedError("; ".join(failures))
    all_bad = sorted({(p, r) for _, b in status for p, r in b})
    if all_bad and not skip_bad_images:
        raise BadImagesError([BadImageError(p, r) for p, r in all_bad])


def _merge_shards(out_dir: Path, folder: Path, letters: Sequence[str], shards: Sequence[_Shard],
                  listings, attrs: dict[str, Any], dim: int, id_lens: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """Rank 0: concatenate the shards in id order into the final files (atomic), then delete them."""
    counts: dict[str, int] = {}
    bad: list[tuple[str, str]] = []
    needed = {c: h5_bytes(len(listings[c]), dim, id_lens[c]) for c in letters}
    with contextlib.ExitStack() as stack:
        files = open_outputs(stack, out_dir, letters, attrs, needed)
        for c in letters:
            name = SET_NAMES[c]
            writer = H5Appender(files[c], name, dim, id_lens[c])
            for s in (s for s in shards if s.letter == c):
                marker = _read_marker(folder / f"{s.stem}.done.json") or {}
                bad += [(p, r) for p, r in marker.get("bad", [])]
                with h5py.File(folder / f"{s.stem}.h5", "r") as f:
                    x, ids = f["x"][:], [b.decode("utf-8") for b in f["x_ids"][:]]
                if len(ids) != marker.get("rows"):
                    raise ExtractionFailedError(f"{folder / s.stem}.h5: {len(ids)} rows, marker says "
                                                f"{marker.get('rows')}; delete it and re-run")  # fmt: skip
                if len(ids):
                    writer.append(x, ids)
            counts[name] = writer.n
            if writer.n == 0:
                raise ConfigError("data", f"every image of the {name} set is unreadable")
    for s in shards:
        for suffix in (".h5", ".done.json"):
            (folder / f"{s.stem}{suffix}").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when no other set's shards are left in it
    return {"counts": counts, "bad": bad}


def _all_gather_object(info: Any, obj: Any) -> list[Any]:
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
