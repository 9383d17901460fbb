"""What each memory-saving option of step 3 costs in IoU: the paper's Table 2 per option.

    OMP_NUM_THREADS=1 nice python benchmarks/finetune_options.py            # the course's defaults
    python benchmarks/finetune_options.py --quick --out runs/fto_quick      # a minute: check the script

Steps 1-2 run once (``<out>/shared``) with the course's defaults (params/demo.yaml: the
teaching model on the mini world); then, for each option, its own ``<out>/<option>/`` gets a
copy of steps 1-2's outputs and runs steps 3-5 as notebooks 03-05 do with their defaults,
except for the option's FinetuneConfig fields. Writes ``<out>/results.json`` (Table 2's rows,
fine-tuning time and final loss per option) and prints Table 2 per option and a summary.
On a CPU: options that need CUDA (adamw8bit) are not run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

OPTIONS = {
    "default": {},                                   # the paper's: whole UNet, AdamW, EMA every step
    "lora8": {"lora_rank": 8},
    "lora16": {"lora_rank": 16},
    "lora8_lr1e-3": {"lora_rank": 8, "lr": 1e-3},    # LoRA is usually trained at a higher rate
    "ema_off": {"ema": "off"},
    "ema_cpu_every10": {"ema": "cpu", "ema_every": 10},
    "untuned": None,                                 # no step 3: steps 4-5 with the base model (a reference point)
}


def _params(path: str) -> dict:
    from fgbg.params import check, load_yaml
    return check(load_yaml(path))


def shared_steps12(P: dict, out: Path, progress: bool) -> None:
    """Steps 1-2 as notebooks 01-02 run them (without the untrained control: not in Table 2)."""
    from fgbg import attention, data, masks, models
    pipe = models.load_pipeline(P["model"], P["device"], P["dtype"])
    ds = data.load_dataset(P["base_dir"], splits=P["splits"], limit=P["limit"])
    attention.save_attention_maps(
        pipe, ds, out, prompt=P["foreground_prompt"], object_word=P["object_word"], extractor=P["extractor"],
        steps=P["steps"], rev_diff_steps=P["rev_diff_steps"], num_inference_steps=P["num_inference_steps"],
        num_repeat_each_diffusion_step=P["num_repeat_each_diffusion_step"], seed=P["seed"],
        resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], progress=progress)
    masks.preliminary_masks(ds, out, seed=P["seed"], progress=progress)


def steps345(P: dict, shared: Path, out: Path, option: dict, progress: bool) -> dict:
    """Steps 3-5 into ``out`` (steps 1-2 copied from ``shared``) as notebooks 03-05 do; Table 2's rows."""
    from fgbg import data, evaluate, finetune, inpaint, masks, models, segmenter
    for sub in ("attention", masks.prelim_dir(shared).relative_to(shared)):
        if not (out / sub).exists():
            shutil.copytree(shared / sub, out / sub)
    pipe = models.load_pipeline(P["model"], P["device"], P["dtype"])
    train = data.load_dataset(P["base_dir"], splits=["train"], limit=P["limit"])
    kw = dict(steps=P["finetune_steps"], batch_size=P["finetune_batch_size"], lr=P["finetune_lr"],
              object_prompt=P["foreground_prompt"], background_prompt=P["background_prompt"], seed=P["seed"],
              resize_mode=P["resize_mode"])
    if option is None:  # no fine-tuning: the base model inpaints
        res, t_ft, tuned = {"loss": [], "reused": False}, 0.0, pipe
    else:
        cfg = finetune.FinetuneConfig(**{**kw, **option})
        t0 = time.perf_counter()
        res = finetune.finetune(pipe, train, out, cfg, progress=progress)
        t_ft = time.perf_counter() - t0
        del pipe
        tuned = finetune.load_finetuned(out, P["device"], P["dtype"])
    ds = data.load_dataset(P["base_dir"], splits=P["splits"], limit=P["limit"])
    t0 = time.perf_counter()
    inpaint.inpaint_and_refine(tuned, ds, out, prompt=P["background_prompt"],
                               num_inference_steps=P["num_inference_steps"], batch_size=P["inpaint_batch_size"],
                               seed=P["seed"], resize_mode=P["resize_mode"], m_pre_upsampling=P["m_pre_upsampling"],
                               close_and_fill=P["close_and_fill"], progress=progress)
    t_inp = time.perf_counter() - t0
    del tuned
    test = evaluate.split_subsets(ds)["test"]

    def read(path_fn):
        return evaluate.saved_masks(path_fn, out)

    rows = {"prelim": segmenter.evaluate_masks(read(masks.prelim_mask_path), test),
            "crop": segmenter.evaluate_masks(read(inpaint.crop_mask_path), test),
            "refined": segmenter.evaluate_masks(read(inpaint.refined_mask_path), test)}
    seg_train = [it for it in ds if it.split == 1]
    t0 = time.perf_counter()
    for name, target in (("unet_refined", inpaint.refined_mask_path), ("unet_prelim", masks.prelim_mask_path)):
        net, _ = segmenter.train_segmenter(
            seg_train, read(target), size=P["seg_size"], iterations=P["seg_iterations"],
            batch_size=P["seg_batch_size"], lr=P["seg_lr"], seed=P["seed"], device=P["device"], progress=progress,
            channels=segmenter.channels_for_width(P["seg_width"]))
        rows[name] = segmenter.evaluate_masks(
            lambda it, net=net: segmenter.predict(net, data.read_image(it.image_path), size=P["seg_size"])[1], test)
    t_seg = time.perf_counter() - t0
    loss = res["loss"]
    tail = loss[-50:] if loss else []
    return {"option": option, "rows": {k: {m: v[m] for m in ("acc", "iou", "miou", "dice")} for k, v in rows.items()},
            "finetune_s": round(t_ft, 1), "inpaint_s": round(t_inp, 1), "segmenter_s": round(t_seg, 1),
            "loss_last50": sum(tail) / len(tail) if tail else None, "reused": res["reused"]}


