"""AugLy ops and the recipe's view pipelines: odd images, shapes, normalisation, seeding, pickling."""

from __future__ import annotations

import dataclasses
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from isc.data import augly_ops as ops
from isc.data.augment import (
    STAGE_VIEWS,
    RandomOverlayImageAndResizedCrop,
    build_eval_transform,
    build_hard_transform,
    build_moderate_transform,
    build_train_transform,
    hard_ops,
)
from isc.data.images import to_rgb
from isc.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random colour field (cheap to make at any size, never flat)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    img = small.resize((w, h), Image.Resampling.BILINEAR)
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize((w, h)))
        return img
    return img.convert(mode)


ODD_IMAGES = {
    "tiny_8x8": lambda: _photo(8, 8),
    "huge_3000x2000": lambda: _photo(3000, 2000),
    "grayscale": lambda: _photo(120, 90, "L"),
    "rgba": lambda: _photo(90, 120, "RGBA"),
}

# Ops forced to fire (p=1); "same" = output keeps the input size.
FORCED_OPS = {
    "RandomRotation": (ops.RandomRotation(p=1.0), "smaller"),
    "RandomPixelization": (ops.RandomPixelization(p=1.0), "same"),
    "ShufflePixels": (ops.ShufflePixels(0.1, p=1.0), "same"),
    "EncodingQuality": (ops.EncodingQuality(10, p=1.0), "same"),
    "RandomBlur": (ops.RandomBlur(p=1.0), "same"),
    "RandomOverlayText": (ops.RandomOverlayText(p=1.0), "same"),
    "RandomEmojiOverlay": (ops.RandomEmojiOverlay(p=1.0), "same"),
    "EdgeEnhance": (ops.EdgeEnhance(), "same"),
    "EdgeEnhanceMore": (ops.EdgeEnhance(more=True), "same"),
    "RandomPerspective": (ops.RandomPerspective(p=1.0), "same"),
    "meme_format": (ops.meme_format, "taller"),
    "random_noise": (ops.random_noise, "same"),
    "screenshot": (ops.overlay_onto_screenshot, "any"),
    "pad": (ops.pad, "larger"),
}


@pytest.mark.parametrize("image_kind", sorted(ODD_IMAGES))
def test_every_op_runs_on_odd_images_and_keeps_mode_and_size_rules(image_kind):
    img = ODD_IMAGES[image_kind]()
    random.seed(0)
    for name, (op, rule) in FORCED_OPS.items():
        out = op(img)
        assert isinstance(out, Image.Image), name
        assert out.mode in (img.mode, "RGB"), f"{name}: mode {out.mode} from {img.mode}"
        w, h = out.size
        assert w >= 1 and h >= 1, name
        if rule == "same":
            assert out.size == img.size, f"{name}: {out.size} != {img.size}"
        elif rule == "smaller":
            assert w <= img.width and h <= img.height, name
        elif rule == "taller":
            assert w == img.width and h > img.height, name
        elif rule == "larger":
            assert w >= img.width and h >= img.height and (w, h) != img.size, name


@pytest.mark.parametrize("image_kind", ["tiny_8x8", "grayscale", "rgba"])
def test_hard_list_ops_run_on_odd_images(image_kind):
    # In the pipeline the list sees RGB crops of input_size (ToRGB + crop come first); huge inputs are
    # covered by test_hard_view_of_huge_image_is_input_size.
    img = to_rgb(ODD_IMAGES[image_kind]())
    random.seed(1)
    torch.manual_seed(1)
    for op in hard_ops(STAGE_VIEWS["stage3"]):
        force = getattr(op, "p", None)
        if force is not None:
            op.p = 1.0
        out = op(img)
        assert isinstance(out, Image.Image) and out.size == img.size, repr(op)


def test_perspective_replacement_warps_pixels_but_keeps_size():
    img = _photo(64, 48)
    out = ops.perspective_transform(img, sigma=0.08, seed=3)
    assert out.size == img.size
    assert np.abs(np.asarray(out, np.float32) - np.asarray(img, np.float32)).mean() > 2.0


def test_meme_format_replacement_adds_a_caption_band_of_the_requested_height():
    img = _photo(100, 80)
    out = ops.meme_format(
        img, text="HELLO", caption_height=0.25, bg_color=(255, 255, 255), text_color=(0, 0, 0)
    )
    assert out.size == (100, 100)
    band = np.asarray(out)[:20]
    assert (band < 128).any(), "caption text was drawn"
    assert np.array_equal(np.asarray(out)[20:], np.asarray(img))


