"""Copy-edit operations (AugLy and our own replacements) on PIL images.

Why this module exists: the recipe's views and ``make-mini``'s query edits are AugLy operations, but
AugLy 1.0.0 predates today's numpy/Pillow and has RNG side effects, so every op used by the platform
goes through here. What we changed, and why:

* ``perspective_transform`` -- AugLy's calls ``np.float`` (removed in numpy 2): ours below.
* ``meme_format`` -- AugLy's calls ``FreeTypeFont.getsize_multiline`` (removed in Pillow 10): ours below.
* ``shuffle_pixels`` / ``random_noise`` -- AugLy's reseed numpy's *global* RNG with a constant on every
  call (same "random" result each time, and every other numpy user reseeded): ours draw from a local
  generator seeded from python ``random``.
* ``RandomEmojiOverlay`` -- AugLy's calls ``random.seed(42)`` on every call (resetting python's RNG for
  the whole DataLoader worker): ours draws from the caller's RNG.
* overlay text -- AugLy's needs glyph indices and fails on images so small that the font size rounds
  to 0: ``overlay_glyphs`` clamps the size and caches fonts.

Ops that work unchanged (``rotate``, ``pixelization``, ``blur``, ``encoding_quality``, ``overlay_image``,
``overlay_onto_background_image``, ``overlay_onto_screenshot``, ``pad``, ``crop``, ``sharpen``,
``color_jitter`` ...) are re-exported from ``augly.image`` untouched (``tests/test_augment.py`` runs each).

Randomness: every ``Random*`` class draws from python's ``random`` module (numpy generators, where
needed, are seeded from it), so seeding ``random`` in a DataLoader ``worker_init_fn`` makes a worker
deterministic. All classes are plain picklable objects (no lambdas, no open files).

Modes: ops accept ``L``, ``RGB`` and ``RGBA`` images of any size >= 1x1 and return a PIL image of the
same mode, except JPEG re-encoding (``EncodingQuality``), screenshot framing and meme format, which
return ``RGB``.
"""

from __future__ import annotations

import functools
import io
import pickle
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import augly.image as imaugs
import numpy as np
from augly.utils import FONTS_DIR, SCREENSHOT_TEMPLATES_DIR, SMILEY_EMOJI_DIR
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Op = Callable[[Image.Image], Image.Image]

# Unchanged AugLy functionals (verified to run on numpy 2 / Pillow 11+ by the tests).
rotate = imaugs.rotate
pixelization = imaugs.pixelization
blur = imaugs.blur
encoding_quality = imaugs.encoding_quality
overlay_image = imaugs.overlay_image
overlay_onto_background_image = imaugs.overlay_onto_background_image
overlay_onto_screenshot = imaugs.overlay_onto_screenshot
overlay_emoji = imaugs.overlay_emoji
pad = imaugs.pad
crop = imaugs.crop
sharpen = imaugs.sharpen
color_jitter = imaugs.color_jitter
grayscale = imaugs.grayscale
hflip = imaugs.hflip
vflip = imaugs.vflip
opacity = imaugs.opacity
skew = imaugs.skew


# --------------------------------------------------------------------------------------------- assets
@functools.lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    """AugLy's bundled ``.ttf`` fonts that have a glyph list (``.pkl``) and load with this FreeType."""
    out = []
    for ttf in sorted(Path(FONTS_DIR).glob("*.ttf")):
        if not ttf.with_suffix(".pkl").exists():
            continue
        try:
            ImageFont.truetype(str(ttf), 12)
        except OSError:
            continue
        out.append(str(ttf))
    return tuple(out)


# The seed's text overlay leaves out two of AugLy's fonts (exp/v83.py, RandomOverlayText's blacklist).
RECIPE_EXCLUDED_FONTS = ("TypeMyMusic", "PainttheSky-Regular")


def recipe_font_paths() -> tuple[str, ...]:
    """The fonts the recipe's text overlay draws from: :func:`font_paths` without the seed's blacklist."""
    return tuple(f for f in font_paths() if not any(bad in Path(f).name for bad in RECIPE_EXCLUDED_FONTS))


