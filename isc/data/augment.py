"""The recipe's image views: eval, moderate and hard pipelines per stage, and ``NCropsTransform``.

Each training image yields ``ncrops`` views sharing its label: one *moderate* view (a mild crop + flip)
and ``ncrops - 1`` *hard* views that imitate ISC copy edits, so the contrastive loss learns to match an
image with its edited copies:

hard = AugLy RandomRotation(p) -> RandomOverlayImageAndResizedCrop -> ShuffledAug(list, random order,
each op with its own p) -> RGB -> ToTensor -> RandomErasing(value='random', p 0.25) -> Normalize

Stage parameters (recipe.md "Views"; the numbers of the seed's v83.py / v86.py / v98.py), keyed by the
stage names of the training configs (:data:`isc.train.config.SEED_SCRIPTS`):

=====================================  ============  ============  ============
op                                     stage1: v83   stage2: v86   stage3: v98
                                                                   (= stage4)
=====================================  ============  ============  ============
ColorJitter b/c/s (hue 0.2)            0.7 always    0.75 always   0.8 always
RandomRotation p (first hard op)       0.25          0.30          0.35
Pixelization, ShufflePixels, Gray, Blur 0.25         0.25          0.25
JPEG, Perspective, Text, Emoji p       0.25          0.30          0.35
EdgeEnhance p                          0.25          0.30          0.30
HFlip / VFlip p                        0.5 / 0.1     0.5 / 0.1     0.5 / 0.1
RandomErasing p                        0.25          0.25          0.25
overlay_p; opacity_lower; size range   0.05; 0.6;    0.075; 0.5;   0.10; 0.4;
                                       0.4-0.6       0.3-0.7       0.2-0.8
=====================================  ============  ============  ============

``smoke`` (the smoke/test profile's tiny from-scratch network) is stage1 with the colour jitter at 1.0 and
grayscale at 0.4: a random-init net has no colour invariance to start from.

Stage 4 (v107) trains on (query, reference) pairs; as the seed's v107.py, the training loop feeds those
pairs through a plain resize-and-normalise transform (see isc/train/datasets.py); recipe.md gives no view
table for it, so ``build_train_transform("stage4", ...)`` is stage3's (v98's) NCropsTransform.

Choices the recipe leaves open (documented here, used everywhere): the rotation op uses AugLy's default
range (0-180 degrees, cropped to the largest inner rectangle); RandomPixelization, RandomBlur and
torchvision RandomPerspective use their libraries' default ranges.

Randomness comes only from python ``random`` and torch's RNG, both of which PyTorch seeds in every
DataLoader worker, so a seeded run is reproducible. Every object here pickles (no lambdas).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from isc.data import augly_ops as ops
from isc.data.copy_edits import edit_chain
from isc.data.images import load_image, to_rgb
from isc.errors import ConfigError

Op = Callable[[Image.Image], Image.Image]


@dataclass(frozen=True)
class StageViews:
    """Hard-view parameters of one training stage (see the module table)."""

    jitter: float  # ColorJitter brightness = contrast = saturation (hue is 0.2)
    rotation_p: float  # the AugLy rotation that opens the hard view
    edit_p: float  # JPEG, perspective, text overlay, emoji overlay
    edge_p: float  # the edge-enhance OneOf
    overlay_p: float  # probability of overlaying another training image
    opacity_lower: float  # overlay opacity ~ U(opacity_lower, 1)
    size_range: tuple[float, float]  # overlay size ~ U(*size_range), fraction of the base image height
    basic_p: float = 0.25  # pixelization, pixel shuffling, grayscale, blur: 0.25 in every seed stage
    colour_p: float = 1.0  # ColorJitter: the seed applies it always
    gray_p: float | None = None  # RandomGrayscale (None: basic_p, as in the seed)

    @property
    def gray_prob(self) -> float:
        return self.basic_p if self.gray_p is None else self.gray_p


STAGE_VIEWS: dict[str, StageViews] = {
    "stage1": StageViews(jitter=0.7, rotation_p=0.25, edit_p=0.25, edge_p=0.25, overlay_p=0.05,  # v83
                         opacity_lower=0.6, size_range=(0.4, 0.6)),
    "stage2": StageViews(jitter=0.75, rotation_p=0.30, edit_p=0.30, edge_p=0.30, overlay_p=0.075,  # v86
                         opacity_lower=0.5, size_range=(0.3, 0.7)),
    "stage3": StageViews(jitter=0.8, rotation_p=0.35, edit_p=0.35, edge_p=0.30, overlay_p=0.10,  # v98
                         opacity_lower=0.4, size_range=(0.2, 0.8)),
}
STAGE_VIEWS["stage4"] = STAGE_VIEWS["stage3"]  # v107: v98's views
# The tiny from-scratch network of the smoke/test profiles: tiles of one photo share its colours, and a
# random-init net keys on colour unless the views take it away; a pretrained backbone brings that
# invariance, the scratch net buys it with stronger colour and grayscale views.
STAGE_VIEWS["smoke"] = dataclasses.replace(STAGE_VIEWS["stage1"], jitter=1.0, colour_p=0.8, gray_p=0.4)

HUE = 0.2
JPEG_QUALITIES = (10, 20, 30, 50)
ERASING_P = 0.25
MODERATE_SCALE = (0.7, 1.0)
OVERLAY_CROP_SCALE = (0.7, 1.0)
PLAIN_CROP_SCALE = (0.15, 1.0)


def stage_views(stage: str) -> StageViews:
    """Parameters of ``stage`` (stage1-4, smoke) or a ``ConfigError`` naming ``stage``."""
    if stage not in STAGE_VIEWS:
        raise ConfigError("stage", f"unknown augmentation stage '{stage}' (choose from {', '.join(STAGE_VIEWS)})")
    return STAGE_VIEWS[stage]


def _check_size(input_size: int) -> int:
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size <= 0:
        raise ConfigError("input_size", f"must be a positive integer, got {input_size!r}")
    return input_size


def _check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError("mean/std", f"need 3 values each (RGB), got {mean} / {std}")
    if any(s <= 0 for s in std):
        raise ConfigError("std", f"must be > 0, got {std}")
    return mean, std


class ToRGB:
    """Any PIL mode -> RGB (alpha composited on white, 16-bit scaled), as the image loader does."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return "ToRGB()"


