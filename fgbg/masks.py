"""Step 2 (and the mask algebra of step 4): from a soft map to a binary mask.

A cross-attention map (step 1) or an inpainting difference image (step 4) is a *soft* score:
high where the object is, low elsewhere.  To turn it into a foreground mask the paper uses
two hyperparameter-free operations:

1. **GMM midpoint threshold.**  Fit a 2-component Gaussian mixture to the map's values (one
   component for "background" scores, one for "foreground" scores) and cut at the midpoint
   of the two component means.  Note: this is *not* the GMM decision boundary (where the two
   weighted densities are equal) and not Otsu's threshold; it only looks at the means, so
   a tight, large background cluster does not pull the threshold towards itself.
2. **3x3 majority vote** ("orphan filter").  A pixel is foreground iff at least 5 of the 9
   pixels of its 3x3 neighbourhood (itself included) are foreground.  Isolated pixels vanish,
   one-pixel holes are filled.

    M_pre = majority3x3(map > gmm_midpoint_threshold(map))                (step 2)
    M     = upsample(M_pre) AND majority3x3(D > gmm_midpoint_threshold(D)) (step 4)

Two details the paper leaves open have named options; the defaults are the reference code's
(``src/foreground_masks.py``, ``GMMMaskSuggestor``):

* ``border`` of :func:`majority3x3`: the reference writes the 3x3 vote to the *interior*
  cells only, so the cells on the grid's border keep their thresholded value (``"keep"``,
  default).  ``"background"``: outside the grid counts as background (zero padding), so
  border cells see at most 6 (corners 4) foreground cells (fgbg's rule until 2026-11-30).
  The reference uses the same filter for step 4's D, so :func:`refined_mask` has the same
  option and default.
* ``gmm_cells`` of :func:`preliminary_mask`: step 1 pastes the image into the top-left of a
  square canvas, so a non-square image leaves padding cells on the latent grid.  ``"all"``
  (default, the reference): the GMM is fitted on every cell of the map, padding included,
  and the padding cells are thresholded and voted like any other cell: they vote for their
  image neighbours and are not masked out afterwards.  ``"image"``: the GMM is fitted on the
  image's cells only and padding cells are background before and after the vote (fgbg's
  rule until 2026-11-30).  Either way the saved M_pre is ``fgbg.data.map_back`` of the
  latent mask, which never reads a padding cell, so only the image's cells reach the PNG
  and steps 3-5.

``STEP2_RULES`` names the two combinations: ``"reference"`` (all, keep) and ``"fgbg"``
(image, background); the course parameter ``step2_rules`` picks one.

Everything here is plain numpy/scipy and works on arrays of any size; functions that say so
also accept batches shaped (..., H, W) and treat each image on its own.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

__all__ = [
    "gmm_midpoint_threshold",
    "majority3x3",
    "preliminary_mask",
    "refined_mask",
    "fill_and_close",
    "upsample_mask",
    "BORDERS",
    "GMM_CELLS",
    "STEP2_RULES",
]

BORDERS = ("keep", "background")
"""Border rules of :func:`majority3x3`: "keep" (the reference), "background" (zero padding)."""
GMM_CELLS = ("all", "image")
"""Cells the GMM of :func:`preliminary_mask` is fitted on: "all" (the reference), "image"."""
STEP2_RULES = {
    "reference": {"gmm_cells": "all", "border": "keep"},
    "fgbg": {"gmm_cells": "image", "border": "background"},
}
"""The course parameter ``step2_rules``: the keyword arguments of step 2 each name stands for."""


def _check_option(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")


def gmm_midpoint_threshold(values, seed: int = 0) -> float:
    """Threshold half-way between the means of a 2-component Gaussian mixture.

    ``values`` is any array (it is flattened).  A ``sklearn.mixture.GaussianMixture`` with
    ``n_components=2, random_state=seed`` is fitted to the values as float64, and
    ``(mu_0 + mu_1) / 2`` is returned; ``values > threshold`` is then the foreground.

    Degenerate input: when all values are equal there is nothing to separate, and that value
    itself is returned, so ``values > threshold`` is an empty mask.  (sklearn would otherwise
    warn that it found fewer distinct clusters than components.)  sklearn's
    ``ConvergenceWarning`` is silenced in all cases: the midpoint is still usable.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("gmm_midpoint_threshold: empty input")
    if not np.all(np.isfinite(x)):
        raise ValueError("gmm_midpoint_threshold: input contains NaN or inf")
    lo, hi = x.min(), x.max()
    if lo == hi:  # fewer than 2 distinct values
        return float(lo)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm = GaussianMixture(n_components=2, random_state=seed).fit(x.reshape(-1, 1))
    return float(gmm.means_.ravel().mean())