@functools.lru_cache(maxsize=64)
def font_glyphs(font_path: str) -> tuple[str, ...]:
    """Characters the font can draw (AugLy's per-font ``.pkl`` list of code points)."""
    with open(Path(font_path).with_suffix(".pkl"), "rb") as f:
        codes = pickle.load(f)  # noqa: S301 -- a file shipped inside the installed augly package
    chars = tuple(chr(c) for c in codes if chr(c).isprintable() and not chr(c).isspace())
    return chars or tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


@functools.lru_cache(maxsize=256)
def _font(font_path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path, max(1, int(size)))


@functools.lru_cache(maxsize=1)
def smiley_paths() -> tuple[str, ...]:
    """AugLy's bundled smiley emoji PNGs (the recipe's RandomEmojiOverlay draws from these)."""
    return tuple(sorted(str(p) for p in Path(SMILEY_EMOJI_DIR).glob("*.png")))


@functools.lru_cache(maxsize=32)
def _emoji(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGBA")


def screenshot_templates() -> list[str]:
    """AugLy's web/mobile screenshot templates (used by ``overlay_onto_screenshot``)."""
    return sorted(str(p) for p in Path(SCREENSHOT_TEMPLATES_DIR).glob("*.png"))


def _np_rng() -> np.random.Generator:
    """A numpy generator seeded from python ``random`` (so worker seeding covers it)."""
    return np.random.default_rng(random.getrandbits(63))


def _restore_mode(out: Image.Image, mode: str) -> Image.Image:
    return out if out.mode == mode else out.convert(mode)


# ---------------------------------------------------------------------- our functional replacements
def perspective_transform(img: Image.Image, sigma: float = 0.05, seed: int | None = None) -> Image.Image:
    """Move each corner by N(0, sigma * side) pixels and warp; same size and mode as ``img``.

    Replaces AugLy's version (uses ``np.float``). ``sigma`` is a fraction of the image side.
    """
    w, h = img.size
    rng = np.random.default_rng(seed if seed is not None else random.getrandbits(63))
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    dst = src + rng.normal(0.0, sigma, size=(4, 2)) * np.array([w, h])
    # Solve for the 8 coefficients mapping output (dst) coordinates back to input (src) ones.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    try:
        coeffs = np.linalg.solve(np.asarray(rows), np.asarray(rhs))
    except np.linalg.LinAlgError:  # degenerate corner draw: leave the image as is
        return img.copy()
    return img.transform(
        (w, h), Image.Transform.PERSPECTIVE, tuple(coeffs.tolist()), Image.Resampling.BILINEAR
    )


def meme_format(
    img: Image.Image,
    text: str = "LOL",
    font_path: str | None = None,
    caption_height: float = 0.25,
    text_color: tuple[int, int, int] = (0, 0, 0),
    bg_color: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Add a caption band of ``caption_height`` x image height above ``img`` with centred ``text`` (RGB).

    Replaces AugLy's version (uses ``getsize_multiline``, removed in Pillow 10).
    """
    img = img.convert("RGB")
    w, h = img.size
    band = max(1, round(h * caption_height))
    canvas = Image.new("RGB", (w, h + band), bg_color)
    canvas.paste(img, (0, band))
    font = _font(font_path or font_paths()[0], max(1, int(band * 0.6)))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    draw.text(((w - tw) / 2 - left, (band - th) / 2 - top), text, fill=text_color, font=font)
    return canvas


def shuffle_pixels(img: Image.Image, factor: float = 0.1, seed: int | None = None) -> Image.Image:
    """Permute a random ``factor`` fraction of the pixels among themselves (same size and mode).

    Replaces AugLy's version, which reseeds numpy's global RNG with a constant on every call.
    """
    rng = np.random.default_rng(seed if seed is not None else random.getrandbits(63))
    arr = np.array(img)
    flat = arr.reshape(arr.shape[0] * arr.shape[1], -1)
    n = int(round(factor * flat.shape[0]))
    if n < 2:
        return img.copy()
    idx = rng.choice(flat.shape[0], size=n, replace=False)
    flat[idx] = flat[rng.permutation(idx)]
    return Image.fromarray(flat.reshape(arr.shape), mode=img.mode)


def random_noise(img: Image.Image, var: float = 0.01, seed: int | None = None) -> Image.Image:
    """Add Gaussian noise of variance ``var`` (on a 0-1 intensity scale); same size and mode.

    Replaces AugLy's version, which reseeds numpy's global RNG with 42 on every call.
    """
    rng = np.random.default_rng(seed if seed is not None else random.getrandbits(63))
    arr = np.asarray(img).astype(np.float32)
    noise = rng.standard_normal(arr.shape, dtype=np.float32)
    noise *= np.float32(255.0 * var**0.5)  # std on the 0-255 scale
    if img.mode == "RGBA":
        noise[..., 3] = 0.0  # leave the alpha channel alone
    arr += noise
    out = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode=img.mode)


def overlay_glyphs(
    img: Image.Image,
    lines: Sequence[str],
    font_path: str,
    font_size: float = 0.15,
    color: tuple[int, int, int] = (255, 0, 0),
    x_pos: float = 0.0,
    y_pos: float = 0.5,
    opacity: float = 1.0,
) -> Image.Image:
    """Draw ``lines`` of text at (x_pos, y_pos) (fractions of width/height); glyph height = font_size x min side."""
    mode = img.mode
    base = img.convert("RGBA")
    w, h = base.size
    size = max(1, int(min(w, h) * font_size))
    font = _font(font_path, size)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    fill = (*color, round(255 * opacity))
    for i, line in enumerate(lines):
        draw.text((x_pos * w, y_pos * h + i * (size + 2)), line, fill=fill, font=font)
    return _restore_mode(Image.alpha_composite(base, layer), mode)


def paste_emoji(
    img: Image.Image,
    emoji_path: str,
    size: float = 0.15,
    x_pos: float = 0.4,
    y_pos: float = 0.4,
    opacity: float = 1.0,
) -> Image.Image:
    """Paste an emoji whose height is ``size`` x image height at (x_pos, y_pos) (fractions); same mode."""
    mode = img.mode
    base = img.convert("RGBA")
    w, h = base.size
    emoji = _emoji(emoji_path)
    eh = max(1, int(h * size))
    ew = max(1, int(emoji.width * eh / max(1, emoji.height)))
    emoji = emoji.resize((ew, eh), Image.Resampling.BILINEAR)
    if opacity < 1.0:
        alpha = emoji.getchannel("A").point(lambda a: int(a * opacity))
        emoji.putalpha(alpha)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    layer.paste(emoji, (int(x_pos * w), int(y_pos * h)), emoji)
    return _restore_mode(Image.alpha_composite(base, layer), mode)


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at ``quality`` (1-95) and decode again (RGB). Handles any mode."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


# ---------------------------------------------------------------------------- random transforms
class RandomApply:
    """Apply ``op`` with probability ``p`` (python ``random``)."""

    def __init__(self, op: Op, p: float):
        self.op, self.p = op, float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.op(img) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"RandomApply({self.op!r}, p={self.p})"


class OneOf:
    """With probability ``p``, apply one of ``ops`` chosen uniformly (python ``random``)."""

    def __init__(self, ops: Sequence[Op], p: float = 1.0):
        if not ops:
            raise ValueError("OneOf needs at least one op")
        self.ops, self.p = list(ops), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return random.choice(self.ops)(img)

    def __repr__(self) -> str:
        return f"OneOf({self.ops!r}, p={self.p})"


class RandomRotation:
    """Rotate by U(min_degrees, max_degrees) and crop to the largest inner rectangle (AugLy ``rotate``)."""

    def __init__(self, min_degrees: float = 0.0, max_degrees: float = 180.0, p: float = 1.0):
        self.min_degrees, self.max_degrees, self.p = float(min_degrees), float(max_degrees), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        out = rotate(img, degrees=random.uniform(self.min_degrees, self.max_degrees))
        return out if out.width >= 1 and out.height >= 1 else img


class RandomPixelization:
    """Pixelate with ratio U(min_ratio, max_ratio) (AugLy ``pixelization``; AugLy's default range)."""

    def __init__(self, min_ratio: float = 0.1, max_ratio: float = 1.0, p: float = 1.0):
        self.min_ratio, self.max_ratio, self.p = float(min_ratio), float(max_ratio), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        ratio = random.uniform(self.min_ratio, self.max_ratio)
        ratio = max(ratio, 1.0 / max(1, min(img.size)))  # at least one pixel per side
        return pixelization(img, ratio=min(1.0, ratio))


class RandomBlur:
    """Gaussian blur with radius U(min_radius, max_radius) pixels (AugLy ``blur``; AugLy's default range)."""

    def __init__(self, min_radius: float = 0.0, max_radius: float = 10.0, p: float = 1.0):
        self.min_radius, self.max_radius, self.p = float(min_radius), float(max_radius), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return blur(img, radius=random.uniform(self.min_radius, self.max_radius))


class ShufflePixels:
    """Shuffle ``factor`` of the pixels (our :func:`shuffle_pixels`, fresh randomness each call)."""

    def __init__(self, factor: float = 0.1, p: float = 1.0):
        self.factor, self.p = float(factor), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return shuffle_pixels(img, self.factor, seed=random.getrandbits(63))


class EncodingQuality:
    """JPEG re-encoding at a fixed ``quality`` (returns RGB)."""

    def __init__(self, quality: int = 50, p: float = 1.0):
        self.quality, self.p = int(quality), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return jpeg_roundtrip(img, self.quality)

    def __repr__(self) -> str:
        return f"EncodingQuality({self.quality}, p={self.p})"


class RandomOverlayText:
    """The recipe's text overlay: 1-2 lines of 5-9 random glyphs from a random AugLy font.

    Glyph height U(size range) x min side, random RGB colour, top-left at (U(x range), U(y range)).
    """

    def __init__(
        self,
        p: float = 1.0,
        font_size: tuple[float, float] = (0.1, 0.3),
        x_pos: tuple[float, float] = (0.0, 0.5),
        y_pos: tuple[float, float] = (0.0, 0.5),
        n_lines: tuple[int, int] = (1, 2),
        n_glyphs: tuple[int, int] = (5, 9),
        opacity: tuple[float, float] = (1.0, 1.0),
    ):
        self.p, self.font_size, self.x_pos, self.y_pos = float(p), font_size, x_pos, y_pos
        self.n_lines, self.n_glyphs, self.opacity = n_lines, n_glyphs, opacity

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        font = random.choice(recipe_font_paths())
        glyphs = font_glyphs(font)
        lines = [
            "".join(random.choice(glyphs) for _ in range(random.randint(*self.n_glyphs)))
            for _ in range(random.randint(*self.n_lines))
        ]
        color = (random.randrange(256), random.randrange(256), random.randrange(256))
        return overlay_glyphs(
            img,
            lines,
            font,
            font_size=random.uniform(*self.font_size),
            color=color,
            x_pos=random.uniform(*self.x_pos),
            y_pos=random.uniform(*self.y_pos),
            opacity=random.uniform(*self.opacity),
        )


class RandomEmojiOverlay:
    """The recipe's emoji overlay: a random AugLy smiley, height U(size range) x image height, its top-left
    corner at U(0, 1) of the width and height as the seed's (so it is sometimes cut by the border)."""

    def __init__(self, p: float = 1.0, emoji_size: tuple[float, float] = (0.1, 0.3), opacity: float = 1.0):
        self.p, self.emoji_size, self.opacity = float(p), emoji_size, float(opacity)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        size = random.uniform(*self.emoji_size)
        return paste_emoji(
            img,
            random.choice(smiley_paths()),
            size=size,
            x_pos=random.uniform(0.0, 1.0),
            y_pos=random.uniform(0.0, 1.0),
            opacity=self.opacity,
        )


class EdgeEnhance:
    """PIL ``EDGE_ENHANCE`` or ``EDGE_ENHANCE_MORE`` (``more=True``); same mode (RGBA keeps its alpha)."""

    def __init__(self, more: bool = False):
        self.more = bool(more)

    def __call__(self, img: Image.Image) -> Image.Image:
        filt = ImageFilter.EDGE_ENHANCE_MORE if self.more else ImageFilter.EDGE_ENHANCE
        if img.mode in ("L", "RGB"):
            return img.filter(filt)
        if img.mode == "RGBA":
            out = img.convert("RGB").filter(filt)
            out.putalpha(img.getchannel("A"))
            return out
        return img.convert("RGB").filter(filt)

    def __repr__(self) -> str:
        return f"EdgeEnhance(more={self.more})"


class RandomPerspective:
    """Our :func:`perspective_transform` with corner jitter ``sigma`` (fraction of the side)."""

    def __init__(self, sigma: float = 0.05, p: float = 1.0):
        self.sigma, self.p = float(sigma), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return perspective_transform(img, self.sigma, seed=random.getrandbits(63))
