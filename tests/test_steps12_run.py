"""Steps 1-2 over a dataset: outputs, resume, and bad input that must not stop the run."""
import json

import numpy as np
import pytest
from PIL import Image

from fgbg import attention, evaluate, masks
from fgbg.data import load_dataset, read_mask


def _run(pipe, ds, out, **kw):
    return attention.save_attention_maps(pipe, ds, out, rev_diff_steps=3, num_inference_steps=50, seed=0,
                                         progress=False, **kw)


def test_outputs_mirror_the_dataset_and_rerun_skips(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["train", "test"])
    out = tmp_path / "out"
    rep = _run(tiny_pipe, ds, out)
    assert len(rep.done) == len(ds) and not rep.skipped
    for it in ds:
        amap, pl = attention.load_attention(out, it)
        assert amap.shape == (16, 16) and (pl.height, pl.width) == (64, 64)
        assert attention.attention_path(out, it).relative_to(out / "attention").with_suffix("").as_posix() == it.key
    before = {it.key: attention.attention_path(out, it).stat().st_mtime_ns for it in ds}
    rep2 = _run(tiny_pipe, ds, out)
    assert rep2.done == [] and len(rep2.reused) == len(ds)
    assert before == {it.key: attention.attention_path(out, it).stat().st_mtime_ns for it in ds}
    rep3 = masks.preliminary_masks(ds, out, progress=False)
    assert len(rep3.done) == len(ds)
    m = np.array(Image.open(masks.prelim_mask_path(out, ds.items[0])))
    assert m.shape == (64, 64) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}


def test_outputs_of_another_model_or_setting_are_not_reused(tiny_pipe, mini_dataset, tmp_path):
    import copy

    import torch

    from fgbg.runs import RunConfigError
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _run(tiny_pipe, ds, out)
    with pytest.raises(RunConfigError, match=r"seed: 0 then, 1 now"):
        attention.save_attention_maps(tiny_pipe, ds, out, rev_diff_steps=3, seed=1, progress=False)
    other = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        next(other.unet.parameters()).add_(0.01)
    with pytest.raises(RunConfigError, match="model:"):
        _run(other, ds, out)
    # the same model again is fine (and reuses); overwrite=True recomputes with the new one
    assert len(_run(tiny_pipe, ds, out).reused) == len(ds)
    assert len(_run(other, ds, out, overwrite=True).done) == len(ds)
    assert len(_run(other, ds, out).reused) == len(ds)


def test_masks_of_an_earlier_step1_are_not_reused(tiny_pipe, mini_dataset, tmp_path):
    from fgbg.runs import RunConfigError
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _run(tiny_pipe, ds, out)
    assert len(masks.preliminary_masks(ds, out, progress=False).done) == len(ds)
    assert len(masks.preliminary_masks(ds, out, progress=False).reused) == len(ds)
    # step 1 redone with another seed: the old M_pre no longer belong to these maps
    attention.save_attention_maps(tiny_pipe, ds, out, rev_diff_steps=3, seed=1, overwrite=True, progress=False)
    with pytest.raises(RunConfigError, match="step1"):
        masks.preliminary_masks(ds, out, progress=False)
    assert len(masks.preliminary_masks(ds, out, overwrite=True, progress=False).done) == len(ds)


