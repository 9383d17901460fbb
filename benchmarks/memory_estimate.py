"""Estimate step 3's GPU memory at SD v1.4 size without a GPU: shapes only (fake tensors).

    python benchmarks/memory_estimate.py --batch 1 2 --json runs/memory_estimate.json

Builds the SD v1.4-shaped UNet (fgbg.models.random_pipeline("sd14")'s UNet: 859.5 M
parameters) under PyTorch's FakeTensorMode, which computes every tensor's shape and dtype
but allocates nothing, and runs one training forward + backward (autocast fp16, the loss of
fgbg.finetune) under a dispatch mode (PeakBytes) that adds up the bytes of every live tensor
as the step runs, like a caching allocator with no rounding or fragmentation. For
each of full fine-tuning and LoRA, with and without gradient checkpointing, it reports the
peak of what the forward/backward pass adds to the parameters (activations, autocast's fp16
weight copies, gradients, temporaries; the parameters themselves are not counted).
docs/memory.md adds the parameters and the states (optimizer, EMA) by hand.

Caveats (why these are estimates; the GPU check measures): fake tensors run on the "cpu"
device, so attention takes the CPU's kernel (flash attention: it keeps its output and
log-sum-exp, as CUDA's memory-efficient kernels do) and autocast the CPU's op lists, except
that group_norm and layer_norm are made to run in float32 as under CUDA's autocast
(cuda_autocast_norms); no allocator rounding or fragmentation; no cuDNN/cuBLAS workspaces;
no CUDA context.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

GIB = 2 ** 30


def sd14_unet():
    from diffusers import UNet2DConditionModel
    # the shapes of fgbg.models.random_pipeline("sd14") (= CompVis/stable-diffusion-v1-4's UNet)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


class PeakBytes:
    """A TorchDispatchMode that adds up the bytes of every storage an op creates while it
    lives (weak references see it freed): the peak is what a caching allocator would need
    without rounding or fragmentation. Storages made before (the parameters) are not counted."""

    def __new__(cls):
        import weakref
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class _Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live, self.now, self.peak = {}, 0, 0

            def _free(self, key, nbytes, _ref):
                self.live.pop(key, None)
                self.now -= nbytes

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key = st._cdata
                        if key not in self.live:
                            n = st.nbytes()
                            self.live[key] = weakref.ref(st, lambda r, k=key, n=n: self._free(k, n, r))
                            self.now += n
                            self.peak = max(self.peak, self.now)
                return out

        return _Mode()


@contextmanager
def cuda_autocast_norms():
    """Run group_norm and layer_norm in float32, as CUDA's autocast does (its fp32 op list;
    the CPU's autocast runs them in fp16): their fp32 inputs and outputs are what the
    backward pass keeps on a GPU."""
    import torch.nn.functional as F
    gn, ln = F.group_norm, F.layer_norm

    def f32(t):
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        with torch.autocast("cpu", enabled=False):
            return gn(f32(input), num_groups, f32(weight), f32(bias), eps)

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        with torch.autocast("cpu", enabled=False):
            return ln(f32(input), normalized_shape, f32(weight), f32(bias), eps)

    F.group_norm, F.layer_norm = group_norm, layer_norm
    try:
        yield
    finally:
        F.group_norm, F.layer_norm = gn, ln


def measure(batch: int, gc: bool, lora_rank: int = 0) -> dict:
    """Peak bytes of one fp16-autocast forward + backward of the SD v1.4 UNet at 64x64 latents."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    t0 = time.perf_counter()
    with FakeTensorMode():
        default = torch.get_default_dtype()
        # LoRA: the frozen base in the pipeline's dtype (fp16), as fgbg.finetune keeps it under autocast.
        # Built in that dtype: Module.to cannot convert fake parameters (it swaps them, and the
        # fake mode holds weak references), so peft's .to() calls are skipped too.
        torch.set_default_dtype(torch.float16 if lora_rank else torch.float32)
        try:
            unet = sd14_unet()
            n_params = sum(p.numel() for p in unet.parameters())
            if lora_rank:
                from unittest import mock
                from fgbg.finetune import _add_lora
                with mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
                    _add_lora(unet, lora_rank)  # LoRA weights float32, the base fp16
        finally:
            torch.set_default_dtype(default)
        if not lora_rank:
            unet.requires_grad_(True)
        trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        unet.train()
        if gc:
            unet.enable_gradient_checkpointing()
        x = torch.randn(batch, 4, 64, 64)
        t = torch.randint(0, 1000, (batch,))
        c = torch.randn(batch, 77, 768)
        mt = PeakBytes()  # the parameters (made before) are not counted: what the step adds to them
        with mt, cuda_autocast_norms():  # also in the backward pass: checkpointing recomputes the norms
            with torch.autocast("cpu", dtype=torch.float16):
                y = unet(x, t, encoder_hidden_states=c).sample
            fwd = mt.now
            ((y.float() - x) ** 2).mean().backward()
            grads = sum(p.grad.numel() * p.grad.element_size() for p in unet.parameters() if p.grad is not None)
    return {"batch": batch, "gradient_checkpointing": gc, "lora_rank": lora_rank, "params": n_params,
            "trainable": trainable, "peak_over_params_gib": mt.peak / GIB, "after_forward_gib": fwd / GIB,
            "grads_gib": grads / GIB, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--lora-rank", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--gc", choices=["on", "off", "both"], default="both")
    ap.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    a = ap.parse_args(argv)
    gcs = {"on": [True], "off": [False], "both": [False, True]}[a.gc]
    for rank in a.lora_rank:
        for gc in gcs:
            for b in a.batch:
                r = measure(b, gc, rank)
                print(f"lora_rank {rank:2d}  checkpointing {'on ' if gc else 'off'}  batch {b}: peak over the "
                      f"parameters {r['peak_over_params_gib']:6.2f} GiB (after the forward pass "
                      f"{r['after_forward_gib']:.2f}, gradients {r['grads_gib']:.2f})  ({r['seconds']} s)", flush=True)
                if a.json:
                    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                    with open(a.json, "a") as f:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
