"""Why "U-Net trained on M plus D'" is below "U-Net trained on M" on the mini world.

Reads a finished course run (default runs/build, from `make notebooks`) and measures, on its
test split: the step-5 U-Net trained on M and on M plus D' for several seeds (the seed
spread), and how D's refined masks compare with the photos' (foreground fraction, empty or
near-full masks).

    OMP_NUM_THREADS=1 python benchmarks/dprime_miniworld.py --out-dir runs/build --seeds 0 1 2
"""
import argparse
import json

import numpy as np

from fgbg import data, evaluate, inpaint, segmenter, synthetic


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", default="runs/build")
    p.add_argument("--base-dir", default="data/miniworld")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=600)
    a = p.parse_args()
    ds = data.load_dataset(a.base_dir, splits=["train", "test"])
    train = [it for it in ds if it.split == 1]
    test = evaluate.split_subsets(ds)["test"]
    dprime = data.load_dataset(synthetic.dprime_data_dir(a.out_dir), splits=["train"])
    run = synthetic.dprime_run_dir(a.out_dir)

    def fractions(items, src):
        return np.array([data.read_mask(inpaint.refined_mask_path(src, it)).mean() for it in items])
    real, synth = fractions(train, a.out_dir), fractions(dprime, run)
    out = {"refined_M_foreground_fraction": {
        "photos": {"mean": round(float(real.mean()), 3), "empty": int((real < 0.01).sum()),
                   "over_half": int((real > 0.5).sum()), "n": len(real)},
        "dprime": {"mean": round(float(synth.mean()), 3), "empty": int((synth < 0.01).sum()),
                   "over_half": int((synth > 0.5).sum()), "n": len(synth)}}}
    read = evaluate.saved_masks(inpaint.refined_mask_path, a.out_dir)
    both, both_fn = synthetic.training_set(train, dprime.items, a.out_dir)
    rows = {"M": [], "M plus D'": []}
    for seed in a.seeds:
        for name, (items, fn) in {"M": (train, read), "M plus D'": (both, both_fn)}.items():
            net, _ = segmenter.train_segmenter(items, fn, size=64, iterations=a.iterations, batch_size=16,
                                               lr=2e-3, seed=seed, channels=segmenter.channels_for_width(8),
                                               progress=False)
            r = segmenter.evaluate_masks(lambda it: segmenter.predict(net, data.read_image(it.image_path), 64)[1],
                                         test)
            rows[name].append(r["iou"])
            print(seed, name, r["iou"], flush=True)
    out["unet_iou_by_seed"] = {k: {"seeds": a.seeds, "iou": v, "mean": round(float(np.mean(v)), 4)}
                               for k, v in rows.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