def majority3x3(mask, border: str = "keep") -> np.ndarray:
    """3x3 majority vote: foreground iff >= 5 of the 9 pixels around (and at) it are.

    ``border`` says what happens on the grid's outermost rows and columns:

    * ``"keep"`` (default, the reference's ``filter_orphan_pixel``): the vote is written to
      the interior cells only; border cells keep their input value.  Interior cells count
      their border neighbours' *input* values.
    * ``"background"``: outside the grid counts as background (zero padding), so e.g. the
      corner pixels of a fully foreground image see only 4 foreground pixels and switch off.

    Works on (H, W) and on batches (..., H, W), each image separately (the 3x3 window never
    crosses images; the border is that of the last two axes).  Returns bool.
    """
    _check_option("majority3x3: border", border, BORDERS)
    m = np.asarray(mask)
    if m.ndim < 2:
        raise ValueError(f"majority3x3: expected (..., H, W), got shape {m.shape}")
    b = m.astype(bool)
    weights = np.ones((1,) * (m.ndim - 2) + (3, 3), dtype=np.int32)
    out = ndimage.correlate(b.astype(np.int32), weights, mode="constant", cval=0) >= 5
    if border == "keep":
        for edge in (np.s_[..., 0, :], np.s_[..., -1, :], np.s_[..., :, 0], np.s_[..., :, -1]):
            out[edge] = b[edge]
    return out


def preliminary_mask(attn_map, valid=None, seed: int = 0, gmm_cells: str = "all",
                     border: str = "keep") -> np.ndarray:
    """Step 2: M_pre = majority3x3(map > gmm_midpoint_threshold(map)) for one (H, W) map.

    ``valid`` (optional, bool, same shape) marks the cells that hold image content; the rest
    is canvas padding (step 1 pastes the image into the top-left of a square canvas).

    * ``gmm_cells="all"`` (default, the reference): the GMM is fitted on every cell, padding
      included; padding cells are thresholded, take part in the vote and are returned as
      they come out of it (not masked out), as in the reference.  ``valid`` is then only
      checked for its shape.
    * ``gmm_cells="image"``: the GMM is fitted on valid cells only; invalid cells are
      background before the vote (so they cannot vote for their neighbours) and after it.
      A map with no valid cell gives an empty mask.

    ``border`` is :func:`majority3x3`'s rule for the grid's border (the canvas's edge, not
    the image's edge against padding); default the reference's "keep".  Without ``valid``
    both ``gmm_cells`` rules are the same.  (The saved M_pre of :func:`preliminary_masks`
    is mapped back to the image's pixels, which never reads padding cells.)
    """
    _check_option("preliminary_mask: gmm_cells", gmm_cells, GMM_CELLS)
    _check_option("preliminary_mask: border", border, BORDERS)
    a = np.asarray(attn_map, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"preliminary_mask: expected an (H, W) map, got shape {a.shape}")
    v = None if valid is None else np.asarray(valid, dtype=bool)
    if v is not None and v.shape != a.shape:
        raise ValueError(f"preliminary_mask: map shape {a.shape} != valid shape {v.shape}")
    if v is None or gmm_cells == "all":
        return majority3x3(a > gmm_midpoint_threshold(a, seed=seed), border)
    if not v.any():
        return np.zeros(a.shape, dtype=bool)
    fg = (a > gmm_midpoint_threshold(a[v], seed=seed)) & v
    return majority3x3(fg, border) & v


def refined_mask(m_pre_up, diff, seed: int = 0, border: str = "keep") -> np.ndarray:
    """Step 4: M = m_pre_up AND majority3x3(diff > gmm_midpoint_threshold(diff), border).

    ``m_pre_up`` is the preliminary mask already upsampled to full image resolution (the
    reference's bilinear rule, :func:`fgbg.inpaint.upsampled_m_pre`, or the exact blocks of
    :func:`upsample_mask`), ``diff`` the difference image D = mean_RGB |x - x_inpainted| at
    the same resolution.  Where inpainting the background changed the picture a lot, the
    object was; intersecting with M_pre keeps only changes inside the attention region, so
    M is always a subset of ``m_pre_up``.

    ``border``: :func:`majority3x3`'s rule at the image's border; default "keep", as the
    reference, whose step 4 thresholds D with the same ``GMMMaskSuggestor`` (GMM midpoint
    and ``filter_orphan_pixel``) as step 2.  D covers the image only, so there is no padding
    here and the GMM is fitted on all of D, as in the reference.
    """
    m = np.asarray(m_pre_up, dtype=bool)
    d = np.asarray(diff, dtype=np.float64)
    if m.shape != d.shape or d.ndim != 2:
        raise ValueError(
            f"refined_mask: m_pre_up shape {m.shape} and diff shape {d.shape} must be equal (H, W)"
        )
    return m & majority3x3(d > gmm_midpoint_threshold(d, seed=seed), border)


