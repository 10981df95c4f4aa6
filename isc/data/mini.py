"""Mini DISC21-shaped datasets built offline from bundled photographs (or any folder of photos).

Why: the platform's tests and demo need a dataset with the structure of DISC21 -- references, edited
copies of some of them as queries, distractor queries whose source is not a reference, and a disjoint
training set -- without downloading anything.

How the "source images" are made (and kept disjoint). There are only ~20 real photographs bundled with
scikit-image (plus scikit-learn's two and matplotlib's one, when installed), so each photo is cut into
NON-OVERLAPPING rectangles by a random k-d partition: a region whose longer side exceeds
``target x U(1, 2)`` pixels is split across that side at U(35 %, 65 %), recursively. The leaves tile
the photo without overlap and come out at different scales (the stop threshold is random). Leaves
that are nearly flat (grey-level std < 8) or thinner than 32 px are dropped. The ``target`` side is
chosen from the photos' total area so that enough leaves exist; if too few survive it shrinks and the
cut is redone. Every leaf is resized so its long side is ``long_side`` px, and the shuffled leaves are
dealt, each to exactly ONE pool:

* references (``reference_images/``),
* distractor sources (edited into distractor queries; never a reference or training image),
* overlay partners (the "other image" of overlay edits; never a reference or training image),
* training images (``training_images/``).

So no two images of different pools share a pixel of the same photo (``mini_manifest.json`` records
each image's photo and rectangle; the tests check pairwise non-overlap).

Held-out means unseen photos: whole PHOTOS are dealt to the three query splits (train / val / test, about
55 / 20 / 25 % of the area, largest photo first). A split's references, its distractor sources and its
queries are cut from its own photos only; training images and overlay partners come only from the train
split's photos. So no training image (and no stage-4 training pair) shares a photo with a val or test
query or its reference: the val and test numbers measure copies of new images. All references form one
reference set, as in DISC21 (a test query is searched against every reference).

Queries follow DISC21: a chain of 1-4 random copy edits (crops, text/emoji overlays, overlay onto or
of another image, screenshot framing, meme format, colour changes, blur, JPEG, rotations, flips,
padding, pixelisation, perspective, sharpening, grayscale, noise, pixel shuffling) applied to a
reference (positive query) or to a distractor source (distractor query). Query ids are assigned in
random order; most references are never queried. Everything is deterministic given ``seed``.

Query splits: ``ground_truth.csv`` lists every query; ``ground_truth_{train,val,test}.csv`` partition the
queries (each split has positives and distractors): *train* pairs feed stage 4, *val* scores tuning
trials and chooses the champion, *test* is held out for the reported numbers.

The dataset is built in a folder of its own beside ``out`` (``.<out>.@host@pid.XXXXXXXX.partial``, one per
process) and renamed onto ``out`` at the end, so a crash never leaves a folder that looks complete and two
builds at once never share one.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from isc.data.copy_edits import edit_chain
from isc.data.disc21 import DISC21, list_images
from isc.data.images import IMAGE_EXTENSIONS, load_image
from isc.data.regions import MIN_TILE_SIDE, Tile, make_regions, make_tiles, spread
from isc.errors import BadImageError, ConfigError
from isc.fileutil import partial_dir
from isc.io import write_ground_truth

log = logging.getLogger(__name__)

MANIFEST = "mini_manifest.json"
WORKING_LONG_SIDE = 2048  # photos larger than this are downscaled before tiling (bounds memory)
SPLIT_FRACTIONS = {"train": 0.4, "val": 0.3, "test": 0.3}  # of the queries and references
# of the photos' area: the train photos also yield every training image, so they get the larger share
PHOTO_SHARES = {"train": 0.55, "val": 0.2, "test": 0.25}

# scikit-image's bundled real photographs, read straight from its data folder (no loader call, so
# nothing ever reaches for pooch or the network). Synthetic images (checkerboard, blobs, phantom, colour
# wheel, logo) and the near-duplicates (``cat`` = ``chelsea``, ``motorcycle_right`` ~ ``_left``) and
# uniform textures (brick, grass, gravel: their tiles look alike) are left out.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
# Bundled images that are not what a user photographs (a microscope, a telescope, a scanner): they feed the
# train split only, so val and test, which choose and report, are copies of everyday photographs (issue 19).
TRAIN_ONLY_PHOTOS = frozenset(
    {"cell.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "page.png", "retina.jpg", "text.png"}
)
# Of the everyday photos' area when the train split also has train-only photos (the train split then still
# gets some everyday photos to learn from; val and test get most of them).
EVERYDAY_SHARES = {"train": 0.3, "val": 0.3, "test": 0.4}
# Other real photographs that ship inside installed packages: (package, relative path).
PACKAGE_PHOTOS = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


@dataclass(frozen=True)
class MiniSpec:
    """Counts and image size of one dataset size preset."""

    n_references: int
    n_queries: int
    n_train: int
    long_side: int  # px, long side of every reference / training image and the cap for queries
    distractor_fraction: float  # of the queries
    n_partners: int  # overlay partners ("other images" of overlay edits)
    # Held-out splits (val, test) at photo sizes: when ``heldout_side`` is set, their references and distractor
    # sources are regions of their photos at native resolution (long side between its two values, never
    # upscaled), each copied by as many independent edit chains as the split's query count needs.
    heldout_side: tuple[int, int] | None = None


# Why the default's val and test are at photo sizes: a user's photos (DISC21's, a folder of one's own) are
# several hundred px per side with real detail; 256-px tiles upscaled from ~70-px regions reward the
# training size, so extraction settings chosen on them did not carry over (issue 19: 128 px chosen, 0.611
# on another photo set where the same weights gave 0.719 at 224 px + TTA).
HELDOUT_SIDE = (192, 512)
HELDOUT_SPLITS = ("val", "test")
HELDOUT_MIN_REGIONS = 3  # per held-out split: one distractor source and two references at least


SIZES: dict[str, MiniSpec] = {
    "tiny": MiniSpec(
        n_references=64, n_queries=40, n_train=64, long_side=160, distractor_fraction=0.35, n_partners=8
    ),
    "default": MiniSpec(
        n_references=400, n_queries=300, n_train=400, long_side=256, distractor_fraction=0.35, n_partners=16,
        heldout_side=HELDOUT_SIDE,
    ),
}


# ------------------------------------------------------------------------------------------ sources
def bundled_photo_paths() -> list[Path]:
    """The real photographs available offline: scikit-image's, plus scikit-learn's / matplotlib's."""
    paths: list[Path] = []
    spec = importlib.util.find_spec("skimage")
    if spec and spec.submodule_search_locations:
        data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
        paths += [data_dir / n for n in SKIMAGE_PHOTOS if (data_dir / n).is_file()]
    for package, rel in PACKAGE_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            p = Path(next(iter(spec.submodule_search_locations))) / rel
            if p.is_file():
                paths.append(p)
    return paths


