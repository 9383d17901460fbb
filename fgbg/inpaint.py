"""Step 4 of the method: inpaint the background, compare, and refine M_pre into M.

The fine-tuned generator (step 3) has learned what "a photo of a background" looks like in
this dataset. Repainting the region of the preliminary mask M_pre with it removes the
object; where the picture changed a lot, the object was.

1. **Inpainting** (:func:`inpaint_background`). DDIM (eta 0, 50 steps, guidance 1) from pure
   noise with the prompt "a photo of a background". Before *every* step the known region
   (outside M_pre, on the latent grid) is replaced by the original latent noised to the
   current level with fresh noise (RePaint-style latent blending, :func:`blend_known`)::

       z_t <- q_sample(z0, t) * (1 - M_pre) + z_t * M_pre,
       q_sample(z0, t) = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)

   so the model only invents the M_pre region, in agreement with its surroundings. M_pre is
   not dilated. The final latent is decoded as it comes out of the last step (no blending
   after it), so outside M_pre the result is the original only up to the VAE's and the
   model's reconstruction error.
2. **Difference image** (:func:`difference_image`): D = mean over RGB of |x - x_inpainted|,
   at full resolution.
3. **Refined mask** (:func:`refine_mask`)::

       M = up(M_pre) AND majority3x3(D > gmm_midpoint_threshold(D))

   (``fgbg.masks.refined_mask``), optionally followed by a binary closing and hole filling.
   up(M_pre) (:func:`upsampled_m_pre`) brings the latent-grid M_pre to the image's pixels.
   By default as the reference does: *bilinear* interpolation of the boolean latent mask,
   every pixel with a value above 0 kept, which dilates M_pre by up to half a latent cell
   (4 pixels for SD, 2 in the mini world), so M can recover a rim of object the coarse
   mask cut off. ``m_pre_upsampling="nearest"`` uses the exact block upsampling instead
   (the step-2 PNG itself): then M is never larger than M_pre.
4. **The M_crop baseline** of the paper (:func:`crop_baseline`): instead of inpainting, the
   bounding box of M_pre is filled with a mirror image of the largest background strip
   beside it; D and the mask then follow exactly as for inpainting.

:func:`inpaint_and_refine` runs all of it over a dataset (resumable, bad images skipped),
and :func:`sample_fg_bg` is the paper's foreground-vs-background steering for sampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .attention import encode_images, encode_prompt, seed_for
from .data import DatasetError, Item, Placement, load_item, map_back, place_mask, read_mask, valid_region
from .io import save_npy, save_png
from .masks import fill_and_close, prelim_dir, prelim_mask_path, refined_mask
from .models import canvas_size, model_fingerprint
from .runs import StepReport, for_each_batch, read_run_config, step_outputs

BACKGROUND_PROMPT = "a photo of a background"


# --------------------------------------------------------------------------- the sampler
def _ddim(pipe, num_inference_steps: int):
    """A fresh DDIM scheduler with the pipeline's noise schedule, its timesteps set."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=pipe.unet.device)
    return scheduler


def guided_eps(unet, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None,
               scale: float = 1.0) -> torch.Tensor:
    """The noise prediction eps = eps(uncond) + scale * (eps(cond) - eps(uncond)).

    ``cond``/``uncond`` are prompt embeddings (1, tokens, d). With ``uncond=None`` only the
    conditional pass is run (guidance 1). Latents stay float32; the UNet runs in its dtype.
    """
    B, x = z.shape[0], z.to(unet.dtype)
    if uncond is None:
        return unet(x, t, encoder_hidden_states=cond.expand(B, -1, -1)).sample.float()
    emb = torch.cat([uncond.expand(B, -1, -1), cond.expand(B, -1, -1)])
    eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.float().chunk(2)
    return eps_u + scale * (eps_c - eps_u)