class ShuffledAug:
    """Apply every op of ``ops`` in a fresh random order (each op decides itself whether to fire)."""

    def __init__(self, ops_list: Sequence[Op]):
        self.ops = list(ops_list)

    def __call__(self, img: Image.Image) -> Image.Image:
        order = list(self.ops)
        random.shuffle(order)
        for op in order:
            img = op(img)
        return img

    def __repr__(self) -> str:
        return f"ShuffledAug({self.ops!r})"


class RandomOverlayImageAndResizedCrop:
    """With prob ``overlay_p`` blend this image with a random image from ``overlay_paths``, then crop.

    Overlay (50/50): this image pasted onto the other, or the other pasted onto this one; opacity
    U(opacity_lower, 1), size U(size_range) x the base image's height, random position; followed by
    RandomResizedCrop(input_size, scale 0.7-1). Without overlay: RandomResizedCrop(scale 0.15-1).
    Output: an ``input_size`` x ``input_size`` image.
    """

    def __init__(
        self,
        input_size: int,
        overlay_paths: Sequence[str | Path] = (),
        overlay_p: float = 0.05,
        opacity_lower: float = 0.6,
        size_range: tuple[float, float] = (0.4, 0.6),
    ):
        self.overlay_paths = [str(p) for p in overlay_paths]
        self.overlay_p, self.opacity_lower, self.size_range = (
            float(overlay_p),
            float(opacity_lower),
            size_range,
        )
        self.overlay_crop = T.RandomResizedCrop(input_size, scale=OVERLAY_CROP_SCALE)
        self.plain_crop = T.RandomResizedCrop(input_size, scale=PLAIN_CROP_SCALE)

    def __call__(self, img: Image.Image) -> Image.Image:
        if not self.overlay_paths or random.random() >= self.overlay_p:
            return self.plain_crop(img)
        other = load_image(random.choice(self.overlay_paths))
        opacity = random.uniform(self.opacity_lower, 1.0)
        size = random.uniform(*self.size_range)
        x, y = random.uniform(0.0, 1.0 - size), random.uniform(0.0, 1.0 - size)
        img = to_rgb(img)
        if random.random() < 0.5:
            out = ops.overlay_onto_background_image(
                img, background_image=other, opacity=opacity, overlay_size=size, x_pos=x, y_pos=y
            )
        else:
            out = ops.overlay_image(img, overlay=other, opacity=opacity, overlay_size=size, x_pos=x, y_pos=y)
        return self.overlay_crop(to_rgb(out))

    def __repr__(self) -> str:
        return (
            f"RandomOverlayImageAndResizedCrop(n_paths={len(self.overlay_paths)}, p={self.overlay_p}, "
            f"opacity_lower={self.opacity_lower}, size_range={self.size_range})"
        )


def hard_ops(views: StageViews) -> list[Op]:
    """The ShuffledAug list of a stage (each op carries its own probability)."""
    basic, edit, j = views.basic_p, views.edit_p, views.jitter
    jitter = T.ColorJitter(j, j, j, HUE)
    return [
        jitter if views.colour_p >= 1.0 else T.RandomApply([jitter], p=views.colour_p),
        ops.RandomPixelization(p=basic),
        ops.ShufflePixels(factor=0.1, p=basic),
        ops.OneOf([ops.EncodingQuality(q) for q in JPEG_QUALITIES], p=edit),
        T.RandomGrayscale(p=views.gray_prob),
        ops.RandomBlur(p=basic),
        T.RandomPerspective(p=edit),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomVerticalFlip(p=0.1),
        ops.RandomOverlayText(p=edit),
        ops.RandomEmojiOverlay(p=edit),
        ops.OneOf([ops.EdgeEnhance(more=False), ops.EdgeEnhance(more=True)], p=views.edge_p),
    ]


