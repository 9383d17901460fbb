"""Speed of steps 1, 3 and 4 on one GPU at SD v1.4 size: images/s, peak memory, TFLOP/s.

    python benchmarks/bench_gpu.py --json out.json              # one H100/H200: about 7 minutes
    python benchmarks/bench_gpu.py --json out.json --profile    # + the top kernels of step 1 and fine-tuning
    python benchmarks/bench_gpu.py --dry-run                    # the plan only (no GPU, no model)
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --cpu --json /tmp/b.json   # smoke test, < 1 min

One run measures, on the SD v1.4-shaped pipeline with random weights at 512x512
(``fgbg.models.random_pipeline("sd14")``; speed and memory do not depend on the weights'
values), one row per configuration:

1. Step 1 (raw cross-attention maps, 40 noise levels of one image):
   * BASELINE, "reference style": the loop written out below (:func:`reference_style_step1`),
     the way the reference code (MischaD/fobadiffusion) computes step 1: one UNet pass per
     level, one level after another, batch 1, fp32, eager attention everywhere (diffusers'
     ``AttnProcessor``), every cross-attention layer's head-averaged probabilities of every
     level kept, then upsampled and averaged. The ratios of step 1 are against this row.
   * "reference as released": the same loop with the reference script's own batch (3 images
     per UNet pass) under ``torch.autocast("cuda")`` (fp16), which is what its
     ``compute_attention_masks_raw.py`` runs; shown for context, not used for the ratios.
   * fgbg: ``fgbg.attention.compute_attention_maps``, one image per call with its 40 levels as
     one UNet batch, in the pipeline's native half precision (``fgbg.models.pick_dtype``:
     bf16 from compute capability 8.0), SDPA self-attention, captured cross-attention.
   * the same with ``pipe.unet.compile()`` (torch.compile, mode "default"); a compile error
     or overrun is recorded and the run goes on.
2. Step 4: ``fgbg.inpaint.inpaint_background``, 50 DDIM steps, batches of 8 and 16.
3. Step 3 (fine-tuning) throughput in samples/s, with and without gradient checkpointing, at
   batches 8 and 32: ``fgbg.finetune.finetune`` itself is called (not a copy of its loop) on a
   tiny synthetic CUB-layout dataset (``fgbg.miniworld.write_cub_like``, 8 images, M_pre from
   steps 1-2 with 2 levels), with its defaults otherwise (AdamW, EMA on the GPU, bf16
   autocast over fp32 master weights); only its disk writes (checkpoint, saved pipeline) are
   skipped. A step is the time between the starts of consecutive UNet forwards (a
   forward pre-hook), after 2 warm-up steps; the hook stops the run once the row's time
   budget is spent.

Every row prints images/s (samples/s), peak GPU memory (``torch.cuda.max_memory_allocated``,
reset before each row), TFLOP/s achieved and its fraction of the card's matrix rate in the
compute dtype (bf16 on an H100/H200), which the script measures first (an 8192^3 matmul, best
of 3 x 10), and, for step 1,
the ratio to the reference style. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``
on the warm-up call of each row (not timed): step 1 per image from the reference-style row
(eager attention: every attention matmul is counted; fgbg's own count is recorded beside
it), step 4 per image from one batched call (VAE encode, 50 UNet passes, VAE decode), and
fine-tuning as 3 x one UNet forward per sample (forward + backward, the usual "model FLOPs";
the recomputation of gradient checkpointing is not counted).

Each row has its own time budget and the whole run a global one (``--budget``, 450 s):
a timed loop stops when its next iteration would overrun, a row that would start with less
than its minimum left is skipped (and says so), and a row running past its budget plus a
grace period is stopped by a timer (SIGALRM). The JSON (``--json``) is rewritten after every
row, so a killed run keeps what it measured. ``--profile`` adds a torch.profiler summary
(GPU busy time, time by kernel kind, top kernels by CUDA time) of one step-1 image (eager,
and compiled when the compile row ran) and of two fine-tuning steps.

``--cpu`` runs the same code paths on the tiny teaching-shaped model (``random_pipeline("tiny")``)
at its own size (64x64), with tiny counts, on the CPU: a smoke test of this script, not a timing.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PROMPT = "a photo of a bird"

# the project's speed targets on an H100/H200 at 512x512 (benchmarks/README.md)
TARGETS = {
    "step1": {"rate": 16.0, "ratio": 25.0, "unit": "images/s"},
    "step4": {"rate": 10.0, "unit": "images/s"},
    "finetune": {"rate": 60.0, "unit": "samples/s"},
}


def plan_for(cpu: bool, a) -> dict:
    """What one run measures: sizes, counts and time budgets (seconds) of every row."""
    if cpu:
        return dict(
            model="tiny", device="cpu", budget=a.budget or 50.0, grace=10.0, reserve=6.0 if a.profile else 1.0,
            matmul_n=512, matmul_repeats=5, levels=10, num_inference_steps=50,
            reference=dict(max_images=2, budget=4.0, min_s=2.0),
            released=dict(batch=2, max_batches=1, budget=4.0, min_s=2.0),
            fgbg=dict(max_images=3, budget=3.0, min_s=1.0),
            compiled=dict(max_images=2, budget=15.0, min_s=5.0, backend=a.compile_backend or "eager"),
            step4=dict(batches=a.step4_batches or [2, 4], steps=5, max_reps=2, budget=3.0, min_s=1.0),
            finetune=dict(batches=a.finetune_batches or [2], n_images=4, image_hw=(48, 64), warm=2, max_timed=3,
                          min_timed=1, budget=4.0, min_s=1.0),
            profile_finetune_steps=5)
    return dict(
        model="sd14", device="cuda", budget=a.budget or 450.0, grace=20.0, reserve=30.0 if a.profile else 5.0,
        matmul_n=8192, matmul_repeats=10, levels=40, num_inference_steps=50,
        reference=dict(max_images=8, budget=30.0, min_s=10.0),
        released=dict(batch=3, max_batches=3, budget=15.0, min_s=8.0),
        fgbg=dict(max_images=32, budget=25.0, min_s=8.0),
        compiled=dict(max_images=32, budget=150.0, min_s=60.0, backend=a.compile_backend or "inductor"),
        step4=dict(batches=a.step4_batches or [8, 16], steps=50, max_reps=3, budget=25.0, min_s=10.0),
        finetune=dict(batches=a.finetune_batches or [8, 32], n_images=8, image_hw=(375, 500), warm=2, max_timed=10,
                      min_timed=3, budget=22.0, min_s=10.0),
        profile_finetune_steps=5)


def row_list(p: dict, skip: set) -> list[tuple[str, str, str]]:
    """(row id, part, description) in the order they run (the uncertain compile last of step 1)."""
    L = p["levels"]
    rows = [("step1_reference", "step1",
             f"step 1 BASELINE reference style: batch 1, {L} levels one by one, fp32, eager"),
            ("step1_reference_as_released", "step1",
             f"step 1 reference as released: {p['released']['batch']} images/pass, levels one by one, "
             f"autocast fp16 (CUDA), eager"),
            ("step1_fgbg", "step1", f"step 1 fgbg: {L} levels in one batch, pick_dtype (bf16 on GPU), SDPA + capture"),
            ("step1_fgbg_compiled", "step1", f"step 1 fgbg + torch.compile(unet) ({p['compiled']['backend']})")]
    rows += [(f"step4_b{b}", "step4", f"step 4 inpaint_background, batch {b}, {p['step4']['steps']} DDIM steps")
             for b in p["step4"]["batches"]]
    rows += [(f"finetune_b{b}_gc_{'on' if gc_ else 'off'}", "finetune",
              f"step 3 finetune(), batch {b}, gradient checkpointing {'on' if gc_ else 'off'}")
             for b in p["finetune"]["batches"] for gc_ in (False, True)]
    names = {"reference": "step1_reference", "released": "step1_reference_as_released", "fgbg": "step1_fgbg",
             "compile": "step1_fgbg_compiled"}
    out = []
    for rid, part, what in rows:
        if any(rid == names.get(s) or rid.startswith(s + "_") or rid == s for s in skip):
            continue
        out.append((rid, part, what))
    return out


# --------------------------------------------------------------------------- timing helpers
class PartTimeout(BaseException):
    """A row ran past its budget plus the grace period (raised by SIGALRM). A BaseException,
    so that library code catching Exception does not swallow it."""


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise PartTimeout in the main thread after ``seconds`` (no-op where SIGALRM is missing)."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise PartTimeout(f"stopped by the timer after {seconds:.0f} s (its budget plus grace)")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.5))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_loop(fn, items_per_call: int, budget_s: float, max_calls: int, dev: torch.device,
               min_calls: int = 1) -> dict:
    """Call ``fn(k)`` for k = 0, 1, ... until ``max_calls`` or until the next call (at the
    median duration so far) would end after ``budget_s``; at least ``min_calls`` calls."""
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < max_calls:
        if len(times) >= min_calls:
            med = sorted(times)[len(times) // 2]
            if time.perf_counter() - t_start + med > budget_s:
                break
        sync(dev)
        t0 = time.perf_counter()
        fn(len(times))
        sync(dev)
        times.append(time.perf_counter() - t0)
    total = sum(times)
    return {"calls": len(times), "items": items_per_call * len(times), "seconds": round(total, 3),
            "rate": items_per_call * len(times) / total if total > 0 else float("nan"),
            "call_s": [round(t, 4) for t in times],
            "stopped_by_budget": len(times) < max_calls}


def count_flops(fn):
    """(result of fn(), total FLOPs counted by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        r = fn()
    return r, int(fc.get_total_flops())


def matmul_rate(dev: torch.device, dtype: torch.dtype, n: int, repeats: int, trials: int = 3) -> float:
    """The measured matrix rate in TFLOP/s: best of ``trials`` x ``repeats`` n^3 matmuls."""
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(dev)
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12)
    del a, b
    return best


