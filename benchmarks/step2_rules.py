"""Step 2's rules on the mini world: M_pre of the reference's rules against fgbg's old ones.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/step2_rules.py            # ~2 min on 2 cores
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/step2_rules.py --out runs/step2_rules --width 40

1. The mini world (data/miniworld; written with ``python -m fgbg.miniworld course`` when
   missing) and a padded, non-square copy of its test split: every split-0 image and its
   masks (segmentations/, distractors/) cropped to the centre ``--width`` columns
   (64 x 40, HxW, by default), in the reference layout, at ``<out>/miniworld_64xW``. Step 1
   pastes it into the top-left of the 64 x 64 canvas, so the right 6 of the 16 latent
   columns are padding.
2. Step 1 once per dataset (the shipped teaching model, the course's default parameters,
   ``fgbg.attention.save_attention_maps``) into ``<out>/square`` and ``<out>/padded``
   (resumable: a rerun reuses the maps).
3. M_pre of every combination of ``gmm_cells`` (all / image) and ``border`` (keep /
   background), computed from the same maps without writing anything, mapped back to the
   image's pixels as step 2 does, scored pooled against the ground truth on the course's
   "test" subset (no distractor), the "distractor" subset and all of split 0.

Prints a table and writes ``<out>/step2_rules.json``. Nothing here is asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMBOS = [("all", "keep"), ("all", "background"), ("image", "keep"), ("image", "background")]
NAMES = {("all", "keep"): "reference", ("image", "background"): "fgbg"}


def padded_copy(base: Path, dest: Path, width: int) -> Path:
    """Split 0 of ``base`` with every image and mask cropped to its centre ``width`` columns."""
    from PIL import Image
    if (dest / "images.txt").is_file():
        return dest
    lines = []
    for line in (base / "images.txt").read_text().splitlines():
        rel, split = line.split()
        if split != "0":
            continue
        lines.append(line)
        sub = Path(rel).relative_to("images").with_suffix(".png")
        for src, out in [(base / rel, dest / rel)] + [(base / d / sub, dest / d / sub)
                                                       for d in ("segmentations", "distractors")]:
            if not src.is_file():
                continue
            im = Image.open(src)
            c0 = (im.width - width) // 2
            out.parent.mkdir(parents=True, exist_ok=True)
            im.crop((c0, 0, c0 + width, im.height)).save(out)
    (dest / "images.txt").write_text("\n".join(lines) + "\n")
    return dest


def score(ds, out_dir: Path, seed: int) -> dict:
    from fgbg import evaluate
    from fgbg.attention import load_attention
    from fgbg.data import map_back, read_mask, valid_region
    from fgbg.masks import preliminary_mask
    from fgbg.metrics import Confusion
    subsets = evaluate.split_subsets(ds)
    subsets["split0"] = subsets["test"] + subsets["distractor"]
    res = {}
    for sub, items in subsets.items():
        conf = {c: Confusion() for c in COMBOS}
        pre = {c: [] for c in COMBOS}
        padding_fg = 0
        for it in items:
            amap, pl = load_attention(out_dir, it)
            vr, vc = valid_region(pl, amap.shape[0])
            valid = np.zeros(amap.shape, bool)
            valid[:vr, :vc] = True
            gt = read_mask(it.gt_path, (pl.height, pl.width))
            for c in COMBOS:
                lat = preliminary_mask(amap, valid, seed, gmm_cells=c[0], border=c[1])
                if c == ("all", "keep"):
                    padding_fg += int((lat & ~valid).sum())
                m = map_back(lat, pl, "nearest")
                conf[c].update(m, gt)
                pre[c].append(m)
        ref, old = pre[("all", "keep")], pre[("image", "background")]
        res[sub] = {
            "n_images": len(items),
            "images_differing_reference_vs_fgbg": int(sum((a != b).any() for a, b in zip(ref, old))),
            "pixels_differing_reference_vs_fgbg": int(sum((a != b).sum() for a, b in zip(ref, old))),
            "padding_cells_foreground_under_reference": padding_fg,
            "rules": {f"{g}/{b}": {k: round(v, 4) for k, v in conf[(g, b)].as_dict(4).items()
                                   if k in ("acc", "iou", "miou", "dice")} for g, b in COMBOS},
        }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="data/miniworld")
    ap.add_argument("--out", default="runs/step2_rules")
    ap.add_argument("--width", type=int, default=40, help="columns kept in the padded copy (of 64)")
    a = ap.parse_args()
    from fgbg import models, params
    from fgbg.attention import save_attention_maps
    from fgbg.data import load_dataset
    base, out = ROOT / a.base, ROOT / a.out
    if not (base / "images.txt").is_file():
        subprocess.run([sys.executable, "-m", "fgbg.miniworld", "course", str(base)], check=True, cwd=ROOT)
    padded = padded_copy(base, out / f"miniworld_64x{a.width}", a.width)
    P = params.defaults()
    pipe = models.load_pipeline(P["model"], "cpu", P["dtype"])
    results = {"date": time.strftime("%Y-%m-%d"), "width": a.width}
    for name, b in (("square", base), ("padded", padded)):
        ds = load_dataset(b, splits=["test"])
        t0 = time.time()
        save_attention_maps(pipe, ds, out / name, prompt=P["foreground_prompt"], object_word=P["object_word"],
                            extractor=P["extractor"], steps=P["steps"], rev_diff_steps=P["rev_diff_steps"],
                            num_inference_steps=P["num_inference_steps"],
                            num_repeat_each_diffusion_step=P["num_repeat_each_diffusion_step"], seed=P["seed"],
                            resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], progress=False)
        print(f"{name}: step 1 on {len(ds)} images in {time.time() - t0:.0f} s", flush=True)
        results[name] = score(ds, out / name, P["seed"])
    (out / "step2_rules.json").write_text(json.dumps(results, indent=1))
    print(f"\nM_pre pooled IoU (acc) by gmm_cells/border; {out / 'step2_rules.json'}")
    for name in ("square", "padded"):
        for sub, r in results[name].items():
            cells = "  ".join(f"{k}{'=' + NAMES[tuple(k.split('/'))] if tuple(k.split('/')) in NAMES else ''}: "
                              f"{v['iou']:.4f} ({v['acc']:.4f})" for k, v in r["rules"].items())
            print(f"{name:7s} {sub:10s} n={r['n_images']:3d}  {cells}  | images differing ref vs fgbg: "
                  f"{r['images_differing_reference_vs_fgbg']}, pixels: {r['pixels_differing_reference_vs_fgbg']}, "
                  f"padding cells fg (ref): {r['padding_cells_foreground_under_reference']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
