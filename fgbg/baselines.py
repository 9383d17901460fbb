"""Trivial baselines that an attention map has to beat.

Both return a float map in [0, 1] of the image's size (H, W), scored with the same metrics
(AUC-ROC, or thresholded with the GMM midpoint) as the attention maps.

* :func:`centre_prior` knows nothing about the image: photographers centre their subject,
  so "the middle is the object" is already a strong guess on datasets like CUB.
* :func:`border_colour_saliency` looks at colours only: the image border is usually
  background, so pixels whose colour differs from the border's mean colour are salient.

If an attention map barely beats these, it has learned little about the object.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["centre_prior", "border_colour_saliency"]


def centre_prior(h: int, w: int) -> np.ndarray:
    """Isotropic Gaussian around the image centre, sigma = 0.25 * min(h, w).

    Value at pixel (i, j) is ``exp(-d^2 / (2 sigma^2))`` with d the distance of the pixel
    centre (i + 0.5, j + 0.5) from the image centre (h / 2, w / 2): 1 at the exact centre,
    decaying outwards.  sigma = a quarter of the short side puts the ±2 sigma region (about
    95 % of the mass in 1-D) across the short side, a rough size of a centred object; the
    ranking of pixels, and so the AUC, does not depend on sigma at all.
    """
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise ValueError(f"centre_prior: need h, w >= 1, got {h}, {w}")
    sigma = 0.25 * min(h, w)
    y = np.arange(h) + 0.5 - h / 2
    x = np.arange(w) + 0.5 - w / 2
    d2 = y[:, None] ** 2 + x[None, :] ** 2
    return np.exp(-d2 / (2 * sigma**2))


def border_colour_saliency(img) -> np.ndarray:
    """Colour distance of every pixel from the mean colour of the image border.

    1. Blur each RGB channel with a Gaussian (sigma = 1 pixel) to damp noise and JPEG
       artefacts.
    2. Mean colour of a border strip of width ``max(1, round(0.05 * min(h, w)))`` on all four
       sides (assumed to be background).
    3. Euclidean RGB distance of every pixel from that colour, divided by its maximum.
    A (numerically) constant image gives all zeros.  ``img``: (H, W, 3), uint8 or float.
    """
    a = np.asarray(img, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"border_colour_saliency: expected (H, W, 3), got shape {a.shape}")
    h, w = a.shape[:2]
    a = ndimage.gaussian_filter(a, sigma=(1, 1, 0))
    b = max(1, int(np.floor(0.05 * min(h, w) + 0.5)))
    border = np.ones((h, w), dtype=bool)
    border[b:h - b, b:w - b] = False
    mean_colour = a[border].mean(axis=0)
    dist = np.linalg.norm(a - mean_colour, axis=2)
    dmax = dist.max()
    # Blurring a constant image leaves ~1e-13 rounding noise; do not blow it up to 1.
    if dmax <= 1e-6 * max(1.0, np.abs(a).max()):
        return np.zeros((h, w), dtype=np.float64)
    return dist / dmax
