"""Step 3 of the method: concept distillation (fine-tune the generator's UNet).

After step 2 every training image has a preliminary mask M_pre: a rough guess of where the
object is. Step 3 teaches the generator what "background" means, using nothing but those
guesses. The whole UNet is trained (text encoder and VAE frozen) with the usual
epsilon-prediction loss; each sample of a batch is, with probability ``p_background``:

* an **object sample**: the full image with the prompt "a photo of a bird", loss on every
  latent pixel (padding included, as in the reference); or
* a **background sample**: the same kind of image with "a photo of a background", loss only
  on the background pixels of ONE random rectangle (:func:`sample_background_box`).

With z0 the image's latent, t ~ U{0, ..., 999}, eps ~ N(0, I) and
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, the loss of a batch is

    L = sum over b, C, H, W of m * (eps_hat - eps)^2 / (B * C * H * W)     (masked_eps_loss)

with eps_hat = UNet(z_t, t, prompt) and m the loss mask (all ones for an object sample).
The mask only weights the loss; the UNet never sees it. Because the division is by all
elements, a background sample whose box covers few pixels contributes a small loss.

Training: AdamW (lr 1e-4, constant), batch 8, an exponential moving average (EMA) of the
weights with decay min(0.999, (1 + step) / (10 + step)), and the saved model holds the EMA
weights. The reference trains about one day on 2 A6000 GPUs (4 samples on each: an effective
batch of 8); the mini world's default of 300 steps takes minutes.

The run reads as its steps (:func:`finetune`): prepare (latents and masks of the training
images, :func:`_prepare`; the model, optimizer and EMA, :func:`_setup`; a checkpoint to
resume, :func:`_resume`), then per step draw the effective batch (:func:`_draw_batch`), one
optimizer step (:func:`_training_step`), the EMA (:func:`_update_ema`) and every
``save_every`` steps a checkpoint (:func:`_checkpoint`); last the export (EMA weights in,
LoRA merged, the pipeline saved). Several processes (``accelerate launch``) share each batch
through accelerate's Accelerator: see :func:`finetune`.

Memory-saving options (``FinetuneConfig``; the defaults are the paper's full fine-tuning),
the ones diffusers' own training scripts use, so that SD v1.x fits a 16 GB card such as
Colab's T4 (estimates and measurements: docs/memory.md):

* ``gradient_checkpointing``: recompute each UNet block's activations in the backward pass
  instead of keeping them (about a third more compute, far less activation memory);
* ``mixed_precision``: fp16/bf16 autocast over fp32 master weights (fp16 with loss scaling);
* ``optimizer="adamw8bit"``: bitsandbytes' 8-bit AdamW (2 bytes of optimizer state per
  parameter instead of 8; CUDA only);
* ``lora_rank > 0``: LoRA (through peft) on the attention projections to_q/to_k/to_v/to_out.0
  of every attention layer; only the LoRA weights train (alpha = rank), the frozen base UNet
  stays in the pipeline's dtype under autocast. The LoRA is merged into the UNet before it is
  saved, so the saved pipeline is a plain diffusers folder (no peft needed to load it);
* ``ema="cpu"``: the EMA copy lives in CPU memory; ``ema="off"``: no EMA, the saved model holds
  the raw weights; ``ema_every=N``: fold the weights into the EMA every N steps only, with the
  product of the N per-step decays (exact when the weights did not move in between).

Conventions of this implementation (choices the paper leaves open):

* A box's *corner* is its top-left pixel, drawn uniformly among the background pixels; the
  box extends down and right by its side lengths and is clipped at the bottom/right border
  (so boxes near those borders are smaller than ``min_side``).
* Canvas padding (``resize_mode="pad"`` pastes the image into the top-left of the square
  canvas) is neither foreground nor background: background boxes are drawn inside the
  valid region only (the sides keep their bounds relative to the whole latent grid), so a
  background sample never gets loss on padding. Object samples get loss everywhere.
* Batches are drawn with replacement (``batch_size`` random items per step).
* All randomness comes from a numpy Generator and a torch Generator seeded by
  ``config.seed``; their states go into the checkpoint, so an interrupted run resumed from
  its checkpoint gives the same weights as an uninterrupted one (exactly on a CPU; on a
  GPU up to the non-determinism of its kernels).
* The UNet is trained in float32 (master weights) whatever the pipeline's dtype, with
  autocast in bf16/fp16 on CUDA (``mixed_precision``); at the end it is cast back. With LoRA
  only the LoRA weights are float32; the frozen base keeps the pipeline's dtype when autocast
  is on (float32 otherwise).
* With LoRA the EMA averages the LoRA weights A and B (not their product BA), and the saved
  UNet is the base with the (EMA) LoRA merged in.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["sample_background_box", "masked_eps_loss", "FinetuneConfig", "finetune", "load_finetuned",
           "sample", "finetuned_dir"]

# fields that may change between a run and its resumption without changing the result
_RESUMABLE_FIELDS = ("steps", "save_every", "gradient_checkpointing", "gradient_accumulation_steps")
# fields added after runs were recorded without them: such a run used these values
_ADDED_FIELDS = {"optimizer": "adamw", "lora_rank": 0, "ema": "gpu", "ema_every": 1, "gradient_accumulation_steps": 1}
OPTIMIZERS = ("adamw", "adamw8bit")
EMA_MODES = ("gpu", "cpu", "off")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention layer's projections (diffusers' LoRA script)
def _install(package: str) -> str:
    return f"pip install {package} (or, in the course's folder, pip install -e '.[lowmem]')"


# --------------------------------------------------------------------------- loss masks
def _default_sides(n: int) -> tuple[int, int]:
    """The reference's 11..32 of 64 latent pixels, scaled to a side of n pixels."""
    return max(1, round(11 * n / 64)), max(1, round(32 * n / 64))