def summary(results: dict) -> str:
    cols = [("prelim", "M_pre"), ("crop", "M_crop"), ("unet_prelim", "U-Net(M_pre)"), ("refined", "M"),
            ("unet_refined", "U-Net(M)")]
    head = f"{'option':18s}" + "".join(f"{c:>13s}" for _, c in cols) + f"{'step 3 s':>10s}"
    lines = ["IoU (%) on the test split", head]
    for name, r in results.items():
        lines.append(f"{name:18s}" + "".join(f"{100 * r['rows'][k]['iou']:13.1f}" for k, _ in cols)
                     + f"{r['finetune_s']:10.0f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--out", default="runs/finetune_options")
    ap.add_argument("--options", nargs="*", default=list(OPTIONS), help=f"of {', '.join(OPTIONS)}")
    ap.add_argument("--quick", action="store_true", help="4 images, short loops: checks the script only")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    from fgbg import evaluate
    P = _params(a.params)
    if a.quick:
        P.update(limit=4, rev_diff_steps=4, num_inference_steps=5, finetune_steps=4, finetune_batch_size=2,
                 seg_iterations=5)
    if P["make_mini_world"] and not (Path(P["base_dir"]) / "images.txt").exists():
        from fgbg.miniworld import write_course_dataset
        write_course_dataset(Path(P["base_dir"]), seed=P["seed"])
    out = Path(a.out)
    shared = out / "shared"
    t0 = time.perf_counter()
    shared_steps12(P, shared, a.progress)
    print(f"steps 1-2 (shared): {time.perf_counter() - t0:.0f} s", flush=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    for name in a.options:
        r = steps345(P, shared, out / name, OPTIONS[name], a.progress)
        results[name] = r
        res_path.write_text(json.dumps(results, indent=1))
        loss = f"{r['loss_last50']:.4f}" if r["loss_last50"] is not None else "-"
        print(f"\n== {name} {OPTIONS[name]}: step 3 {r['finetune_s']} s, step 4 {r['inpaint_s']} s, "
              f"step 5 {r['segmenter_s']} s, loss (last 50 steps) {loss}", flush=True)
        print(evaluate.table2(r["rows"]), flush=True)
    print()
    print(summary({k: results[k] for k in OPTIONS if k in results}))


if __name__ == "__main__":
    main()