def fill_and_close(mask, closing: bool = True, fill_holes: bool = True) -> np.ndarray:
    """Optional clean-up of a refined mask: 3x3 binary closing, then hole filling.

    Closing (dilate, then erode) bridges one-pixel gaps; hole filling turns background
    regions that do not touch the image border into foreground.  The mask is padded by one
    background pixel before closing, so that foreground touching the image border is not
    eaten by the erosion (scipy's ``binary_closing`` alone would do that).  (H, W) or a
    batch (..., H, W), each image separately.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim < 2:
        raise ValueError(f"fill_and_close: expected (..., H, W), got shape {m.shape}")
    if m.ndim > 2:
        return np.stack([fill_and_close(x, closing, fill_holes) for x in m.reshape(-1, *m.shape[-2:])]
                        ).reshape(m.shape)
    out = m
    if closing:
        padded = np.pad(out, 1, mode="constant", constant_values=False)
        out = ndimage.binary_closing(padded, structure=np.ones((3, 3), bool))[1:-1, 1:-1]
    if fill_holes:
        out = ndimage.binary_fill_holes(out)
    return out


def upsample_mask(mask, shape) -> np.ndarray:
    """Nearest-neighbour (block) resize of the last two axes of ``mask`` to ``shape`` = (H, W).

    Output pixel (i, j) takes the grid cell its centre falls in:
    ``row = floor((i + 0.5) * h / H)``, computed in integers.  When H, W are multiples of the
    grid size h, w this is exact block repetition (each cell becomes an (H/h) x (W/w) block);
    unlike bilinear upsampling of a boolean mask it does not dilate the mask.  Keeps the
    dtype; leading batch axes are kept.
    """
    m = np.asarray(mask)
    if m.ndim < 2:
        raise ValueError(f"upsample_mask: expected (..., h, w), got shape {m.shape}")
    H, W = (int(s) for s in shape)
    h, w = m.shape[-2:]
    rows = ((2 * np.arange(H) + 1) * h) // (2 * H)
    cols = ((2 * np.arange(W) + 1) * w) // (2 * W)
    return m[..., rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------- datasets
def prelim_dir(out_dir):
    """The folder of step 2's outputs (M_pre PNGs and their run_config.json)."""
    from pathlib import Path
    return Path(out_dir) / "masks" / "prelim"


def prelim_mask_path(out_dir, item):
    return prelim_dir(out_dir) / f"{item.key}.png"


def prelim_mask_of(amap, placement, seed: int = 0, **rules) -> np.ndarray:
    """Step 2 for one step-1 map on the latent grid, as :func:`preliminary_masks` writes it:
    :func:`preliminary_mask` with the image's valid cells and ``rules`` (``gmm_cells``,
    ``border``), mapped back (nearest) to the image's original pixels."""
    from .data import map_back, valid_region
    vr, vc = valid_region(placement, amap.shape[0])
    valid = np.zeros(amap.shape, bool)
    valid[:vr, :vc] = True
    return map_back(preliminary_mask(amap, valid, seed, **rules), placement, "nearest")


def preliminary_masks(dataset, out_dir, attention_subdir: str = "attention", seed: int = 0,
                      overwrite: bool = False, progress: bool = True, *, gmm_cells: str = "all",
                      border: str = "keep"):
    """Step 2 over a dataset: M_pre of every image whose step-1 map exists, computed on the
    latent grid by :func:`preliminary_mask` with ``gmm_cells`` and ``border`` (defaults: the
    reference's rules, GMM on every cell of the map and border cells kept; ``STEP2_RULES``
    names both sets), then mapped back to the original pixel grid (nearest, never reading
    padding cells) and written as an 8-bit PNG (0/255) to
    ``<out_dir>/masks/prelim/<same relative path>.png``. Returns a StepReport.

    The masks' ``run_config.json`` records the step-1 settings they were made from and the
    rules, so a rerun after step 1 was redone with another model or setting, or with other
    rules, is refused, not skipped."""
    from pathlib import Path

    from .attention import load_attention
    from .io import save_png
    from .runs import for_each_item, read_run_config, step_outputs

    _check_option("preliminary_masks: gmm_cells", gmm_cells, GMM_CELLS)
    _check_option("preliminary_masks: border", border, BORDERS)
    step1 = read_run_config(Path(out_dir) / attention_subdir)
    if step1 is None:
        raise FileNotFoundError(f"{Path(out_dir) / attention_subdir}: no step-1 run there; run step 1 first "
                                f"(notebook 01_attention with the same out_dir, or fgbg.attention.save_attention_maps)")

    def work(item):
        amap, pl = load_attention(out_dir, item, attention_subdir)
        m = prelim_mask_of(amap, pl, seed, gmm_cells=gmm_cells, border=border)
        save_png(prelim_mask_path(out_dir, item), m.astype(np.uint8) * 255)

    config = {"step1": step1, "seed": seed, "gmm_cells": gmm_cells, "border": border}
    with step_outputs(prelim_dir(out_dir), config, overwrite=overwrite, out_dir=out_dir):
        return for_each_item("step 2 (M_pre)", dataset, lambda it: [prelim_mask_path(out_dir, it)], work,
                             out_dir=out_dir, progress=progress)
