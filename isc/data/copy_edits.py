"""The copy edits a mini dataset's queries are made of: DISC21's kinds (crops, text/emoji overlays,
overlay onto or of another image, screenshot framing, meme format, colour changes, blur, JPEG, rotations,
flips, padding, pixelisation, perspective, sharpening, grayscale, noise, pixel shuffling), each a seeded
random draw of an AugLy-style op (:mod:`isc.data.augly_ops`).

Why a module of its own: two users -- :mod:`isc.data.mini` edits references into queries, and the hard
training views of :mod:`isc.data.augment` (``EditChainView``) are made of the same edits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from PIL import Image

from isc.data import augly_ops as ops


def resize_long(img: Image.Image, long_side: int) -> Image.Image:
    """Bicubic resize so the longer side is ``long_side`` px (the mini builder's tiles and copies alike)."""
    scale = long_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


Edit = Callable[[Image.Image, random.Random, Image.Image], Image.Image]


def _words(rng: random.Random) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(1, 3))
    )


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _edit_crop(img, rng, other):
    w, h = rng.uniform(0.45, 0.9), rng.uniform(0.45, 0.9)
    x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return ops.crop(img, x1=x, y1=y, x2=x + w, y2=y + h)


def _edit_text(img, rng, other):
    font = rng.choice(ops.font_paths())
    return ops.overlay_glyphs(
        img, [_words(rng)], font, font_size=rng.uniform(0.08, 0.2), color=_colour(rng),
        x_pos=rng.uniform(0, 0.4), y_pos=rng.uniform(0, 0.8), opacity=rng.uniform(0.6, 1.0),
    )  # fmt: skip


def _edit_emoji(img, rng, other):
    size = rng.uniform(0.15, 0.35)
    return ops.paste_emoji(
        img, rng.choice(ops.smiley_paths()), size=size,
        x_pos=rng.uniform(0, 1 - size), y_pos=rng.uniform(0, 1 - size), opacity=rng.uniform(0.7, 1.0),
    )  # fmt: skip


def _edit_onto_other(img, rng, other):
    size = rng.uniform(0.5, 0.85)
    return ops.overlay_onto_background_image(
        img, background_image=other, overlay_size=size, opacity=rng.uniform(0.85, 1.0),
        x_pos=rng.uniform(0, 1 - size), y_pos=rng.uniform(0, 1 - size), scale_bg=rng.random() < 0.5,
    )  # fmt: skip


def _edit_other_onto(img, rng, other):
    size = rng.uniform(0.2, 0.45)
    return ops.overlay_image(
        img, overlay=other, opacity=rng.uniform(0.6, 1.0), overlay_size=size,
        x_pos=rng.uniform(0, 1 - size), y_pos=rng.uniform(0, 1 - size),
    )  # fmt: skip


def _edit_screenshot(img, rng, other):
    return ops.overlay_onto_screenshot(img, template_filepath=rng.choice(ops.screenshot_templates()))


def _edit_meme(img, rng, other):
    return ops.meme_format(
        img, text=_words(rng), font_path=rng.choice(ops.font_paths()), caption_height=rng.uniform(0.15, 0.3),
        text_color=_colour(rng), bg_color=_colour(rng),
    )  # fmt: skip


def _edit_colour(img, rng, other):
    return ops.color_jitter(
        img, brightness_factor=rng.uniform(0.6, 1.5), contrast_factor=rng.uniform(0.6, 1.6),
        saturation_factor=rng.uniform(0.3, 2.0),
    )  # fmt: skip


def _edit_blur(img, rng, other):
    return ops.blur(img, radius=rng.uniform(1.0, 3.0))


def _edit_jpeg(img, rng, other):
    return ops.jpeg_roundtrip(img, rng.randint(5, 30))


def _edit_rotate(img, rng, other):
    if rng.random() < 0.5:
        return img.rotate(rng.choice([90, 180, 270]), expand=True)
    return ops.rotate(img, degrees=rng.uniform(-40, 40))


def _edit_flip(img, rng, other):
    return ops.hflip(img) if rng.random() < 0.7 else ops.vflip(img)


def _edit_pad(img, rng, other):
    return ops.pad(img, w_factor=rng.uniform(0.05, 0.3), h_factor=rng.uniform(0.05, 0.3), color=_colour(rng))


def _edit_pixelize(img, rng, other):
    return ops.pixelization(img, ratio=rng.uniform(0.25, 0.5))


def _edit_perspective(img, rng, other):
    return ops.perspective_transform(img, sigma=rng.uniform(0.03, 0.08), seed=rng.getrandbits(63))


def _edit_sharpen(img, rng, other):
    return ops.sharpen(img, factor=rng.uniform(3.0, 10.0))


def _edit_gray(img, rng, other):
    return ops.grayscale(img)


def _edit_noise(img, rng, other):
    return ops.random_noise(img, var=rng.uniform(0.003, 0.02), seed=rng.getrandbits(63))


def _edit_shuffle(img, rng, other):
    return ops.shuffle_pixels(img, factor=rng.uniform(0.05, 0.15), seed=rng.getrandbits(63))


EDITS: dict[str, Edit] = {
    "crop": _edit_crop,
    "overlay_text": _edit_text,
    "overlay_emoji": _edit_emoji,
    "overlay_onto_image": _edit_onto_other,
    "overlay_image_onto": _edit_other_onto,
    "screenshot": _edit_screenshot,
    "meme_format": _edit_meme,
    "color_jitter": _edit_colour,
    "blur": _edit_blur,
    "jpeg": _edit_jpeg,
    "rotate": _edit_rotate,
    "flip": _edit_flip,
    "pad": _edit_pad,
    "pixelization": _edit_pixelize,
    "perspective": _edit_perspective,
    "sharpen": _edit_sharpen,
    "grayscale": _edit_gray,
    "noise": _edit_noise,
    "shuffle_pixels": _edit_shuffle,
}
# Framing edits grow the canvas a lot; at most one per chain keeps the copied content visible.
FRAMING = {"screenshot", "meme_format", "overlay_onto_image", "pad"}


def edit_chain(
    img: Image.Image, rng: random.Random, partners: Sequence[Image.Image], long_side: int
) -> tuple[Image.Image, list[str]]:
    """Apply 1-4 distinct random edits (at most one framing edit); return the RGB copy (long side <=
    ``long_side``) and the edit names in order."""
    names: list[str] = []
    pool = list(EDITS)
    for _ in range(rng.randint(1, 4)):
        name = rng.choice([n for n in pool if n not in names and not (n in FRAMING and FRAMING & set(names))])
        img = EDITS[name](img, rng, rng.choice(partners)).convert("RGB")
        names.append(name)
    if max(img.size) > long_side:
        img = resize_long(img, long_side)
    return img, names
