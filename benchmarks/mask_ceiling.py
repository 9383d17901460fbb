"""How good can M_pre be at the teaching model's attention resolutions, and how far are the
course's masks from it? A diagnostic of docs/teaching_model.md, on the test split of mini-world
course datasets (square images of the model's canvas size).

    .venv/bin/python benchmarks/mask_ceiling.py --data data/miniworld runs/ab/data/v2 \
        --runs runs/v2course/A=runs/ab/data/v2 --out runs/mask_ceiling

- ``ideal``: step 1 with a perfect map in every cross-attention layer: each layer's map is the
  exact mask's area fraction per cell of that layer's grid (16x16, 8x8, 4x4 for the teaching
  model), block-upsampled to the latent grid and averaged over the layers as step 1 averages
  them (``fgbg.attention.AttentionStore``); then step 2 as the course runs it
  (``fgbg.masks.preliminary_mask``: GMM midpoint, 3x3 majority). Also with the finest layers
  only, and the latent grid's own limit (cells more than half covered by the bird);
- ``runs``: for course runs on one of those datasets, each saved mask kind's area (share of
  the image), precision and recall against the exact masks (means over images).

IoU is pooled over the images (intersections over unions, summed), as in the course's Table 2.

Nothing here is a model's result: it bounds what step 2 can make of the architecture's maps.
Writes ``<out>/mask_ceiling.json`` and prints it.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def ideal_map(gt: np.ndarray, layers: dict[int, int], grid: int) -> np.ndarray:
    """The mean over layers of perfect per-layer maps: ``layers`` maps a layer grid's rows to
    its number of layers; each layer's map is ``gt``'s area fraction per cell, block-upsampled
    to ``grid`` x ``grid``."""
    from fgbg.masks import upsample_mask
    size = gt.shape[0]
    acc, n = np.zeros((grid, grid)), 0
    for r, k in layers.items():
        f = size // r
        acc += k * upsample_mask(gt.reshape(r, f, r, f).mean((1, 3)), (grid, grid))
        n += k
    return acc / n


def _counts(m: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Intersection and union pixels: IoU pooled over images, as the course's Table 2."""
    return int((m & gt).sum()), int((m | gt).sum())


def _pooled(c: list) -> float:
    return round(sum(i for i, _ in c) / max(1, sum(u for _, u in c)), 3)


def ceiling(items, layers: dict[int, int], grid: int, canvas: int) -> dict:
    from fgbg.data import read_mask
    from fgbg.masks import preliminary_mask, upsample_mask
    finest = {max(layers): layers[max(layers)]}
    out = {name: {"iou": [], "area": []} for name in ("ideal, all layers", "ideal, finest layers", "grid cells")}
    # "iou": (intersection, union) per image, pooled below
    areas = []
    for it in items:
        gt = read_mask(it.gt_path, (canvas, canvas))
        areas.append(gt.mean())
        for name, ly in (("ideal, all layers", layers), ("ideal, finest layers", finest)):
            m = upsample_mask(preliminary_mask(ideal_map(gt, ly, grid)), (canvas, canvas))
            out[name]["iou"].append(_counts(m, gt)); out[name]["area"].append(m.mean())
        m = upsample_mask(ideal_map(gt, {grid: 1}, grid) > 0.5, (canvas, canvas))  # the grid's own cells
        out["grid cells"]["iou"].append(_counts(m, gt)); out["grid cells"]["area"].append(m.mean())
    res = {k: {"iou": _pooled(d["iou"]), "area": round(float(np.mean(d["area"])), 3)} for k, d in out.items()}
    return {"n": len(areas), "bird_area": round(float(np.mean(areas)), 3), **res}


def run_masks(run: Path, items, canvas: int) -> dict:
    """Area, precision and recall of each saved mask kind of a course run (test split)."""
    from PIL import Image
    from fgbg.data import read_mask
    res = {}
    gts = {it.key: read_mask(it.gt_path, (canvas, canvas)) for it in items}
    for kind in ("prelim", "refined", "crop", "unet_prelim", "unet_refined"):
        rows = []
        for it in items:
            f = run / "masks" / kind / f"{it.key}.png"
            if not f.is_file():
                continue
            m = np.asarray(Image.open(f).convert("L").resize((canvas, canvas), Image.NEAREST)) > 127
            gt = gts[it.key]
            tp = (m & gt).sum()
            rows.append((m.mean(), tp / max(1, m.sum()), tp / max(1, gt.sum()), *_counts(m, gt)))
        if rows:
            a = np.mean(rows, 0)
            res[kind] = {"n": len(rows), "area": round(float(a[0]), 3), "precision": round(float(a[1]), 3),
                         "recall": round(float(a[2]), 3), "iou": _pooled([r[3:] for r in rows])}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fgbg/assets/teaching-model", help="whose layer layout to use")
    ap.add_argument("--data", nargs="+", required=True, help="course datasets (test split)")
    ap.add_argument("--runs", nargs="*", default=[], metavar="RUN=DATA", help="course runs and their dataset")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from fgbg import evaluate, models
    from fgbg.attention import _layer_resolutions
    from fgbg.data import load_dataset, read_image
    from fgbg.io import atomic_write_text
    pipe = models.load_pipeline(str(ROOT / a.model), "cpu", "fp32")
    canvas = models.canvas_size(pipe)
    grid = canvas // (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    layers = dict(Counter(_layer_resolutions(pipe.unet, grid).values()))

    def test_items(data):
        items = evaluate.split_subsets(load_dataset(ROOT / data, splits=["test"]))["test"]
        shape = read_image(items[0].image_path).shape[:2]
        if shape != (canvas, canvas):
            raise SystemExit(f"{data}: images of {shape[0]}x{shape[1]}; this diagnostic needs the model's "
                             f"{canvas}x{canvas} canvas")
        return items

    res = {"model": a.model, "layers_per_grid": {f"{r}x{r}": k for r, k in layers.items()}, "latent_grid": grid,
           "ceiling": {d: ceiling(test_items(d), layers, grid, canvas) for d in a.data},
           "runs": {}}
    for spec in a.runs:
        run, data = spec.split("=", 1)
        res["runs"][run] = run_masks(ROOT / run, test_items(data), canvas)
    text = json.dumps(res, indent=1)
    (ROOT / a.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(ROOT / a.out / "mask_ceiling.json", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
