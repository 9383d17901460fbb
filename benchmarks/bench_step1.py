"""Step 1 throughput: the reference's way vs fgbg's batched way (images per second).

    python benchmarks/bench_step1.py                      # teaching model (or tiny), CPU
    python benchmarks/bench_step1.py --model sd14 --device cuda --dtype bf16 --images 8

reference: the 40 levels of an image one after another (UNet batch 1), eager attention
in every layer. fgbg: the 40 levels as one UNet batch, SDPA in self-attention, captured
cross-attention; the same maps (checked below) in less time. Speed is shown here, never
asserted in tests.
"""
from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="teaching", help="teaching | tiny | sd14 | a pipeline folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--levels", type=int, default=40)
    a = ap.parse_args()
    from diffusers.models.attention_processor import AttnProcessor
    from fgbg import attention, models
    if a.model in ("tiny", "sd14"):
        pipe = models.random_pipeline(a.model, device=None if a.device == "auto" else a.device)
        dt = models.pick_dtype(pipe.device, a.dtype)
        pipe.to(dtype=dt)
    else:
        pipe = models.load_pipeline(a.model, a.device, a.dtype)
    s = models.canvas_size(pipe)
    x = torch.rand(a.images, 3, s, s) * 2 - 1
    results = {}
    for mode in ("reference", "fgbg"):
        original = dict(pipe.unet.attn_processors)
        if mode == "reference":
            pipe.unet.set_attn_processor(AttnProcessor())
        batch = 1 if mode == "reference" else a.levels
        maps = []
        attention.compute_attention_maps(pipe, x[:1].to(pipe.unet.dtype), "a photo of a bird", a.levels,
                                         unet_batch=batch, generator=torch.Generator().manual_seed(0))  # warm-up
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(a.images):
            m = attention.compute_attention_maps(pipe, x[i:i + 1].to(pipe.unet.dtype), "a photo of a bird",
                                                 a.levels, unet_batch=batch,
                                                 generator=torch.Generator().manual_seed(i))
            maps.append(m.mean()[0, 5])
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        dt_s = time.perf_counter() - t0
        pipe.unet.set_attn_processor(original)
        results[mode] = (a.images / dt_s, torch.stack(maps))
        print(f"{mode:10s} {a.images / dt_s:8.2f} images/s  ({pipe.device}, {pipe.unet.dtype}, {a.levels} levels)")
    diff = (results["reference"][1] - results["fgbg"][1]).abs().max().item()
    print(f"speed-up {results['fgbg'][0] / results['reference'][0]:.1f}x, max |map difference| {diff:.2e}")


if __name__ == "__main__":
    main()
