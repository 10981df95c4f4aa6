"""Descriptors in memory: pre-processed tensors (:func:`describe_tensors`, with test-time augmentation),
image files (:func:`describe_images`) and the bytes of encoded images (:func:`describe_encoded_images`), and
the batch stream (:func:`describe_stream`) that the h5 writers of :mod:`isc.extract.streamed` consume.

Descriptors come from the model in eval mode (the eval GeM exponent), under ``torch.inference_mode`` and,
on CUDA, float16 autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from isc.data.images import decode_image, load_image
from isc.errors import BadImageError, BadImagesError, ConfigError
from isc.extract.decode import (
    EvalTransform,
    ImageList,
    PendingBatch,
    batch_loader,
    eval_transform_for,
    finish_on_device,
    jpeg_decode_device,
)

# Test-time augmentation (v107 --tta): the image is loaded at sqrt(2) x the input size, then the model runs
# at input / sqrt(2), input and input x sqrt(2), each with and without a horizontal flip (6 passes); the
# sum is L2-normalised.
TTA_SCALES = (2 ** -0.5, 1.0, 2 ** 0.5)


def tta_load_size(input_size: int) -> int:
    """The side images are loaded at for TTA: sqrt(2) x the input size (v107's largest scale)."""
    return int(round(input_size * 2 ** 0.5))


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


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (eval GeM p, frozen BN) for the block; the caller's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
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
    device = model_device(model)
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


def describe_stream(
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
    device = model_device(model)
    if decode_on == "auto":
        decode_on = jpeg_decode_device(device, transform)
    raw_load = load
    if isinstance(transform, EvalTransform):
        load = transform.loader(load)
    images = ImageList(paths if sources is None else sources, transform, load, device_jpeg=decode_on is not None)
    loader = batch_loader(images, batch_size, workers, device)
    for idx, batch, bad in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=2.0):
        if isinstance(batch, PendingBatch):
            idx, batch, more = finish_on_device(batch, transform, torch.device(decode_on), images.paths, raw_load)
            bad = sorted(bad + more)
        errors = [BadImageError(paths[i], reason) for i, reason in bad]
        if batch is None or not run_model():
            yield idx, None, errors
        else:
            yield idx, describe_tensors(model, batch, tta), errors


def check_batching(batch_size: int, workers: int) -> None:
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
    check_batching(batch_size, workers)
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
    check_batching(batch_size, 0)
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
    for _, x, errors in describe_stream(
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