def test_shuffle_pixels_permutes_about_factor_of_the_pixels():
    img = _photo(50, 40)
    out = ops.shuffle_pixels(img, factor=0.2, seed=0)
    a = np.asarray(img).reshape(-1, 3)
    b = np.asarray(out).reshape(-1, 3)
    assert sorted(map(tuple, a)) == sorted(map(tuple, b))  # same pixels, moved
    moved = (a != b).any(axis=1).mean()
    assert 0.1 < moved <= 0.2


def test_emoji_overlay_places_its_corner_anywhere_as_the_seed_so_some_emoji_are_cut_by_the_border():
    """The seed draws x, y ~ U(0, 1) (exp/v83.py's RandomEmojiOverlay); a corner kept inside 1 - size never
    starts past 0.9 of the width (size >= 0.1)."""
    random.seed(0)
    blank = Image.new("RGB", (200, 200), (0, 0, 0))
    op = ops.RandomEmojiOverlay(p=1.0)
    lefts, cut = [], 0
    for _ in range(120):
        changed = np.argwhere(np.asarray(op(blank)).any(axis=2))
        if len(changed) == 0:
            continue
        lefts.append(changed[:, 1].min() / 200)
        cut += int(changed[:, 1].max() == 199 or changed[:, 0].max() == 199)
    assert max(lefts) > 0.9 and cut >= 5, (max(lefts), cut)


def test_text_overlay_draws_from_the_seeds_fonts_only():
    fonts = [Path(f).name for f in ops.recipe_font_paths()]
    assert len(fonts) >= 10 and len(ops.font_paths()) > len(fonts)  # AugLy 1.0.0 ships TypeMyMusic (not PainttheSky)
    assert not [f for f in fonts if "TypeMyMusic" in f or "PainttheSky-Regular" in f]


def test_our_random_ops_do_not_reseed_global_rngs():
    # AugLy's RandomEmojiOverlay calls random.seed(42) and its noise/shuffle np.random.seed(const).
    img = _photo(32, 32)
    draws = []
    for seed in (0, 1):
        random.seed(seed)
        np.random.seed(seed)
        ops.RandomEmojiOverlay(p=1.0)(img)
        ops.ShufflePixels(p=1.0)(img)
        ops.random_noise(img)
        draws.append((random.random(), np.random.rand()))
    assert draws[0][0] != draws[1][0]
    assert draws[0][1] != draws[1][1]


def test_eval_and_moderate_views_normalise_with_mean_and_std():
    colour = (200, 100, 50)
    img = Image.new("RGB", (70, 50), colour)
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    for t in (build_eval_transform(32, MEAN, STD), build_moderate_transform(32, MEAN, STD)):
        x = t(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-4)
        assert torch.allclose(x.std(dim=(1, 2)), torch.zeros(3), atol=1e-4)


@pytest.mark.parametrize("stage", sorted(STAGE_VIEWS))
def test_each_stage_gives_ncrops_views_of_the_right_shape(stage, mini_data):
    overlays = [str(p) for _, p in mini_data.images("train")[:8]]
    t = build_train_transform(stage, 48, 3, MEAN, STD, overlays)
    random.seed(0)
    torch.manual_seed(0)
    for kind in ("tiny_8x8", "grayscale", "rgba"):
        views = t(ODD_IMAGES[kind]())
        assert len(views) == 3
        for v in views:
            assert v.shape == (3, 48, 48) and v.dtype == torch.float32
            assert torch.isfinite(v).all()
    # an undisturbed view of a real photo spans roughly the normalised [0, 1] range, not raw pixels
    v = build_moderate_transform(48, MEAN, STD)(_photo(90, 60))
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (v.amin(dim=(1, 2)) >= lo - 1e-4).all() and (v.amax(dim=(1, 2)) <= hi + 1e-4).all()


def test_smoke_views_are_stage1s_with_stronger_colour_views():
    demo, v83 = STAGE_VIEWS["smoke"], STAGE_VIEWS["stage1"]
    assert dataclasses.replace(demo, jitter=v83.jitter, colour_p=1.0, gray_p=None) == v83
    ops_list = hard_ops(demo)
    assert isinstance(ops_list[0].transforms[0], T.ColorJitter) and ops_list[0].p == 0.8
    assert ops_list[0].transforms[0].brightness == (0.0, 2.0)  # jitter 1.0: factor in [0, 2]
    assert isinstance(ops_list[4], T.RandomGrayscale) and ops_list[4].p == 0.4
    assert all(op.p == v83.basic_p for op in (ops_list[1], ops_list[2]))  # the rest is v83
    assert ops_list[6].p == v83.edit_p


