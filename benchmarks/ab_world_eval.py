"""Score teaching models on world v1 and v2 course splits: the A/B of docs/teaching_model.md.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/ab_world_eval.py \
        --model data/ab-v1/pipeline --worlds v1,v2 --out runs/ab/v1arm

For each world (``fgbg.miniworld.write_course_dataset(world=...)``, 64 train images as in
``benchmarks/world_v2_baselines.py``, written once under ``--data``): step 1 with the course's
default parameters and step 2, on the "test" (one bird) and "distractor" (bird + other)
subsets, then ``fgbg.evaluate.evaluate_steps12``: step-1 AUC, M_pre IoU, bird-vs-other AUC,
and the untrained-network control (``fgbg.course.untrained_copy``: the same VAE, a fresh UNet
and text encoder, step 1 as for the model). Also bird-vs-other AUC per class of the other
object, and M_crop as step 4 makes it (``world_v2_baselines.crop_masks``).

``--cue-swap`` also scores bird vs fish on the same 48 pictures with typical and with swapped
class cues (``fgbg.miniworld.cue_swap_pair``): what the model's "bird" means, and, per picture,
what training added to it (model minus untrained network). ``--worlds ""`` scores only that.
The typical pictures are the same for every set of swapped cues: one folder of them serves
all, and their maps are made once.

Writes ``<out>/ab_eval.json`` and prints one line per world.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def step1_kwargs(P: dict) -> dict:
    """save_attention_maps' arguments from the course's parameters."""
    return dict(prompt=P["foreground_prompt"], object_word=P["object_word"], extractor=P["extractor"],
                steps=P["steps"], rev_diff_steps=P["rev_diff_steps"], num_inference_steps=P["num_inference_steps"],
                num_repeat_each_diffusion_step=P["num_repeat_each_diffusion_step"], seed=P["seed"],
                resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], progress=False)


def score_cue_swap(data_root: Path, out: Path, pipe, P: dict, n: int = 48, swap: tuple | None = None,
                   untrained: bool = True) -> dict:
    """Bird-vs-fish AUC of the "bird" map on the same pictures with typical and with swapped
    class cues (``fgbg.miniworld.cue_swap_pair``; ``swap``: the cues swapped, default all),
    and the per-picture difference; with ``untrained``, the same for the untrained network
    (the geometry's share of the difference: the objects' sizes and places change too) and
    what training added to the difference (model minus untrained, per picture).

    The typical pictures are the same whatever ``swap`` is, so every ``swap`` scores them
    from one folder, ``<data_root>/cue_swap/typical``, and their maps are made once per
    network (``save_attention_maps`` keeps maps made with the same settings)."""
    import numpy as np
    from fgbg import course, miniworld
    from fgbg.attention import save_attention_maps
    from fgbg.data import load_dataset
    swap = tuple(swap or miniworld.CUES)
    name = "cue_swap" if set(swap) == set(miniworld.CUES) else "cue_swap-" + "+".join(swap)
    folders = {"typical": ("cue_swap", miniworld.CUES), "swapped": (name, swap)}
    for k, (sub, cues) in folders.items():
        f = data_root / sub / k / "miniworld.json"
        wanted = {"swap": list(cues), "n": n, "generator": miniworld.CUE_SWAP_VERSION}
        if not (f.is_file() and wanted.items() <= json.loads(f.read_text()).items()):  # never score other pictures
            miniworld.write_cue_swap_dataset(data_root / sub, n=n, swap=cues)
    nets = {"attention": pipe}
    if untrained:
        nets["attention_untrained"] = course.untrained_copy(pipe, seed=P["seed"])
    res, per_net = {"swap": list(swap)}, {}
    for subdir, net in nets.items():
        per_image, r = {}, {}
        for k, (sub, _) in folders.items():
            ds = load_dataset(data_root / sub / k, splits=["test"])
            save_attention_maps(net, ds, out / sub / k, subdir=subdir, **step1_kwargs(P))
            per_image[k] = _per_image_separation(ds.items, out / sub / k, subdir)
            r[k] = {"n": len(per_image[k]), "bird_vs_fish_auc": round(float(np.mean(list(per_image[k].values()))), 4)}
        keys = sorted(set(per_image["typical"]) & set(per_image["swapped"]))
        per_image["swapped_minus_typical"] = {key: per_image["swapped"][key] - per_image["typical"][key] for key in keys}
        r["swapped_minus_typical"] = paired_mean(list(per_image["swapped_minus_typical"].values()))
        per_net[subdir] = per_image
        if subdir == "attention":
            res.update(r)
        else:
            res["untrained"] = r
    if untrained:  # what training added (model minus untrained network, per picture), with its noise
        a, u = per_net["attention"], per_net["attention_untrained"]
        res["training_added"] = {k: paired_mean([a[k][key] - u[k][key] for key in sorted(set(a[k]) & set(u[k]))])
                                 for k in (*miniworld.CUE_SWAP, "swapped_minus_typical")}
    return res


def paired_mean(d: list[float]) -> dict:
    """Mean of per-picture differences, its standard error and how many are below zero."""
    import numpy as np
    d = np.asarray(d, dtype=float)
    return {"n": len(d), "mean": round(float(d.mean()), 4),
            "se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4) if len(d) > 1 else None,
            "n_lower": int((d < 0).sum())}


def _per_image_separation(items, run: Path, subdir: str = "attention") -> dict:
    """Per-image AUC of the map ranking the bird's pixels above the other object's."""
    from fgbg.attention import load_attention
    from fgbg.data import map_back, read_mask
    from fgbg.metrics import separation_auc
    out = {}
    for it in items:
        amap, pl = load_attention(run, it, subdir)
        shape = (pl.height, pl.width)
        gt, dis = read_mask(it.gt_path, shape), read_mask(it.distractor_path, shape)
        if gt.any() and (dis & ~gt).any():
            out[it.key] = separation_auc(map_back(amap, pl, "bilinear"), gt, dis & ~gt)
    return out


def score_world(world: str, data_root: Path, out: Path, pipe, P: dict, untrained: bool = True) -> dict:
    from fgbg import course, evaluate, miniworld
    from fgbg.attention import save_attention_maps
    from fgbg.data import load_dataset
    from fgbg.masks import preliminary_masks
    from fgbg.segmenter import evaluate_masks
    from world_v2_baselines import crop_masks
    base, run = data_root / world, out / world
    if not (base / "images.txt").is_file():
        miniworld.write_course_dataset(base, n_train=miniworld.FIRST_TRAIN, world=world)
    ds = load_dataset(base, splits=["test"])
    kw = step1_kwargs(P)
    t0 = time.time()
    save_attention_maps(pipe, ds, run, **kw)
    if untrained:
        save_attention_maps(course.untrained_copy(pipe, seed=P["seed"]), ds, run, subdir="attention_untrained", **kw)
    preliminary_masks(ds, run, seed=P["seed"], progress=False)
    res = {"steps12_seconds": round(time.time() - t0, 1)}
    subsets = evaluate.split_subsets(ds)
    for name, items in subsets.items():
        res[name], skipped = evaluate.evaluate_steps12(items, run, untrained_subdir="attention_untrained",
                                                       seed=P["seed"], self_attention_subdir=None)
        if skipped:
            res[name]["skipped"] = skipped
    scenes = json.loads((base / "scenes.json").read_text())
    by_cls: dict[str, list] = {}
    for it in subsets["distractor"]:
        others = {o["cls"] for o in scenes[it.rel]["objects"] if o["cls"] != "bird"}
        by_cls.setdefault("+".join(sorted(others)) or "?", []).append(it)
    res["distractor"]["by_other_class"] = {}
    for cls, items in sorted(by_cls.items()):
        m, _ = evaluate.evaluate_steps12(items, run, untrained_subdir="attention_untrained", seed=P["seed"],
                                         self_attention_subdir=None)
        res["distractor"]["by_other_class"][cls] = {
            "n": m["n_images"], "model": m.get("bird_vs_distractor_auc"),
            "untrained": m["controls"].get("untrained", {}).get("bird_vs_distractor_auc")}
    if untrained:
        res["distractor"]["paired"] = paired_separation(subsets["distractor"], run)
    test = subsets["test"]
    m_crop, _ = crop_masks(test, run, pipe, P["seed"], P["resize_mode"])
    res["test"]["crop"] = {k: v for k, v in evaluate_masks(lambda it: m_crop[it.key], test).items()
                           if k in ("acc", "iou", "miou", "dice", "n_images")}
    return res


def paired_separation(items, run: Path) -> dict:
    """Per-image bird-vs-other AUC of the model minus the untrained network's, on the same
    images: mean, standard error and n (the spread that the subset means above hide)."""
    import numpy as np
    a, u = _per_image_separation(items, run), _per_image_separation(items, run, "attention_untrained")
    m = np.array([a[k] for k in a if k in u])
    d = m - np.array([u[k] for k in a if k in u])
    se = lambda x: round(float(x.std(ddof=1) / np.sqrt(len(x))), 4)  # noqa: E731
    return {"n": len(d), "model_mean": round(float(m.mean()), 4), "model_se": se(m),
            "minus_untrained_mean": round(float(d.mean()), 4), "minus_untrained_se": se(d)}


def summary(r: dict) -> dict:
    t, d = r["test"], r["distractor"]
    return {"step1_auc": t["step1_auc"], "untrained_auc": t["controls"].get("untrained", {}).get("auc"),
            "m_pre_iou": t["prelim"]["iou"], "m_crop_iou": t["crop"]["iou"],
            "bird_vs_other": d.get("bird_vs_distractor_auc"),
            "bird_vs_other_untrained": d["controls"].get("untrained", {}).get("bird_vs_distractor_auc"),
            "photo_auc": t["controls"]["photo_token"]["auc"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--worlds", default="v1,v2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="runs/ab/data", help="course datasets, one folder per world")
    ap.add_argument("--no-untrained", action="store_true")
    ap.add_argument("--cue-swap", nargs="*", metavar="CUES",
                    help="also score bird vs fish on pictures with typical and with swapped class cues: "
                         "all cues (no value, or 'all'), or one run per value, each a +-joined list of "
                         "colour, texture, size, aspect, context")
    ap.add_argument("--paired-only", action="store_true",
                    help="only add the paired bird-vs-other numbers to <out>/ab_eval.json, from the saved maps")
    a = ap.parse_args()
    if a.paired_only:
        from fgbg import evaluate
        from fgbg.data import load_dataset
        f = ROOT / a.out / "ab_eval.json"
        results = json.loads(f.read_text())
        for w in a.worlds.split(","):
            ds = load_dataset(ROOT / a.data / w, splits=["test"])
            pr = paired_separation(evaluate.split_subsets(ds)["distractor"], ROOT / a.out / w)
            results["worlds"][w]["distractor"]["paired"] = pr
            print(w, json.dumps(pr))
        f.write_text(json.dumps(results, indent=1))
        return 0
    import torch
    torch.set_num_threads(1)
    from fgbg import models, params
    P = params.defaults()
    pipe = models.load_pipeline(a.model, "cpu", P["dtype"])
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    f = out / "ab_eval.json"
    results = json.loads(f.read_text()) if f.exists() else {"model": a.model, "worlds": {}}
    results["date"] = time.strftime("%Y-%m-%d")
    for w in [w for w in a.worlds.split(",") if w]:
        r = score_world(w, ROOT / a.data, out, pipe, P, untrained=not a.no_untrained)
        results["worlds"][w] = r
        f.write_text(json.dumps(results, indent=1))
        print(w, json.dumps(summary(r)), json.dumps(r["distractor"]["by_other_class"]), flush=True)
    for cues in (["all"] if a.cue_swap == [] else a.cue_swap or []):
        r = score_cue_swap(ROOT / a.data, out, pipe, P, swap=None if cues == "all" else tuple(cues.split("+")))
        results["cue_swap" if cues == "all" else f"cue_swap-{cues}"] = r
        f.write_text(json.dumps(results, indent=1))
        print("cue swap", json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