def sample_background_box(fg: np.ndarray, rng: np.random.Generator, min_side: int | None = None,
                          max_side: int | None = None, min_bg_frac: float = 2 / 3,
                          max_tries: int = 100) -> np.ndarray:
    """The loss mask of a background sample: background pixels inside one random box.

    ``fg``: M_pre on the latent grid, bool (h, w). A draw picks the box's top-left corner
    uniformly among the background pixels (``~fg``), its height and width uniformly in
    ``[min_side, max_side]`` (defaults: round(11 h / 64) .. round(32 h / 64) for the height,
    the same with w for the width, at least 1), and clips the box at the bottom/right
    border. It is accepted when at least ``min_bg_frac`` of the (clipped) box's pixels are
    background; the mask is then ``box & ~fg`` (foreground pixels in the box get no loss).

    After ``max_tries`` rejected draws the whole background ``~fg`` is returned; with no
    background pixel at all, an all-False mask.
    """
    fg = np.asarray(fg, dtype=bool)
    if fg.ndim != 2:
        raise ValueError(f"sample_background_box: expected fg of shape (h, w), got {fg.shape}")
    h, w = fg.shape
    bounds = []
    for n in (h, w):
        lo, hi = _default_sides(n)
        lo, hi = lo if min_side is None else int(min_side), hi if max_side is None else int(max_side)
        if not 1 <= lo <= hi:
            raise ValueError(f"sample_background_box: need 1 <= min_side <= max_side, got {lo}, {hi}")
        bounds.append((lo, hi))
    bg = ~fg
    rows, cols = np.nonzero(bg)
    if len(rows) == 0:
        return np.zeros_like(bg)
    for _ in range(max_tries):
        k = rng.integers(len(rows))
        r, c = int(rows[k]), int(cols[k])
        bh = int(rng.integers(bounds[0][0], bounds[0][1] + 1))
        bw = int(rng.integers(bounds[1][0], bounds[1][1] + 1))
        r2, c2 = min(r + bh, h), min(c + bw, w)
        inside = bg[r:r2, c:c2]
        if inside.sum() >= min_bg_frac * inside.size - 1e-9:
            mask = np.zeros_like(bg)
            mask[r:r2, c:c2] = inside
            return mask
    return bg.copy()


def _background_mask(fg: np.ndarray, valid: tuple[int, int], rng: np.random.Generator,
                     min_side: int, max_side: int) -> np.ndarray:
    """A background sample's loss mask on the whole latent grid: the box is drawn inside
    the valid region (rows, cols) only, so padding cells never get loss."""
    vr, vc = valid
    mask = np.zeros(fg.shape, dtype=bool)
    mask[:vr, :vc] = sample_background_box(fg[:vr, :vc], rng, min_side, max_side)
    return mask