def test_hard_view_of_huge_image_is_input_size():
    t = build_hard_transform("stage3", 64, MEAN, STD)
    random.seed(2)
    torch.manual_seed(2)
    assert t(ODD_IMAGES["huge_3000x2000"]()).shape == (3, 64, 64)


def test_same_seed_gives_identical_views_and_other_seed_differs():
    t = build_train_transform("stage3", 40, 2, MEAN, STD)
    img = _photo(120, 90)

    def views(seed):
        random.seed(seed)
        torch.manual_seed(seed)
        return torch.cat([torch.cat(t(img)) for _ in range(4)])

    assert torch.equal(views(7), views(7))
    assert not torch.equal(views(7), views(8))


class _Images(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.images = [_photo(64, 48, seed=i) for i in range(6)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.stack(self.transform(self.images[i]))


def test_train_transform_pickles_and_is_reproducible_in_dataloader_workers(mini_data):
    overlays = [p for _, p in mini_data.images("train")[:4]]
    t = build_train_transform("stage1", 32, 2, MEAN, STD, overlays)
    t2 = pickle.loads(pickle.dumps(t))
    assert isinstance(t2.hard.transforms[2], RandomOverlayImageAndResizedCrop)

    def run(seed):
        loader = torch.utils.data.DataLoader(
            _Images(t2), batch_size=3, num_workers=2, generator=torch.Generator().manual_seed(seed)
        )
        return torch.cat(list(loader))

    a, b = run(3), run(3)
    assert a.shape == (6, 2, 3, 32, 32)
    assert torch.equal(a, b)


def test_overlay_blends_another_training_image_when_it_fires(tmp_path: Path):
    white = tmp_path / "white.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(white)
    black = Image.new("RGB", (80, 60), (0, 0, 0))
    random.seed(0)
    torch.manual_seed(0)
    always = RandomOverlayImageAndResizedCrop(
        32, [white], overlay_p=1.0, opacity_lower=1.0, size_range=(0.5, 0.5)
    )
    never = RandomOverlayImageAndResizedCrop(32, [white], overlay_p=0.0)
    blended = [np.asarray(always(black)).max() for _ in range(6)]
    assert sum(m > 200 for m in blended) >= 4  # cropped views may miss the pasted patch now and then
    assert all(np.asarray(never(black)).max() == 0 for _ in range(6))
    assert always(black).size == (32, 32)


def test_bad_parameters_raise_config_errors_naming_them():
    with pytest.raises(ConfigError, match="stage"):
        build_hard_transform("v999", 32, MEAN, STD)
    with pytest.raises(ConfigError, match="input_size"):
        build_eval_transform(0, MEAN, STD)
    with pytest.raises(ConfigError, match="ncrops"):
        build_train_transform("smoke", 32, 0, MEAN, STD)
    with pytest.raises(ConfigError, match="mean"):
        build_moderate_transform(32, (0.5,), STD)


def test_edit_views_are_the_mini_queries_edits_resized_and_seeded(mini_data):
    paths = [p for _, p in mini_data.images("train")][:20]
    t = build_train_transform("stage1", 40, 3, MEAN, STD, paths, views="edits", anchor="plain")
    img = Image.open(paths[0])
    random.seed(7)
    views = t(img)
    assert len(views) == 3 and all(v.shape == (3, 40, 40) for v in views)
    # the plain anchor is the eval view; edit views differ from it and from each other
    assert torch.allclose(views[0], build_eval_transform(40, MEAN, STD)(img))
    assert not torch.allclose(views[1], views[0]) and not torch.allclose(views[1], views[2])
    random.seed(7)
    assert all(torch.equal(a, b) for a, b in zip(views, t(img), strict=True))
    with pytest.raises(ConfigError, match="views"):
        build_train_transform("stage1", 40, 2, MEAN, STD, paths, views="nope")
    with pytest.raises(ConfigError, match="anchor"):
        build_train_transform("stage1", 40, 2, MEAN, STD, paths, anchor="nope")