@torch.no_grad()
def decode_latents(pipe, z: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, S, S) in [-1, 1], float32 on the CPU, from latents z (VAE input z / scaling)."""
    vae = pipe.vae
    x = vae.decode(z.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return x.float().clamp(-1, 1).cpu()


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8, value round((x + 1) * 127.5)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.moveaxis(np.clip(np.round((a + 1.0) * 127.5), 0, 255).astype(np.uint8), -3, -1)


def _randn(shape: tuple[int, ...], B: int, generators: list[torch.Generator] | None) -> torch.Tensor:
    """(B, *shape) standard normal noise on the CPU; row k from generators[k] (global RNG if None)."""
    if generators is None:
        return torch.randn((B, *shape))
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


# --------------------------------------------------------------------------- step 4: inpainting
def blend_known(z: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor, t: int | torch.Tensor, scheduler,
                noise: torch.Tensor) -> torch.Tensor:
    """RePaint-style latent blending: keep ``z`` inside ``mask`` (1 = to repaint), and put
    the original latent ``z0`` noised to level ``t`` outside it::

        q_sample(z0, t) * (1 - mask) + z * mask,   q_sample = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise

    with abar_t = ``scheduler.alphas_cumprod[t]``.
    """
    abar = float(scheduler.alphas_cumprod[int(t)])
    known = abar ** 0.5 * z0 + (1.0 - abar) ** 0.5 * noise
    return known * (1 - mask) + z * mask


@torch.no_grad()
def inpaint_background(pipe, images: torch.Tensor, masks: torch.Tensor, prompt: str = BACKGROUND_PROMPT,
                       num_inference_steps: int = 50, guidance_scale: float = 1.0,
                       generators: list[torch.Generator] | None = None,
                       return_latents: bool = False) -> torch.Tensor:
    """Repaint the M_pre region of placed images with the background prompt.

    ``images``: (B, 3, S, S) in [-1, 1] on the canvas; ``masks``: (B, 1, h, w) on the latent
    grid, 1 = M_pre = the region to repaint, 0 = known. DDIM (eta 0) from pure noise; before
    every step :func:`blend_known` with fresh noise; then one UNet pass (guidance 1:
    conditional only; otherwise classifier-free guidance with the empty prompt as the
    unconditional one) and the DDIM step. ``generators``: one CPU generator per image;
    image k's initial noise and its re-noising noise of every step come from
    ``generators[k]`` (in that order), so its result does not depend on the batch.

    Returns the decoded images (B, 3, S, S) in [-1, 1] (float32, CPU), or with
    ``return_latents`` the final latents (B, 4, h, w) instead, without decoding.
    """
    dev = pipe.unet.device
    B = images.shape[0]
    if generators is not None and len(generators) != B:
        raise ValueError(f"inpaint_background: {len(generators)} generators for {B} images")
    z0 = encode_images(pipe, images).float()
    if tuple(masks.shape) != (B, 1, *z0.shape[2:]):
        raise ValueError(f"inpaint_background: masks must be (B, 1, h, w) = {(B, 1, *z0.shape[2:])} "
                         f"on the latent grid, got {tuple(masks.shape)}")
    m = masks.to(dev, torch.float32)
    scheduler = _ddim(pipe, num_inference_steps)
    cond = encode_prompt(pipe, prompt)
    uncond = None if guidance_scale == 1.0 else encode_prompt(pipe, "")

    def noise() -> torch.Tensor:
        return _randn(tuple(z0.shape[1:]), B, generators).to(dev)

    z = noise() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        z = blend_known(z, z0, m, t, scheduler, noise())
        eps = guided_eps(pipe.unet, scheduler.scale_model_input(z, t), t, cond, uncond, guidance_scale)
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return z.cpu() if return_latents else decode_latents(pipe, z)


def difference_image(x: torch.Tensor | np.ndarray, x_inpainted: torch.Tensor | np.ndarray) -> np.ndarray:
    """D = mean over RGB of |x - x_inpainted|, float32 (H, W).

    Either both are tensors (3, H, W) in [-1, 1] (D in [0, 2]) or both uint8 arrays
    (H, W, 3) (D in [0, 255]): D is on the pixel scale of its inputs.
    """
    if isinstance(x, torch.Tensor) and isinstance(x_inpainted, torch.Tensor):
        if x.ndim != 3 or x.shape[0] != 3 or x.shape != x_inpainted.shape:
            raise ValueError(f"difference_image: expected two (3, H, W) tensors, got {tuple(x.shape)} "
                             f"and {tuple(x_inpainted.shape)}")
        return (x.float() - x_inpainted.float()).abs().mean(0).cpu().numpy().astype(np.float32)
    a, b = np.asarray(x), np.asarray(x_inpainted)
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape != b.shape:
        raise ValueError(f"difference_image: expected two (3, H, W) tensors in [-1, 1] or two uint8 (H, W, 3) "
                         f"arrays, got {type(x).__name__} {a.dtype} {a.shape} and "
                         f"{type(x_inpainted).__name__} {b.dtype} {b.shape}")
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=2)


UPSAMPLINGS = ("bilinear", "nearest")


def upsampled_m_pre(m_lat: np.ndarray, placement: Placement, mode: str = "bilinear") -> np.ndarray:
    """M_pre from the latent grid (``m_lat``, bool (h, w) over the canvas) on the original
    image's pixels, bool (H, W), as step 4 intersects it with the thresholded D.

    ``"bilinear"`` (the reference): linear interpolation of the 0/1 latent mask between
    cell centres at each pixel centre, kept where above 0: M_pre dilated by up to half a
    latent cell. ``"nearest"``: the cell each pixel centre falls in, an exact block
    upsampling (the step-2 PNG).
    """
    if mode == "nearest":
        return map_back(np.asarray(m_lat, bool), placement, "nearest")
    if mode == "bilinear":
        return map_back(np.asarray(m_lat, np.float32), placement, "bilinear") > 0
    raise ValueError(f"m_pre_upsampling: expected one of {UPSAMPLINGS}, got {mode!r}")


def refine_mask(m_pre: np.ndarray, diff: np.ndarray, seed: int = 0, close_and_fill: bool = False) -> np.ndarray:
    """The refined mask M = m_pre AND majority3x3(D > GMM-midpoint(D)), bool (H, W).

    ``m_pre`` is M_pre upsampled to the original grid (:func:`upsampled_m_pre`), ``diff``
    is D on the same grid, ``seed`` the GMM's random state. ``close_and_fill`` (opt-in, not
    the reference): then a 3x3 closing and hole filling (``fgbg.masks.fill_and_close``),
    which may add pixels outside ``m_pre``; without it M is always a subset of ``m_pre``.
    """
    m = refined_mask(m_pre, diff, seed)
    return fill_and_close(m) if close_and_fill else m


# --------------------------------------------------------------------------- the M_crop baseline
def crop_baseline(img: np.ndarray, m_pre: np.ndarray) -> np.ndarray:
    """The paper's M_crop baseline: the bounding box of M_pre filled with mirrored background.

    Exact rule. The box is rows r0..r1-1, columns c0..c1-1 (of height bh, width bw). Beside
    it lie four strips outside the box, which hold no M_pre pixel: left (c0 columns x bh
    rows), right (W - c1 columns), above (r0 rows x bw columns), below (H - r1 rows). The one
    of largest area is mirrored across the box edge it shares (ties: left, right, above,
    below). With d the strip's depth, the box's k-th column (row) from that edge takes the
    strip's column (row) at distance ``p = k mod 2d`` from the edge when ``p < d``, else at
    distance ``2d - 1 - p``: a reflection, reflected again when the strip is thinner than
    the box (like ``np.pad(mode="symmetric")``), so there is no seam. Pixels outside the
    box are unchanged. Empty M_pre, or a box covering the whole image (no background
    beside it): the image is returned unchanged.
    """
    img, m = np.asarray(img), np.asarray(m_pre, dtype=bool)
    if img.ndim != 3 or img.shape[:2] != m.shape:
        raise ValueError(f"crop_baseline: image {img.shape} and M_pre {m.shape} must share (H, W)")
    out = img.copy()
    rows, cols = np.nonzero(m)
    if rows.size == 0:
        return out
    H, W = m.shape
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    bh, bw = r1 - r0, c1 - c0
    area = {"left": c0 * bh, "right": (W - c1) * bh, "above": r0 * bw, "below": (H - r1) * bw}
    side = max(area, key=area.get)  # the first of the largest, in dict order
    if area[side] == 0:
        return out
    # A view of `out` in which the chosen strip lies left of the box: writing it writes `out`.
    view, (vr0, vr1), (vc0, vc1) = {
        "left": (out, (r0, r1), (c0, c1)),
        "right": (out[:, ::-1], (r0, r1), (W - c1, W - c0)),
        "above": (out.transpose(1, 0, 2), (c0, c1), (r0, r1)),
        "below": (out[::-1].transpose(1, 0, 2), (c0, c1), (H - r1, H - r0)),
    }[side]
    d = vc0  # the strip's depth: the columns 0 .. vc0 - 1 of the view
    p = np.arange(vc1 - vc0) % (2 * d)
    src = np.where(p < d, vc0 - 1 - p, p - d)  # distance p from the edge = column vc0 - 1 - p
    view[vr0:vr1, vc0:vc1] = view[vr0:vr1][:, src]
    return out


# --------------------------------------------------------------------------- dataset runs
INPAINT_OUTPUT_DIRS = ("inpaint", "diff", "masks/refined", "masks/crop")
"""The folders step 4 writes below out_dir; the first holds its run_config.json."""


def inpaint_dir(out_dir: str | Path) -> Path:
    """The folder of step 4's run (its run_config.json and the inpainted images)."""
    return Path(out_dir) / INPAINT_OUTPUT_DIRS[0]