def test_same_seed_same_maps_whatever_the_order(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    _run(tiny_pipe, ds, tmp_path / "a")
    ds.items.reverse()
    _run(tiny_pipe, ds, tmp_path / "b")
    for it in ds:
        a = attention.load_attention(tmp_path / "a", it)[0]
        b = attention.load_attention(tmp_path / "b", it)[0]
        np.testing.assert_array_equal(a, b)


def test_bad_images_are_reported_and_skipped(tiny_pipe, mini_dataset, tmp_path):
    base = mini_dataset
    lines = (base / "images.txt").read_text().splitlines()
    # a truncated file, a missing file, a grayscale 16-bit image, an RGBA image, a malformed line
    trunc = base / "images/test/test_0000.png"
    trunc.write_bytes(trunc.read_bytes()[:200])
    (base / "images/test/test_0001.png").unlink()
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(base / "images/test/g16.png")
    Image.fromarray(np.zeros((30, 70, 4), np.uint8)).save(base / "images/test/rgba.png")
    lines += ["images/test/g16.png 0", "images/test/rgba.png 0", "this line is wrong"]
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset(base, splits=["test"])
    assert ds.skipped and "line" in ds.skipped[0][0] and "images.txt" in ds.skipped[0][0]
    out = tmp_path / "out"
    rep = _run(tiny_pipe, ds, out)
    bad = dict(rep.skipped)
    assert set(bad) == {"images/test/test_0000.png", "images/test/test_0001.png"}
    assert all("test_000" in why for why in bad.values())  # the message names the file
    assert "images/test/g16" in rep.done and "images/test/rgba" in rep.done
    assert (out / "skipped.txt").read_text().count("\n") == 2
    _, pl = attention.load_attention(out, ds.items[[i.key for i in ds.items].index("images/test/g16")])
    assert (pl.height, pl.width) == (48, 64)  # a non-square image keeps its own grid
    masks.preliminary_masks(ds, out, progress=False)
    m = read_mask(masks.prelim_mask_path(out, [i for i in ds.items if i.key == "images/test/rgba"][0]))
    assert m.shape == (30, 70)


def test_wrong_size_ground_truth_is_skipped_in_evaluation(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _run(tiny_pipe, ds, out)
    masks.preliminary_masks(ds, out, progress=False)
    victim = ds.items[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(victim.gt_path)
    m, skipped = evaluate.evaluate_steps12(ds.items, out)
    assert [s[0] for s in skipped] == [victim.rel] and "10" in skipped[0][1]
    assert m["n_images"] == len(ds) - 1
    assert 0 <= m["step1_auc"] <= 1 and set(m["prelim"]) == {"acc", "iou", "miou", "dice"}
    assert "bird_vs_distractor_auc" in m  # the distractor images are in the test split


def test_metrics_json_schema(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _run(tiny_pipe, ds, out)
    test = evaluate.split_subsets(ds)["test"]
    _run(tiny_pipe, test, out, subdir="attention_untrained")
    masks.preliminary_masks(ds, out, progress=False)
    sub = evaluate.split_subsets(ds)
    t, _ = evaluate.evaluate_steps12(sub["test"], out)
    d, _ = evaluate.evaluate_steps12(sub["distractor"], out)
    sources = [out / "attention", out / "attention_untrained", masks.prelim_dir(out)]
    evaluate.update_metrics(out, {**t, "distractor": d}, items=ds.items, sources=sources)
    m = json.loads((out / "metrics.json").read_text())
    for key in ("step1_auc", "prelim", "baselines", "controls", "distractor"):
        assert key in m
    assert set(m["baselines"]) == {"centre", "saliency"} and set(m["baselines"]["centre"]) >= {"auc", "iou"}
    assert set(m["controls"]) == {"untrained", "photo_token"}
    assert "bird_vs_distractor_auc" in m["distractor"] and "bird_vs_distractor_auc" not in m
    evaluate.update_metrics(out, {"prelim": {"extra": 1}}, items=ds.items, sources=sources)  # merging keeps the rest
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["prelim"]["extra"] == 1 and m2["prelim"]["iou"] == m["prelim"]["iou"]
    assert m2["run"]["test_images"]["n"] == len(ds) and set(m2["made_from"]["step1_auc"]) == {
        "attention", "attention_untrained", "masks/prelim"}


def test_unknown_word_and_extractor_are_clear_errors(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    with pytest.raises(ValueError, match="'cat' is not in the prompt"):
        _run(tiny_pipe, ds, tmp_path, object_word="cat")
    with pytest.raises(ValueError, match="extractor"):
        _run(tiny_pipe, ds, tmp_path, extractor="mean_of_everything")