# --------------------------------------------------------------------------- the BASELINE
class KeepCrossAttention:
    """The reference's way of recording cross-attention, on a diffusers UNet: every attention
    layer runs diffusers' eager ``AttnProcessor`` (QK^T, softmax, times V as three kernels),
    and each cross-attention layer (``attn2``) keeps a clone of its head-averaged softmax
    probabilities of the current pass, like the reference's ``CrossAttention(save_attention=
    True)`` (``attn.mean over heads``, ``torch.clone``). ``maps``: layer name -> (B, Nq, tokens)."""

    def __init__(self, unet):
        self.unet = unet
        self.layers = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
        self.maps: dict[str, torch.Tensor] = {}

    def __enter__(self):
        from diffusers.models.attention_processor import AttnProcessor
        self.original = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(AttnProcessor())
        for name, m in self.layers.items():
            orig = m.get_attention_scores

            def scores(query, key, attention_mask=None, _orig=orig, _name=name, _heads=m.heads):
                probs = _orig(query, key, attention_mask)
                self.maps[_name] = probs.view(-1, _heads, *probs.shape[1:]).mean(1).clone()
                return probs
            m.get_attention_scores = scores  # an instance attribute over the bound method
        return self

    def __exit__(self, *exc):
        for m in self.layers.values():
            m.__dict__.pop("get_attention_scores", None)
        self.unet.set_attn_processor(self.original)
        return False