def _path(out_dir: str | Path, sub: str, item: Item, suffix: str = ".png") -> Path:
    return Path(out_dir) / sub / f"{item.key}{suffix}"


def inpainted_path(out_dir: str | Path, item: Item) -> Path:
    """``out_dir/inpaint/<key>.png``: the inpainted image in the original grid."""
    return _path(out_dir, INPAINT_OUTPUT_DIRS[0], item)


def diff_path(out_dir: str | Path, item: Item, suffix: str = ".npy") -> Path:
    """``out_dir/diff/<key>.npy``: D as float16 (0..255 scale); ``suffix=".png"``: D as uint8 for viewing."""
    return _path(out_dir, INPAINT_OUTPUT_DIRS[1], item, suffix)


def refined_mask_path(out_dir: str | Path, item: Item) -> Path:
    """``out_dir/masks/refined/<key>.png``: the refined mask M (0/255)."""
    return _path(out_dir, INPAINT_OUTPUT_DIRS[2], item)


def crop_mask_path(out_dir: str | Path, item: Item) -> Path:
    """``out_dir/masks/crop/<key>.png``: the M_crop baseline mask (0/255)."""
    return _path(out_dir, INPAINT_OUTPUT_DIRS[3], item)


def _to_original(x: torch.Tensor, placement: Placement) -> np.ndarray:
    """An inpainted canvas (3, S, S) in [-1, 1] -> uint8 (H, W, 3) on the original grid.

    Unscaled placement (the image's pixels are the canvas's top-left pixels): a plain crop,
    exact (``map_back`` bilinear would give the same, at interpolation weights of 0).
    Otherwise each channel is mapped back bilinearly (``fgbg.data.map_back``), then rounded.
    """
    p = placement
    if (p.placed_h, p.placed_w) == (p.height, p.width):
        a = x[:, :p.height, :p.width].numpy()
    else:
        a = np.stack([map_back(c, p, "bilinear") for c in x.numpy()])
    return to_uint8(a)