def masked_eps_loss(eps_hat: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """sum over B x C x H x W of mask * (eps_hat - eps)^2, divided by ``eps.numel()``.

    ``mask``: (B, 1, h, w) (broadcast over the channels) or (B, C, h, w), bool or float.
    An all-zero mask gives exactly 0 and a zero gradient. ``reduction="none"`` gives the
    per-sample losses (B,) (each divided by C x H x W); their mean is the "mean" loss.
    """
    if eps_hat.shape != eps.shape:
        raise ValueError(f"masked_eps_loss: eps_hat {tuple(eps_hat.shape)} != eps {tuple(eps.shape)}")
    mask = torch.as_tensor(mask, device=eps.device)
    if mask.ndim != eps.ndim or torch.broadcast_shapes(mask.shape, eps.shape) != eps.shape:
        raise ValueError(f"masked_eps_loss: mask {tuple(mask.shape)} does not broadcast to {tuple(eps.shape)}")
    sq = mask.to(eps_hat.dtype) * (eps_hat - eps) ** 2
    if reduction == "mean":
        return sq.sum() / eps.numel()
    if reduction == "none":
        return sq.flatten(1).sum(1) / sq[0].numel()
    raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------- training
@dataclass
class FinetuneConfig:
    """Parameters of step 3. Defaults: the reference's, except ``steps`` (300 for the mini
    world; the reference trains about one day on 2 A6000 GPUs, i.e. many thousand steps).

    ``gradient_checkpointing``: None = on for CUDA (saves memory at SD size), off elsewhere.
    ``mixed_precision``: "auto" (bf16 autocast on CUDA when supported, fp16 otherwise on
    CUDA, none on CPU), "no", "bf16" or "fp16" (CUDA only). ``min_side``/``max_side``: box
    sides in latent pixels (default: 11..32 of 64, scaled to the latent grid).

    Memory (docs/memory.md): ``optimizer``: "adamw" (torch) or "adamw8bit" (bitsandbytes,
    CUDA only). ``lora_rank``: 0 = full fine-tuning of the UNet (the paper's); r > 0 = LoRA of
    rank r on the attention projections, only those weights train. ``ema``: "gpu" (the EMA
    copy on the training device; on a CPU run that is the CPU), "cpu" (in CPU memory) or
    "off" (no EMA: the raw weights are saved). ``ema_every``: update the EMA every N steps.

    ``batch_size`` is the effective batch: with N processes (``accelerate launch``) and
    ``gradient_accumulation_steps`` A, each process runs batch_size / (N x A) samples per
    forward pass (it must divide evenly), so the default keeps the paper's 8 on any setup.

    A run is identified by every field but ``steps``, ``save_every``,
    ``gradient_checkpointing`` and ``gradient_accumulation_steps``, which may change when a
    run is resumed (as may the number of processes); so may ``ema`` between "gpu" and "cpu"
    (where the copy lives does not change the result), not to or from "off".
    """
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    p_background: float = 0.5
    object_prompt: str = "a photo of a bird"
    background_prompt: str = "a photo of a background"
    seed: int = 0
    gradient_checkpointing: bool | None = None
    mixed_precision: str = "auto"
    save_every: int = 100
    resize_mode: str = "pad"
    min_side: int | None = None
    max_side: int | None = None
    optimizer: str = "adamw"
    lora_rank: int = 0
    ema: str = "gpu"
    ema_every: int = 1
    gradient_accumulation_steps: int = 1

    def check(self) -> None:
        for name in ("steps", "batch_size", "save_every", "ema_every", "gradient_accumulation_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FinetuneConfig.{name}: expected a positive integer, got {v!r}")
        if not 0.0 <= self.p_background <= 1.0:
            raise ValueError(f"FinetuneConfig.p_background: expected a value in [0, 1], got {self.p_background!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"FinetuneConfig.ema_decay: expected a value in [0, 1), got {self.ema_decay!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"FinetuneConfig.mixed_precision: expected 'auto', 'no', 'bf16' or 'fp16', "
                             f"got {self.mixed_precision!r}")
        if self.resize_mode not in ("pad", "resize"):
            raise ValueError(f"FinetuneConfig.resize_mode: expected 'pad' or 'resize', got {self.resize_mode!r}")
        if self.gradient_checkpointing not in (None, True, False):
            raise ValueError(f"FinetuneConfig.gradient_checkpointing: expected None, True or False, "
                             f"got {self.gradient_checkpointing!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"FinetuneConfig.optimizer: expected one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ValueError(f"FinetuneConfig.lora_rank: expected an integer >= 0 (0: full fine-tuning), "
                             f"got {self.lora_rank!r}")
        if self.ema not in EMA_MODES:
            raise ValueError(f"FinetuneConfig.ema: expected one of {', '.join(EMA_MODES)}, got {self.ema!r}")

    @classmethod
    def from_params(cls, P: dict) -> "FinetuneConfig":
        """The config of a course parameter set (``fgbg.params``: ``finetune_*``, the prompts,
        ``seed`` and ``resize_mode``), as the notebook and ``python -m fgbg.batch finetune``
        use it."""
        return cls(steps=P["finetune_steps"], batch_size=P["finetune_batch_size"], lr=P["finetune_lr"],
                   object_prompt=P["foreground_prompt"], background_prompt=P["background_prompt"],
                   seed=P["seed"], resize_mode=P["resize_mode"],
                   gradient_checkpointing=P["finetune_gradient_checkpointing"],
                   mixed_precision=P["finetune_mixed_precision"], optimizer=P["finetune_optimizer"],
                   lora_rank=P["finetune_lora_rank"], ema=P["finetune_ema"], ema_every=P["finetune_ema_every"],
                   gradient_accumulation_steps=P["finetune_gradient_accumulation_steps"])


def finetuned_dir(out_dir) -> Path:
    """Where step 3 writes the fine-tuned pipeline: ``<out_dir>/finetuned``."""
    return Path(out_dir) / "finetuned"


def _autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype of fine-tuning (None: fp32). ``auto``: fp32 off CUDA, else the
    rule of :func:`fgbg.models.native_half_dtype` (bf16 from compute capability 8.0, fp16
    on older GPUs such as the T4, where ``finetune`` then scales the loss)."""
    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        from . import models
        return models.native_half_dtype(device)
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"FinetuneConfig.mixed_precision='fp16' needs a CUDA device, got {device}")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _check_options(config: FinetuneConfig, device: torch.device) -> None:
    """Refuse, before any work, the options this device or environment cannot run: one
    line each, naming the install command."""
    _autocast_dtype(device, config.mixed_precision)
    if config.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ValueError(f"FinetuneConfig.optimizer='adamw8bit' (bitsandbytes' 8-bit AdamW) needs a CUDA "
                             f"GPU and bitsandbytes ({_install('bitsandbytes')}); the device is {device}: use "
                             f"'adamw' there")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError(f"FinetuneConfig.optimizer='adamw8bit' needs bitsandbytes, which is not installed: "
                              f"{_install('bitsandbytes')}") from None
    if config.lora_rank > 0:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ImportError(f"FinetuneConfig.lora_rank={config.lora_rank} (LoRA) needs peft, which is not "
                              f"installed: {_install('peft')}") from None


def _make_optimizer(config: FinetuneConfig, params: list, device: torch.device):
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (same betas, eps and weight decay)."""
    if config.optimizer == "adamw8bit":
        _check_options(config, device)
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _identity(cfg: dict) -> dict:
    """A recorded config as it identifies a run: fields added since (absent) at the value
    runs had before them; "gpu"/"cpu" EMA are one (where the copy lives does not change the
    result)."""
    c = {**_ADDED_FIELDS, **cfg}
    if c["ema"] in ("gpu", "cpu"):
        c["ema"] = "on"
    return c


def _same_config(a: dict, b: dict) -> list[str]:
    """Names of the fields (other than the resumable ones) where two configs differ."""
    a, b = _identity(a), _identity(b)
    if "off" in (a["ema"], b["ema"]):  # without EMA, ema_every means nothing
        a["ema_every"] = b["ema_every"] = None
    return [k for k in sorted(set(a) | set(b)) if k not in _RESUMABLE_FIELDS and a.get(k) != b.get(k)]


def _ema_weight(first: int, last: int, decay: float) -> float:
    """1 - the product of the per-step decays min(decay, (1 + k) / (10 + k)) for k in
    [first, last): the weight of the current weights when the EMA is updated after step
    ``last`` and was last updated after step ``first``. One step: 1 - its decay."""
    prod = 1.0
    for k in range(first, last):
        prod *= min(decay, (1 + k) / (10 + k))
    return 1.0 - prod


def _add_lora(unet, rank: int) -> None:
    """LoRA of rank ``rank`` (alpha = rank, Gaussian A, zero B: the UNet is unchanged at
    first) on every attention projection of ``unet``; only its weights require grad, float32."""
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def _merge_lora(unet) -> None:
    """Merge the LoRA into the base weights and remove peft's layers: a plain UNet again."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()


def _read_losses(path: Path, up_to: int | None = None) -> list[dict]:
    """The records of loss.jsonl (a half-written last line is ignored), one per step."""
    if not path.exists():
        return []
    recs = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if up_to is None or r["step"] <= up_to:
            recs[r["step"]] = r
    return [recs[s] for s in sorted(recs)]


# --------------------------------------------------------------------------- the run, step by step
def _prepare(pipe, items, out_dir, config: FinetuneConfig, progress: bool):
    """Prepare: z0 (the image's latent), M_pre on the latent grid and the valid region of
    every usable item. Under ``accelerate launch`` each process encodes its shard of the
    items and all processes then hold the whole list, in item order."""
    from .attention import encode_images
    from .data import load_item, place_mask, read_mask, valid_region
    from .masks import prelim_mask_path
    from .models import canvas_size
    from .runs import for_each_batch, gather_in_order, process_group

    canvas, grid = canvas_size(pipe), int(pipe.unet.config.sample_size)
    data: list[tuple[str, torch.Tensor, np.ndarray, tuple[int, int]]] = []

    def load(item):
        x, pl, img = load_item(item, canvas=canvas, mode=config.resize_mode)
        m_pre = read_mask(prelim_mask_path(out_dir, item), shape=img.shape)
        return item.rel, x, place_mask(m_pre, pl, grid=grid), valid_region(pl, grid)

    def encode(batch):
        return list(encode_images(pipe, torch.stack([b[1] for b in batch])).float().cpu())

    def keep(item, d, z0):
        data.append((d[0], z0, d[2], d[3]))

    report = for_each_batch("step 3 (fine-tuning data)", items, lambda it: [], load, encode, keep,
                            batch_size=config.batch_size, out_dir=out_dir, overwrite=True, progress=progress)
    state = process_group()
    if state is None or state.is_main_process:
        for rel, why in report.skipped:
            print(f"step 3: skipped {rel}: {why}")
    return gather_in_order(data), list(report.skipped)


def _save_checkpoint(path: Path, state: dict) -> None:
    from .io import _atomic
    _atomic(path, lambda f: torch.save(state, f))


def finetune(pipe, items, out_dir, config: FinetuneConfig | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
    """Step 3: fine-tune ``pipe.unet`` on ``items`` (the training images) and their M_pre.

    Needs ``masks.prelim_mask_path(out_dir, item)`` (step 2) for every item; an item whose
    image or M_pre is missing, unreadable or of the wrong size is skipped with a message
    naming the file. Raises ValueError when no item remains.

    Writes to ``<out_dir>/finetuned/``: the pipeline (``save_pretrained``, safetensors, EMA
    UNet), ``checkpoint.pt`` (raw UNet, EMA, optimizer, step, rng states; every
    ``save_every`` steps and at the end), ``loss.jsonl`` (one line per step: ``step``, the
    batch ``loss``, ``kind`` "object"/"background"/"mixed" and the mean per-sample loss of
    each kind, ``object``/``background``, null when absent) and ``done.json`` (written last).

    Resume: when ``done.json`` exists for the same steps and config, nothing is trained or
    loaded and ``pipe`` is left as it is: load the result with :func:`load_finetuned`.
    Otherwise a ``checkpoint.pt`` of the same config is resumed from its step (a different
    config or item list raises ValueError: delete the folder or use another ``out_dir``).
    "Config" here includes a fingerprint of ``pipe``'s weights (``base_model``), the M_pre
    run recorded by step 2 (``m_pre_run``, which names step 1's model, settings and dataset)
    and the training items (``items``): a finished run of another model, of other masks or
    on other images is refused (:class:`fgbg.runs.RunConfigError`), never silently reused.
    ``overwrite=True`` deletes ``<out_dir>/finetuned`` first and trains anew. One process at
    a time: a second one gets :class:`fgbg.runs.RunLockedError`.

    Data-parallel (``accelerate launch --num_processes N``; accelerate's ``Accelerator``):
    ``config.batch_size`` is the *effective* batch, split into
    ``gradient_accumulation_steps`` micro-batches, each shared by the N processes, so each
    process runs ``batch_size / (N x gradient_accumulation_steps)`` samples at a time and
    the gradients are averaged over all of them. Every process draws the same whole batch
    from the same seeded generators and takes its rows, so a run gives the same result
    (up to the order of float additions) on any number of processes, and a checkpoint
    resumes on any number. The main process alone logs, keeps the EMA and writes the
    checkpoint and the pipeline; the others then load the saved UNet.

    After training, ``pipe.unet`` holds the EMA weights, in its original dtype, in eval
    mode with gradients off (also if training stops with an error, minus the EMA copy).

    Returns ``{"steps", "skipped": [(rel, reason)], "loss": [per-step loss], "path",
    "reused": True when done.json was found}``.
    """
    from .runs import prepared_by_main_process

    config = config or FinetuneConfig()
    config.check()
    items = list(items)
    cfg = _run_identity(pipe, items, out_dir, config)
    fin = finetuned_dir(out_dir)
    with prepared_by_main_process(fin, lambda: _open_run(fin, cfg, config, overwrite)) as finished:
        if finished is not None:
            return finished
        return _train(pipe, items, out_dir, config, cfg, progress)


def _training_set_id(items) -> dict:
    """The training images' identity: how many, and a hash of their paths in order."""
    import hashlib
    rels = [it.rel for it in items]
    return {"n": len(rels), "sha1": hashlib.sha1("\n".join(rels).encode()).hexdigest()[:12]}


def _run_identity(pipe, items, out_dir, config: FinetuneConfig) -> dict:
    """What the result depends on: the config, the base weights, the M_pre run, the images."""
    from .masks import prelim_dir
    from .models import model_fingerprint
    from .runs import read_run_config
    m_pre_run = read_run_config(prelim_dir(out_dir))
    if m_pre_run is None:
        raise FileNotFoundError(f"{prelim_dir(out_dir)}: no M_pre run there; run steps 1-2 first (notebooks "
                                f"01_attention and 02_masks with the same out_dir)")
    return json.loads(json.dumps(dict(asdict(config), base_model=model_fingerprint(pipe), m_pre_run=m_pre_run,
                                      items=_training_set_id(items))))


def _open_run(fin: Path, cfg: dict, config: FinetuneConfig, overwrite: bool) -> dict | None:
    """The main process, holding the lock: clear the folder (``overwrite``) or its
    leftovers, and return the result of a finished run of the same config (None: train)."""
    from .runs import OVERWRITE_HINT, RunConfigError, clear_folder, remove_orphans
    if overwrite:
        clear_folder(fin)
    remove_orphans(fin)  # a checkpoint write cut short by a kill
    done_path = fin / "done.json"
    if not done_path.exists():
        return None
    done = json.loads(done_path.read_text())
    if done.get("steps") != config.steps:
        return None
    diff = _same_config(done.get("config", {}), cfg)
    if diff:
        raise RunConfigError(f"{fin} holds a fine-tuning run with another config (fields {', '.join(diff)} "
                             f"differ). {OVERWRITE_HINT}")
    return {"steps": config.steps, "skipped": [tuple(s) for s in done.get("skipped", [])],
            "loss": [r["loss"] for r in _read_losses(fin / "loss.jsonl")], "path": str(fin), "reused": True}


def _micro_batch(config: FinetuneConfig, processes: int) -> int:
    """Each process's samples per forward pass: batch_size / (processes x accumulation)."""
    parts = processes * config.gradient_accumulation_steps
    if config.batch_size % parts:
        raise ValueError(f"FinetuneConfig.batch_size={config.batch_size} (the effective batch) cannot be split "
                         f"evenly into {processes} process(es) x {config.gradient_accumulation_steps} accumulation "
                         f"step(s); choose a batch size divisible by {parts}")
    return config.batch_size // parts


@dataclass
class _Training:
    """The state of one step-3 run: the UNet and its data-parallel wrapper, the optimizer,
    the EMA (main process only), the generators and the step counters."""
    accelerator: Any
    unet: Any                   # the UNet being trained (pipe.unet)
    model: Any                  # what the forward pass calls: the UNet, or its DDP wrapper
    named: list                 # (name, parameter) of the trained parameters
    opt: Any
    scaler: Any
    ema: list | None            # the EMA of the trained parameters (None: ema="off", or not the main process)
    ema_dev: torch.device
    rng: np.random.Generator    # batches, background/object draws, boxes
    gen: torch.Generator        # t and eps
    step: int = 0
    ema_step: int = 0           # the last step folded into the EMA

    @property
    def params(self) -> list:
        return [p for _, p in self.named]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _accelerator(device: torch.device):
    """accelerate's Accelerator for this run: data-parallel under ``accelerate launch``, a
    plain pass-through on one process. Precision and placement stay fgbg's (autocast and
    the pipeline's device), so one process trains exactly as without accelerate."""
    from accelerate import Accelerator
    from .runs import process_group
    # one process: accelerate's device is not used (nothing is placed or wrapped), so its state
    # keeps its default and a later run on another device in the same kernel does not clash
    cpu = device.type != "cuda" if process_group() is not None else False
    return Accelerator(cpu=cpu, device_placement=False, mixed_precision="no")


def _setup(pipe, config: FinetuneConfig, accelerator, amp) -> _Training:
    """Prepare the model for training: float32 master weights (or a LoRA on a frozen base),
    gradient checkpointing, the optimizer, the EMA copy and the seeded generators."""
    unet, dev = pipe.unet, pipe.unet.device
    if config.lora_rank > 0:  # the frozen base: the pipeline's dtype under autocast, else float32
        unet.to(unet.dtype if amp is not None else torch.float32)
        _add_lora(unet, config.lora_rank)
    else:
        unet.to(torch.float32).requires_grad_(True)
    unet.train()
    if _uses_checkpointing(config, dev):
        unet.enable_gradient_checkpointing()
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    opt = _make_optimizer(config, [p for _, p in named], dev)
    model = accelerator.prepare_model(unet, device_placement=False)  # DDP when there are several processes
    ema_dev = torch.device("cpu") if config.ema == "cpu" else dev
    keep_ema = config.ema != "off" and accelerator.is_main_process
    return _Training(accelerator=accelerator, unet=unet, model=model, named=named, opt=opt,
                     scaler=torch.amp.GradScaler(dev.type, enabled=amp == torch.float16),
                     ema=[p.detach().to(ema_dev, copy=True) for _, p in named] if keep_ema else None,
                     ema_dev=ema_dev, rng=np.random.default_rng(config.seed),
                     gen=torch.Generator().manual_seed(config.seed))


def _uses_checkpointing(config: FinetuneConfig, dev: torch.device) -> bool:
    return config.gradient_checkpointing if config.gradient_checkpointing is not None else dev.type == "cuda"


def _resume(run: _Training, ckpt_path: Path, cfg: dict, rels: list, config: FinetuneConfig, cuda_idx: list) -> None:
    """Load ``checkpoint.pt`` when there is one of this run: weights, optimizer, EMA,
    generators and step (written by any number of processes)."""
    from .runs import OVERWRITE_HINT, RunConfigError
    if not ckpt_path.exists():
        return
    st = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    diff = _same_config(st["config"], cfg)
    if diff or st["items"] != rels:
        what = f"fields {', '.join(diff)} differ" if diff else "the training items differ"
        raise RunConfigError(f"{ckpt_path} was written by a run with another config ({what}). {OVERWRITE_HINT}")
    if st["step"] > config.steps:
        raise ValueError(f"{ckpt_path} is at step {st['step']}, beyond steps={config.steps}; "
                         f"delete {ckpt_path.parent} or choose another out_dir")
    if config.lora_rank > 0:  # the checkpoint holds the trained (LoRA) weights only
        with torch.no_grad():
            for n, p in run.named:
                p.copy_(st["unet"][n])
    else:
        run.unet.load_state_dict(st["unet"])
    run.opt.load_state_dict(st["optimizer"])
    run.scaler.load_state_dict(st["scaler"])
    if run.ema is not None:
        run.ema = [e.to(run.ema_dev) for e in st["ema"]]
    run.rng.bit_generator.state = st["np_rng"]
    run.gen.set_state(st["torch_rng"])
    torch.set_rng_state(st["torch_global_rng"])
    for i, s in zip(cuda_idx, st["cuda_rng"]):
        torch.cuda.set_rng_state(s, i)
    run.step = st["step"]
    run.ema_step = st.get("ema_step", run.step)


def _draw_batch(run: _Training, data, config: FinetuneConfig, z0_all: torch.Tensor, n_t: int, sides) -> dict:
    """The next effective batch, the same in every process: which images, which are
    background samples (and their loss masks), t and eps."""
    B, grid = config.batch_size, z0_all.shape[-1]
    idx = run.rng.integers(len(data), size=B)
    is_bg = run.rng.random(B) < config.p_background
    m = np.ones((B, 1, grid, grid), dtype=bool)  # object samples: every latent pixel
    for k in np.flatnonzero(is_bg):
        _, _, fg, valid = data[idx[k]]
        m[k, 0] = _background_mask(fg, valid, run.rng, *sides)
    t = torch.randint(0, n_t, (B,), generator=run.gen)
    z0 = z0_all[torch.from_numpy(idx)]
    eps = torch.randn(z0.shape, generator=run.gen)
    return {"z0": z0, "eps": eps, "t": t, "mask": torch.from_numpy(m), "is_bg": is_bg}


def _training_step(run: _Training, batch: dict, emb: torch.Tensor, abar: torch.Tensor, amp, micro: int,
                   accumulation: int) -> torch.Tensor:
    """One optimizer step on the effective batch: this process's rows of each of the
    ``accumulation`` micro-batches, forward (autocast), masked eps-loss, backward (the
    gradients are averaged over processes on the last micro-batch), step. Returns the
    per-sample losses of the whole effective batch (gathered from every process)."""
    acc, dev = run.accelerator, run.unet.device
    P, r = acc.num_processes, acc.process_index
    run.opt.zero_grad(set_to_none=True)
    losses = []
    for j in range(accumulation):
        rows = slice((j * P + r) * micro, (j * P + r + 1) * micro)  # micro-batch j, process r
        z0, eps, t = batch["z0"][rows].to(dev), batch["eps"][rows].to(dev), batch["t"][rows].to(dev)
        a = abar[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        cond = emb[torch.from_numpy(batch["is_bg"][rows].astype(np.int64)).to(dev)]
        sync = nullcontext() if j == accumulation - 1 else acc.no_sync(run.model)
        with sync:
            with torch.autocast(dev.type, dtype=amp) if amp is not None else nullcontext():
                eps_hat = run.model(z_t, t, encoder_hidden_states=cond).sample
            per_sample = masked_eps_loss(eps_hat.float(), eps, batch["mask"][rows].to(dev), reduction="none")
            loss = per_sample.mean() if accumulation == 1 else per_sample.mean() / accumulation
            run.scaler.scale(loss).backward()
        losses.append(acc.gather(per_sample.detach()))  # rows of micro-batch j, in process order
    run.scaler.step(run.opt)
    run.scaler.update()
    run.step += 1
    return torch.cat(losses)


def _update_ema(run: _Training, config: FinetuneConfig) -> None:
    """Fold the weights into the EMA (every ``ema_every`` steps, main process)."""
    if run.ema is None or run.step % config.ema_every:
        return
    with torch.no_grad():
        w = _ema_weight(run.ema_step, run.step, config.ema_decay)
        if run.ema_dev == run.unet.device:
            torch._foreach_lerp_(run.ema, [p.detach() for p in run.params], w)
        else:  # one tensor at a time: no second full copy of the weights in CPU memory
            for e, p in zip(run.ema, run.params):
                e.lerp_(p.detach().to(run.ema_dev), w)
    run.ema_step = run.step


def _checkpoint(run: _Training, path: Path, cfg: dict, rels: list, cuda_idx: list, lora: bool) -> None:
    """Write ``checkpoint.pt`` (main process; the others wait for it)."""
    if run.main:
        trained = run.unet.state_dict() if not lora else {n: p.detach() for n, p in run.named}
        _save_checkpoint(path, {
            "unet": trained, "ema": run.ema, "ema_step": run.ema_step, "optimizer": run.opt.state_dict(),
            "scaler": run.scaler.state_dict(), "step": run.step, "np_rng": run.rng.bit_generator.state,
            "torch_rng": run.gen.get_state(), "torch_global_rng": torch.get_rng_state(),
            "cuda_rng": [torch.cuda.get_rng_state(i) for i in cuda_idx], "config": cfg, "items": rels})
    run.accelerator.wait_for_everyone()


def _log_step(log, run: _Training, per_sample: torch.Tensor, is_bg: np.ndarray) -> float:
    """One line of loss.jsonl: the batch loss and the mean loss of each kind of sample."""
    ps = per_sample.cpu().numpy()
    loss = float(per_sample.mean())
    kind = "background" if is_bg.all() else "object" if not is_bg.any() else "mixed"
    log.write(json.dumps({"step": run.step, "loss": loss, "kind": kind,
                          "object": float(ps[~is_bg].mean()) if (~is_bg).any() else None,
                          "background": float(ps[is_bg].mean()) if is_bg.any() else None}) + "\n")
    log.flush()
    return loss


def _fold_in_ema(run: _Training, config: FinetuneConfig) -> None:
    """Export, first half: the trained parameters become the EMA, with the steps since its
    last update folded in (the checkpoint keeps the EMA as it was, so that resuming gives
    the same result)."""
    if run.ema is None:
        return
    w = _ema_weight(run.ema_step, run.step, config.ema_decay)
    with torch.no_grad():
        for p, e in zip(run.params, run.ema):
            if w == 0.0:
                p.copy_(e)
            else:
                p.lerp_(e.to(p.device), 1.0 - w)


def _train(pipe, items, out_dir, config: FinetuneConfig, cfg: dict, progress: bool) -> dict:
    """Prepare, train step by step with checkpoints, export (EMA, merged LoRA, pipeline)."""
    from diffusers import DDPMScheduler
    from .attention import encode_prompt
    from .io import atomic_write_text
    from .masks import prelim_dir
    from .runs import progress_bar

    unet, dev = pipe.unet, pipe.unet.device
    _check_options(config, dev)  # before the data: a missing package is said at once
    accelerator = _accelerator(dev)
    micro = _micro_batch(config, accelerator.num_processes)
    data, skipped = _prepare(pipe, items, out_dir, config, progress)
    if not data:
        raise ValueError(f"step 3: no usable training item in {out_dir} (need the images and their M_pre "
                         f"under {prelim_dir(out_dir)}; {len(skipped)} skipped)")
    rels = [d[0] for d in data]
    fin = finetuned_dir(out_dir)
    done_path, ckpt_path, loss_path = fin / "done.json", fin / "checkpoint.pt", fin / "loss.jsonl"

    orig_dtype = unet.dtype
    amp = _autocast_dtype(dev, config.mixed_precision)
    lora = config.lora_rank > 0
    train_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    abar = train_sched.alphas_cumprod.to(dev, torch.float32)
    n_t = int(train_sched.config.num_train_timesteps)
    lo, hi = _default_sides(int(unet.config.sample_size))
    sides = (lo if config.min_side is None else config.min_side, hi if config.max_side is None else config.max_side)
    emb = torch.cat([encode_prompt(pipe, config.object_prompt), encode_prompt(pipe, config.background_prompt)])
    emb = emb.to(dev, torch.float32)  # row 0: object prompt, row 1: background prompt
    z0_all = torch.stack([d[1] for d in data])
    cuda_idx = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    main = accelerator.is_main_process
    if main:
        fin.mkdir(parents=True, exist_ok=True)
    log = run = None
    try:
        with torch.random.fork_rng(devices=cuda_idx):  # the caller's global rng is restored on exit
            torch.default_generator.manual_seed(config.seed)  # LoRA's initial weights; dropout, if any
            for i in cuda_idx:
                torch.cuda.default_generators[i].manual_seed(config.seed)
            run = _setup(pipe, config, accelerator, amp)
            _resume(run, ckpt_path, cfg, rels, config, cuda_idx)
            if main:
                done_path.unlink(missing_ok=True)  # the folder is being rewritten
                atomic_write_text(loss_path, "".join(json.dumps(r) + "\n" for r in _read_losses(loss_path, run.step)))
                log = open(loss_path, "a")
            bar = progress_bar(total=config.steps, initial=run.step, desc="step 3 (fine-tune)",
                               disable=not (progress and main))
            while run.step < config.steps:
                batch = _draw_batch(run, data, config, z0_all, n_t, sides)
                per_sample = _training_step(run, batch, emb, abar, amp, micro, config.gradient_accumulation_steps)
                _update_ema(run, config)
                if main:
                    bar.set_postfix(loss=f"{_log_step(log, run, per_sample, batch['is_bg']):.4f}")
                bar.update(1)
                if run.step % config.save_every == 0 or run.step == config.steps:
                    _checkpoint(run, ckpt_path, cfg, rels, cuda_idx, lora)
            bar.close()
        run.opt.zero_grad(set_to_none=True)
        run.opt = None  # its state (and the gradients) go before the EMA goes in and the LoRA is merged
        _fold_in_ema(run, config)
    finally:
        if log is not None:
            log.close()
        if _uses_checkpointing(config, dev):
            unet.disable_gradient_checkpointing()
        unet.zero_grad(set_to_none=True)  # after an error too (e.g. out of memory): no gradients left
        if lora:
            _merge_lora(unet)
        unet.to(orig_dtype).eval().requires_grad_(False)
        if run is not None:
            run.model = run.opt = None
        accelerator.free_memory()  # drops its references to the DDP wrapper

    if main:  # export: the pipeline with the EMA UNet, then done.json, written last
        pipe.save_pretrained(fin, safe_serialization=True)
        atomic_write_text(done_path, json.dumps({"steps": config.steps, "config": cfg, "items": len(rels),
                                                 "processes": accelerator.num_processes,
                                                 "skipped": [list(s) for s in skipped]}, indent=1))
    accelerator.wait_for_everyone()
    if not main:  # the other processes hold the raw weights: take the exported (EMA) UNet
        saved = type(unet).from_pretrained(fin, subfolder="unet", use_safetensors=True, torch_dtype=orig_dtype)
        unet.load_state_dict(saved.state_dict())
        del saved
    return {"steps": config.steps, "skipped": skipped, "loss": [r["loss"] for r in _read_losses(loss_path)],
            "path": str(fin), "reused": False}


def load_finetuned(out_dir, device: str | None = None, dtype: str | torch.dtype | None = None):
    """The fine-tuned pipeline of ``<out_dir>/finetuned`` (``models.load_pipeline``).

    Raises ModelLoadError naming the folder and what is missing when step 3 did not finish
    there (no done.json, model_index.json or UNet weights)."""
    from .models import ModelLoadError, load_pipeline
    fin = finetuned_dir(out_dir)
    missing = [f for f in ("done.json", "model_index.json") if not (fin / f).is_file()]
    if not any((fin / "unet").glob("diffusion_pytorch_model*")):
        missing.append("unet/diffusion_pytorch_model.safetensors")
    if missing:
        raise ModelLoadError(f"{fin}: the fine-tuned pipeline is incomplete (missing {', '.join(missing)}); "
                             f"rerun step 3, finetune(pipe, items, out_dir, config), to finish it")
    return load_pipeline(str(fin), device=device, dtype=dtype)


# --------------------------------------------------------------------------- sampling
def sample(pipe, prompt: str, n: int, num_inference_steps: int = 50, seed: int = 0,
           guidance_scale: float = 1.0, negative_prompt: str | None = None) -> np.ndarray:
    """``n`` images of ``prompt``, uint8 (n, H, W, 3), by DDIM (eta 0) through the pipeline.

    With ``guidance_scale`` s > 1 this is classifier-free guidance, and with
    ``negative_prompt`` the unconditional prediction is replaced by the negative prompt's:
    eps = eps_neg + s (eps_prompt - eps_neg). The paper's foreground-vs-background steering,
    eps = eps_bg + s (eps_fg - eps_bg), is exactly that with negative_prompt = the background
    prompt. The pipeline's own scheduler is swapped for DDIM during the call and restored.
    """
    from diffusers import DDIMScheduler
    if negative_prompt is not None and guidance_scale <= 1:
        raise ValueError("sample: negative_prompt has no effect with guidance_scale <= 1; "
                         "use guidance_scale > 1 for guidance against it")
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        out = pipe(prompt, num_images_per_prompt=n, num_inference_steps=num_inference_steps,
                   generator=torch.Generator().manual_seed(seed), output_type="np",
                   guidance_scale=guidance_scale, negative_prompt=negative_prompt)
    finally:
        pipe.scheduler = original
    return (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)
