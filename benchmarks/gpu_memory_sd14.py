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

Step 3's memory-saving options (docs/memory.md), each at several batch sizes, in fp16 as on
a T4, with the GPU capped at a T4's memory:

    FGBG_GPU_MEMORY_GIB=14.5 python benchmarks/gpu_memory_sd14.py --finetune-options \
        --base-dir /tmp/cubmini/CUB_200_2011 --params params/colab_t4.yaml --batches 1 4 8

prints, per option and batch, the peak GPU memory of fine-tuning (allocated and reserved by
PyTorch's allocator), the seconds per step, or OOM where it does not fit under the cap.
It skips writing checkpoint.pt and the saved pipeline (disk time, not GPU memory).

FGBG_GPU_MEMORY_GIB (GiB): caps PyTorch's allocator on GPU 0 at that much
(``torch.cuda.set_per_process_memory_fraction``) in this script and, through an IPython
start-up file (``--write-kernel-startup DIR``, then ``IPYTHONDIR=DIR``), in every notebook
kernel that papermill starts; that file also writes the kernel's peak GPU memory after each
cell to FGBG_PEAK_FILE (JSON). tools/gpu_colab_check.sh uses both.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

MEMORY_ENV, PEAK_ENV = "FGBG_GPU_MEMORY_GIB", "FGBG_PEAK_FILE"

# step 3's memory options measured by --finetune-options: FinetuneConfig fields over the params
# file's (fp16 autocast and gradient checkpointing on, unless an option says otherwise)
FINETUNE_OPTIONS = {
    "full, AdamW, EMA gpu (the paper)": {"optimizer": "adamw", "ema": "gpu"},
    "full, AdamW, EMA off": {"optimizer": "adamw", "ema": "off"},
    "full, 8-bit AdamW, EMA gpu": {"optimizer": "adamw8bit", "ema": "gpu"},
    "full, 8-bit AdamW, EMA cpu": {"optimizer": "adamw8bit", "ema": "cpu"},
    "full, 8-bit AdamW, EMA cpu every 10": {"optimizer": "adamw8bit", "ema": "cpu", "ema_every": 10},
    "full, 8-bit AdamW, EMA off": {"optimizer": "adamw8bit", "ema": "off"},
    "full, 8-bit AdamW, EMA off, no checkpointing": {"optimizer": "adamw8bit", "ema": "off",
                                                     "gradient_checkpointing": False},
    "LoRA 8, EMA gpu": {"lora_rank": 8, "ema": "gpu"},
    "LoRA 8, EMA gpu, no checkpointing": {"lora_rank": 8, "ema": "gpu", "gradient_checkpointing": False},
    "LoRA 64, EMA gpu": {"lora_rank": 64, "ema": "gpu"},
}

# An IPython start-up file: papermill's kernels run it, so the cap and the peak report apply
# inside the notebooks without any change to them.
KERNEL_STARTUP = """\
# written by benchmarks/gpu_memory_sd14.py --write-kernel-startup: GPU memory cap and peak report
import json as _json, os as _os


def _fgbg_cap():
    gib = _os.environ.get("FGBG_GPU_MEMORY_GIB")
    if not gib:
        return
    import torch
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(gib) * 2 ** 30 / total), 0)


def _fgbg_peak(*_):
    path = _os.environ.get("FGBG_PEAK_FILE")
    if not path:
        return
    import sys
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    rec = {"device": "cuda" if cuda else "cpu",
           "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if cuda else None,
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 3) if cuda else None,
           "cap_gib": float(_os.environ["FGBG_GPU_MEMORY_GIB"]) if _os.environ.get("FGBG_GPU_MEMORY_GIB") else None}
    with open(path, "w") as f:
        _json.dump(rec, f)


_fgbg_cap()
try:
    get_ipython().events.register("post_run_cell", _fgbg_peak)
except NameError:  # not IPython
    pass
"""


def write_kernel_startup(ipython_dir) -> Path:
    """Write KERNEL_STARTUP as ``<ipython_dir>/profile_default/startup/00-fgbg-gpu.py``."""
    path = Path(ipython_dir) / "profile_default" / "startup" / "00-fgbg-gpu.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(KERNEL_STARTUP)
    return path


def apply_memory_cap() -> float | None:
    """Cap GPU 0 at FGBG_GPU_MEMORY_GIB GiB (None: no cap set, or no GPU)."""
    gib = os.environ.get(MEMORY_ENV)
    if not gib or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(gib) * 2 ** 30 / total), 0)
    return float(gib)


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def finetune_options(pipe, items, out: Path, base: dict, batches, steps: int, options=None,
                     on_result=None) -> dict:
    """Peak memory and seconds per step of step 3 for each option in ``options`` (default
    FINETUNE_OPTIONS) and batch size; ``base``: the FinetuneConfig fields of the params file.
    An option whose package is missing (bitsandbytes, peft) is reported as such; one that
    does not fit (torch.cuda.OutOfMemoryError) as OOM. ``on_result(results)`` is called
    after each measurement (e.g. to write them, should the run be stopped)."""
    import gc
    from unittest import mock
    from fgbg import finetune
    cuda = pipe.unet.device.type == "cuda"
    res = {}
    starts = []

    def stamp(*_):  # the start of every UNet forward: one per training step
        if cuda:
            torch.cuda.synchronize()
        starts.append(time.perf_counter())

    hook = pipe.unet.register_forward_pre_hook(stamp)
    try:
        for name, opt in (options or FINETUNE_OPTIONS).items():
            for bs in batches:
                key = f"{name}, batch {bs}"
                need = ("bitsandbytes" if opt.get("optimizer") == "adamw8bit" else None,
                        "peft" if opt.get("lora_rank") else None)
                missing = (["CUDA"] if opt.get("optimizer") == "adamw8bit" and not cuda else []) + \
                    [m for m in need if m and not _has(m)]
                if missing:
                    res[key] = {"skipped": f"needs {' and '.join(missing)}"}
                    print(f"{key:60s} skipped: {res[key]['skipped']}", flush=True)
                    continue
                cfg = finetune.FinetuneConfig(**{**base, **opt, "batch_size": bs, "steps": steps,
                                                 "save_every": 10 ** 6})
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                starts.clear()
                try:  # disk writes (checkpoint, pipeline) are not GPU memory: skipped here
                    with mock.patch.object(finetune, "_save_checkpoint", lambda *a: None), \
                            mock.patch.object(pipe, "save_pretrained", lambda *a, **k: None):
                        finetune.finetune(pipe, items, out, cfg, progress=False, overwrite=True)
                    if cuda:
                        torch.cuda.synchronize()
                    steps_s = sorted(b - a for a, b in zip(starts[1:], starts[2:]))  # after the first step
                    r = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
                         "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2) if cuda else None,
                         "s_per_step": round(steps_s[len(steps_s) // 2], 3) if steps_s else None}
                except torch.cuda.OutOfMemoryError:
                    r = {"oom": True}
                res[key] = r
                if on_result:
                    on_result(res)
                print(f"{key:60s} " + (f"peak {r['peak_allocated_gib']} GiB (reserved {r['peak_reserved_gib']}), "
                                       f"{r['s_per_step']} s/step" if "oom" not in r else "OOM"), flush=True)
    finally:
        hook.remove()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", help="a CUB-layout dataset (python -m fgbg.miniworld cub); required but with "
                    "--write-kernel-startup")
    ap.add_argument("--params", default="params/cub_sd14.yaml")
    ap.add_argument("--out-dir", default="runs/gpu_memory_sd14")
    ap.add_argument("--finetune-steps", type=int, default=3)
    ap.add_argument("--seg-iterations", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--model", default="sd14", help="sd14, tiny (a quick CPU check of this script), or a saved "
                    "pipeline folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--finetune-options", action="store_true",
                    help="measure step 3 with each memory option (FINETUNE_OPTIONS) instead of every step")
    ap.add_argument("--options", nargs="*", default=None, help="with --finetune-options: only these (names)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="with --finetune-options")
    ap.add_argument("--write-kernel-startup", metavar="IPYTHONDIR", default=None,
                    help="only write the IPython start-up file (memory cap, peak report) and exit")
    a = ap.parse_args(argv)
    if a.write_kernel_startup:
        print(write_kernel_startup(a.write_kernel_startup))
        return
    if not a.base_dir:
        ap.error("the following arguments are required: --base-dir")
    from fgbg import attention, data, finetune, inpaint, masks, models, segmenter
    from fgbg.evaluate import saved_masks
    from fgbg.params import check, load_yaml
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("this benchmark measures GPU memory: no CUDA device here (--device cpu to try it)")
    cap = apply_memory_cap() if cuda else None
    P = check(load_yaml(a.params))
    dtype = models.pick_dtype(dev, P["dtype"])
    if Path(a.model).is_dir():  # a saved pipeline (e.g. random_pipeline("sd14") saved): quicker than building one
        pipe = models.load_pipeline(a.model, device=a.device, dtype=dtype)
    else:
        pipe = models.random_pipeline(a.model, device=a.device)
        pipe.to(dtype=dtype)
    train = data.load_dataset(a.base_dir, "train", limit=P["limit"])
    out = Path(a.out_dir)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": a.model, "dtype": str(dtype),
               "canvas": models.canvas_size(pipe), "cap_gib": cap, "params": a.params}
    ft_base = dict(lr=P["finetune_lr"], object_prompt=P["foreground_prompt"],
                   background_prompt=P["background_prompt"], seed=P["seed"], resize_mode=P["resize_mode"],
                   gradient_checkpointing=P["finetune_gradient_checkpointing"],
                   mixed_precision=P["finetune_mixed_precision"] if cuda else "no", optimizer=P["finetune_optimizer"],
                   lora_rank=P["finetune_lora_rank"], ema=P["finetune_ema"], ema_every=P["finetune_ema_every"])
    if a.finetune_options:
        from fgbg.attention import save_attention_maps
        # step 3 needs M_pre: steps 1-2 on the training images, with the params file's settings
        save_attention_maps(pipe, train, out, prompt=P["foreground_prompt"], object_word=P["object_word"],
                            rev_diff_steps=min(P["rev_diff_steps"], 2), num_inference_steps=P["num_inference_steps"],
                            seed=P["seed"], resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], overwrite=True,
                            progress=False)
        masks.preliminary_masks(train, out, seed=P["seed"], overwrite=True, progress=False)
        # every option from the paper's full fine-tuning, with checkpointing, in the file's precision
        base = {**ft_base, "gradient_checkpointing": True, "lora_rank": 0, "optimizer": "adamw", "ema": "gpu",
                "ema_every": 1}
        options = {k: v for k, v in FINETUNE_OPTIONS.items() if not a.options or k in a.options}
        unknown = set(a.options or ()) - set(FINETUNE_OPTIONS)
        if unknown:
            ap.error(f"--options: unknown {sorted(unknown)}; known: {list(FINETUNE_OPTIONS)}")

        def save(res):
            results["finetune_options"] = res
            if a.json:
                Path(a.json).write_text(json.dumps(results, indent=1))

        save(finetune_options(pipe, train, out, base, a.batches, max(a.finetune_steps, 4), options, save))
        return results

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
    cfg = finetune.FinetuneConfig(**ft_base, steps=a.finetune_steps, batch_size=P["finetune_batch_size"],
                                  save_every=10**6)
    what = f"lora {cfg.lora_rank}" if cfg.lora_rank else f"{cfg.optimizer}, ema {cfg.ema}"
    measure(f"step 3: fine-tune, batch {cfg.batch_size}, {cfg.steps} steps ({what})", lambda: finetune.finetune(
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
    return results


if __name__ == "__main__":
    main()
