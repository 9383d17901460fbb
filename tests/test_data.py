"""Tests for fgbg.data: dataset layouts, robust image reading, placement and mapping back."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fgbg.data import (DatasetError, ImageError, Placement, load_dataset, load_item,
                       map_back, place_image, place_mask, read_image, read_mask, valid_region)
from fgbg.io import atomic_write_text, save_png


def _img(path: Path, h=6, w=8, value=100) -> None:
    save_png(path, np.full((h, w, 3), value, np.uint8))


def make_reference(base: Path) -> Path:
    """Reference layout: 2 train, 1 val, 3 test; gt for all but one test image."""
    lines = [("images/a/t0.jpg", 1), ("images/a/t1.jpg", 1), ("images/b/v0.jpg", 2),
             ("images/b/s0.jpg", 0), ("images/b/s1.jpg", 0), ("images/c/s2.jpg", 0)]
    for rel, _ in lines:
        _img(base / rel)  # PNG bytes under a .jpg name: PIL reads by content
        if rel != "images/b/s1.jpg":
            save_png(base / "segmentations" / Path(rel[len("images/"):]).with_suffix(".png"),
                     np.zeros((6, 8), np.uint8))
    save_png(base / "distractors/c/s2.png", np.zeros((6, 8), np.uint8))
    atomic_write_text(base / "images.txt", "\n".join(f"{r} {s}" for r, s in lines) + "\n")
    return base


def make_cub(root: Path, seg_beside: bool = False) -> Path:
    """Official CUB layout: id 1 train, ids 2 and 3 test; masks for ids 1 and 3, inside
    CUB_200_2011/ or, with seg_beside, beside it (where the official archive unpacks)."""
    base = root / "CUB_200_2011"
    names = {1: "001.Albatross/x1.jpg", 2: "001.Albatross/x2.jpg", 3: "002.Auklet/y1.jpg"}
    for i, name in names.items():
        _img(base / "images" / name)
    seg = (root if seg_beside else base) / "segmentations"
    save_png(seg / "001.Albatross/x1.png", np.zeros((6, 8), np.uint8))
    save_png(seg / "002.Auklet/y1.png", np.zeros((6, 8), np.uint8))
    atomic_write_text(base / "images.txt", "".join(f"{i} {n}\n" for i, n in names.items()))
    atomic_write_text(base / "train_test_split.txt", "1 1\n2 0\n3 0\n")
    return base


# ---------------------------------------------------------------- datasets

def test_reference_layout_splits_gt_and_key(tmp_path):
    base = make_reference(tmp_path)
    ds = load_dataset(base)  # default: test split
    assert ds.layout == "reference" and ds.base_dir == base
    assert [it.rel for it in ds] == ["images/b/s0.jpg", "images/b/s1.jpg", "images/c/s2.jpg"]
    assert [it.line for it in ds] == [4, 5, 6] and {it.split for it in ds} == {0}
    s0, s1, s2 = ds.items
    assert s0.image_path == base / "images/b/s0.jpg"
    assert s0.gt_path == base / "segmentations/b/s0.png"
    assert s1.gt_path is None and ds.has_ground_truth
    assert s2.distractor_path == base / "distractors/c/s2.png" and s0.distractor_path is None
    assert s0.key == "images/b/s0"
    assert ds.skipped == []

    both = load_dataset(base, splits=["train", 2])
    assert [it.rel for it in both] == ["images/a/t0.jpg", "images/a/t1.jpg", "images/b/v0.jpg"]
    assert len(load_dataset(base, splits=(0, "train", "val"))) == 6


def test_limit_is_per_split_and_keeps_file_order(tmp_path):
    base = make_reference(tmp_path)
    ds = load_dataset(base, splits=("test", "train"), limit=1)
    assert [it.rel for it in ds] == ["images/a/t0.jpg", "images/b/s0.jpg"]
    assert len(load_dataset(base, splits="test", limit=2)) == 2


def test_unknown_split_name_is_rejected(tmp_path):
    base = make_reference(tmp_path)
    with pytest.raises(ValueError, match=r"splits.*'test', 'train', 'val'"):
        load_dataset(base, splits=("testing",))
    with pytest.raises(ValueError, match="splits"):
        load_dataset(base, splits=(5,))


def test_malformed_lines_are_skipped_with_file_and_line(tmp_path):
    base = make_reference(tmp_path)
    text = (base / "images.txt").read_text().splitlines()
    text[1:1] = ["foo", "", "images/b/s9.jpg x", "images/b/s8.jpg 3", "../evil.jpg 0",
                 "images/b/s0.jpg 0"]
    (base / "images.txt").write_text("\n".join(text) + "\n")
    ds = load_dataset(base, splits=(0, 1, 2))
    assert len(ds) == 6  # every good line kept, blank line ignored
    whats = [w for w, _ in ds.skipped]
    assert whats == ["images.txt line 2", "images.txt line 4", "images.txt line 5",
                     "images.txt line 6", "images.txt line 10"]  # line 3 is blank
    assert "'foo'" in ds.skipped[0][1] and "<path> <split>" in ds.skipped[0][1]
    assert "'images/b/s8.jpg 3'" in ds.skipped[2][1]
    assert "leaves" in ds.skipped[3][1]
    assert "repeats line 7" in ds.skipped[4][1]  # s0 was inserted again at line 7
    s0 = next(it for it in ds if it.rel == "images/b/s0.jpg")
    assert s0.line == 7


def test_empty_selection_and_missing_images_txt(tmp_path):
    base = make_reference(tmp_path / "ref")
    atomic_write_text(base / "images.txt", "images/a/t0.jpg 1\n")
    with pytest.raises(DatasetError, match=r"ref.*no items.*\['val'\]"):
        load_dataset(base, splits="val")
    with pytest.raises(DatasetError, match=r"nowhere.images\.txt"):
        load_dataset(tmp_path / "nowhere")


def test_cub_layout_detection_splits_and_gt(tmp_path):
    base = make_cub(tmp_path)
    ds = load_dataset(base, splits=("train", "test"))
    assert ds.layout == "cub"
    assert [(it.rel, it.split, it.line) for it in ds] == [
        ("images/001.Albatross/x1.jpg", 1, 1), ("images/001.Albatross/x2.jpg", 0, 2),
        ("images/002.Auklet/y1.jpg", 0, 3)]
    assert ds[0].image_path == base / "images/001.Albatross/x1.jpg"
    assert ds[0].gt_path == base / "segmentations/001.Albatross/x1.png"
    assert ds[1].gt_path is None
    assert ds[0].key == "images/001.Albatross/x1"
    assert [it.rel for it in load_dataset(base)] == ["images/001.Albatross/x2.jpg",
                                                     "images/002.Auklet/y1.jpg"]
    with pytest.raises(DatasetError, match="no val split"):
        load_dataset(base, splits="val")


def test_cub_segmentations_beside_the_dataset(tmp_path):
    base = make_cub(tmp_path, seg_beside=True)
    ds = load_dataset(base, splits="test")
    assert ds[1].gt_path == tmp_path / "segmentations/002.Auklet/y1.png"
    assert ds.has_ground_truth


def test_cub_unknown_id_and_bad_split_line_are_skipped(tmp_path):
    base = make_cub(tmp_path)
    atomic_write_text(base / "train_test_split.txt", "1 1\n2 7\n3 0\n")
    atomic_write_text(base / "images.txt", (base / "images.txt").read_text() + "9 002.Auklet/y9.jpg\n")
    ds = load_dataset(base, splits=("train", "test"))
    assert [it.rel for it in ds] == ["images/001.Albatross/x1.jpg", "images/002.Auklet/y1.jpg"]
    assert ds.skipped[0][0] == "train_test_split.txt line 2" and "'2 7'" in ds.skipped[0][1]
    assert ds.skipped[1][0] == "images.txt line 2"   # id 2 lost its split
    assert ds.skipped[2][0] == "images.txt line 4" and "id 9" in ds.skipped[2][1]


def test_reference_with_stray_split_file_is_not_cub(tmp_path):
    base = make_reference(tmp_path)
    atomic_write_text(base / "train_test_split.txt", "1 1\n")
    assert load_dataset(base).layout == "reference"


def test_course_dataset_loads(tmp_path):
    from fgbg.miniworld import write_course_dataset
    base = write_course_dataset(tmp_path, n_train=2, n_val=1, n_test=2, n_distractor=2, size=32)
    ds = load_dataset(base, splits="test")
    assert len(ds) == 4 and all(it.gt_path is not None for it in ds)
    assert sum(it.distractor_path is not None for it in ds) == 2
    x, placement, img = load_item(ds[0], canvas=64)
    assert img.shape == (32, 32, 3) and x.shape == (3, 64, 64)
    assert read_mask(ds[0].gt_path, img.shape).any()


# ---------------------------------------------------------------- reading pixels

def test_read_image_modes(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    assert np.array_equal(out, np.stack([grey] * 3, axis=2))

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, not composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png")[0, 0], [200, 0, 0])

    pal = Image.new("P", (3, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 1, 0, 0, 1])
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 50]

    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert read_image(tmp_path / "c.tif")[1, 1].tolist() == [255, 0, 0]


def test_read_image_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1, 128, 129, 257, 32896, 65278, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "16.png")
    with Image.open(tmp_path / "16.png") as im:
        assert im.mode.startswith("I")  # really 16 bit on disk
    out = read_image(tmp_path / "16.png")[0, :, 0]
    assert out.tolist() == [0, 0, 0, 1, 1, 128, 254, 255]
    ramp = np.linspace(0, 65535, 1000).astype(np.uint16)[None]
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    r = read_image(tmp_path / "ramp.png")[0, :, 0].astype(int)
    assert np.all(np.diff(r) >= 0) and r[0] == 0 and r[-1] == 255


def test_read_image_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="missing.png"):
        read_image(tmp_path / "missing.png")

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match="text.png"):
        read_image(tmp_path / "text.png")

    _img(tmp_path / "big.png", h=10, w=10)
    assert read_image(tmp_path / "big.png", max_pixels=100).shape == (10, 10, 3)
    with pytest.raises(ImageError, match=r"big.png.*max_pixels=99"):
        read_image(tmp_path / "big.png", max_pixels=99)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # PIL's bomb error at > 2x this
    with pytest.raises(ImageError, match="big.png"):
        read_image(tmp_path / "big.png")


def test_read_mask_binarises_at_128_and_checks_size(tmp_path):
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    save_png(tmp_path / "m.png", grey)
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, True, True]]
    save_png(tmp_path / "rgb.png", np.stack([grey] * 3, axis=2))
    assert read_mask(tmp_path / "rgb.png", shape=(1, 4, 3)).tolist() == [[False, False, True, True]]
    with pytest.raises(ImageError, match=r"m.png.*1x4.*2x4"):
        read_mask(tmp_path / "m.png", shape=(2, 4))


# ---------------------------------------------------------------- placement

def test_place_image_pads_with_minus_one(tmp_path):
    img = np.zeros((37, 23, 3), np.uint8)
    img[..., 0] = 255
    x, p = place_image(img, canvas=64)
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
    assert p == Placement(canvas=64, scale=1.0, height=37, width=23, placed_h=37, placed_w=23)
    assert torch.all(x[0, :37, :23] == 1) and torch.all(x[1:, :37, :23] == -1)
    pad = torch.ones(64, 64, dtype=torch.bool)
    pad[:37, :23] = False
    assert torch.all(x[:, pad] == -1)
    assert x.min() >= -1 and x.max() <= 1
    assert valid_region(p, 64) == (37, 23) and valid_region(p, 8) == (5, 3)


def test_place_image_shrinks_large_images_keeping_aspect():
    img = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    x, p = place_image(img, canvas=128)
    assert (p.placed_h, p.placed_w) == (128, 85) and p.scale == pytest.approx(128 / 300)
    assert torch.all(x[:, :, 85:] == -1) and not torch.all(x[:, :, 84] == -1)
    assert x.min() >= -1 and x.max() <= 1
    xr, pr = place_image(img, canvas=128, mode="resize")
    assert (pr.placed_h, pr.placed_w, pr.mode) == (128, 128, "resize") and xr.min() > -1 - 1e-6
    with pytest.raises(ValueError, match="mode"):
        place_image(img, mode="crop")


def _random_mask(shape, block=1, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.random((-(-shape[0] // block), -(-shape[1] // block))) > 0.5
    return np.kron(small, np.ones((block, block), bool))[: shape[0], : shape[1]]


@pytest.mark.parametrize("shape", [(120, 70), (70, 120), (37, 23), (64, 64)])
def test_map_back_is_exact_on_the_canvas(shape):
    mask = _random_mask(shape)
    _, p = place_image(np.zeros((*shape, 3), np.uint8), canvas=128)
    on_canvas = place_mask(mask, p)
    assert on_canvas.shape == (128, 128) and not on_canvas[shape[0]:].any()
    assert np.array_equal(on_canvas[: shape[0], : shape[1]], mask)  # pasted unresized
    back = map_back(on_canvas, p)
    assert back.dtype == bool and np.array_equal(back, mask)


@pytest.mark.parametrize("shape", [(200, 136), (136, 200), (48, 24)])
def test_map_back_from_the_latent_grid(shape):
    """Image size a multiple of 8, mask constant on 8x8 blocks: the 64 grid of a 512
    canvas holds it exactly, and maps back exactly."""
    mask = _random_mask(shape, block=8, seed=1)
    _, p = place_image(np.zeros((*shape, 3), np.uint8), canvas=512)
    grid = place_mask(mask, p, grid=64)
    assert np.array_equal(grid[: shape[0] // 8, : shape[1] // 8], mask[::8, ::8])
    assert np.array_equal(map_back(grid, p), mask)
    assert np.array_equal(map_back(torch.from_numpy(grid), p), mask)


@pytest.mark.parametrize("shape", [(1024, 768), (768, 1024)])
def test_map_back_larger_than_canvas(shape):
    """Shrunk by exactly 2: a mask constant on 2x2 blocks survives the round trip."""
    mask = _random_mask(shape, block=2, seed=2)
    _, p = place_image(np.zeros((*shape, 3), np.uint8), canvas=512)
    assert max(p.placed_h, p.placed_w) == 512 and p.scale == 0.5
    assert np.array_equal(map_back(place_mask(mask, p), p), mask)
    grid = place_mask(mask, p, grid=64)  # and a mask on 16x16 blocks through the latent grid
    mask16 = map_back(grid, p)
    assert np.array_equal(mask16, np.kron(grid[: shape[0] // 16, : shape[1] // 16], np.ones((16, 16), bool)))


@pytest.mark.parametrize("shape", [(1000, 700), (333, 517)])
@pytest.mark.parametrize("grid", [256, 32])
def test_map_back_round_trip_at_odd_scales(shape, grid):
    """Any grid mask, mapped back to an oddly shrunk original and placed again, maps
    back to the same original mask (nothing is lost or shifted on the way)."""
    _, p = place_image(np.zeros((*shape, 3), np.uint8), canvas=256)
    mask = map_back(_random_mask((grid, grid), seed=3), p)
    assert mask.shape == shape and 0.3 < mask.mean() < 0.7
    assert np.array_equal(map_back(place_mask(mask, p, grid=grid), p), mask)


def test_map_back_resize_mode_and_bilinear():
    mask = _random_mask((37, 23), seed=4)
    _, p = place_image(np.zeros((37, 23, 3), np.uint8), canvas=64, mode="resize")
    assert np.array_equal(map_back(place_mask(mask, p), p), mask)

    _, p = place_image(np.zeros((40, 24, 3), np.uint8), canvas=64)
    grid = np.full((8, 8), 99.0)  # padding cells hold 99: they must never leak in
    grid[:5, :3] = np.arange(15, dtype=float).reshape(5, 3)
    out = map_back(grid, p, order="bilinear")
    assert out.shape == (40, 24) and out.max() <= 14 and out.min() >= 0
    assert out[0, 0] == 0 and out[-1, -1] == 14
    # the grid holds 3 r + c, a linear function: bilinear interpolation reproduces it at
    # every pixel centre (i + 1/2 pixels = (i + 1/2) / 8 - 1/2 cells), clamped to valid cells
    r = np.clip((np.arange(40) + 0.5) / 8 - 0.5, 0, 4)
    c = np.clip((np.arange(24) + 0.5) / 8 - 0.5, 0, 2)
    assert np.allclose(out, 3 * r[:, None] + c[None, :])
    assert out[8, 0] == pytest.approx(3 * 0.5625)
    with pytest.raises(ValueError, match="order"):
        map_back(grid, p, order="cubic")
