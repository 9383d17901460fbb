"""Step 2 / step 4 mask operations on tiny hand-computed arrays."""
import inspect
import json
import warnings

import numpy as np
import pytest

from fgbg.masks import (
    STEP2_RULES,
    fill_and_close,
    gmm_midpoint_threshold,
    majority3x3,
    preliminary_mask,
    refined_mask,
    upsample_mask,
)

# A 3x3 block in a 5x5 image: block corners see 4 of 9 (off), block edge-centres 6 (on),
# the centre 9 (on), every outside pixel at most 3 (off) -> a plus sign.
BLOCK = np.zeros((5, 5), bool)
BLOCK[1:4, 1:4] = True
PLUS = np.array([[0, 0, 0, 0, 0],
                 [0, 0, 1, 0, 0],
                 [0, 1, 1, 1, 0],
                 [0, 0, 1, 0, 0],
                 [0, 0, 0, 0, 0]], bool)


def test_majority_block_becomes_plus():
    np.testing.assert_array_equal(majority3x3(BLOCK), PLUS)


def test_majority_isolated_pixel_vanishes_and_hole_fills():
    m = np.zeros((7, 7), bool)
    m[5, 5] = True                     # orphan: 1 of 9
    m[0:3, 0:3] = True
    m[1, 1] = False                    # hole: 8 of 9 -> on
    out = majority3x3(m)
    assert not out[5, 5]
    assert out[1, 1]


def test_majority_zero_padding_at_border():
    # border="background": full 3x3 image: corners see 4 (off), edges 6 (on), centre 9 (on)
    np.testing.assert_array_equal(majority3x3(np.ones((3, 3), bool), border="background"), PLUS[1:4, 1:4])
    full = majority3x3(np.ones((5, 5), bool), border="background")
    expected = np.ones((5, 5), bool)
    expected[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    np.testing.assert_array_equal(full, expected)


def test_majority_keep_border_is_the_default_and_the_reference():
    # The reference (filter_orphan_pixel) writes the 3x3 mean >= 0.5 to interior cells only.
    np.testing.assert_array_equal(majority3x3(np.ones((5, 5), bool)), np.ones((5, 5), bool))
    np.testing.assert_array_equal(majority3x3(np.ones((3, 3), bool), border="keep"), np.ones((3, 3), bool))
    m = np.array([[1, 0, 0, 1],
                  [1, 1, 0, 0],
                  [0, 0, 0, 0],
                  [0, 1, 1, 0]], bool)
    # interior counts (input values, border ones included): (1,1) 3, (1,2) 2, (2,1) 4, (2,2) 3
    keep = m.copy()
    keep[1:3, 1:3] = False
    np.testing.assert_array_equal(majority3x3(m), keep)
    np.testing.assert_array_equal(majority3x3(m, border="keep"), keep)
    # zero padding: border counts (0,0) 3, (0,3) 1, (1,0) 3, (3,1) 2, (3,2) 2 -> all off
    np.testing.assert_array_equal(majority3x3(m, border="background"), np.zeros((4, 4), bool))
    # interior cells count the border's *input* values: (1,1) sees 5 -> on under both rules
    m2 = np.zeros((4, 4), bool)
    m2[0, 0:3] = m2[1, 0] = m2[2, 0] = True
    for border in ("keep", "background"):
        assert majority3x3(m2, border=border)[1, 1]
    np.testing.assert_array_equal(majority3x3(m2)[0], m2[0])
    with pytest.raises(ValueError, match="border"):
        majority3x3(m, border="zero")


def test_majority_batch_is_per_image():
    other = np.zeros((5, 5), bool)
    other[:, 0] = True                 # column at the left edge: all pixels see <= 3
    batch = np.stack([BLOCK, other, np.ones((5, 5), bool)])[None]   # (1, 3, 5, 5)
    for border in ("keep", "background"):
        out = majority3x3(batch, border=border)
        assert out.shape == batch.shape
        for k in range(3):
            np.testing.assert_array_equal(out[0, k], majority3x3(batch[0, k], border=border))
    assert not majority3x3(batch, border="background")[0, 1].any()
    np.testing.assert_array_equal(majority3x3(batch, border="keep")[0, 1], other)  # a border column keeps


def test_gmm_midpoint_two_clusters():
    rng = np.random.default_rng(0)
    v = np.concatenate([0.1 + 1e-3 * rng.standard_normal(200), 0.9 + 1e-3 * rng.standard_normal(200)])
    assert gmm_midpoint_threshold(v) == pytest.approx(0.5, abs=1e-3)


def test_gmm_midpoint_unequal_clusters_is_midpoint_of_means():
    rng = np.random.default_rng(1)
    # 900 tight values at 0.2, 100 wide ones at 0.7: the overall mean is 0.25, the GMM
    # equal-density boundary lies near 0.35; the midpoint of the means is 0.45.
    v = np.concatenate([0.2 + 0.02 * rng.standard_normal(900), 0.7 + 0.05 * rng.standard_normal(100)])
    assert gmm_midpoint_threshold(v.reshape(20, 50)) == pytest.approx(0.45, abs=0.01)


def test_gmm_degenerate_inputs_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gmm_midpoint_threshold(np.full((4, 4), 0.3)) == 0.3
        m = np.full((6, 6), 0.3)
        assert not preliminary_mask(m).any()
        assert not preliminary_mask(m, border="background").any()
        assert gmm_midpoint_threshold([0.0, 0.0, 0.0, 1.0]) == pytest.approx(0.5, abs=1e-6)


def test_gmm_rejects_empty():
    with pytest.raises(ValueError):
        gmm_midpoint_threshold(np.array([]))


def _map_with_padding(pad_value):
    a = np.full((5, 6), 0.1)
    a[1:4, 1:4] = 0.9
    a[:, 4:] = pad_value
    valid = np.zeros((5, 6), bool)
    valid[:, :4] = True
    return a, valid


def test_preliminary_mask_plain():
    a = np.where(BLOCK, 0.9, 0.1)
    np.testing.assert_array_equal(preliminary_mask(a), PLUS)


def _gmm_midpoint_by_sklearn(values):
    from sklearn.mixture import GaussianMixture
    gmm = GaussianMixture(n_components=2, random_state=0).fit(np.asarray(values, np.float64).reshape(-1, 1))
    return float(gmm.means_.mean())


def test_preliminary_mask_fgbg_rules_padding_excluded_from_fit():
    a, valid = _map_with_padding(-5.0)
    expected = np.zeros((5, 6), bool)
    expected[:, :5] = PLUS
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid, gmm_cells="image", border="background"),
                                  expected)
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid, **STEP2_RULES["fgbg"]), expected)


