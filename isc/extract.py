"""Batched, streamed descriptor extraction: DISC21 folders -> ISC21 descriptor h5 files.

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
ISC21 tooling). Descriptors come from the model in eval mode (the eval GeM exponent), under
``torch.inference_mode`` and, on CUDA, float16 autocast.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from isc import contract, fileutil
from isc.contract import Tag
from isc.data.disc21 import DISC21
from isc.data.images import decode_image, load_image, to_rgb
from isc.errors import BadImageError, BadImagesError, ConfigError, ISCError
from isc.fileutil import atomic_path
from isc.proctree import loader_worker_init

log = logging.getLogger(__name__)

SET_NAMES = {"q": "query", "r": "reference", "t": "train"}
DESCRIPTORS_FILE = contract.DESCRIPTORS_FILE
TRAIN_FILE = contract.TRAIN_DESCRIPTORS_FILE
# Test-time augmentation (v107 --tta): the image is loaded at sqrt(2) x the input size, then the model runs
# at input / sqrt(2), input and input x sqrt(2), each with and without a horizontal flip (6 passes); the
# sum is L2-normalised.
TTA_SCALES = (2 ** -0.5, 1.0, 2 ** 0.5)


def tta_load_size(input_size: int) -> int:
    """The side images are loaded at for TTA: sqrt(2) x the input size (v107's largest scale)."""
    return int(round(input_size * 2 ** 0.5))
H5_CHUNK_ROWS = 1024


class ExtractionFailedError(ISCError):
    """A rank of a sharded extraction failed (its message is reported by every rank), or a shard file is
    inconsistent with its done-marker."""


def output_paths(out_dir: str | Path, letters: Sequence[str]) -> list[Path]:
    """The files an extraction of ``letters`` writes into ``out_dir``."""
    names = ([DESCRIPTORS_FILE] if any(c in letters for c in "qr") else []) + (
        [TRAIN_FILE] if "t" in letters else []
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


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` = CUDA when available, else CPU."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError("device", f"unknown device '{device}'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA requested but no GPU is visible")
    return dev


def resolve_input_size(model: torch.nn.Module, input_size: int | None) -> int:
    """``input_size`` if > 0, else the model's ``model_config['input_size']``."""
    if input_size:
        if int(input_size) < 0:
            raise ConfigError("input_size", f"must be >= 0 (0 = the model's), got {input_size}")
        return int(input_size)
    size = getattr(model, "model_config", {}).get("input_size")
    if not size:
        raise ConfigError("input_size", "the model records no input_size; pass one explicitly")
    return int(size)


# Pillow's "reducing gap" (Image.thumbnail's default): a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the
# DCT domain only while both sides stay >= DRAFT_GAP x the input size, so the resize that follows still
# shrinks by >= 2x with its antialiasing filter. At 2.0 the descriptors of real photos stay within cosine
# 0.999 of a full decode at 256-512 px (tests/test_fast_decode.py; docs/descriptors.md has the figures);
# 1.0 (draft straight to the input size) measured 0.997 at 256-384 px. 0 turns draft decoding off.
DRAFT_GAP = 2.0


class EvalTransform:
    """Resize to ``size`` square, ToTensor, Normalize with ``mean``/``std``: callable on an RGB PIL image.

    A class rather than a bare ``Compose`` because the decoders need its numbers too: the CPU loader
    decodes JPEGs at reduced size (:meth:`draft_side`), and on CUDA the device decoder resizes and
    normalises JPEGs itself (:func:`decode_jpegs_on`) to the same ``size``, ``mean`` and ``std``.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        from torchvision import transforms as T

        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self._compose = T.Compose(
            [T.Lambda(to_rgb), T.Resize((self.size, self.size)), T.ToTensor(), T.Normalize(self.mean, self.std)]
        )

    def __call__(self, img: Any) -> torch.Tensor:
        return self._compose(img)

    def draft_side(self) -> int | None:
        """The side a JPEG may be reduced to before the resize (``None``: decode at full size)."""
        return int(math.ceil(self.size * DRAFT_GAP)) if DRAFT_GAP > 0 else None

    def loader(self, load: Callable[..., Any] = load_image) -> Callable[[Any], Any]:
        """``load`` (:func:`load_image` or :func:`decode_image`) with this transform's draft side."""
        side = self.draft_side()
        return functools.partial(load, draft=side) if side else load


def eval_transform_for(model: torch.nn.Module, input_size: int) -> EvalTransform:
    """Resize to ``input_size`` square, ToTensor, Normalize with the model's mean/std.

    The same pipeline as :func:`isc.data.augment.build_eval_transform` (a test holds them equal), built
    here so that extraction does not import the training augmentations and with them AugLy: GPU boxes
    that only extract (or run ``bench/gpu_check.sh``) need not install it.
    """
    cfg = getattr(model, "model_config", {})
    mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise ConfigError("input_size", f"must be a positive integer, got {input_size!r}")
    if len(mean) != 3 or len(std) != 3 or any(v <= 0 for v in std):
        raise ConfigError("mean/std", f"need 3 values each (RGB), std > 0; got {mean} / {std}")
    return EvalTransform(input_size, mean, std)


# ---------------------------------------------------------------- model side


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (eval GeM p, frozen BN) for the block; the caller's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _forward(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            return model(x.contiguous(memory_format=torch.channels_last)).float()
    return model(x).float()


def describe_tensors(model: torch.nn.Module, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
    """Descriptors of pre-processed images.

    batch: [B, 3, s, s] float tensor, already resized and normalised. Returns [B, d] float32 numpy,
    L2-normalised rows. Runs on the model's device (AMP on CUDA) in eval mode under inference_mode.
    With ``tta`` the batch is at :func:`tta_load_size` (sqrt(2) x the input size) and the descriptor is the
    normalised sum of 6 passes: :data:`TTA_SCALES` x the input size, each with and without a flip.
    """
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ConfigError("batch", f"expected [B, 3, H, W] images, got shape {tuple(batch.shape)}")
    device = _model_device(model)
    with _eval_mode(model), torch.inference_mode():
        x = batch.to(device, non_blocking=True).float()
        if not tta:
            out = _forward(model, x, device)
        else:
            base = x.shape[-1] / 2 ** 0.5  # the input size the batch was loaded for
            out = 0
            for scale in TTA_SCALES:
                side = max(8, int(round(base * scale)))
                xs = x if side == x.shape[-1] else F.interpolate(
                    x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
                out = out + _forward(model, xs, device) + _forward(model, torch.flip(xs, dims=[3]), device)
            out = F.normalize(out, p=2, dim=1)
        return out.cpu().numpy().astype(np.float32, copy=False)


# ---------------------------------------------------------------- data side


class _Jpeg:
    """The bytes of a JPEG left for the device decoder (a uint8 tensor: pinned and copied like the rest)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)


def device_decodable_jpeg(source: Any) -> bytes | None:
    """The bytes of ``source`` (a path or the bytes of a file) when the device decoder can decode it to
    what :func:`load_image` gives, else ``None`` (the CPU decoder then handles it, with its errors).

    Only complete JPEGs in RGB or grayscale without an EXIF rotation qualify: other formats, CMYK, rotated
    photos, files without the end-of-image marker (truncated: Pillow refuses them, nvJPEG might not),
    empty, unreadable or oversized files all go to the CPU. Reads the header only, no pixels.
    """
    try:
        data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    except (OSError, TypeError):
        return None
    if data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return None
                if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: only Pillow's path applies it
                    return None
    except Exception:  # noqa: BLE001 -- whatever fails here, the CPU decoder reports it properly
        return None
    return data


def decode_jpegs_on(device: torch.device, datas: Sequence[torch.Tensor],
                    transform: EvalTransform) -> list[torch.Tensor | None]:  # fmt: skip
    """Decode JPEG bytes on ``device`` (nvJPEG on CUDA, batched), resize and normalise like ``transform``.

    ``datas``: the files' bytes as uint8 CPU tensors (torchvision's GPU decoder takes them from the host).
    Returns one [3, s, s] float tensor on ``device`` per input, or ``None`` where the decoder refused the
    file (the caller hands those to the CPU decoder). The resize is the antialiased bilinear filter that
    torchvision models on Pillow's, in Pillow's two rounded passes, so the tensors match the CPU path's
    full decode within the tolerance tests/test_fast_decode.py checks (no draft: the GPU decodes at full
    size, so its descriptors are the closer ones).
    ``device`` may be the CPU (the same code on libjpeg-turbo: how the tests check it without a GPU).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        images: list[torch.Tensor | None] = list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole batch: decode one by one to find it
        images = []
        for d in datas:
            try:
                images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    s = transform.size
    mean = torch.tensor(transform.mean, device=device).view(3, 1, 1)
    std = torch.tensor(transform.std, device=device).view(3, 1, 1)
    out: list[torch.Tensor | None] = []
    for img in images:
        if img is None:
            out.append(None)
            continue
        x = img[None].float()
        # Pillow resizes uint8 images in two passes, width then height, rounding to whole levels after
        # each; doing the same leaves ~0.2 % of the pixels one level off (one pass: ~15 %).
        for size in ((x.shape[-2], s), (s, s)):
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                x = x.round_().clamp_(0, 255)
        out.append((x[0] / 255 - mean) / std)
    return out


def jpeg_decode_device(device: torch.device, transform: Any) -> torch.device | None:
    """Where JPEGs are decoded: on ``device`` when it is CUDA and torchvision can decode there (and the
    transform is the plain :class:`EvalTransform`), else ``None`` = in the DataLoader workers on the CPU."""
    if device.type != "cuda" or not isinstance(transform, EvalTransform):
        return None
    try:
        from torchvision.io import decode_jpeg  # noqa: F401 -- built without image support on some wheels
    except ImportError:
        return None
    return device


class _ImageList(Dataset):
    """(index, tensor or None, reason) per image: bad files are reported, not raised, so one pass sees all.

    ``load`` turns one source into an RGB PIL image: :func:`load_image` for paths, :func:`decode_image`
    for the bytes of an encoded file; everything after it (resize, normalise) is the same ``transform``.
    With ``device_jpeg`` a JPEG the device can decode (:func:`device_decodable_jpeg`) comes back as its
    bytes (a :class:`_Jpeg`) instead of a tensor; every other file goes through ``load`` as before.
    """

    def __init__(self, paths: Sequence[Any], transform: Callable[[Any], torch.Tensor],
                 load: Callable[[Any], Any] = load_image, device_jpeg: bool = False):  # fmt: skip
        self.paths = list(paths)
        self.transform = transform
        self.load = load
        self.device_jpeg = device_jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | _Jpeg | None, str]:
        if self.device_jpeg:
            data = device_decodable_jpeg(self.paths[i])
            if data is not None:
                return i, _Jpeg(data), ""
        try:
            img = self.load(self.paths[i])
        except BadImageError as exc:
            return i, None, exc.reason
        return i, self.transform(img), ""


class _Pending:
    """A batch that still holds JPEG bytes for the device decoder: ``rows`` in index order, each a
    normalised CPU tensor or a :class:`_Jpeg`."""

    def __init__(self, rows: list[tuple[int, torch.Tensor | _Jpeg]]):
        self.rows = rows

    def pin_memory(self) -> _Pending:  # called by the DataLoader's pinning thread (CUDA only)
        return _Pending([(i, t if isinstance(t, _Jpeg) else t.pin_memory()) for i, t in self.rows])


def _collate(
    items: list[tuple[int, torch.Tensor | _Jpeg | None, str]],
) -> tuple[list[int], torch.Tensor | _Pending | None, list[tuple[int, str]]]:
    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, reason) for i, t, reason in items if t is None]
    if any(isinstance(t, _Jpeg) for _, t in good):
        return [i for i, _ in good], _Pending(good), bad
    batch = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], batch, bad


def _finish_on_device(pending: _Pending, transform: EvalTransform, device: torch.device, sources: Sequence[Any],
                      load: Callable[[Any], Any]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:  # fmt: skip
    """Decode a batch's JPEGs on ``device`` and stack it with its CPU-decoded rows, in index order.

    A JPEG the device decoder refuses goes to the CPU decoder, which gives it the very error (or the
    very pixels) it would have had without device decoding: same messages, same skip rules.
    """
    jpegs = [(i, t.data) for i, t in pending.rows if isinstance(t, _Jpeg)]
    decoded = decode_jpegs_on(device, [d for _, d in jpegs], transform)  # bytes stay on the host: nvJPEG reads them there
    rows = {i: t.to(device, non_blocking=True) for i, t in pending.rows if not isinstance(t, _Jpeg)}
    errors: list[tuple[int, str]] = []
    for (i, _), x in zip(jpegs, decoded, strict=True):
        if x is None:
            try:
                x = transform(transform.loader(load)(sources[i])).to(device)
            except BadImageError as exc:
                errors.append((i, exc.reason))
                continue
        rows[i] = x
    idx = sorted(rows)
    return idx, (torch.stack([rows[i] for i in idx]) if idx else None), errors


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # rows must come out in id order
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=loader_worker_init,  # SIGTERM ends the main process first (isc.proctree)
    )


def _describe_stream(
    model: torch.nn.Module,
    paths: Sequence[Path],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    workers: int,
    tta: bool,
    desc: str,
    run_model: Callable[[], bool] = lambda: True,
    sources: Sequence[Any] | None = None,
    load: Callable[[Any], Any] = load_image,
    decode_on: torch.device | str | None = "auto",
) -> Iterator[tuple[list[int], np.ndarray | None, list[BadImageError]]]:
    """Yield ``(row indices, descriptors [b, d] | None, bad images)`` per batch, in path order.

    ``run_model()`` is asked before each forward pass: once it says False (a bad image was found and the
    run is going to fail) the remaining batches are only decoded, so every bad file still gets listed
    without spending model time. ``sources``/``load``: decode ``load(sources[i])`` instead of the file
    ``paths[i]`` (which then only names image ``i`` in errors), e.g. the bytes of a served request.
    ``decode_on``: where JPEGs are decoded -- ``"auto"`` = :func:`jpeg_decode_device` (the GPU on CUDA),
    a device to force the device decoder there (the tests use the CPU), ``None`` = the CPU workers.
    """
    device = _model_device(model)
    if decode_on == "auto":
        decode_on = jpeg_decode_device(device, transform)
    raw_load = load
    if isinstance(transform, EvalTransform):
        load = transform.loader(load)
    images = _ImageList(paths if sources is None else sources, transform, load, device_jpeg=decode_on is not None)
    loader = _loader(images, batch_size, workers, device)
    for idx, batch, bad in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=2.0):
        if isinstance(batch, _Pending):
            idx, batch, more = _finish_on_device(batch, transform, torch.device(decode_on), images.paths, raw_load)
            bad = sorted(bad + more)
        errors = [BadImageError(paths[i], reason) for i, reason in bad]
        if batch is None or not run_model():
            yield idx, None, errors
        else:
            yield idx, describe_tensors(model, batch, tta), errors


def _check_common(batch_size: int, workers: int) -> None:
    if int(batch_size) < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    if int(workers) < 0:
        raise ConfigError("workers", f"must be >= 0, got {workers}")


def describe_images(
    model: torch.nn.Module,
    paths: Sequence[str | Path],
    input_size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    tta: bool = False,
) -> np.ndarray:
    """In-memory descriptors of image files (tuning, the registry's pyfunc, ad-hoc search).

    Returns [len(paths), d] float32, L2-normalised, in the order of ``paths``. Any unreadable file
    raises :class:`BadImagesError` listing every bad one. ``device=None`` keeps the model where it is.
    """
    _check_common(batch_size, workers)
    return _describe_in_memory(model, [Path(p) for p in paths], None, input_size, batch_size, workers, device, tta)


def describe_encoded_images(
    model: torch.nn.Module,
    images: Sequence[bytes],
    names: Sequence[str] | None = None,
    input_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    tta: bool = False,
) -> np.ndarray:
    """:func:`describe_images` for the bytes of encoded image files (JPEG, PNG...) held in memory.

    Why: a served request carries images, not paths. Each is decoded by :func:`decode_image` (the
    decoder of :func:`load_image`) and then resized and normalised by the very same transform, so the
    bytes of a file and the file itself get identical descriptors. ``names`` label bad images in the
    :class:`BadImagesError` (default ``image[i]``).
    """
    _check_common(batch_size, 0)
    labels = list(names) if names is not None else [f"image[{i}]" for i in range(len(images))]
    if len(labels) != len(images):
        raise ConfigError("names", f"{len(labels)} names for {len(images)} images")
    return _describe_in_memory(model, labels, list(images), input_size, batch_size, 0, device, tta, decode_image)


def _describe_in_memory(
    model: torch.nn.Module,
    paths: Sequence[Any],
    sources: Sequence[Any] | None,
    input_size: int | None,
    batch_size: int,
    workers: int,
    device: str | torch.device | None,
    tta: bool,
    load: Callable[[Any], Any] = load_image,
) -> np.ndarray:
    """The body of both ``describe_*``: ``paths`` name the images, ``load(sources[i])`` decodes them."""
    if device is not None:
        model.to(resolve_device(device))
    size = resolve_input_size(model, input_size)
    transform = eval_transform_for(model, tta_load_size(size) if tta else size)
    dim = int(getattr(model, "model_config", {}).get("dim", 0)) or None
    rows: list[np.ndarray] = []
    bad: list[BadImageError] = []
    for _, x, errors in _describe_stream(
        model, paths, transform, batch_size, workers, tta, "describe", run_model=lambda: not bad,
        sources=sources, load=load,
    ):
        bad.extend(errors)
        if x is not None and not bad:
            rows.append(x)
    if bad:
        raise BadImagesError(bad)
    if not rows:
        return np.zeros((0, dim or 0), dtype=np.float32)
    return np.concatenate(rows, axis=0)


# ---------------------------------------------------------------- streamed h5 writing


def encode_id(image_id: str) -> bytes:
    """Ids are stored as bytes. DISC21 ids are ASCII, which UTF-8 leaves as they are; a non-ASCII file
    stem (``Qé01``) is stored as its UTF-8 bytes, which :func:`isc.io.read_descriptors` decodes back to
    the same stem (ASCII encoding would crash on it after the model had already run)."""
    return image_id.encode("utf-8")


def id_bytes_len(ids: Sequence[str]) -> int:
    return max((len(encode_id(i)) for i in ids), default=1)


class _H5Appender:
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


@dataclass
class _Prepared:
    """Everything both extraction paths check and compute before the first image is decoded."""

    letters: list[str]
    listings: dict[str, list[tuple[str, Path]]]
    size: int
    transform: Any
    attrs: dict[str, Any]
    out_dir: Path


def _prepare(model: torch.nn.Module, data: DISC21, sets: str, out_dir: str | Path, input_size: int | None,
             batch_size: int, workers: int, limit: int | None, tta: bool, model_ref: str,
             overwrite: bool) -> _Prepared:  # fmt: skip
    """Validate the arguments and the data, refuse existing outputs, list the images; nothing written."""
    letters = parse_sets(sets)
    _check_common(batch_size, workers)
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
    return _Prepared(letters, listings, size, transform, attrs, Path(out_dir))


def h5_bytes(rows: int, dim: int, id_len: int) -> int:
    """Disk an :class:`_H5Appender` dataset pair of ``rows`` rows may take: whole chunks of float32 rows and
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


def _open_outputs(stack: contextlib.ExitStack, out_dir: Path, letters: Sequence[str], attrs: dict[str, Any],
                  needed: dict[str, int]) -> dict[str, h5py.File]:  # fmt: skip
    """``letter -> open h5`` (temp files renamed onto their final names when ``stack`` closes); ``needed``:
    letter -> :func:`h5_bytes` of its set, reserved per file."""
    files: dict[str, h5py.File] = {}
    by_letter: dict[str, h5py.File] = {}
    for c in letters:
        fname = TRAIN_FILE if c == "t" else DESCRIPTORS_FILE
        if fname not in files:
            size = sum(n for k, n in needed.items() if k in letters and (k == "t") == (c == "t"))
            files[fname] = open_h5_output(stack, out_dir / fname, size)
            files[fname].attrs.update(attrs)
        by_letter[c] = files[fname]
    return by_letter


def _stream_into(writer: _H5Appender, model: torch.nn.Module, items: Sequence[tuple[str, Path]], transform: Any,
                 batch_size: int, workers: int, tta: bool, skip_bad_images: bool, bad: list[BadImageError],
                 desc: str) -> None:  # fmt: skip
    """Describe ``items`` into ``writer``; bad images go to ``bad``. After the first bad image (unless
    ``skip_bad_images``) the model stops but decoding goes on, so the error lists every bad file."""
    ids = [i for i, _ in items]
    for idx, x, errors in _describe_stream(
        model, [p for _, p in items], transform, batch_size, workers, tta, desc,
        run_model=lambda: skip_bad_images or not bad,
    ):  # fmt: skip
        for e in errors:
            log.warning("bad image: %s: %s", e.path, e.reason)
        bad.extend(errors)
        if x is not None and (skip_bad_images or not bad):
            writer.append(x, [ids[i] for i in idx])


def _finish(result: ExtractionResult, letters: Sequence[str], out_dir: Path, t0: float) -> dict[str, Any]:
    result.seconds = time.perf_counter() - t0
    written = sum(result.counts.values())
    result.images_per_second = written / result.seconds if result.seconds > 0 else 0.0
    if any(c in letters for c in "qr"):
        result.descriptors = out_dir / DESCRIPTORS_FILE
    if "t" in letters:
        result.train_descriptors = out_dir / TRAIN_FILE
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
    prep = _prepare(model, data, sets, out_dir, input_size, batch_size, workers, limit, tta, model_ref, overwrite)
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    dim = int(getattr(model, "model_config", {}).get("dim", 0)) or _probe_dim(model, prep.size)
    result = ExtractionResult(input_size=prep.size, dim=dim, device=str(dev))
    bad: list[BadImageError] = []
    log.info("extracting %s (%d images, %d px, batch %d, %d workers) on %s", "".join(prep.letters),
             sum(len(v) for v in prep.listings.values()), prep.size, batch_size, workers, dev)  # fmt: skip
    t0 = time.perf_counter()
    id_lens = {c: id_bytes_len([i for i, _ in prep.listings[c]]) for c in prep.letters}
    needed = {c: h5_bytes(len(prep.listings[c]), dim, id_lens[c]) for c in prep.letters}
    with contextlib.ExitStack() as stack:
        files = _open_outputs(stack, prep.out_dir, prep.letters, prep.attrs, needed)
        for c in prep.letters:
            items = prep.listings[c]
            writer = _H5Appender(files[c], SET_NAMES[c], dim, id_lens[c])
            _stream_into(writer, model, items, prep.transform, batch_size, workers, tta, skip_bad_images, bad,
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
    return _finish(result, prep.letters, prep.out_dir, t0)


def _probe_dim(model: torch.nn.Module, size: int) -> int:
    """Descriptor size of a model without ``model_config['dim']``: one forward on a blank image."""
    device = _model_device(model)
    return int(describe_tensors(model, torch.zeros(1, 3, size, size, device=device)).shape[1])


# ---------------------------------------------------------------- sharded extraction (torchrun)

SHARD_DIR = ".extract_shards"
DEFAULT_SHARD_SIZE = 8192  # images per shard file: ~250 shards for 2M images, minutes of work each


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of the model's weights: finished shards are reused only for the very same network."""
    import hashlib

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
    import json

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
    import json

    bad: list[BadImageError] = []
    try:
        with contextlib.ExitStack() as stack:
            f = open_h5_output(stack, folder / f"{shard.stem}.h5", h5_bytes(shard.stop - shard.start, dim, id_len))
            writer = _H5Appender(f, "x", dim, id_len)
            _stream_into(writer, model, items[shard.start : shard.stop], transform, batch_size, workers, tta,
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
    info: Any = None,
    sets: str = "qrt",
    out_dir: str | Path = "outputs/extract",
    input_size: int | None = None,
    batch_size: int = 64,
    workers: int = 2,
    skip_bad_images: bool = False,
    limit: int | None = None,
    tta: bool = False,
    model_ref: str = "",
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> dict[str, Any]:
    """:func:`extract_descriptors` split over the ranks of a ``torchrun`` job (``info``: a
    :class:`isc.train.distributed.DistInfo`; ``None`` = one process), resumable per shard.

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

    info = info or ddp.DistInfo(device=_model_device(model))
    if int(shard_size) < 1:
        raise ConfigError("shard_size", f"must be >= 1, got {shard_size}")
    prep = _prepare(model, data, sets, out_dir, input_size, batch_size, workers, limit, tta, model_ref, overwrite)
    letters, listings, size, transform, out_dir = prep.letters, prep.listings, prep.size, prep.transform, prep.out_dir
    shard_size = -(-int(shard_size) // int(batch_size)) * int(batch_size)
    dev = _model_device(model)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    dim = int(getattr(model, "model_config", {}).get("dim", 0)) or _probe_dim(model, size)
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
    return _finish(result, letters, out_dir, t0)


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
        files = _open_outputs(stack, out_dir, letters, attrs, needed)
        for c in letters:
            name = SET_NAMES[c]
            writer = _H5Appender(files[c], name, dim, id_lens[c])
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
