"""The mini world's v1 against v2: what the trivial baselines reach on each, before any training.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/world_v2_baselines.py       # ~4 min on 2 cores
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/world_v2_baselines.py --worlds v2 --out runs/wv2

For each world (``fgbg.miniworld.write_course_dataset(world=...)``, 64 train images so that
v1's test split is the course's):

1. Step 1 (the shipped teaching model, trained on v1, the course's default parameters) and
   step 2 on split 0, then the course's own scoring, ``fgbg.evaluate.evaluate_steps12``, on
   the "test" subset (one bird) and the "distractor" subset (bird + other): step-1 AUC, M_pre
   IoU, and the baselines centre prior and border-colour saliency (AUC of the map; IoU of the
   mask the GMM-midpoint + majority rule makes of it), and bird-vs-other AUCs.
2. M_crop, exactly as step 4 makes it (``fgbg.inpaint``: crop_baseline, difference_image,
   refine_mask, with M_pre upsampled bilinearly), from the model's M_pre, and a model-free
   M_crop from the saliency mask instead of M_pre; scored with ``fgbg.segmenter.evaluate_masks``
   on the test subset as notebook 04 does.
3. The bars for a world where the method has to earn its result: step-1 AUC >=
   saliency AUC + 0.02; M_pre IoU >= saliency IoU; IoU(refined M) >= IoU(M_crop) + 0.05. Only
   the baselines' side is measured here (the shipped model never saw v2).

Writes ``<out>/world_v2_baselines.json`` and ``<out>/samples_<world>.png`` (12 test and 12
distractor images with their bird masks), and prints a table. Nothing here is asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def crop_masks(items, out_dir: Path, pipe, seed: int, resize_mode: str) -> tuple[dict, dict]:
    """M_crop of every item as step 4 makes it, from the model's M_pre and from the saliency mask."""
    from fgbg.baselines import border_colour_saliency
    from fgbg.data import load_item, place_mask, read_mask
    from fgbg.inpaint import crop_baseline, difference_image, refine_mask, upsampled_m_pre
    from fgbg.masks import preliminary_mask, prelim_mask_path
    from fgbg.models import canvas_size
    canvas = canvas_size(pipe)
    grid = canvas // pipe.vae_scale_factor
    model, saliency = {}, {}
    for it in items:
        _, pl, img = load_item(it, canvas=canvas, mode=resize_mode)
        m_pre = read_mask(prelim_mask_path(out_dir, it), img.shape[:2])
        m_up = upsampled_m_pre(place_mask(m_pre, pl, grid), pl, "bilinear")
        model[it.key] = refine_mask(m_up, difference_image(img, crop_baseline(img, m_pre)), seed)
        s_pre = preliminary_mask(border_colour_saliency(img), seed=seed)
        saliency[it.key] = refine_mask(s_pre, difference_image(img, crop_baseline(img, s_pre)), seed)
    return model, saliency


def run_world(world: str, out: Path, pipe, P: dict) -> dict:
    from fgbg import evaluate, miniworld
    from fgbg.attention import save_attention_maps
    from fgbg.data import load_dataset
    from fgbg.masks import preliminary_masks
    from fgbg.segmenter import evaluate_masks
    base, run = out / world / "data", out / world / "run"
    t0 = time.time()
    if not (base / "images.txt").is_file():
        miniworld.write_course_dataset(base, n_train=miniworld.FIRST_TRAIN, world=world)
    t_data = time.time() - t0
    ds = load_dataset(base, splits=["test"])
    t0 = time.time()
    save_attention_maps(pipe, ds, run, prompt=P["foreground_prompt"], object_word=P["object_word"],
                        extractor=P["extractor"], steps=P["steps"], rev_diff_steps=P["rev_diff_steps"],
                        num_inference_steps=P["num_inference_steps"],
                        num_repeat_each_diffusion_step=P["num_repeat_each_diffusion_step"], seed=P["seed"],
                        resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], progress=False)
    preliminary_masks(ds, run, seed=P["seed"], progress=False)
    t_model = time.time() - t0
    res = {"data_seconds": round(t_data, 1), "steps12_seconds": round(t_model, 1)}
    subsets = evaluate.split_subsets(ds)
    for name, items in subsets.items():
        res[name], skipped = evaluate.evaluate_steps12(items, run, untrained_subdir=None, seed=P["seed"],
                                                       self_attention_subdir=None)
        if skipped:
            res[name]["skipped"] = skipped
    sample_grid(ds, out / f"samples_{world}.png")
    test = subsets["test"]
    m_crop, s_crop = crop_masks(test, run, pipe, P["seed"], P["resize_mode"])
    keep = ("acc", "iou", "miou", "dice", "n_images")
    res["test"]["crop"] = {k: v for k, v in evaluate_masks(lambda it: m_crop[it.key], test).items() if k in keep}
    res["test"]["crop_from_saliency"] = {k: v for k, v in evaluate_masks(lambda it: s_crop[it.key], test).items()
                                         if k in keep}
    return res