def source_photo_paths(source: str | Path | None) -> list[Path]:
    """Image files of ``source`` (recursively, sorted) or the bundled photos when ``source`` is empty."""
    if source in (None, ""):
        paths = bundled_photo_paths()
        if not paths:
            raise ConfigError(
                "source", "no bundled photos found (is scikit-image installed?); pass --source DIR"
            )
        return paths
    root = Path(source).expanduser()
    if not root.is_dir():
        raise ConfigError("source", f"{root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ConfigError("source", f"{root} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _load_working(path: Path) -> Image.Image:
    img = load_image(path)
    scale = WORKING_LONG_SIDE / max(img.size)
    if scale < 1.0:
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BOX
        )
    return img


def load_photos(paths: Sequence[Path]) -> list[tuple[str, Image.Image]]:
    """Decode the source photos (downscaled to <= 2048 px); unreadable files are skipped with a warning."""
    photos, bad = [], []
    for p in tqdm(paths, desc="load photos", leave=False, disable=len(paths) < 50):
        try:
            img = _load_working(p)
        except BadImageError as exc:
            bad.append(exc)
            continue
        if min(img.size) >= MIN_TILE_SIDE:
            photos.append((str(p), img))
    for exc in bad[:20]:
        log.warning("skipping unreadable source image %s", exc)
    if not photos:
        raise ConfigError(
            "source", f"none of the {len(paths)} image files is a readable photo >= {MIN_TILE_SIDE} px"
        )
    return photos