@torch.no_grad()
def reference_style_step1(pipe, images: torch.Tensor, prompt: str = PROMPT, levels: int = 40,
                          num_inference_steps: int = 50, generator: torch.Generator | None = None,
                          autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """BASELINE (not fgbg's code path): step 1 as the reference code computes it.

    ``images`` (B, 3, S, S) in [-1, 1] go through the UNet together (the reference's batch),
    but the ``levels`` noise levels one after another: for each level t (highest first) one
    UNet pass on z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps with eager attention, keeping
    every cross-attention layer's head-averaged map (:class:`KeepCrossAttention`); all maps of
    all levels stay in memory until the end, when each is upsampled (nearest) to the latent
    grid and all are averaged: (B, tokens, h, w), the reference's ``all_token_mean``.
    ``autocast_dtype``: run under ``torch.autocast`` (the reference script's
    ``autocast("cuda")`` is fp16); None: the pipeline's own dtype (fp32 for the baseline).
    Noise is drawn as fgbg draws it (image-major, then level), so with the same generator the
    maps equal fgbg's up to rounding.
    """
    from diffusers import DDIMScheduler
    from fgbg import attention
    unet, dev = pipe.unet, pipe.unet.device
    ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with ctx, KeepCrossAttention(unet) as keep:
        z0 = attention.encode_images(pipe, images)
        cond = attention.encode_prompt(pipe, prompt)
        ts = attention.noise_levels(pipe.scheduler.config, num_inference_steps, levels)
        abar = DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.to(dev)
        B = z0.shape[0]
        noise = torch.randn((B, len(ts), *z0.shape[1:]), generator=generator,
                            device=generator.device if generator is not None else "cpu")
        kept = []
        for k, t in enumerate(ts):
            a = abar[t].to(z0.dtype)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise[:, k].to(dev, z0.dtype)
            keep.maps = {}
            unet(zt, torch.full((B,), t, device=dev), encoder_hidden_states=cond.expand(B, -1, -1))
            kept.append(keep.maps)
    h, w = z0.shape[-2:]
    total, n = None, 0
    for level in kept:
        for p in level.values():
            f = int(round((h * w / p.shape[1]) ** 0.5))
            m = p.float().transpose(1, 2).reshape(B, p.shape[2], h // f, w // f)
            m = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")
            total = m if total is None else total + m
            n += 1
    return total / n


# --------------------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, a):
        self.a = a
        self.cpu = a.cpu
        self.p = plan_for(a.cpu, a)
        self.dev = torch.device(self.p["device"])
        self.t0 = time.perf_counter()
        self.res = {"meta": {}, "plan": {}, "rows": {}, "profile": {}}
        self.tmp = None
        self.ref_map0 = None
        self.flops = {}

    # ---- clock
    def left(self) -> float:
        return self.p["budget"] - (time.perf_counter() - self.t0)

    def save(self) -> None:
        if self.a.json:
            path = Path(self.a.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.res, indent=1, default=str))

    # ---- one row
    def row(self, rid: str, part: str, what: str, budget: float, min_s: float, fn, reserve: float | None = None):
        """Run ``fn(budget_s) -> dict`` as row ``rid`` under its budget; record and print it."""
        reserve = self.p["reserve"] if reserve is None else reserve
        avail = self.left() - reserve
        rec = {"part": part, "what": what, "budget_s": budget}
        if avail < min_s:
            rec.update(status="skipped", reason=f"would overrun: {max(avail, 0):.0f} s left of the run's budget, "
                                                f"this row needs at least {min_s:.0f} s")
            self._finish(rid, rec)
            return rec
        b = min(budget, avail)
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
        t0 = time.perf_counter()
        try:
            with hard_limit(b + self.p["grace"]):
                rec.update(fn(b))
            rec.setdefault("status", "ok")
        except PartTimeout as e:
            rec.update(status="timeout", reason=str(e))
        except torch.cuda.OutOfMemoryError as e:
            rec.update(status="oom", reason=str(e).splitlines()[0][:200])
        except Exception as e:  # record it, go on with the next row
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            rec.update(status="error", reason=f"{type(e).__name__}: {msg}")
            traceback.print_exc(limit=6)
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        if self.dev.type == "cuda":
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated(self.dev) / 2 ** 30, 2)
        gc.collect()
        self._finish(rid, rec)
        return rec

    def _finish(self, rid: str, rec: dict) -> None:
        peak = self.res["meta"].get("matmul_tflops")
        if rec.get("rate") and rec.get("flops_per_item"):
            rec["tflops"] = float(f"{rec['flops_per_item'] * rec['rate'] / 1e12:.4g}")
            if peak:
                rec["frac_of_matmul_rate"] = float(f"{rec['tflops'] / peak:.3g}")
        ref = self.res["rows"].get("step1_reference", {}).get("rate")
        if rec.get("part") == "step1" and rec.get("rate") and ref:
            rec["ratio_to_reference"] = round(rec["rate"] / ref, 2)
        self.res["rows"][rid] = rec
        print(self.format_row(rec), flush=True)
        self.save()

    def format_row(self, rec: dict) -> str:
        head = f"{rec['what'][:78]:78s}"
        if rec.get("status") != "ok":
            return f"{head} {rec.get('status', '?').upper()}: {rec.get('reason', '')}"
        unit = "samples/s" if rec["part"] == "finetune" else "images/s"
        peak = f"{rec['peak_gib']:6.2f} GiB" if rec.get("peak_gib") is not None else "     - GiB"
        tf = f"{rec['tflops']:7.4g} TFLOP/s" if rec.get("tflops") is not None else "      - TFLOP/s"
        frac = f" ({100 * rec['frac_of_matmul_rate']:4.1f}%)" if rec.get("frac_of_matmul_rate") is not None else ""
        ratio = f"  {rec['ratio_to_reference']:6.1f}x ref" if rec.get("ratio_to_reference") is not None else ""
        n = f"  [{rec.get('items')} in {rec.get('seconds')} s{', budget hit' if rec.get('stopped_by_budget') else ''}]"
        return f"{head} {rec['rate']:8.2f} {unit}  peak {peak}  {tf}{frac}{ratio}{n}"

    # ---- setup
    def setup(self) -> None:
        import diffusers
        import transformers
        from fgbg import models
        m = self.res["meta"]
        m.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), mode="cpu" if self.cpu else "gpu",
                 torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                 python=platform.python_version(), cuda=torch.version.cuda, argv=sys.argv[1:])
        try:
            root = Path(__file__).resolve().parents[1]
            m["git"] = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                                      text=True, timeout=10).stdout.strip() or None
        except Exception:
            m["git"] = None
        if self.dev.type == "cuda":
            pr = torch.cuda.get_device_properties(self.dev)
            m.update(card=pr.name, compute_capability=f"{pr.major}.{pr.minor}",
                     memory_gib=round(pr.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
                     tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                     cudnn_benchmark=torch.backends.cudnn.benchmark)
        else:
            m.update(card=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
        self.dtype = models.pick_dtype(self.dev)
        m["dtype"] = str(self.dtype).removeprefix("torch.")
        self.res["plan"] = {**self.p, "rows": [r[0] for r in row_list(self.p, set(self.a.skip))]}
        print(f"{m['card']} | torch {m['torch']} | diffusers {m['diffusers']} | {m['date']} | compute dtype "
              f"{m['dtype']} | run budget {self.p['budget']:.0f} s", flush=True)
        t0 = time.perf_counter()
        m["matmul_dtype"] = m["dtype"]  # the compute dtype: bf16 on an H100/H200 (fp16 on a T4, fp32 on a CPU)
        mm_dtype = self.dtype
        rate = matmul_rate(self.dev, mm_dtype, self.p["matmul_n"], self.p["matmul_repeats"])
        m["matmul_tflops"] = float(f"{rate:.4g}")
        print(f"matrix rate ({self.p['matmul_n']}^3 {m['matmul_dtype']} matmul, best of 3 x "
              f"{self.p['matmul_repeats']}): {m['matmul_tflops']} TFLOP/s ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        t0 = time.perf_counter()
        self.pipe = models.random_pipeline(self.p["model"], device=str(self.dev))  # fp32: the baseline first
        self.S = models.canvas_size(self.pipe)
        m["model"] = f"random_pipeline({self.p['model']!r}), canvas {self.S}x{self.S}, UNet " \
                     f"{sum(p.numel() for p in self.pipe.unet.parameters()) / 1e6:.1f} M parameters"
        m["setup_s"] = round(time.perf_counter() - t0, 1)
        print(f"{m['model']} (built in {m['setup_s']} s)", flush=True)
        g = torch.Generator().manual_seed(0)
        n = max(self.p["fgbg"]["max_images"], self.p["compiled"]["max_images"], self.p["reference"]["max_images"],
                self.p["released"]["batch"] * self.p["released"]["max_batches"])
        self.x = torch.rand(n, 3, self.S, self.S, generator=g) * 2 - 1
        self.save()

    # ---- step 1
    def step1_reference(self, budget: float) -> dict:
        p, pipe = self.p, self.pipe
        def fn(k):
            return reference_style_step1(pipe, self.images(k), PROMPT, p["levels"], p["num_inference_steps"],
                                         torch.Generator().manual_seed(k))
        t0 = time.perf_counter()
        m0, flops = count_flops(lambda: fn(0))
        self.ref_map0 = m0[0].float().cpu()
        self.flops["step1"] = flops
        r = timed_loop(lambda k: fn(k + 1), 1, budget - (time.perf_counter() - t0), p["reference"]["max_images"],
                       self.dev)
        return {**r, "flops_per_item": flops, "flop_source": "FlopCounterMode, this row's warm-up image (eager)",
                "dtype": str(pipe.unet.dtype).removeprefix("torch.")}

    def step1_released(self, budget: float) -> dict:
        p, pipe = self.p, self.pipe
        B = p["released"]["batch"]
        ac = torch.float16 if self.dev.type == "cuda" else None
        def fn(k):
            return reference_style_step1(pipe, self.images(k, B), PROMPT, p["levels"], p["num_inference_steps"],
                                         torch.Generator().manual_seed(k), ac)
        t0 = time.perf_counter()
        _, flops = count_flops(lambda: fn(0))
        r = timed_loop(fn, B, budget - (time.perf_counter() - t0), p["released"]["max_batches"], self.dev)
        return {**r, "flops_per_item": flops / B, "flop_source": "FlopCounterMode, this row's warm-up batch / batch",
                "autocast": str(ac).removeprefix("torch.") if ac else "none (CPU)"}

    def images(self, k: int, B: int = 1) -> torch.Tensor:
        """The k-th batch of B test images (cycling through the drawn ones)."""
        return self.x[torch.arange(k * B, (k + 1) * B) % len(self.x)]

    def fgbg_call(self, k: int):
        from fgbg import attention
        p = self.p
        return attention.compute_attention_maps(self.pipe, self.images(k).to(self.dtype), PROMPT, p["levels"],
                                                p["num_inference_steps"], unet_batch=p["levels"],
                                                generator=torch.Generator().manual_seed(k))

    def step1_fgbg(self, budget: float) -> dict:
        p = self.p
        t0 = time.perf_counter()
        maps, own = count_flops(lambda: self.fgbg_call(0))
        out = {"flops_counted_own": own, "dtype": str(self.pipe.unet.dtype).removeprefix("torch.")}
        if self.ref_map0 is not None:  # the same noise: the baseline's maps, up to rounding (fp32 vs bf16)
            a, b = maps.mean()[0].float(), self.ref_map0
            out["max_rel_diff_to_baseline"] = float((a - b).abs().max() / b.abs().max())
            out["corr_with_baseline"] = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        r = timed_loop(lambda k: self.fgbg_call(k + 1), 1, budget - (time.perf_counter() - t0),
                       p["fgbg"]["max_images"], self.dev)
        flops = self.flops.get("step1", own)
        return {**r, **out, "flops_per_item": flops,
                "flop_source": "the baseline's count (same work)" if "step1" in self.flops else "this row's count"}

    def step1_compiled(self, budget: float) -> dict:
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters
        p = self.p
        unet = self.pipe.unet
        dynamo.reset()
        counters.clear()
        out = {"backend": p["compiled"]["backend"], "mode": "default"}
        graphs = lambda: counters["stats"].get("unique_graphs", 0)  # noqa: E731
        t0 = time.perf_counter()
        try:
            unet.compile(backend=p["compiled"]["backend"])  # mode "default"
            self.fgbg_call(0)
            sync(self.dev)
            out["first_call_s"] = round(time.perf_counter() - t0, 1)
            out["graphs_after_first_call"] = graphs()
            t1 = time.perf_counter()
            self.fgbg_call(1)  # slow again, with more graphs, if the capture processors force recompiles
            sync(self.dev)
            out["second_call_s"] = round(time.perf_counter() - t1, 1)
            out["graphs_after_second_call"] = graphs()
            r = timed_loop(lambda k: self.fgbg_call(k + 2), 1, budget - (time.perf_counter() - t0),
                           p["compiled"]["max_images"], self.dev)
            out.update(graphs_at_end=graphs(), frames_compiled=counters["frames"].get("ok"),
                       graph_breaks=sum(counters["graph_break"].values()),
                       graph_break_reasons={k[:200]: v for k, v in sorted(counters["graph_break"].items(),
                                                                           key=lambda kv: -kv[1])[:5]})
            if self.a.profile:
                self.res["profile"]["step1_compiled"] = self.profile_call(lambda: self.fgbg_call(0),
                                                                          "step 1, fgbg + torch.compile")
            out.update(r)
            out["flops_per_item"] = self.flops.get("step1")
            out["flop_source"] = "the baseline's count (same work)"
            return out
        finally:
            unet._compiled_call_impl = None  # nn.Module.compile's slot: eager again for the next rows
            dynamo.reset()

    # ---- step 4
    def step4(self, B: int, budget: float) -> dict:
        from fgbg import inpaint
        p, pipe = self.p, self.pipe
        h = self.S // pipe.vae_scale_factor
        x = self.images(0, B)
        m = torch.zeros(B, 1, h, h)
        m[..., h // 4:3 * h // 4, h // 4:3 * h // 4] = 1  # repaint the centre quarter
        def fn(k):  # one generator per image, as inpaint_and_refine passes them
            return inpaint.inpaint_background(pipe, x, m, inpaint.BACKGROUND_PROMPT, p["step4"]["steps"],
                                              generators=[torch.Generator().manual_seed(k * B + i) for i in range(B)])
        t0 = time.perf_counter()
        _, flops = count_flops(lambda: fn(0))
        r = timed_loop(lambda k: fn(k + 1), B, budget - (time.perf_counter() - t0), p["step4"]["max_reps"], self.dev)
        return {**r, "flops_per_item": flops / B, "flop_source": "FlopCounterMode, this row's warm-up batch / batch"}

    # ---- step 3
    def finetune_setup(self) -> None:
        """A tiny CUB-layout dataset with M_pre (steps 1-2, 2 levels) for finetune(), and the
        FLOPs of one UNet forward per sample."""
        from fgbg import attention, data, masks, miniworld
        f = self.p["finetune"]
        self.tmp = Path(tempfile.mkdtemp(prefix="fgbg_bench_"))
        base = miniworld.write_cub_like(self.tmp / "cub", n_train=f["n_images"], n_test=1, h=f["image_hw"][0],
                                        w=f["image_hw"][1])
        self.ft_items = data.load_dataset(base, "train")
        self.ft_out = self.tmp / "run"
        attention.save_attention_maps(self.pipe, self.ft_items, self.ft_out, prompt=PROMPT, rev_diff_steps=2,
                                      overwrite=True, progress=False)
        masks.preliminary_masks(self.ft_items, self.ft_out, overwrite=True, progress=False)
        unet = self.pipe.unet
        h = int(unet.config.sample_size)
        z = torch.randn(1, unet.config.in_channels, h, h, device=self.dev, dtype=unet.dtype)
        cond = attention.encode_prompt(self.pipe, PROMPT)
        with torch.no_grad():
            _, fwd = count_flops(lambda: unet(z, torch.tensor([500], device=self.dev), encoder_hidden_states=cond))
        self.flops["unet_forward"] = fwd

    def finetune_row(self, B: int, use_gc: bool, budget: float, prof=None, steps: int | None = None) -> dict:
        from unittest import mock
        from fgbg import finetune
        f, pipe, dev = self.p["finetune"], self.pipe, self.dev
        steps = steps or f["warm"] + f["max_timed"] + 1
        starts: list[float] = []
        deadline = time.perf_counter() + budget

        class Enough(Exception):
            pass

        def stamp(*_):  # the start of every UNet forward: one per training step
            sync(dev)
            starts.append(time.perf_counter())
            if prof is not None:
                prof.step()
            timed = len(starts) - 1 - f["warm"]
            if prof is None and timed >= f["min_timed"] and time.perf_counter() > deadline:
                raise Enough

        cfg = finetune.FinetuneConfig(steps=steps, batch_size=B, gradient_checkpointing=use_gc, save_every=10 ** 6)
        hook = pipe.unet.register_forward_pre_hook(stamp)
        stopped = False
        try:  # the disk writes (checkpoint, 3.4 GB pipeline) are not the training step: skipped
            with mock.patch.object(finetune, "_save_checkpoint", lambda *a: None), \
                    mock.patch.object(pipe, "save_pretrained", lambda *a, **k: None):
                finetune.finetune(pipe, self.ft_items, self.ft_out, cfg, progress=False, overwrite=True)
        except Enough:
            stopped = True
        finally:
            hook.remove()
        steps_s = [b - a for a, b in zip(starts, starts[1:])][f["warm"]:]
        if not steps_s:
            raise RuntimeError(f"no timed step ({len(starts)} UNet forwards seen)")
        total = sum(steps_s)
        return {"rate": B * len(steps_s) / total, "items": B * len(steps_s), "calls": len(steps_s),
                "seconds": round(total, 3), "step_s": [round(s, 4) for s in steps_s], "stopped_by_budget": stopped,
                "flops_per_item": 3 * self.flops["unet_forward"],
                "flop_source": "3 x one UNet forward (FlopCounterMode), per sample; recomputation not counted",
                "config": {"optimizer": cfg.optimizer, "ema": getattr(cfg, "ema", "gpu"),
                           "mixed_precision": cfg.mixed_precision, "gradient_checkpointing": use_gc}}

    # ---- profiles
    def profile_call(self, fn, label: str, steps_fn=None) -> dict:
        """A torch.profiler summary of ``fn()`` (or, with ``steps_fn(prof)``, of the steps the
        profiler's schedule records), printed and returned."""
        from torch.profiler import ProfilerActivity, profile, schedule
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
        sync(self.dev)
        if steps_fn is None:
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                fn()
                sync(self.dev)
                wall = time.perf_counter() - t0
        else:  # the schedule records steps 3-4 (prof.step() at each step's start); wall: their time
            with profile(activities=acts, schedule=schedule(wait=2, warmup=1, active=2)) as prof:
                wall = steps_fn(prof)
        s = summarize_profile(prof, wall, self.dev.type == "cuda")
        s["what"] = label
        print(format_profile(s), flush=True)
        return s

    def run(self) -> dict:
        a, p = self.a, self.p
        self.setup()
        rows = row_list(p, set(a.skip))
        ids = [r[0] for r in rows]
        what = {r[0]: r[2] for r in rows}
        print(f"\n{'row':78s} {'rate':>8s}", flush=True)
        if "step1_reference" in ids:
            self.row("step1_reference", "step1", what["step1_reference"], p["reference"]["budget"],
                     p["reference"]["min_s"], self.step1_reference)
        if "step1_reference_as_released" in ids:
            self.row("step1_reference_as_released", "step1", what["step1_reference_as_released"],
                     p["released"]["budget"], p["released"]["min_s"], self.step1_released)
        self.pipe.to(dtype=self.dtype)  # fgbg's rows: the native half precision (bf16; fp32 on a CPU)
        if "step1_fgbg" in ids:
            self.row("step1_fgbg", "step1", what["step1_fgbg"], p["fgbg"]["budget"], p["fgbg"]["min_s"],
                     self.step1_fgbg)
        if "step1_fgbg_compiled" in ids:
            self.row("step1_fgbg_compiled", "step1", what["step1_fgbg_compiled"], p["compiled"]["budget"],
                     p["compiled"]["min_s"], self.step1_compiled)
        for B in p["step4"]["batches"]:
            if f"step4_b{B}" in ids:
                self.row(f"step4_b{B}", "step4", what[f"step4_b{B}"], p["step4"]["budget"], p["step4"]["min_s"],
                         lambda b, B=B: self.step4(B, b))
        ft = [r for r in rows if r[1] == "finetune"]
        setup_err = None
        if ft and self.left() - p["reserve"] >= p["finetune"]["min_s"]:  # else every row says it is skipped
            try:
                t0 = time.perf_counter()
                with hard_limit(self.left() - p["reserve"]):
                    self.finetune_setup()
                print(f"(fine-tuning data: {len(self.ft_items)} images, M_pre from 2 levels, "
                      f"{time.perf_counter() - t0:.1f} s)", flush=True)
            except (Exception, PartTimeout) as e:
                setup_err = f"the fine-tuning data could not be prepared: {type(e).__name__}: {e}"
                if not isinstance(e, PartTimeout):
                    traceback.print_exc(limit=6)
        if ft:
            for rid, _, w in ft:
                B = int(re.search(r"_b(\d+)_", rid).group(1))
                use_gc = rid.endswith("_on")
                if setup_err:
                    self._finish(rid, {"part": "finetune", "what": w, "status": "error", "reason": setup_err})
                    continue
                self.row(rid, "finetune", w, p["finetune"]["budget"], p["finetune"]["min_s"],
                         lambda b, B=B, g=use_gc: self.finetune_row(B, g, b))
        if a.profile:
            self.profiles(ft)
        self.summary()
        self.res["meta"]["total_s"] = round(time.perf_counter() - self.t0, 1)
        self.save()
        return self.res

    def profiles(self, ft) -> None:
        left = self.left()
        if left < 5:
            print(f"profiles skipped: {left:.0f} s left of the run's budget", flush=True)
            self.res["profile"]["skipped"] = f"{left:.0f} s left"
            return
        try:
            with hard_limit(max(left, 5.0) + self.p["grace"]):
                self.fgbg_call(0)  # warm
                self.res["profile"]["step1"] = self.profile_call(lambda: self.fgbg_call(0), "step 1, fgbg (eager)")
                ok = [(r, self.res["rows"][r[0]]) for r in ft if self.res["rows"].get(r[0], {}).get("status") == "ok"]
                if ok:
                    (rid, _, w), _ = max(ok, key=lambda x: x[1]["rate"])
                    B = int(re.search(r"_b(\d+)_", rid).group(1))
                    use_gc = rid.endswith("_on")
                    self.res["profile"]["finetune"] = self.profile_call(
                        None, f"{w}: training steps 3-4", steps_fn=lambda prof: self.finetune_row(
                            B, use_gc, 1e9, prof=prof, steps=self.p["profile_finetune_steps"])["seconds"])
                    self.res["profile"]["finetune"]["row"] = rid
        except (Exception, PartTimeout) as e:
            self.res["profile"]["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc(limit=6)
        self.save()

    def summary(self) -> None:
        rows = self.res["rows"]
        peak = self.res["meta"].get("matmul_tflops")
        f1 = self.flops.get("step1")
        lines = ["", "summary (best row of each part against the speed targets):"]
        if f1 and peak:
            lim = peak * 1e12 / f1
            self.res["meta"]["step1_flops_per_image"] = f1
            self.res["meta"]["step1_images_per_s_at_matrix_rate"] = round(lim, 2)
            lines.append(f"  step 1: {f1 / 1e12:.4g} TFLOP per image -> {lim:.1f} images/s at the measured matrix rate")
        for part, tgt in TARGETS.items():
            ok = {k: r for k, r in rows.items() if r.get("part") == part and r.get("status") == "ok"
                  and k != "step1_reference_as_released"}
            if not ok:
                lines.append(f"  {part}: no row ran")
                continue
            k, r = max(ok.items(), key=lambda kv: kv[1]["rate"])
            met = r["rate"] >= tgt["rate"] and \
                ("ratio" not in tgt or (r.get("ratio_to_reference") or 0) >= tgt["ratio"])
            extra = f", {r['ratio_to_reference']}x the reference style (target {tgt['ratio']}x)" \
                if "ratio" in tgt and r.get("ratio_to_reference") else ""
            verdict = "met" if met else "NOT met"
            if self.cpu:
                verdict = "(CPU smoke test: targets are for an H100/H200)"
            lines.append(f"  {part}: {r['rate']:.2f} {tgt['unit']} ({k}){extra}; target >= {tgt['rate']} "
                         f"{tgt['unit']}: {verdict}")
            self.res.setdefault("targets", {})[part] = {"best_row": k, "rate": round(r["rate"], 3), "target": tgt,
                                                        "met": None if self.cpu else met}
        print("\n".join(lines), flush=True)

    def close(self) -> None:
        if self.tmp is not None:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- profiles
KINDS = [("attention", r"flash|fmha|attention|attn|sdpa"),
         ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|cudnn"),
         ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|matmul|\bmm\b|addmm|bmm"),
         ("normalization", r"norm|welford"),
         ("compiled fusion (triton)", r"^triton_"),
         ("elementwise / copy / reduce", r"elementwise|vectorized|copy|reduce|fill|index|cat|unroll|softmax")]


def kind_of(name: str) -> str:
    n = name.lower()
    for kind, pat in KINDS:
        if re.search(pat, n):
            return kind
    return "other"


def summarize_profile(prof, wall_s: float | None, cuda: bool, top: int = 15) -> dict:
    """GPU kernels (CPU ops on a CPU run) by self time: busy time, share by kind, the top ones."""
    evs = list(prof.key_averages())
    if cuda:
        from torch.autograd import DeviceType
        t = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
        kern = [e for e in evs if getattr(e, "device_type", None) == DeviceType.CUDA and t(e) > 0]
        if not kern:  # fallback: events with device time and no CPU time
            kern = [e for e in evs if t(e) > 0 and e.cpu_time_total == 0]
    else:
        t = lambda e: e.self_cpu_time_total  # noqa: E731
        kern = [e for e in evs if t(e) > 0 and not e.key.startswith("ProfilerStep")]
    total = sum(t(e) for e in kern)  # microseconds
    kinds: dict[str, float] = {}
    for e in kern:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + t(e)
    kern.sort(key=t, reverse=True)
    out = {"device": "cuda kernels" if cuda else "cpu ops (self time)", "busy_ms": round(total / 1e3, 2),
           "by_kind": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
           if total else {},
           "top": [{"name": e.key[:120], "calls": e.count, "ms": round(t(e) / 1e3, 3),
                    "share": round(t(e) / total, 3) if total else None} for e in kern[:top]]}
    if wall_s is not None:
        out["wall_ms"] = round(wall_s * 1e3, 2)
        out["busy_frac"] = round(total / 1e6 / wall_s, 3) if wall_s > 0 else None
    return out


def format_profile(s: dict) -> str:
    busy = f"{s['busy_ms']:.1f} ms of {s['device']}"
    if s.get("wall_ms"):
        busy += f" in {s['wall_ms']:.1f} ms wall ({100 * s['busy_frac']:.0f}% busy)"
    lines = [f"\nprofile: {s['what']}: {busy}",
             "  by kind: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["by_kind"].items()),
             f"  {'calls':>6s} {'ms':>9s} {'share':>6s}  kernel"]
    for e in s["top"]:
        lines.append(f"  {e['calls']:6d} {e['ms']:9.2f} {100 * (e['share'] or 0):5.1f}%  {e['name'][:100]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def dry_run(a) -> dict:
    """Import every code path and print the plan, without CUDA and without building a model."""
    from diffusers.models.attention_processor import AttnProcessor  # noqa: F401
    from torch.profiler import profile  # noqa: F401
    from torch.utils.flop_counter import FlopCounterMode  # noqa: F401
    from fgbg import attention, data, finetune, inpaint, masks, miniworld, models  # noqa: F401
    p = plan_for(a.cpu, a)
    finetune.FinetuneConfig(steps=3, batch_size=8, gradient_checkpointing=True, save_every=10 ** 6).check()
    for fn in (attention.compute_attention_maps, inpaint.inpaint_background, finetune.finetune, models.random_pipeline,
               models.pick_dtype, miniworld.write_cub_like, masks.preliminary_masks):
        assert callable(fn)
    rows = row_list(p, set(a.skip))
    budgets = {"step1_reference": p["reference"]["budget"], "step1_reference_as_released": p["released"]["budget"],
               "step1_fgbg": p["fgbg"]["budget"], "step1_fgbg_compiled": p["compiled"]["budget"]}
    cuda = torch.cuda.is_available()
    dt = str(models.pick_dtype(torch.device(p["device"]))) if (p["device"] == "cpu" or cuda) else \
        "bf16 on compute capability >= 8.0, else fp16 (fgbg.models.pick_dtype)"
    print(f"plan ({'CPU smoke test' if a.cpu else 'GPU'}; torch {torch.__version__}, CUDA available here: {cuda}):")
    print(f"  model random_pipeline({p['model']!r}) on {p['device']}, compute dtype {dt}; run budget "
          f"{p['budget']:.0f} s (grace {p['grace']:.0f} s per row, {p['reserve']:.0f} s kept for the end)")
    print(f"  matrix rate: {p['matmul_n']}^3 matmul in the compute dtype, best of 3 x "
          f"{p['matmul_repeats']}")
    for rid, part, what in rows:
        b = budgets.get(rid, p.get(part, {}).get("budget"))
        print(f"  {rid:30s} {what}  [budget {b:.0f} s]")
    print(f"  then: summary against the targets {json.dumps(TARGETS)}")
    if a.profile:
        print("  --profile: top kernels of one step-1 image (eager; compiled inside its row) and of 2 training steps")
    if a.json:
        print(f"  JSON: {a.json}")
    return {"plan": p, "rows": [r[0] for r in rows]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="What each row measures: the module docstring and benchmarks/README.md.")
    ap.add_argument("--json", default=None, help="write every number here (rewritten after each row)")
    ap.add_argument("--cpu", action="store_true", help="smoke test: the tiny model on the CPU, tiny counts (< 1 min)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (imports only, no CUDA needed)")
    ap.add_argument("--profile", action="store_true",
                    help="also print the top kernels by CUDA time of step 1 and of fine-tuning (torch.profiler)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (GPU 450, CPU 50)")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="rows to leave out: reference released fgbg compile step4 finetune, or a row id")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (GPU: inductor, CPU: eager)")
    ap.add_argument("--step4-batches", type=int, nargs="+", default=None, help="GPU: 8 16")
    ap.add_argument("--finetune-batches", type=int, nargs="+", default=None, help="GPU: 8 32")
    a = ap.parse_args(argv)
    if a.dry_run:
        return dry_run(a)
    if not a.cpu and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py measures a GPU and there is no CUDA device here: --cpu runs the smoke test, "
                         "--dry-run prints the plan")
    if a.cpu:
        torch.manual_seed(0)
    b = Bench(a)
    try:
        return b.run()
    finally:
        b.close()


if __name__ == "__main__":
    main()
