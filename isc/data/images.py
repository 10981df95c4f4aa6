"""The single image decoder every split (and every served request) goes through.

Handles grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit, EXIF orientation and animated
files (first frame). Anything that cannot be decoded -- zero-byte, truncated, not an image,
decompression bombs -- raises :class:`~isc.errors.BadImageError` naming the file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from isc.errors import BadImageError

# Pillow warns above ~89 Mpx and raises above twice that. We turn the warning into an error as well:
# a copy-detection pipeline never needs a 100-Mpx image, and a crafted one can exhaust memory.
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16-bit/float scaled to 0-255, palette expanded."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, draft: int | None = None) -> Image.Image:
    """Decode ``path`` into an upright RGB ``PIL.Image`` or raise ``BadImageError``.

    ``draft``: the side the caller resizes to next. A JPEG larger than twice that is decoded at 1/2, 1/4
    or 1/8 scale in the DCT domain (Pillow's draft mode), never below ``draft`` on either side: the
    decode costs a fraction of a full one, and the caller's resize to ``draft`` sees nearly the same
    pixels (docs/descriptors.md states the tolerance). ``None`` = full size (every other format is
    always decoded at full size).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
    except FileNotFoundError as exc:
        raise BadImageError(path, "no such file") from exc
    return _decode(path, path, draft)


def decode_image(data: bytes, name: str = "<bytes>", draft: int | None = None) -> Image.Image:
    """Decode the bytes of an image *file* (JPEG, PNG, ...) exactly as :func:`load_image` decodes the file.

    Why: the REST endpoint receives encoded images, not paths; going through the same decoder keeps a
    served descriptor identical to the one of the file on disk. ``name`` labels errors; ``draft`` as
    in :func:`load_image`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadImageError(name, f"expected the bytes of an image file, got {type(data).__name__}")
    if len(data) == 0:
        raise BadImageError(name, "empty (0 bytes)")
    return _decode(io.BytesIO(bytes(data)), name, draft)


def _decode(source: Path | io.BytesIO, label: str | Path, draft: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.seek(0)  # animated GIF/WebP/APNG: the first frame
                if draft and img.format == "JPEG":
                    # Both sides stay >= draft (Pillow picks the largest 1/2^k scale that allows it), so
                    # the EXIF rotation below and the square resize after it never upsample.
                    img.draft(None, (int(draft), int(draft)))
                img.load()  # force the full decode now: truncation shows up here, not later
                img = ImageOps.exif_transpose(img) or img
                rgb = to_rgb(img)
                rgb.load()
                return rgb.copy() if rgb is img else rgb
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(label, f"too large to decode safely ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise BadImageError(label, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(label, f"cannot decode ({exc})") from exc
