"""Evaluating steps 1-2 against ground truth, beside trivial baselines and controls.

Everything is measured in the original image's pixel grid:

* ``step1_auc``: mean over images of the per-image AUC-ROC of the raw attention map
  (mapped back bilinearly) against the ground-truth mask;
* ``prelim``: acc / IoU / mIoU / Dice of M_pre, pooled over all pixels of all images;
* ``baselines``: a centre prior and a border-colour saliency map, scored the same way
  (AUC of the map, IoU of the mask the same GMM-midpoint + majority rule makes of it),
  so a learner sees what attention adds over "objects are in the middle" and "objects
  differ from the border";
* ``controls``: the same step 1 with an untrained network of the same architecture,
  and the map of the non-object token "photo";
* ``distractor``: the same on images where a non-bird object shares the picture, plus
  ``bird_vs_distractor_auc``: how well the map ranks bird pixels above distractor pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .attention import SELF_ATTENTION_SUBDIR, attention_path, load_attention
from .baselines import border_colour_saliency, centre_prior
from .data import DatasetError, map_back, read_image, read_mask
from .io import atomic_write_text
from .masks import prelim_dir, prelim_mask_of, prelim_mask_path, preliminary_mask
from .metrics import Confusion, auc_roc, separation_auc


def _mean(xs) -> float:
    xs = [x for x in xs if not np.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _step2_rules_of(out_dir: Path) -> dict:
    """The keyword rules step 2 was run with in ``out_dir`` (its run config), if any."""
    from .runs import read_run_config
    cfg = read_run_config(prelim_dir(out_dir)) or {}
    return {k: cfg[k] for k in ("gmm_cells", "border") if k in cfg}


def evaluate_steps12(items, out_dir, untrained_subdir: str | None = "attention_untrained",
                     seed: int = 0, self_attention_subdir: str | None = SELF_ATTENTION_SUBDIR
                     ) -> tuple[dict, list[tuple[str, str]]]:
    """Metrics of steps 1-2 over ``items`` that have ground truth and step-1/2 outputs.

    Where ``self_attention_subdir`` holds a step-1 map of an image (step 1 with
    ``self_attention_k`` > 0), its map is scored too, as ``"self_attention"``: AUC, IoU of
    the M_pre made from it (:func:`fgbg.masks.prelim_mask_of`, with the rules of this run's step 2),
    bird>other, and its k and resolution.

    Returns (metrics, skipped) where skipped lists (image, reason) for images that could
    not be scored.
    """
    out_dir = Path(out_dir)
    auc = {"attention": [], "centre": [], "saliency": [], "untrained": [], "photo_token": [], "self_attention": []}
    sep = {k: [] for k in auc}
    conf = {"prelim": Confusion(), "centre": Confusion(), "saliency": Confusion(), "self_attention": Confusion()}
    sa_setting, rules = set(), _step2_rules_of(out_dir) if self_attention_subdir else {}
    skipped, n = [], 0
    for item in items:
        if item.gt_path is None:
            continue
        try:
            amap, pl = load_attention(out_dir, item)
            shape = (pl.height, pl.width)
            gt = read_mask(item.gt_path, shape)
            pre = read_mask(prelim_mask_path(out_dir, item), shape)
            img = read_image(item.image_path)
            if img.shape[:2] != shape:
                raise DatasetError(f"{item.image_path}: image is {img.shape[1]}x{img.shape[0]} but step 1 saw "
                                   f"{pl.width}x{pl.height}; rerun step 1 with overwrite=True")
            scores = {"attention": map_back(amap, pl, "bilinear"),
                      "photo_token": map_back(load_attention(out_dir, item, word="photo")[0], pl, "bilinear"),
                      "centre": centre_prior(*shape), "saliency": border_colour_saliency(img)}
            if untrained_subdir and attention_path(out_dir, item, untrained_subdir).exists():
                scores["untrained"] = map_back(load_attention(out_dir, item, untrained_subdir)[0], pl, "bilinear")
            sa_pre = None
            if self_attention_subdir and attention_path(out_dir, item, self_attention_subdir).exists():
                sa_map, sa_pl = load_attention(out_dir, item, self_attention_subdir)
                scores["self_attention"] = map_back(sa_map, sa_pl, "bilinear")
                sa_pre = prelim_mask_of(sa_map, sa_pl, seed, **rules)
                with np.load(attention_path(out_dir, item, self_attention_subdir)) as z:
                    sa_setting.add((int(z["self_attention_k"]), int(z["self_attention_resolution"]))
                                   if "self_attention_k" in z else (0, None))
            dis = read_mask(item.distractor_path, shape) if item.distractor_path else None
        except (DatasetError, OSError, KeyError, ValueError) as e:
            skipped.append((item.rel, f"{type(e).__name__}: {e}"))
            continue
        n += 1
        for k, s in scores.items():
            auc[k].append(auc_roc(s, gt))
            if dis is not None and dis.any() and gt.any():
                sep[k].append(separation_auc(s, gt, dis & ~gt))
        conf["prelim"].update(pre, gt)
        for k in ("centre", "saliency"):
            conf[k].update(preliminary_mask(scores[k], seed=seed), gt)
        if sa_pre is not None:
            conf["self_attention"].update(sa_pre, gt)
    r = lambda x: round(float(x), 4)  # noqa: E731
    m = {"n_images": n, "step1_auc": r(_mean(auc["attention"])), "prelim": conf["prelim"].as_dict(4),
         "baselines": {k: {"auc": r(_mean(auc[k])), "iou": r(conf[k].iou)} for k in ("centre", "saliency")},
         "controls": {"photo_token": {"auc": r(_mean(auc["photo_token"]))}}}
    if auc["untrained"]:
        m["controls"]["untrained"] = {"auc": r(_mean(auc["untrained"]))}
    if auc["self_attention"]:
        if len(sa_setting) != 1:
            raise ValueError(f"{out_dir / self_attention_subdir}: maps of several self-attention settings "
                             f"(k, resolution): {sorted(sa_setting, key=str)}; rerun step 1 there with overwrite")
        (k, res), = sa_setting
        m["self_attention"] = {"k": k, "resolution": res, "n_images": len(auc["self_attention"]),
                               "auc": r(_mean(auc["self_attention"])), "iou": r(conf["self_attention"].iou)}
        if sep["self_attention"]:
            m["self_attention"]["bird_vs_distractor_auc"] = r(_mean(sep["self_attention"]))
    if sep["attention"]:
        m["bird_vs_distractor_auc"] = r(_mean(sep["attention"]))
        for k in ("centre", "saliency"):
            m["baselines"][k]["bird_vs_distractor_auc"] = r(_mean(sep[k]))
        for k in ("untrained", "photo_token"):
            if sep[k]:
                m["controls"][k]["bird_vs_distractor_auc"] = r(_mean(sep[k]))
    return m, skipped


def split_subsets(items) -> dict[str, list]:
    """The course's evaluation subsets: "test" (no distractor object) and "distractor"."""
    test = [it for it in items if it.split == 0]
    return {"test": [it for it in test if it.distractor_path is None],
            "distractor": [it for it in test if it.distractor_path is not None]}


def evaluate_and_record_steps12(items, out_dir, untrained_subdir: str = "attention_untrained",
                                seed: int = 0, self_attention_subdir: str | None = SELF_ATTENTION_SUBDIR
                                ) -> tuple[dict, list[tuple[str, str]]]:
    """Notebook 02's scoring: :func:`evaluate_steps12` on the test subset and on the
    distractor subset, recorded in metrics.json (:func:`update_metrics`) with the step
    outputs they come from. Returns (this run's metrics, skipped images); ({}, []) when no
    test image has ground truth (a user's own dataset): nothing is scored or written."""
    out_dir = Path(out_dir)
    items = list(items)
    subsets = split_subsets(items)
    results, skipped = {}, []
    for name, sub in subsets.items():
        if any(it.gt_path is not None for it in sub):
            results[name], s = evaluate_steps12(sub, out_dir, untrained_subdir, seed=seed,
                                                self_attention_subdir=self_attention_subdir)
            skipped += s
    if not results:
        return {}, []
    updates = dict(results.get("test", {}))
    if "distractor" in results:
        updates["distractor"] = results["distractor"]
    sources = [out_dir / "attention", prelim_dir(out_dir)]
    if untrained_subdir and (out_dir / untrained_subdir).is_dir():
        sources.append(out_dir / untrained_subdir)
    if self_attention_subdir and (out_dir / self_attention_subdir).is_dir():
        sources.append(out_dir / self_attention_subdir)
    return update_metrics(out_dir, updates, items=items, sources=sources), skipped


def record_table2_rows(out_dir, rows: dict[str, dict], *, items, sources) -> dict:
    """Table 2 rows scored by :func:`fgbg.segmenter.evaluate_masks` into metrics.json:
    pooled acc / IoU / mIoU / Dice as the row, the per-image IoU summary as
    ``<row>_per_image_iou``. A row scored on no image (no ground truth) is left out.
    ``items`` and ``sources`` as in :func:`update_metrics`; returns this run's metrics."""
    updates = {}
    for k, v in rows.items():
        if v.get("n_images", 0) > 0:
            updates[k] = {m: v[m] for m in ("acc", "iou", "miou", "dice")}
            updates[f"{k}_per_image_iou"] = v["per_image_iou"]
    if not updates:
        return current_metrics(out_dir)[0]
    return update_metrics(out_dir, updates, items=items, sources=sources)


METRICS = "metrics.json"


def run_identity(items) -> dict:
    """Which run metrics belong to: the dataset (:func:`fgbg.data.dataset_identity`) and the
    test-split images scored (their count and a hash of their keys). Two notebooks of one
    course run agree on it; a run with another dataset or ``limit`` does not."""
    import hashlib

    from .data import dataset_identity
    items = list(items)
    keys = sorted(it.key for it in items if it.split == 0)
    ds = dataset_identity(items) if items else None
    return {"dataset": ds and ds["fingerprint"], "base_dir": ds and ds["base_dir"],
            "test_images": {"n": len(keys), "sha1": hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]}}


