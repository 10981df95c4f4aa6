"""Cutting photos into non-overlapping source images for the mini datasets (``isc.data.mini``).

Two cuts share one random k-d partition: ``make_tiles`` (many small leaves, each resized to one long side:
the train split's references, training images and overlay partners) and ``make_regions`` (leaves at photo
size, native pixels, never upscaled: the val and test splits of the default size). Keeping pools on
disjoint leaves is what makes the mini dataset's splits share no pixel.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from isc.data.copy_edits import resize_long
from isc.errors import ConfigError

MIN_TILE_SIDE = 32  # px (in the working copy): thinner leaves are dropped
MIN_TILE_STD = 8.0  # grey-level std below which a leaf counts as flat (black sky, white page margin)


@dataclass
class Tile:
    """One source image: a rectangle (x0, y0, x1, y1) of photo ``photo`` (working-copy pixels)."""

    photo: str
    rect: tuple[int, int, int, int]
    image: Image.Image | None = None


def partition(width: int, height: int, target: float, rng: random.Random,
              min_cut: int | None = None) -> list[tuple[int, int, int, int]]:
    """Random k-d partition of a width x height photo into non-overlapping rectangles (x0, y0, x1, y1).

    A region is split (across its longer side at U(35 %, 65 %)) while that side exceeds
    ``target x U(1, 2)`` px, so leaves come at different scales; together they cover the photo exactly.
    With ``min_cut``, a split leaves both parts at least ``min_cut`` px along the cut side (the cut is drawn
    inside that range), so no leaf is wasted under a minimum size.
    """
    stop = 2 * (min_cut or MIN_TILE_SIDE)
    out: list[tuple[int, int, int, int]] = []
    stack = [(0, 0, width, height)]
    while stack:
        x0, y0, x1, y1 = stack.pop()
        w, h = x1 - x0, y1 - y0
        side = max(w, h)
        if side <= target * rng.uniform(1.0, 2.0) or side < stop:
            out.append((x0, y0, x1, y1))
            continue
        lo, hi = (0.35, 0.65) if min_cut is None else (max(0.35, min_cut / side), min(0.65, 1 - min_cut / side))
        if w >= h:
            cut = x0 + round(w * rng.uniform(lo, hi))
            stack += [(cut, y0, x1, y1), (x0, y0, cut, y1)]
        else:
            cut = y0 + round(h * rng.uniform(lo, hi))
            stack += [(x0, cut, x1, y1), (x0, y0, x1, cut)]
    return out


def _leaves(photos: Sequence[tuple[str, Image.Image]], target: float, rng: random.Random,
            min_cut: int | None = None, min_long: int = 0) -> list[Tile]:
    """The partition's leaves worth an image: not flat (grey std >= MIN_TILE_STD), short side >= MIN_TILE_SIDE,
    long side >= ``min_long``; in photo order, without pixels yet."""
    tiles: list[Tile] = []
    for name, img in photos:
        gray = np.asarray(img.convert("L"), dtype=np.float32)
        for x0, y0, x1, y1 in partition(img.width, img.height, target, rng, min_cut):
            if min(x1 - x0, y1 - y0) < MIN_TILE_SIDE or max(x1 - x0, y1 - y0) < min_long:
                continue
            if gray[y0:y1, x0:x1].std() >= MIN_TILE_STD:
                tiles.append(Tile(name, (x0, y0, x1, y1)))
    return tiles


def make_tiles(
    photos: Sequence[tuple[str, Image.Image]], n_needed: int, long_side: int, seed: int
) -> list[Tile]:
    """At least ``n_needed`` non-flat, pairwise non-overlapping tiles, resized to ``long_side``, shuffled."""
    area = sum(img.width * img.height for _, img in photos)
    target = 1.5 * math.sqrt(area / n_needed)  # start too big, shrink until enough leaves survive
    while True:
        rng = random.Random(seed)
        tiles = _leaves(photos, target, rng)
        if len(tiles) >= n_needed:
            break
        if target * 0.9 < MIN_TILE_SIDE:
            raise ConfigError(
                "source",
                f"the photos yield only {len(tiles)} distinct regions >= {MIN_TILE_SIDE} px, {n_needed} are needed: "
                "add photos or use a smaller --size",
            )
        target *= 0.9
    rng.shuffle(tiles)
    tiles = tiles[:n_needed]
    by_name = dict(photos)
    for t in tiles:
        t.image = resize_long(by_name[t.photo].crop(t.rect), long_side)
    return tiles


def make_regions(
    photos: Sequence[tuple[str, Image.Image]], n_wanted: int, sides: tuple[int, int], seed: int
) -> list[Tile]:
    """Up to ``n_wanted`` non-flat, pairwise non-overlapping regions at photo sizes, shuffled.

    Why not ``make_tiles``: held-out images must look like a user's photos, so a region is kept at native
    resolution (downscaled only past ``sides[1]``) and dropped when its long side is under ``sides[0]``,
    instead of being upscaled. The partition's target side follows the area per wanted region, but never
    below ``sides[0]``: few photos give fewer regions (the caller copies each several times), many photos
    give larger regions, downscaled.
    """
    lo, hi = sides
    area = sum(img.width * img.height for _, img in photos)
    rng = random.Random(seed)
    tiles = _leaves(photos, max(lo, math.sqrt(area / max(1, n_wanted))), rng, min_cut=lo, min_long=lo)
    rng.shuffle(tiles)
    tiles = tiles[:n_wanted]
    by_name = dict(photos)
    for t in tiles:
        crop = by_name[t.photo].crop(t.rect)
        t.image = resize_long(crop, hi) if max(crop.size) > hi else crop
    return tiles


def spread(total: int, slots: int) -> list[int]:
    """``total`` as ``slots`` counts that differ by at most one (the first ones get the extra)."""
    return [total // slots + (i < total % slots) for i in range(slots)]
