"""Step 2 / step 4 mask operations on tiny hand-computed arrays."""
import warnings

import numpy as np
import pytest

from fgbg.masks import (
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
    # full 3x3 image: corners see 4 (off), edges 6 (on), centre 9 (on)
    np.testing.assert_array_equal(majority3x3(np.ones((3, 3), bool)), PLUS[1:4, 1:4])
    full = majority3x3(np.ones((5, 5), bool))
    expected = np.ones((5, 5), bool)
    expected[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    np.testing.assert_array_equal(full, expected)


def test_majority_batch_is_per_image():
    other = np.zeros((5, 5), bool)
    other[:, 0] = True                 # column at the left edge: all pixels see <= 3
    batch = np.stack([BLOCK, other, np.ones((5, 5), bool)])[None]   # (1, 3, 5, 5)
    out = majority3x3(batch)
    assert out.shape == batch.shape
    for k in range(3):
        np.testing.assert_array_equal(out[0, k], majority3x3(batch[0, k]))
    assert not out[0, 1].any()


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


def test_preliminary_mask_padding_excluded_from_fit():
    a, valid = _map_with_padding(-5.0)
    expected = np.zeros((5, 6), bool)
    expected[:, :5] = PLUS
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid), expected)
    # fitting on everything would put the threshold between -5 and 0.1: all valid cells on
    assert preliminary_mask(a)[:, :4].sum() > 12


def test_preliminary_mask_padding_set_false_before_vote():
    a, valid = _map_with_padding(0.9)   # high padding must neither appear nor vote
    expected = np.zeros((5, 6), bool)
    expected[:, :5] = PLUS
    np.testing.assert_array_equal(preliminary_mask(a, valid=valid), expected)


def test_refined_mask_hand_case():
    diff = np.where(BLOCK, 5.0, 0.5)          # majority of (diff > t) = PLUS
    m_pre_up = np.zeros((5, 5), bool)
    m_pre_up[:, :3] = True
    expected = PLUS.copy()
    expected[2, 3] = False
    np.testing.assert_array_equal(refined_mask(m_pre_up, diff), expected)


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
