"""Step 5: the segmentation U-Net, its training, prediction, evaluation and files."""
import numpy as np
import pytest
import torch

from fgbg.data import Item, read_image, read_mask
from fgbg.evaluate import PAPER_TABLE2, table2
from fgbg.io import save_png
from fgbg.segmenter import (UNet, channels_for_width, evaluate_masks, load_segmenter, predict, predict_items,
                            save_segmenter, train_segmenter)

SMALL = (8, 16, 32)  # a U-Net small enough to train in seconds on one CPU thread


def _write(tmp, name, img, gt=None, split=1, line=1):
    """An Item whose image (and ground truth) are written as PNGs under tmp."""
    img_path = tmp / "images" / f"{name}.png"
    save_png(img_path, img)
    gt_path = None
    if gt is not None:
        gt_path = tmp / "segmentations" / f"{name}.png"
        save_png(gt_path, gt.astype(np.uint8) * 255)
    return Item(f"images/{name}.png", split, img_path, gt_path, line)


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """8 images 32x32: dark noise with one bright square of side 8-15, masks exact."""
    tmp = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        img = rng.integers(0, 90, (32, 32, 3)).astype(np.uint8)
        m = np.zeros((32, 32), bool)
        s = rng.integers(8, 16)
        r, c = rng.integers(0, 32 - s, 2)
        m[r:r + s, c:c + s] = True
        img[m] = rng.integers(170, 256, (m.sum(), 3))
        items.append(_write(tmp, f"sq{i}", img, m, line=i + 1))
    return items


def gt_masks(item):
    return read_mask(item.gt_path)


@pytest.fixture(scope="module")
def trained(squares):
    return train_segmenter(squares, gt_masks, size=32, iterations=60, batch_size=8, channels=SMALL,
                           progress=False)


def unet_iou(model, items):
    return evaluate_masks(lambda it: predict(model, read_image(it.image_path), size=32)[1], items)["iou"]


# ----------------------------------------------------------------------------- UNet
@pytest.mark.parametrize("hw", [(8, 8), (16, 24), (32, 40)])
def test_unet_output_shape(hw):
    net = UNet(SMALL)
    assert net(torch.zeros(2, 3, *hw)).shape == (2, 1, *hw)


def test_channels_for_width():
    assert channels_for_width(8) == (8, 16, 32, 64)
    assert channels_for_width(32, levels=5) == (32, 64, 128, 256, 512)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="seg_width"):
            channels_for_width(bad)


def test_unet_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(SMALL)(torch.zeros(1, 3, 10, 12))


# ----------------------------------------------------------------------------- training
def test_training_learns_the_squares(squares, trained):
    model, losses = trained
    assert isinstance(model, UNet) and not model.training
    assert len(losses) == 60 and model.skipped == []
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    untrained, _ = train_segmenter(squares, gt_masks, size=32, iterations=0, channels=SMALL, progress=False)
    assert unet_iou(untrained, squares) < 0.5  # control: the learning, not the architecture, does it
    assert unet_iou(model, squares) > 0.8


def test_training_is_deterministic(squares):
    kw = dict(size=32, iterations=3, batch_size=4, channels=(4, 8), progress=False)
    _, a = train_segmenter(squares, gt_masks, seed=1, **kw)
    _, b = train_segmenter(squares, gt_masks, seed=1, **kw)
    _, c = train_segmenter(squares, gt_masks, seed=2, **kw)
    assert a == b
    assert a != c


def test_bad_items_are_skipped_with_a_message(squares, tmp_path, capsys):
    missing = Item("images/gone.png", 1, tmp_path / "images" / "gone.png", None, 9)
    wrong = _write(tmp_path, "wrong", np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8), bool))
    model, _ = train_segmenter(squares[:2] + [missing, wrong], gt_masks, size=32, iterations=1,
                               batch_size=2, channels=(4, 8), progress=False)
    out = capsys.readouterr().out
    assert "gone.png" in out and "file not found" in out
    assert "wrong.png" in out
    assert [rel for rel, _ in model.skipped] == ["images/gone.png", "images/wrong.png"]


# ----------------------------------------------------------------------------- prediction
def test_predict_maps_back_to_the_original_size(trained):
    model, _ = trained
    img = np.random.default_rng(1).integers(0, 256, (24, 40, 3)).astype(np.uint8)
    prob, mask = predict(model, img, size=32)
    assert prob.shape == mask.shape == (24, 40)
    assert mask.dtype == bool and prob.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1
    np.testing.assert_array_equal(mask, prob > 0.5)