def _source_ids(out_dir: Path, sources) -> dict[str, str | None]:
    from .runs import folder_config_id
    out = {}
    for src in sources:
        src = Path(src)
        rel = src.relative_to(out_dir).as_posix() if src.is_absolute() and src.is_relative_to(out_dir) else str(src)
        out[rel] = folder_config_id(out_dir / rel)
    return out


def update_metrics(out_dir, updates: dict, *, items, sources) -> dict:
    """Merge ``updates`` into ``<out_dir>/metrics.json`` (atomically) and return this run's
    metrics (:func:`current_metrics`).

    ``items``: the images the updates were computed for (their test split names the run,
    :func:`run_identity`); a metrics.json of another run (another dataset or other test
    images, e.g. an earlier run with another ``limit``) is replaced, not merged into.
    ``sources``: the step folders the updates were made from (e.g. ``out_dir/attention``,
    ``out_dir/masks/prelim``); each row records their run_config ids in ``made_from``, and
    a row whose sources have since been recomputed with other settings is never shown as
    this run's.
    """
    out_dir = Path(out_dir)
    path = out_dir / METRICS
    run = run_identity(items)
    metrics = json.loads(path.read_text()) if path.exists() else {}
    if metrics.get("run") != run:
        metrics = {"run": run}

    def merge(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v
    merge(metrics, updates)
    ids = _source_ids(out_dir, sources)
    made_from = metrics.setdefault("made_from", {})
    for k in updates:
        made_from[k] = ids
    atomic_write_text(path, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return current_metrics(out_dir)[0]


def current_metrics(out_dir) -> tuple[dict, list[str]]:
    """``<out_dir>/metrics.json`` without the rows whose step outputs have since been
    recomputed with other settings; returns (metrics, names of the rows left out)."""
    from .runs import folder_config_id
    out_dir = Path(out_dir)
    path = out_dir / METRICS
    if not path.exists():
        return {}, []
    metrics = json.loads(path.read_text())
    made_from = metrics.get("made_from", {})
    stale = sorted(k for k, srcs in made_from.items()
                   if any(folder_config_id(out_dir / rel) != cid for rel, cid in srcs.items()))
    for k in stale:
        metrics.pop(k, None)
    return metrics, stale


def steps12_table(m: dict) -> str:
    """A small text table of steps 1-2 (what the notebooks print and nbval compares)."""
    rows = [("attention (step 1)", m.get("step1_auc"), m["prelim"]["iou"], m.get("bird_vs_distractor_auc"))]
    if "self_attention" in m:  # step 1 refined by A_self^k (fgbg.attention.refine_with_self_attention)
        sa = m["self_attention"]
        rows.append((f"attn + self-attn (k={sa['k']})", sa["auc"], sa["iou"], sa.get("bird_vs_distractor_auc")))
    for k in ("centre", "saliency"):
        b = m["baselines"][k]
        rows.append((f"baseline: {k}", b["auc"], b["iou"], b.get("bird_vs_distractor_auc")))
    for k, c in m.get("controls", {}).items():
        rows.append((f"control: {k}", c["auc"], None, c.get("bird_vs_distractor_auc")))
    f = lambda x: "   -  " if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:6.2f}"  # noqa: E731
    lines = [f"{'':24s} {'AUC':>6s} {'IoU':>6s} {'bird>other':>10s}"]
    lines += [f"{name:24s} {f(a)} {f(i)} {f(s):>10s}" for name, a, i, s in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Table 2
TABLE2_ROWS = {
    "prelim": "preliminary masks M_pre",
    "crop": "simple inpainting M_crop",
    "unet_prelim": "U-Net trained on M_pre",
    "refined": "refined masks M",
    "unet_refined": "U-Net trained on M",
    "unet_refined_dprime": "U-Net trained on M plus D'",
    "unet_supervised": "fully supervised U-Net",
}
"""Row keys of :func:`table2`, in the paper's order, with their labels."""

# Dombrowski et al., "Foreground-Background Separation through Concept Distillation from
# Generative Image Foundation Models", ICCV 2023, Table 2: CUB-200-2011 test set,
# (Acc, IoU, mIoU) in percent (as quoted in METHOD.md).
PAPER_TABLE2 = {
    "prelim": (83.5, 29.0, 55.7),
    "crop": (90.0, 30.7, 60.0),
    "unet_prelim": (91.7, 66.5, 78.2),
    "refined": (92.4, 63.6, 77.4),
    "unet_refined": (95.2, 75.1, 84.8),
    "unet_refined_dprime": (95.6, 77.2, 86.0),
    "unet_supervised": (97.9, 88.3, 93.0),
}


def table2(rows: dict[str, dict]) -> str:
    """The paper's Table 2 for this run, as text.

    ``rows`` maps keys of :data:`TABLE2_ROWS` to metric dicts with "acc", "iou", "miou",
    "dice" as fractions (e.g. :func:`fgbg.segmenter.evaluate_masks`' output). Rows appear
    in the paper's order, only those present; other keys (e.g. the rest of metrics.json)
    are ignored. This run's values are shown in percent (1 decimal) next to
    the paper's CUB numbers (Acc / IoU / mIoU; the paper gives no Dice).
    """
    def pct(d: dict, k: str) -> str:
        v = d.get(k)
        return f"{100 * v:6.1f}" if isinstance(v, (int, float)) and not np.isnan(v) else "     -"

    keys = [k for k in TABLE2_ROWS if isinstance(rows.get(k), dict)]
    width = max([len("what")] + [len(TABLE2_ROWS.get(k, k)) for k in keys])
    lines = [f"{'':{width}s}  {'this run':^27s}   {'paper (CUB)':^20s}".rstrip(),
             f"{'what':{width}s}  {'Acc':>6s} {'IoU':>6s} {'mIoU':>6s} {'Dice':>6s}   "
             f"{'Acc':>6s} {'IoU':>6s} {'mIoU':>6s}"]
    for k in keys:
        paper = PAPER_TABLE2.get(k)
        ref = " ".join(f"{v:6.1f}" for v in paper) if paper else " ".join(["     -"] * 3)
        ours = " ".join(pct(rows[k], m) for m in ("acc", "iou", "miou", "dice"))
        lines.append(f"{TABLE2_ROWS.get(k, k):{width}s}  {ours}   {ref}")
    return "\n".join(lines)


def saved_masks(path_fn, out_dir):
    """``item -> bool mask`` reading a per-image mask PNG written by a step
    (e.g. ``masks.prelim_mask_path``, ``inpaint.refined_mask_path``), checked against the
    size of the item's image."""
    return lambda item: read_mask(path_fn(out_dir, item), read_image(item.image_path).shape[:2])
