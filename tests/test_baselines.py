"""Trivial baselines: centre prior and border-colour saliency."""
import numpy as np
import pytest

from fgbg.baselines import border_colour_saliency, centre_prior


def test_centre_prior():
    p = centre_prior(4, 4)                 # sigma = 1
    assert p.shape == (4, 4)
    assert p[1, 1] == pytest.approx(np.exp(-0.25))   # centre (1.5, 1.5) is 0.5^2*2 from (2, 2)
    assert p[0, 0] == pytest.approx(np.exp(-2.25))
    q = centre_prior(9, 15)
    assert q.shape == (9, 15) and q.min() >= 0 and q.max() <= 1
    assert q[4, 7] == pytest.approx(1.0) and q[4, 7] > q[0, 0]
    np.testing.assert_allclose(q, q[::-1, ::-1])


def test_border_saliency_red_square():
    img = np.full((20, 20, 3), 128, np.uint8)
    img[7:13, 7:13] = (255, 0, 0)
    s = border_colour_saliency(img)
    assert s.shape == (20, 20) and s.dtype == np.float64
    assert s.min() >= 0 and s.max() == pytest.approx(1.0)
    assert s[9:11, 9:11].min() == pytest.approx(1.0)
    assert s[0, 0] < 1e-6 and s[:3].max() < 1e-6


def test_border_saliency_constant_image_is_zero():
    s = border_colour_saliency(np.full((10, 12, 3), 77, np.uint8))
    assert s.shape == (10, 12) and not s.any()
    with pytest.raises(ValueError):
        border_colour_saliency(np.zeros((10, 12), np.uint8))