def test_preliminary_mask_gmm_on_all_cells_vs_image_cells():
    a, valid = _map_with_padding(-5.0)
    t_all, t_img = _gmm_midpoint_by_sklearn(a), _gmm_midpoint_by_sklearn(a[valid])
    assert -5.0 < t_all < 0.1 and t_img == pytest.approx(0.5)   # the thresholds differ
    # "all" (the reference, the default): every image cell is above t_all, every padding cell
    # below. Keep border: the grid's border cells keep that; interior column 3 (the image's last)
    # sees 6 of 9 (on), interior column 4 (padding) sees 3 (off): M_pre = the valid region.
    for kw in ({}, {"gmm_cells": "all"}, {"gmm_cells": "all", "border": "keep"}, STEP2_RULES["reference"]):
        np.testing.assert_array_equal(preliminary_mask(a, valid=valid, **kw), valid)
    # "all" with zero padding outside the grid: the image's corners on the grid border see
    # 4 of 9, (0, 3) and (4, 3) see 4 of 9 (padding column 4 is background): off
    expected = valid.copy()
    expected[[0, 0, 4, 4], [0, 3, 0, 3]] = False
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid, gmm_cells="all", border="background"),
                                  expected)
    # "image" with the reference's border: threshold 0.5, the block -> the plus sign
    expected = np.zeros((5, 6), bool)
    expected[:, :5] = PLUS
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid, gmm_cells="image", border="keep"), expected)
    # without valid, the rules' GMMs agree (all cells are the image)
    np.testing.assert_array_equal(preliminary_mask(a, gmm_cells="image"), preliminary_mask(a, gmm_cells="all"))


def test_preliminary_mask_padding_cells_vote_under_the_reference_rule():
    a, valid = _map_with_padding(0.9)   # high padding: threshold 0.5 for both GMM rules
    # fgbg: padding is background before and after the vote
    expected = np.zeros((5, 6), bool)
    expected[:, :5] = PLUS
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid, **STEP2_RULES["fgbg"]), expected)
    # reference: padding cells are foreground, vote for the image's column 3 and are kept
    # (thresholded: the block plus columns 4-5; interior counts worked out by hand)
    expected = np.array([[0, 0, 0, 0, 1, 1],
                         [0, 0, 1, 1, 1, 1],
                         [0, 1, 1, 1, 1, 1],
                         [0, 0, 1, 1, 1, 1],
                         [0, 0, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid), expected)
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid, **STEP2_RULES["reference"]), expected)


