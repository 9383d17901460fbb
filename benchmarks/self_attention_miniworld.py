"""Self-attention refinement of step 1 on the mini world: its effect and its cost.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/self_attention_miniworld.py   # ~4 min on 2 cores

Runs the course's own functions on the test split with the shipped teaching model:
step 1 (``save_attention_maps``) without refinement and with ``self_attention_k`` = 1, 2, 4
(and k = 1 at the other resolution, 8), step 2 (``preliminary_masks``, the default rules)
and ``evaluate_steps12`` (which scores a self-attention folder as its "self_attention"
row). Prints step-1 AUC, M_pre IoU and bird-vs-distractor AUC of each, and the time of
step 1 on the 40 test images without and with the capture. Numbers are printed, never
asserted.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-dir", default="data/miniworld")
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--resolution", type=int, default=None, help="self-attention resolution (default: automatic)")
    ap.add_argument("--other-resolution", type=int, default=8, help="also k=1 at this resolution (0: skip)")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--time-only", type=int, default=0, metavar="REPEATS",
                    help="only time step 1 on the test images, without and with the capture, alternating, "
                         "REPEATS times each")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from fgbg import attention, data, evaluate, masks, models
    pipe = models.load_pipeline("teaching", "cpu", "fp32")
    pipe.set_progress_bar_config(disable=True)
    ds = data.load_dataset(a.base_dir, splits=["test"])
    sub = evaluate.split_subsets(ds)
    test, items = sub["test"], sub["test"] + sub["distractor"]
    res = attention.choose_self_attention_resolution(pipe.unet, models.canvas_size(pipe) // pipe.vae_scale_factor,
                                                     a.resolution)
    out = Path(a.out or tempfile.mkdtemp(prefix="sa_bench_"))
    kw = dict(progress=False, seed=0)

    def step1(subset, **extra):
        t0 = time.perf_counter()
        rep = attention.save_attention_maps(pipe, subset, out, **kw, **extra)
        assert not rep.skipped, rep
        return time.perf_counter() - t0

    attention.save_attention_maps(pipe, test[:1], out / "warmup", **kw)  # first-call costs out of the timing
    if a.time_only:
        t = {"without": [], "with": []}
        for _ in range(a.time_only):
            t["without"].append(step1(test, overwrite=True))
            t["with"].append(step1(test, subdir="sa", self_attention_k=1, self_attention_resolution=res,
                                   overwrite=True))
        for name, v in t.items():
            print(f"step 1 on {len(test)} test images {name} the capture at {res}x{res}: "
                  + ", ".join(f"{x:.1f}" for x in v) + f" s (min {min(v):.1f} s)")
        return
    t_raw = step1(test)
    step1(items)  # + the distractor subset
    masks.preliminary_masks(items, out, progress=False)
    runs = [(int(k), res) for k in a.ks.split(",")]
    if a.other_resolution:
        runs.append((1, a.other_resolution))
    times, rows = {}, []
    for k, r in runs:
        sub_dir = f"attention_sa_k{k}_r{r}"
        times[(k, r)] = step1(test, subdir=sub_dir, self_attention_k=k, self_attention_resolution=r)
        step1(items, subdir=sub_dir, self_attention_k=k, self_attention_resolution=r)
        mt, _ = evaluate.evaluate_steps12(test, out, None, self_attention_subdir=sub_dir)
        md, _ = evaluate.evaluate_steps12(sub["distractor"], out, None, self_attention_subdir=sub_dir)
        if not rows:
            rows.append(("raw (reference)", mt["step1_auc"], mt["prelim"]["iou"], md["bird_vs_distractor_auc"]))
        sa, sd = mt["self_attention"], md["self_attention"]
        rows.append((f"A_self^{k} at {r}x{r}", sa["auc"], sa["iou"], sd["bird_vs_distractor_auc"]))
    print(f"mini world test split: {len(test)} images (+ {len(sub['distractor'])} with a distractor), "
          f"teaching model, rev_diff_steps 40, seed 0; outputs in {out}")
    print(f"{'':22s} {'AUC':>6s} {'IoU':>6s} {'bird>other':>10s}")
    for name, auc, iou, sep in rows:
        print(f"{name:22s} {auc:6.3f} {iou:6.3f} {sep:10.3f}")
    print(f"step 1 on the {len(test)} test images: {t_raw:.1f} s without the capture")
    for (k, r), t in times.items():
        print(f"  with the self-attention capture at {r}x{r} and k={k}: {t:.1f} s ({t / t_raw:.2f}x)")


if __name__ == "__main__":
    main()
