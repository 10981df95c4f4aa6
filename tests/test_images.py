"""load_image: every odd but valid file becomes an upright RGB image; every bad one a BadImageError naming it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isc.data.disc21 import DISC21, list_images
from isc.data.images import load_image
from isc.errors import BadImageError, ConfigError


def _gradient(w: int = 40, h: int = 30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def _assert_rgb(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB" and img.size == size
    return np.asarray(img)


def test_grayscale_png_becomes_rgb_with_equal_channels(tmp_path: Path):
    p = tmp_path / "g.png"
    _gradient().convert("L").save(p)
    a = _assert_rgb(load_image(p), (40, 30))
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_palette_gif_becomes_rgb(tmp_path: Path):
    p = tmp_path / "p.gif"
    _gradient().convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(p)
    a = _assert_rgb(load_image(p), (40, 30))
    assert len(np.unique(a.reshape(-1, 3), axis=0)) <= 16


def test_rgba_is_composited_on_white(tmp_path: Path):
    p = tmp_path / "a.png"
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    img.save(p)
    a = _assert_rgb(load_image(p), (10, 10))
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert tuple(a[5, 5]) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    a = _assert_rgb(load_image(p), (20, 20)).astype(int)
    assert a[..., 0].mean() > 200 and a[..., 1].mean() < 60


def test_16bit_png_is_scaled_to_8bit(tmp_path: Path):
    p = tmp_path / "d.png"
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[:4] = 32768
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    a = _assert_rgb(load_image(p), (8, 8))
    assert a[6, 0, 0] == 255 and 126 <= a[0, 0, 0] <= 129


def test_exif_orientation_is_applied(tmp_path: Path):
    p = tmp_path / "e.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    _gradient(40, 30).save(p, exif=exif)
    assert Image.open(p).size == (40, 30)
    _assert_rgb(load_image(p), (30, 40))


def test_animated_gif_gives_its_first_frame(tmp_path: Path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    a = _assert_rgb(load_image(p), (16, 16)).astype(int)
    assert a[..., 0].mean() > 200 and a[..., 2].mean() < 50


def test_image_with_wrong_extension_still_loads(tmp_path: Path):
    p = tmp_path / "really_a_png.jpg"
    _gradient().save(p, format="PNG")
    _assert_rgb(load_image(p), (40, 30))


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "0 bytes"),
        ("notes.jpg", b"this is a text file, not a picture\n" * 10, "not a recognised image"),
    ],
)
def test_unreadable_files_raise_bad_image_error_naming_the_file(tmp_path: Path, name, content, reason):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as info:
        load_image(p)
    assert info.value.path == p and name in str(info.value)


def test_truncated_jpeg_raises_bad_image_error(tmp_path: Path):
    full = tmp_path / "full.jpg"
    _gradient(200, 150).save(full, quality=95)
    p = tmp_path / "truncated.jpg"
    p.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(BadImageError, match="truncated.jpg"):
        load_image(p)


def test_missing_file_raises_bad_image_error(tmp_path: Path):
    with pytest.raises(BadImageError, match="no such file"):
        load_image(tmp_path / "nope.png")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` pixels (a decompression bomb needs no pixel data to open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 30_000])  # 100 Mpx (Pillow warns) and 900 Mpx (Pillow refuses)
def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, side):
    p = tmp_path / f"bomb_{side}.png"
    _png_header_only(p, side, side)
    with pytest.raises(BadImageError, match="too large") as info:
        load_image(p)
    assert info.value.path == p


def test_list_images_ignores_non_images_and_rejects_duplicate_ids(tmp_path: Path):
    d = tmp_path / "imgs"
    d.mkdir()
    _gradient().save(d / "b.png")
    _gradient().save(d / "a.jpg")
    (d / "readme.txt").write_text("x")
    (d / ".hidden.jpg").write_bytes(b"")
    assert [i for i, _ in list_images(d)] == ["a", "b"]
    _gradient().save(d / "a.png")
    with pytest.raises(ConfigError, match="'a'"):
        list_images(d)
    with pytest.raises(ConfigError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_disc21_names_splits_and_ground_truth_files(tmp_path: Path):
    ds = DISC21(tmp_path)
    assert ds.split_dir("q") == ds.query_dir == tmp_path.resolve() / "query_images"
    assert ds.ground_truth("test").name == "ground_truth_test.csv"
    with pytest.raises(ConfigError, match="split"):
        ds.split_dir("x")
    with pytest.raises(ConfigError, match="reference_images"):
        (tmp_path / "query_images").mkdir()
        ds.validate("qr")