@dataclass
class _Loaded:
    x: torch.Tensor         # the placed image (3, S, S)
    placement: Placement
    img: np.ndarray         # the original image, uint8 (H, W, 3)
    m_pre: np.ndarray       # M_pre, bool (H, W)
    m_lat: np.ndarray       # M_pre on the latent grid, bool (h, w)
    seed: int               # the image's own seed


def inpaint_and_refine(pipe, items, out_dir: str | Path, prompt: str = BACKGROUND_PROMPT,
                       num_inference_steps: int = 50, guidance_scale: float = 1.0, batch_size: int = 16,
                       seed: int = 0, resize_mode: str = "pad", close_and_fill: bool = False, crop: bool = True,
                       m_pre_upsampling: str = "bilinear", overwrite: bool = False,
                       progress: bool = True) -> StepReport:
    """Step 4 over a dataset: inpaint each image's M_pre region, D, M (and M_crop).

    Needs the M_pre PNGs of step 2 (``masks.prelim_mask_path``). Writes, atomically, in the
    original pixel grid of each image:

    * ``out_dir/inpaint/<key>.png``  the inpainted image (uint8 RGB);
    * ``out_dir/diff/<key>.npy``     D (float16, 0..255 scale: computed from the two uint8 images),
      ``out_dir/diff/<key>.png``     D rounded to uint8, for viewing;
    * ``out_dir/masks/refined/<key>.png``  M (0/255);
    * ``out_dir/masks/crop/<key>.png``     M_crop (0/255), with ``crop=True``.

    M and M_crop intersect with M_pre upsampled by ``m_pre_upsampling``
    (:func:`upsampled_m_pre`; default the reference's dilating "bilinear").

    Image k's noise comes from its own generator seeded ``seed_for(seed, key)``: results do
    not depend on ``batch_size``, order or resuming. Skipped (reported, never fatal): an
    unreadable image, a missing M_pre file, an M_pre of another size than the image (the
    image changed since step 2). Recorded as notes, outputs still written: an empty M_pre
    (nothing to inpaint: inpainted = original, D = 0, M empty) and an M_pre covering the
    whole image (no known region to blend: the image is generated from scratch).

    ``out_dir/inpaint/run_config.json`` records the settings, a fingerprint of ``pipe``'s
    weights and the M_pre run they start from; a rerun with other ones raises
    :class:`fgbg.runs.RunConfigError` instead of silently reusing the finished images.
    """
    if m_pre_upsampling not in UPSAMPLINGS:
        raise ValueError(f"m_pre_upsampling: expected one of {UPSAMPLINGS}, got {m_pre_upsampling!r}")
    canvas = canvas_size(pipe)
    grid = canvas // pipe.vae_scale_factor
    out_dir = Path(out_dir)
    m_pre_run = read_run_config(prelim_dir(out_dir))
    if m_pre_run is None:
        raise FileNotFoundError(f"{prelim_dir(out_dir)}: no M_pre run there; run steps 1-2 first (notebooks "
                                f"01_attention and 02_masks with the same out_dir)")
    config = dict(
        model=model_fingerprint(pipe), prompt=prompt, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, seed=seed, resize_mode=resize_mode, close_and_fill=close_and_fill,
        crop=crop, m_pre_upsampling=m_pre_upsampling, m_pre=m_pre_run)

    def outputs(item: Item) -> list[Path]:
        paths = [inpainted_path(out_dir, item), diff_path(out_dir, item), diff_path(out_dir, item, ".png"),
                 refined_mask_path(out_dir, item)]
        return paths + [crop_mask_path(out_dir, item)] if crop else paths

    def load(item: Item) -> _Loaded:
        x, pl, img = load_item(item, canvas=canvas, mode=resize_mode)
        path = prelim_mask_path(out_dir, item)
        if not path.is_file():
            raise DatasetError(f"{path}: M_pre not found; run step 2 (fgbg.masks.preliminary_masks) first")
        m_pre = read_mask(path)
        if m_pre.shape != img.shape[:2]:
            raise DatasetError(f"{item.image_path} is {img.shape[0]}x{img.shape[1]} (HxW) but its M_pre {path} "
                               f"is {m_pre.shape[0]}x{m_pre.shape[1]}: the image changed since step 2; "
                               f"rerun steps 1-2 for it")
        return _Loaded(x, pl, img, m_pre, place_mask(m_pre, pl, grid), seed_for(seed, item.key))

    def work(batch: list[_Loaded]) -> list[torch.Tensor | None]:
        todo = [k for k, b in enumerate(batch) if b.m_lat.any()]  # empty M_pre: nothing to inpaint
        results: list[torch.Tensor | None] = [None] * len(batch)
        if todo:
            x = torch.stack([batch[k].x for k in todo])
            m = torch.from_numpy(np.stack([batch[k].m_lat for k in todo])).float()[:, None]
            gens = [torch.Generator().manual_seed(batch[k].seed) for k in todo]
            out = inpaint_background(pipe, x, m, prompt, num_inference_steps, guidance_scale, gens)
            for k, o in zip(todo, out):
                results[k] = o
        return results

    def finish(item: Item, b: _Loaded, result: torch.Tensor | None) -> str | None:
        note = None
        if result is None:
            inpainted = b.img.copy()
            note = "M_pre is empty (on the latent grid): nothing to inpaint; inpainted = original, D = 0, M empty"
        else:
            inpainted = _to_original(result, b.placement)
            vr, vc = valid_region(b.placement, grid)
            if b.m_lat[:vr, :vc].all():
                note = "M_pre covers the whole image: no known region to blend, the background is generated from scratch"
        d = difference_image(b.img, inpainted)
        m_up = upsampled_m_pre(b.m_lat, b.placement, m_pre_upsampling)
        m = refine_mask(m_up, d, seed, close_and_fill)
        save_png(inpainted_path(out_dir, item), inpainted)
        save_npy(diff_path(out_dir, item), d.astype(np.float16))
        save_png(diff_path(out_dir, item, ".png"), np.clip(np.round(d), 0, 255).astype(np.uint8))
        save_png(refined_mask_path(out_dir, item), m.astype(np.uint8) * 255)
        if crop:
            m_crop = refine_mask(m_up, difference_image(b.img, crop_baseline(b.img, b.m_pre)), seed,
                                 close_and_fill)
            save_png(crop_mask_path(out_dir, item), m_crop.astype(np.uint8) * 255)
        return note

    also = tuple(out_dir / sub for sub in INPAINT_OUTPUT_DIRS[1:])
    with step_outputs(inpaint_dir(out_dir), config, overwrite=overwrite, also=also, out_dir=out_dir):
        return for_each_batch("step 4 (inpainting)", items, outputs, load, work, finish, batch_size=batch_size,
                              out_dir=out_dir, progress=progress)


