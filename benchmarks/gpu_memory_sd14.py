"""Peak GPU memory of every step at SD v1.4 size, with the CUB parameters.

    python -m fgbg.miniworld cub /tmp/cubmini                    # CUB layout, 500x375 images
    python benchmarks/gpu_memory_sd14.py --base-dir /tmp/cubmini/CUB_200_2011

A random-weight SD v1.4-shaped pipeline (same UNet, VAE and text encoder shapes as
CompVis/stable-diffusion-v1-4, 512x512 canvas) runs the fgbg functions the notebooks call,
with the batch sizes and precision of params/cub_sd14.yaml: step 1 (one image, its 40
noise levels in one UNet pass), step 2, step 3 (a few fine-tuning steps of batch 8 with
gradient checkpointing), step 4 (inpainting at batch 1 and at the params file's batch) and
step 5 (the segmenter at 128x128). Memory does not depend on the weights' values, so
random weights measure what SD v1.4 needs. Prints one line per step and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-dir", required=True, help="a CUB-layout dataset (python -m fgbg.miniworld cub)")
    ap.add_argument("--params", default="params/cub_sd14.yaml")
    ap.add_argument("--out-dir", default="runs/gpu_memory_sd14")
    ap.add_argument("--finetune-steps", type=int, default=3)
    ap.add_argument("--seg-iterations", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--model", default="sd14", help="sd14, or tiny for a quick CPU check of this script")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from fgbg import attention, data, finetune, inpaint, masks, models, segmenter
    from fgbg.evaluate import saved_masks
    from fgbg.params import load_yaml
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("this benchmark measures GPU memory: no CUDA device here (--device cpu to try it)")
    P = load_yaml(a.params)
    dtype = models.pick_dtype(dev, P["dtype"])
    pipe = models.random_pipeline(a.model, device=a.device)
    pipe.to(dtype=dtype)
    train = data.load_dataset(a.base_dir, "train")
    out = Path(a.out_dir)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": a.model, "dtype": str(dtype), "canvas": models.canvas_size(pipe)}

    def measure(name, fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        r = fn()
        if cuda:
            torch.cuda.synchronize()
        gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        results[name] = {"peak_gb": round(gb, 2), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:44s} peak {gb:6.2f} GiB  ({results[name]['seconds']} s)", flush=True)
        return r

    both = data.load_dataset(a.base_dir, ["train", "test"])
    measure(f"step 1: attention maps, {len(both)} images, unet_batch {P['unet_batch']}", lambda: attention.save_attention_maps(
        pipe, both, out, prompt=P["foreground_prompt"], object_word=P["object_word"], extractor=P["extractor"],
        rev_diff_steps=P["rev_diff_steps"], num_inference_steps=P["num_inference_steps"], seed=P["seed"],
        resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], overwrite=True, progress=False))
    measure("step 2: preliminary masks", lambda: masks.preliminary_masks(both, out, seed=P["seed"], progress=False))
    cfg = finetune.FinetuneConfig(steps=a.finetune_steps, batch_size=P["finetune_batch_size"], lr=P["finetune_lr"],
                                  object_prompt=P["foreground_prompt"], background_prompt=P["background_prompt"],
                                  seed=P["seed"], save_every=10**6)
    measure(f"step 3: fine-tune, batch {cfg.batch_size}, {cfg.steps} steps", lambda: finetune.finetune(
        pipe, train, out, cfg, progress=False))
    for bs in sorted({1, P["inpaint_batch_size"]}):
        items = data.load_dataset(a.base_dir, ["train", "test"], limit=bs)
        measure(f"step 4: inpaint + refine, batch {bs}", lambda: inpaint.inpaint_and_refine(
            pipe, items, out, prompt=P["background_prompt"], num_inference_steps=P["num_inference_steps"],
            batch_size=bs, seed=P["seed"], resize_mode=P["resize_mode"], overwrite=True, progress=False))
    measure(f"step 5: segmenter {P['seg_size']}px, batch {P['seg_batch_size']}", lambda: segmenter.train_segmenter(
        train, saved_masks(inpaint.refined_mask_path, out), size=P["seg_size"], iterations=a.seg_iterations,
        batch_size=P["seg_batch_size"], lr=P["seg_lr"], seed=P["seed"], device=a.device, progress=False,
        channels=segmenter.channels_for_width(P["seg_width"])))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
