"""Training-free baseline descriptors: perceptual hashes and a tiny thumbnail.

They set the floor any learned model must beat, and exercise the whole evaluation path cheaply.
Every method maps an RGB image to a float32 vector of unit L2 norm, so squared L2 distance =
``2 - 2 x cosine`` and, for the hashes, is proportional to the Hamming distance:

* ``phash``: imagehash's 64-bit DCT hash, bits mapped to +-1 / 8 (64 dims);
* ``pdq``: Meta's 256-bit PDQ hash, bits mapped to +-1 / 16 (256 dims);
* ``thumbnail``: the grayscale 16 x 16 thumbnail, zero mean, L2 normalised (256 dims).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from isc.data.images import load_image
from isc.errors import BadImageError, BadImagesError, ConfigError


def phash_vector(img: Image.Image) -> np.ndarray:
    """64-d +-1/8 vector of imagehash.phash (hash_size 8)."""
    import imagehash

    bits = np.asarray(imagehash.phash(img, hash_size=8).hash, dtype=bool).ravel()
    return np.where(bits, 1.0, -1.0).astype(np.float32) / 8.0


def pdq_vector(img: Image.Image) -> np.ndarray:
    """256-d +-1/16 vector of the PDQ hash (pdqhash.compute on the RGB uint8 array)."""
    import pdqhash

    bits, _quality = pdqhash.compute(np.ascontiguousarray(np.asarray(img, dtype=np.uint8)))
    return np.where(np.asarray(bits).ravel() > 0, 1.0, -1.0).astype(np.float32) / 16.0


def thumbnail_vector(img: Image.Image, size: int = 16) -> np.ndarray:
    """``size*size``-d zero-mean, unit-norm grayscale thumbnail (a flat image gives the zero vector)."""
    g = img.convert("L").resize((size, size), Image.Resampling.BOX)
    v = np.asarray(g, dtype=np.float64).ravel()
    v -= v.mean()
    norm = np.linalg.norm(v)
    return (v / norm if norm > 1e-12 else v).astype(np.float32)


METHODS: dict[str, Callable[[Image.Image], np.ndarray]] = {
    "phash": phash_vector,
    "pdq": pdq_vector,
    "thumbnail": thumbnail_vector,
}


def get_method(name: str) -> Callable[[Image.Image], np.ndarray]:
    if name not in METHODS:
        raise ConfigError("method", f"unknown baseline '{name}' (choose from {sorted(METHODS)})")
    return METHODS[name]


def compute_descriptors(paths: Sequence[str | Path], method: str, desc: str = "") -> np.ndarray:
    """Descriptors [len(paths), d] float32 of the images at ``paths``.

    Unreadable images are collected and reported together (:class:`BadImagesError`) after the pass.
    """
    fn = get_method(method)
    rows: list[np.ndarray] = []
    errors: list[BadImageError] = []
    for p in tqdm(paths, desc=desc or f"{method} descriptors", unit="img", disable=len(paths) < 50):
        try:
            rows.append(fn(load_image(p)))
        except BadImageError as exc:
            errors.append(exc)
    if errors:
        raise BadImagesError(errors)
    if not rows:
        raise ConfigError("paths", "no image to describe")
    return np.stack(rows).astype(np.float32)