def test_predict_items_matches_predict_and_skips_unreadable(trained, squares, tmp_path, capsys):
    model, _ = trained
    missing = Item("images/gone.png", 0, tmp_path / "gone.png", None, 9)
    out = predict_items(model, squares[:3] + [missing], size=32, batch_size=2)
    assert "gone.png" in capsys.readouterr().out
    assert list(out) == [it.key for it in squares[:3]]
    for it in squares[:3]:
        np.testing.assert_array_equal(out[it.key], predict(model, read_image(it.image_path), size=32)[1])


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_masks_pooled_by_hand(tmp_path):
    z = lambda h, w: np.zeros((h, w, 3), np.uint8)  # noqa: E731
    b = lambda rows: np.array(rows, bool)  # noqa: E731
    # image a: tp 1, fp 1, fn 0, tn 2 (IoU 1/2); image b: tp 0, fp 0, fn 2, tn 4 (IoU 0);
    # image c: both empty, tn 4 (IoU nan: not in the per-image statistics); d: no gt, ignored
    gts = {"a": b([[1, 0], [0, 0]]), "b": b([[0, 1, 1], [0, 0, 0]]), "c": b([[0, 0], [0, 0]])}
    preds = {"a": b([[1, 1], [0, 0]]), "b": b([[0, 0, 0], [0, 0, 0]]), "c": b([[0, 0], [0, 0]]),
             "d": b([[1, 1], [1, 1]])}
    items = [_write(tmp_path, k, z(*g.shape), g) for k, g in gts.items()] + [_write(tmp_path, "d", z(2, 2))]
    m = evaluate_masks(lambda it: preds[it.key.split("/")[-1]], items)
    # pooled: tp 1, fp 1, fn 2, tn 10 over 14 pixels
    assert m["acc"] == round(11 / 14, 4)
    assert m["iou"] == 0.25
    assert m["miou"] == round((1 / 4 + 10 / 13) / 2, 4)
    assert m["dice"] == 0.4
    assert m["per_image_iou"] == {"mean": 0.25, "median": 0.25, "p10": 0.05, "p90": 0.45}
    assert m["n_images"] == 3 and m["skipped"] == []


def test_evaluate_masks_skips_wrong_sized_prediction(tmp_path, capsys):
    item = _write(tmp_path, "x", np.zeros((2, 2, 3), np.uint8), np.ones((2, 2), bool))
    m = evaluate_masks(lambda it: np.ones((3, 3), bool), [item])
    assert m["n_images"] == 0 and len(m["skipped"]) == 1
    assert "images/x.png" in capsys.readouterr().out


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(trained, squares, tmp_path):
    model, _ = trained
    path = save_segmenter(model, tmp_path / "seg" / "unet.safetensors", meta={"size": 32})
    assert path.is_file() and path.with_suffix(".json").is_file()
    loaded = load_segmenter(path)
    assert loaded.channels == SMALL and loaded.meta == {"size": 32}
    for it in squares[:3]:
        img = read_image(it.image_path)
        np.testing.assert_array_equal(predict(loaded, img, 32)[0], predict(model, img, 32)[0])


# ----------------------------------------------------------------------------- Table 2
def test_table2_has_paper_and_run_numbers_in_order():
    rows = {"unet_refined": {"acc": 0.9523, "iou": 0.7512, "miou": 0.8481, "dice": 0.858},
            "prelim": {"acc": 0.8, "iou": 0.3, "miou": 0.55, "dice": 0.4615}}
    text = table2(rows)
    lines = text.splitlines()
    pre = next(line for line in lines if "preliminary masks M_pre" in line)
    ref = next(line for line in lines if line.startswith("U-Net trained on M "))
    assert lines.index(pre) < lines.index(ref)
    assert pre.split()[-7:] == ["80.0", "30.0", "55.0", "46.2", "83.5", "29.0", "55.7"]
    assert ref.split()[-7:] == ["95.2", "75.1", "84.8", "85.8", "95.2", "75.1", "84.8"]
    assert "M_crop" not in text and "D'" not in text  # only the rows given
    assert PAPER_TABLE2["unet_refined_dprime"] == (95.6, 77.2, 86.0)