def sample_grid(items, path: Path, n: int = 12) -> None:
    """The first ``n`` test and ``n`` distractor images with their bird masks, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fgbg import evaluate
    from fgbg.data import read_image, read_mask
    sub = evaluate.split_subsets(items)
    chosen = sub["test"][:n] + sub["distractor"][:n]
    fig, ax = plt.subplots(4, n, figsize=(1.5 * n, 6.2))
    for i, it in enumerate(chosen):
        r, c = 2 * (i // n), i % n
        img = read_image(it.image_path)
        ax[r, c].imshow(img)
        ax[r + 1, c].imshow(read_mask(it.gt_path, img.shape[:2]), cmap="gray")
    for a in ax.ravel():
        a.axis("off")
    plt.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def table(results: dict) -> str:
    rows = [("test: n images", lambda r: r["test"]["n_images"]),
            ("saliency AUC", lambda r: r["test"]["baselines"]["saliency"]["auc"]),
            ("saliency IoU", lambda r: r["test"]["baselines"]["saliency"]["iou"]),
            ("centre AUC", lambda r: r["test"]["baselines"]["centre"]["auc"]),
            ("centre IoU", lambda r: r["test"]["baselines"]["centre"]["iou"]),
            ("M_crop IoU (saliency M_pre)", lambda r: r["test"]["crop_from_saliency"]["iou"]),
            ("shipped model: step-1 AUC", lambda r: r["test"]["step1_auc"]),
            ("shipped model: M_pre IoU", lambda r: r["test"]["prelim"]["iou"]),
            ("shipped model: M_crop IoU", lambda r: r["test"]["crop"]["iou"]),
            ("distractor: n images", lambda r: r["distractor"]["n_images"]),
            ("distractor: saliency AUC", lambda r: r["distractor"]["baselines"]["saliency"]["auc"]),
            ("distractor: saliency bird>other", lambda r: r["distractor"]["baselines"]["saliency"]
             ["bird_vs_distractor_auc"]),
            ("distractor: model bird>other", lambda r: r["distractor"]["bird_vs_distractor_auc"])]
    worlds = list(results["worlds"])
    lines = [f"{'':34s}" + "".join(f"{w:>8s}" for w in worlds)]
    for name, f in rows:
        vals = []
        for w in worlds:
            try:
                v = f(results["worlds"][w])
                vals.append(f"{v:8d}" if isinstance(v, int) else f"{v:8.3f}")
            except KeyError:
                vals.append(f"{'-':>8s}")
        lines.append(f"{name:34s}" + "".join(vals))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/world_v2_baselines")
    ap.add_argument("--worlds", default="v1,v2")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from fgbg import models, params
    out = ROOT / a.out
    P = params.defaults()
    pipe = models.load_pipeline(P["model"], "cpu", P["dtype"])
    results = {"date": time.strftime("%Y-%m-%d"), "model": P["model"], "worlds": {}}
    for w in a.worlds.split(","):
        results["worlds"][w] = run_world(w, out, pipe, P)
        print(f"{w}: data {results['worlds'][w]['data_seconds']} s, steps 1-2 "
              f"{results['worlds'][w]['steps12_seconds']} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world_v2_baselines.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\n{out / 'world_v2_baselines.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