# --------------------------------------------------------------------------- fg-vs-bg sampling
@torch.no_grad()
def sample_fg_bg(pipe, fg_prompt: str, bg_prompt: str, scale: float, n: int, num_inference_steps: int = 50,
                 seed: int = 0, batch_size: int = 16, seeds: list[int] | None = None) -> np.ndarray:
    """Sample ``n`` images steered from the background towards the foreground concept.

    DDIM (eta 0) from pure noise, with the noise prediction

        eps = eps(bg_prompt) + scale * (eps(fg_prompt) - eps(bg_prompt))

    i.e. classifier-free guidance with the background prompt in place of the empty one;
    ``scale = 1`` is plain conditional sampling with ``fg_prompt``. The initial noise of all
    ``n`` images is drawn at once from ``torch.Generator().manual_seed(seed)`` (like
    diffusers' pipelines), then ``batch_size`` images at a time are denoised. With
    ``seeds`` (one per image, ``n`` is then ``len(seeds)``) image k's noise comes from its
    own generator, so an image does not depend on the others (resumable datasets, D').
    Returns uint8 (n, H, W, 3).
    """
    unet = pipe.unet
    size = unet.config.sample_size
    scheduler = _ddim(pipe, num_inference_steps)
    fg, bg = encode_prompt(pipe, fg_prompt), encode_prompt(pipe, bg_prompt)
    shape = (unet.config.in_channels, size, size)
    if seeds is not None:
        n = len(seeds)
        noise = _randn(shape, n, [torch.Generator().manual_seed(int(s)) for s in seeds])
    else:
        noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    images = []
    for s in range(0, n, batch_size):
        z = noise[s:s + batch_size].to(unet.device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = guided_eps(unet, scheduler.scale_model_input(z, t), t, cond=fg, uncond=bg, scale=scale)
            z = scheduler.step(eps, t, z, eta=0.0).prev_sample
        images.append(to_uint8(decode_latents(pipe, z)))
    return np.concatenate(images)