# ------------------------------------------------------------------------------------------ splits
# ------------------------------------------------------------------------------------------- build
def _save_jpeg(img: Image.Image, path: Path) -> None:
    try:
        img.convert("RGB").save(path, format="JPEG", quality=90)
    except OSError as exc:  # Pillow's failed write (full disk) names no file: name it
        if exc.filename or not exc.errno:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(
                "out", f"{out} already exists and is not empty (pass --overwrite to replace it)"
            )
    return partial_dir(out)


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``partial`` folder onto ``out`` in one rename, which fails if another make-mini
    filled ``out`` meanwhile (that one wins; this one says so). An ``out`` that was there before (only with
    --overwrite) is swapped away first and removed only after."""
    old = None
    if overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        old = partial.with_name(partial.name.removesuffix(".partial") + ".old")  # fits where out's name fits
        os.replace(out, old)
    try:
        os.rename(partial, out)  # onto nothing or an empty folder; never onto a filled one
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise ConfigError("out", f"{out} was filled by another process while this one built it (two "
                                 "make-mini at once?); it is left as that one wrote it") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_mini(
    out: str | Path,
    source: str | Path | None = None,
    seed: int = 0,
    size: str = "default",
    overwrite: bool = False,
) -> DISC21:
    """Build a DISC21-shaped mini dataset in ``out`` and return it (see the module docstring).

    ``size``: ``"tiny"`` (64 references, 40 queries, 64 training images, 160 px; for tests) or
    ``"default"`` (400 / 300 / 500, 256 px; the demo). ``source``: a folder of photos, or ``None``/``""``
    for the bundled photographs. Raises ``ConfigError`` naming ``source``/``out``/``size``/``seed``.
    """
    if size not in SIZES:
        raise ConfigError("size", f"unknown size '{size}' (choose from {', '.join(SIZES)})")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
    spec = SIZES[size]
    out = Path(out).expanduser().resolve()
    paths = source_photo_paths(source)
    if source not in (None, ""):
        src = Path(source).expanduser().resolve()
        if out == src or out in src.parents or src in out.parents:
            # --overwrite would delete the photos being read (or nest the dataset inside its own source).
            raise ConfigError("out", f"{out} is, holds or is inside --source {src}; choose another folder")
    partial = _prepare_out(out, overwrite)
    try:
        _build(partial, paths, spec, seed, size, source)
        _publish(partial, out, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return DISC21(out)


def assign_photo_groups(photos: Sequence[tuple[str, Image.Image]], rng: random.Random,
                        train_only: frozenset[int] = frozenset()) -> dict[str, list[int]]:
    """Deal whole photos to the query splits (train / val / test), about in ``PHOTO_SHARES`` of area.

    Why: a held-out query must be a copy of a photo the model never saw a piece of. Every tile of a
    photo goes to one split's pools, and training images come only from the train split's photos.
    Largest photo first, each to the split furthest below its share of the area; every split gets one.
    Photos in ``train_only`` (indices) go to train; the others are then dealt in ``EVERYDAY_SHARES``.
    """
    if len(photos) - len(train_only) < len(SPLIT_FRACTIONS):
        raise ConfigError("source", f"need at least {len(SPLIT_FRACTIONS)} photos (one per query split), "
                                    f"got {len(photos) - len(train_only)}")
    shares = EVERYDAY_SHARES if train_only else PHOTO_SHARES
    order = [i for i in range(len(photos)) if i not in train_only]
    rng.shuffle(order)  # ties broken by the seed, not by file order
    order.sort(key=lambda i: -photos[i][1].width * photos[i][1].height)
    groups: dict[str, list[int]] = {k: [] for k in SPLIT_FRACTIONS}
    area = dict.fromkeys(SPLIT_FRACTIONS, 0.0)
    groups["train"] += sorted(train_only)
    for n, i in enumerate(order):
        empty = [k for k in groups if not groups[k]]
        left = len(order) - n
        if empty and left <= len(empty):  # the last photos go to splits that have none yet
            split = empty[0]
        else:
            split = min(shares, key=lambda k: area[k] / shares[k])
        groups[split].append(i)
        area[split] += photos[i][1].width * photos[i][1].height
    return groups


def _split_counts(total: int) -> dict[str, int]:
    """``total`` items over the splits in ``SPLIT_FRACTIONS`` (each >= 1 when total >= 3)."""
    val = max(1, round(total * SPLIT_FRACTIONS["val"]))
    test = max(1, round(total * SPLIT_FRACTIONS["test"]))
    return {"train": total - val - test, "val": val, "test": test}


def _cut_tiles(photos, groups: dict[str, list[int]], spec: MiniSpec, seed: int, pos_n: dict[str, int],
               dis_n: dict[str, int]) -> tuple[dict[str, list[Tile]], dict[str, list[Tile]], list[Tile], list[Tile]]:
    """Per split: its references (queried or not) and distractor sources; train also partners + training images."""
    ref_n = _split_counts(spec.n_references)
    refs_by: dict[str, list[Tile]] = {}
    distractor_by: dict[str, list[Tile]] = {}
    partners: list[Tile] = []
    train: list[Tile] = []
    for k, idx in groups.items():
        n_refs = max(ref_n[k], pos_n[k])
        if spec.heldout_side and k in HELDOUT_SPLITS:
            refs_by[k], distractor_by[k] = _heldout_regions([photos[i] for i in idx], k, n_refs, dis_n[k], spec, seed)
            continue
        extra = spec.n_partners + spec.n_train if k == "train" else 0
        tiles = make_tiles([photos[i] for i in idx], n_refs + dis_n[k] + extra, spec.long_side, seed)
        refs_by[k], distractor_by[k] = tiles[:n_refs], tiles[n_refs:n_refs + dis_n[k]]
        if k == "train":
            partners = tiles[n_refs + dis_n[k]:n_refs + dis_n[k] + spec.n_partners]
            train = tiles[n_refs + dis_n[k] + spec.n_partners:]
    return refs_by, distractor_by, partners, train


def _heldout_regions(photos, split: str, n_refs: int, n_dis: int, spec: MiniSpec,
                     seed: int) -> tuple[list[Tile], list[Tile]]:
    """A held-out split's references and distractor sources at photo sizes (``spec.heldout_side``).

    The split keeps its query counts: with fewer regions than wanted, about ``distractor_fraction`` of them
    (at least one) are distractor sources, the rest references, and each is copied by several independent
    edit chains (``_write_queries``).
    """
    regions = make_regions(photos, n_refs + n_dis, spec.heldout_side, seed)
    if len(regions) < HELDOUT_MIN_REGIONS:
        raise ConfigError(
            "source", f"the {split} photos yield {len(regions)} regions of >= {spec.heldout_side[0]} px, "
                      f"{HELDOUT_MIN_REGIONS} are needed: add photos or use --size tiny")
    if len(regions) < n_refs + n_dis:
        n_dis = max(1, round(len(regions) * spec.distractor_fraction))
    return regions[n_dis:], regions[:n_dis]


def _write_queries(rng: random.Random, refs: list[Tile], ref_ids: list[str], ref_split: list[str],
                   pos_n: dict[str, int], dis_n: dict[str, int], distractor_by: dict[str, list[Tile]], partners: list[Tile], query_dir: Path,
                   reference_dir: Path, spec: MiniSpec, manifest: dict, where) -> tuple[list, dict[str, list[str]]]:
    """Edit and save the queries; ``(ground-truth rows, split -> query ids)``.

    Which references get queried (most do not): each split's positives copy references of its own photos.
    """
    items: list[tuple[Tile, str | None, str]] = []
    for k in SPLIT_FRACTIONS:
        mine = [i for i, sk in enumerate(ref_split) if sk == k]
        if len(mine) >= pos_n[k]:
            items += [(refs[i], ref_ids[i], k) for i in rng.sample(mine, pos_n[k])]
        else:  # held-out split at photo sizes: every reference queried, several times
            items += [(refs[i], ref_ids[i], k) for i, n in zip(mine, spread(pos_n[k], len(mine)), strict=True) for _ in range(n)]
        sources = distractor_by[k]
        items += [(t, None, k) for t, n in zip(sources, spread(dis_n[k], len(sources)), strict=True) for _ in range(n)]
    rng.shuffle(items)  # query ids mix positives, distractors and splits
    partner_images = [t.image for t in partners]
    rows: list[tuple[str, str | None]] = []
    splits: dict[str, list[str]] = {k: [] for k in SPLIT_FRACTIONS}
    for i, (tile, rid, split) in enumerate(tqdm(items, desc="queries", leave=False)):
        qid = f"Q{i:05d}"
        # Positives are edited from the reference as published (its JPEG pixels), as in DISC21.
        base = load_image(reference_dir / f"{rid}.jpg") if rid else tile.image
        cap = spec.heldout_side[1] if spec.heldout_side and split in HELDOUT_SPLITS else spec.long_side
        query, names = edit_chain(base, rng, partner_images, cap)
        _save_jpeg(query, query_dir / f"{qid}.jpg")
        rows.append((qid, rid))
        splits[split].append(qid)
        manifest["queries"][qid] = {"reference": rid, "edits": names, "source": where(tile), "split": split}
    return rows, splits


def _build(root: Path, paths: Sequence[Path], spec: MiniSpec, seed: int, size: str, source) -> None:
    rng = random.Random(seed)
    n_distractors = round(spec.n_queries * spec.distractor_fraction)
    n_positives = spec.n_queries - n_distractors
    if n_positives > spec.n_references:
        raise ConfigError("size", "more positive queries than references")
    if min(n_positives, n_distractors) < len(SPLIT_FRACTIONS):
        raise ConfigError("size", "need at least 3 positive and 3 distractor queries")
    photos = load_photos(paths)
    bundled = source in (None, "")
    train_only = frozenset(i for i, (name, _) in enumerate(photos) if bundled and Path(name).name in TRAIN_ONLY_PHOTOS)
    groups = assign_photo_groups(photos, rng, train_only)
    pos_n, dis_n = _split_counts(n_positives), _split_counts(n_distractors)
    refs_by, distractor_by, partners, train = _cut_tiles(photos, groups, spec, seed, pos_n, dis_n)
    # reference ids in random order, so an id says nothing about its split
    ref_tiles = [(k, t) for k in SPLIT_FRACTIONS for t in refs_by[k]]
    rng.shuffle(ref_tiles)
    refs = [t for _, t in ref_tiles]
    ref_split = [k for k, _ in ref_tiles]
    dirs = {
        k: root / v for k, v in (("q", "query_images"), ("r", "reference_images"), ("t", "training_images"))
    }
    for d in dirs.values():
        d.mkdir()
    manifest: dict = {
        "seed": seed, "size": size, "spec": asdict(spec), "source": str(source or "bundled"),
        "photos": [name for name, _ in photos], "references": {}, "training": {}, "queries": {}, "partners": [],
    }  # fmt: skip
    photo_index = {name: i for i, (name, _) in enumerate(photos)}

    def where(t: Tile) -> list[int]:
        return [photo_index[t.photo], *t.rect]

    ref_ids = [f"R{i:06d}" for i in range(len(refs))]
    for rid, t in tqdm(list(zip(ref_ids, refs, strict=True)), desc="references", leave=False):
        _save_jpeg(t.image, dirs["r"] / f"{rid}.jpg")
        manifest["references"][rid] = where(t)
    for i, t in enumerate(tqdm(train, desc="training", leave=False)):
        _save_jpeg(t.image, dirs["t"] / f"T{i:06d}.jpg")
        manifest["training"][f"T{i:06d}"] = where(t)
    manifest["partners"] = [where(t) for t in partners]

    rows, splits = _write_queries(rng, refs, ref_ids, ref_split, pos_n, dis_n, distractor_by, partners, dirs["q"],
                                  dirs["r"], spec, manifest, where)
    write_ground_truth(root / "ground_truth.csv", rows)
    by_query = dict(rows)
    for split, qids in splits.items():
        write_ground_truth(root / f"ground_truth_{split}.csv", [(q, by_query[q]) for q in qids])
    splits = {k: sorted(v) for k, v in splits.items()}
    manifest["splits"] = splits
    manifest["photo_splits"] = {k: [photos[i][0] for i in idx] for k, idx in groups.items()}
    with open(root / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    counts = {k: len(list_images(d)) for k, d in dirs.items()}
    log.info("mini dataset: %d queries (%d distractors), %d references, %d training images",
             counts["q"], n_distractors, counts["r"], counts["t"])  # fmt: skip