def build_eval_transform(input_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Extraction view: resize to (s, s) (no crop), ToTensor, Normalize -> float tensor [3, s, s]."""
    s = _check_size(input_size)
    mean, std = _check_norm(mean, std)
    return T.Compose([ToRGB(), T.Resize((s, s)), T.ToTensor(), T.Normalize(mean, std)])


def build_moderate_transform(input_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Moderate view: RandomResizedCrop(s, scale 0.7-1), HFlip, ToTensor, Normalize -> [3, s, s]."""
    s = _check_size(input_size)
    mean, std = _check_norm(mean, std)
    return T.Compose(
        [
            ToRGB(),
            T.RandomResizedCrop(s, scale=MODERATE_SCALE),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def build_hard_transform(
    stage: str,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    overlay_paths: Sequence[str | Path] = (),
) -> T.Compose:
    """Hard view of ``stage`` -> float tensor [3, s, s] (see the module docstring for the op list).

    ``overlay_paths``: training images that RandomOverlayImageAndResizedCrop may blend in (empty: the
    overlay never fires and only the 0.15-1 crop is used).
    """
    views = stage_views(stage)
    s = _check_size(input_size)
    mean, std = _check_norm(mean, std)
    return T.Compose(
        [
            ToRGB(),
            ops.RandomRotation(p=views.rotation_p),
            RandomOverlayImageAndResizedCrop(
                s, overlay_paths, views.overlay_p, views.opacity_lower, views.size_range
            ),
            ShuffledAug(hard_ops(views)),
            ToRGB(),
            T.ToTensor(),
            T.RandomErasing(p=ERASING_P, value="random"),
            T.Normalize(mean, std),
        ]
    )


class EditChainView:
    """A hard view made of the copy edits the mini dataset's queries are made of (``isc.data.copy_edits.edit_chain``:
    1-4 of crops, overlays, screenshot/meme framing, colour, blur, JPEG, rotations, flips, pads, ...), then
    the eval resize to (s, s) -- as a query is seen at extraction. ``views: edits`` in a training config.

    Why: on the CPU demo the recipe's views at the recipe's lr left the pretrained start where it was or
    lost (docs/training.md); these views match what copy detection is asked to undo.
    ``partners``: the "other images" of overlay edits (a few training images).
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], partners: Sequence[Image.Image]):
        self.tf = build_eval_transform(input_size, mean, std)
        self.partners = list(partners)
        if not self.partners:
            raise ConfigError("views", "edit views need at least one training image as overlay partner")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        out, _ = edit_chain(img, random.Random(random.getrandbits(64)), self.partners, max(img.size))
        return self.tf(out)

    def __repr__(self) -> str:
        return f"EditChainView(partners={len(self.partners)})"


class NCropsTransform:
    """``ncrops`` views of one image: ``[moderate(img)] + [hard(img)] * (ncrops - 1)`` (fresh draws)."""

    def __init__(self, moderate: Callable, hard: Callable, ncrops: int = 2):
        if not isinstance(ncrops, int) or ncrops < 1:
            raise ConfigError("ncrops", f"must be an integer >= 1, got {ncrops!r}")
        self.moderate, self.hard, self.ncrops = moderate, hard, ncrops

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.moderate(img)] + [self.hard(img) for _ in range(self.ncrops - 1)]

    def __repr__(self) -> str:
        return f"NCropsTransform(ncrops={self.ncrops}, moderate={self.moderate!r}, hard={self.hard!r})"


VIEWS = ("recipe", "edits")
ANCHORS = ("moderate", "plain")
N_EDIT_PARTNERS = 16  # training images an edit view may overlay (loaded once, pickled to workers)


def build_train_transform(
    stage: str,
    input_size: int,
    ncrops: int,
    mean: Sequence[float],
    std: Sequence[float],
    overlay_paths: Sequence[str | Path] = (),
    views: str = "recipe",
    anchor: str = "moderate",
) -> NCropsTransform:
    """The training views: 1 anchor + (ncrops - 1) hard tensors of shape [3, s, s].

    views: ``recipe`` (the stage's hard view, the seed's) or ``edits`` (:class:`EditChainView`); anchor:
    ``moderate`` (the seed's RandomResizedCrop + flip) or ``plain`` (the eval resize).
    """
    if views not in VIEWS:
        raise ConfigError("views", f"one of {', '.join(VIEWS)}, got '{views}'")
    if anchor not in ANCHORS:
        raise ConfigError("anchor", f"one of {', '.join(ANCHORS)}, got '{anchor}'")
    first = build_moderate_transform(input_size, mean, std) if anchor == "moderate" else \
        build_eval_transform(input_size, mean, std)
    if views == "edits":
        partners = [load_image(p) for p in list(overlay_paths)[:N_EDIT_PARTNERS]]
        hard: Callable = EditChainView(input_size, mean, std, partners)
    else:
        hard = build_hard_transform(stage, input_size, mean, std, overlay_paths)
    return NCropsTransform(first, hard, ncrops)