def test_step2_defaults_are_the_reference():
    assert STEP2_RULES["reference"] == {"gmm_cells": "all", "border": "keep"}
    assert STEP2_RULES["fgbg"] == {"gmm_cells": "image", "border": "background"}
    from fgbg import masks, params
    for f in (masks.preliminary_mask, masks.preliminary_masks):
        sig = inspect.signature(f).parameters
        assert {k: sig[k].default for k in ("gmm_cells", "border")} == STEP2_RULES["reference"], f
    assert inspect.signature(majority3x3).parameters["border"].default == "keep"
    assert inspect.signature(refined_mask).parameters["border"].default == "keep"
    assert params.defaults()["step2_rules"] == "reference"
    assert params.check({"step2_rules": "fgbg"})["step2_rules"] == "fgbg"
    with pytest.raises(params.ParameterError, match=r"'step2_rules' must be one of reference, fgbg"):
        params.check({"step2_rules": "paper"})
    with pytest.raises(ValueError, match="gmm_cells"):
        preliminary_mask(np.zeros((4, 4)), gmm_cells="valid")


def test_preliminary_masks_record_the_rules_and_never_reuse_other_rules(tiny_pipe, mini_dataset, tmp_path):
    from fgbg import attention, masks
    from fgbg.data import load_dataset, map_back, read_mask
    from fgbg.runs import RunConfigError
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    attention.save_attention_maps(tiny_pipe, ds, out, rev_diff_steps=2, num_inference_steps=50, seed=0,
                                  progress=False)
    assert len(masks.preliminary_masks(ds, out, progress=False).done) == len(ds)
    config = json.loads((masks.prelim_dir(out) / "run_config.json").read_text())
    assert {config["gmm_cells"], config["border"]} == {"all", "keep"}
    with pytest.raises(RunConfigError, match="border: 'keep' then, 'background' now"):
        masks.preliminary_masks(ds, out, progress=False, **STEP2_RULES["fgbg"])
    assert len(masks.preliminary_masks(ds, out, progress=False, overwrite=True, **STEP2_RULES["fgbg"]).done) == len(ds)
    for it in ds:
        amap, pl = attention.load_attention(out, it)
        expected = map_back(preliminary_mask(amap, np.ones(amap.shape, bool), **STEP2_RULES["fgbg"]), pl, "nearest")
        np.testing.assert_array_equal(read_mask(masks.prelim_mask_path(out, it)), expected)


def test_refined_mask_hand_case():
    diff = np.where(BLOCK, 5.0, 0.5)          # majority of (diff > t) = PLUS
    m_pre_up = np.zeros((5, 5), bool)
    m_pre_up[:, :3] = True
    expected = PLUS.copy()
    expected[2, 3] = False
    np.testing.assert_array_equal(refined_mask(m_pre_up, diff), expected)


def test_refined_mask_border_rule_of_d():
    # D high on the whole left column: the reference's filter keeps the border column,
    # zero padding removes it (each of its cells sees at most 3 of 9)
    diff = np.zeros((4, 4))
    diff[:, 0] = 1.0
    m_pre_up = np.ones((4, 4), bool)
    expected = np.zeros((4, 4), bool)
    expected[:, 0] = True
    np.testing.assert_array_equal(refined_mask(m_pre_up, diff), expected)
    np.testing.assert_array_equal(refined_mask(m_pre_up, diff, border="keep"), expected)
    assert not refined_mask(m_pre_up, diff, border="background").any()


def test_refined_mask_subset_of_m_pre_random():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((16, 16)) > 0.5
        d = rng.random((16, 16))
        r = refined_mask(m, d)
        assert r.dtype == bool and not (r & ~m).any()


def test_refined_mask_shape_mismatch():
    with pytest.raises(ValueError):
        refined_mask(np.ones((4, 4), bool), np.ones((4, 5)))


def test_upsample_exact_blocks():
    m = np.array([[1, 0], [0, 1]], bool)
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(upsample_mask(m, (4, 4)), expected)
    np.testing.assert_array_equal(upsample_mask(m[None], (4, 4))[0], expected)


def test_upsample_non_multiple_uses_pixel_centres():
    # 2 -> 3: centres at 1/3, 1, 5/3 grid cells -> cells 0, 1, 1
    m = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(upsample_mask(m, (3, 3)), [[1, 2, 2], [3, 4, 4], [3, 4, 4]])


def test_fill_and_close():
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False                     # 3x3 hole
    assert fill_and_close(ring, closing=False)[1:6, 1:6].all()
    gap = np.zeros((5, 7), bool)
    gap[1:4, 0:3] = True
    gap[1:4, 4:7] = True                       # one-pixel gap in column 3
    closed = fill_and_close(gap, fill_holes=False)
    assert closed[1:4, :].all() and not closed[0].any() and not closed[4].any()
    # foreground touching the border survives the closing
    np.testing.assert_array_equal(fill_and_close(np.ones((4, 4), bool)), np.ones((4, 4), bool))
    np.testing.assert_array_equal(fill_and_close(ring, closing=False, fill_holes=False), ring)
