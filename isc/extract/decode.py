"""Images -> normalised tensors for extraction: the eval transform, JPEG decoding where it is cheapest
(CPU: Pillow draft mode in the DataLoader workers; CUDA: nvJPEG + resize on the GPU, CPU fallback) and the
batch loader that reports bad files instead of raising, so one pass lists them all."""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from isc.data.images import load_image, to_rgb
from isc.errors import BadImageError, ConfigError
from isc.proctree import loader_worker_init

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
    if device.type == "cuda":
        # nvJPEG's hardware engine (A100, H100, H200) does not wait for the caller's stream: it writes its
        # output into blocks the caching allocator already handed back while queued kernels (the previous
        # batch's forward) still read them -- NaN descriptors on an H200 (bench/gpu_check.py's decode
        # check: min cosine nan, self-match 0.04). Drain the stream first (pytorch/vision#9606).
        torch.cuda.current_stream(device).synchronize()
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


class ImageList(Dataset):
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


class PendingBatch:
    """A batch that still holds JPEG bytes for the device decoder: ``rows`` in index order, each a
    normalised CPU tensor or a :class:`_Jpeg`."""

    def __init__(self, rows: list[tuple[int, torch.Tensor | _Jpeg]]):
        self.rows = rows

    def pin_memory(self) -> PendingBatch:  # called by the DataLoader's pinning thread (CUDA only)
        return PendingBatch([(i, t if isinstance(t, _Jpeg) else t.pin_memory()) for i, t in self.rows])


def _collate(
    items: list[tuple[int, torch.Tensor | _Jpeg | None, str]],
) -> tuple[list[int], torch.Tensor | PendingBatch | None, list[tuple[int, str]]]:
    good = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, reason) for i, t, reason in items if t is None]
    if any(isinstance(t, _Jpeg) for _, t in good):
        return [i for i, _ in good], PendingBatch(good), bad
    batch = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], batch, bad


def finish_on_device(pending: PendingBatch, transform: EvalTransform, device: torch.device, sources: Sequence[Any],
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


def batch_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
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
