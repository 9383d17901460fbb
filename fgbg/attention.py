"""Step 1 of the method: raw cross-attention maps of a word.

For one image and the prompt "a photo of a {object}":

1. encode the image to the latent z0 (VAE posterior mean times the scaling factor);
2. for each of the T0 lowest levels of a T-step DDIM grid (t = 781, 761, ..., 1 for
   T0 = 40 of T = 50), noise z0 independently with fresh noise,
   z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and run ONE conditional UNet pass.
   The levels are independent (this is not a denoising trajectory), so they all go
   through the UNet as one batch;
3. capture the softmax probabilities of every cross-attention layer (``attn2``),
   averaged over heads; self-attention keeps its fast processor;
4. upsample each layer's map to the latent grid by nearest (block) repetition and
   average over layers and levels.

Maps are accumulated as running sums (a few MB per image even for SD) and never stored
per layer and level, unless a figure asks for the breakdown (``by_level``/``by_layer``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

EXTRACTORS = ("relevant_token_step_mean", "multi_relevant_token_step_mean", "all_mean", "all_token_mean",
              "diffusion_steps_mean")


# --------------------------------------------------------------------------- tokens
def find_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in the tokenized ``prompt`` (position 0 is <startoftext>).

    >>> find_token_indices(tok, "a photo of a bird", "bird")   # doctest: +SKIP
    [5]

    A word may be several BPE tokens; all of its positions are returned. Raises
    ValueError when the word is not in the prompt.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    want = tokenizer(word, add_special_tokens=False).input_ids
    if not want:
        raise ValueError(f"object word {word!r} is empty after tokenization")
    for i in range(len(ids) - len(want) + 1):
        if ids[i:i + len(want)] == want:
            return list(range(i, i + len(want)))
    words = [tokenizer.decode([t]) for t in ids[1:-1]]
    raise ValueError(f"object word {word!r} is not in the prompt {prompt!r} (its tokens: {words}); "
                     f"set the parameter `object_word` to one of them or change `prompt`")


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The 77 token strings the text encoder sees (padding included)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    return [tokenizer.convert_ids_to_tokens(t) for t in ids]


# --------------------------------------------------------------------------- levels
def noise_levels(scheduler_config, num_inference_steps: int = 50, rev_diff_steps: int = 40) -> list[int]:
    """The ``rev_diff_steps`` lowest timesteps of a ``num_inference_steps`` DDIM grid,
    highest first: [781, 761, ..., 1] for SD's defaults (T0 = 40 of T = 50)."""
    from diffusers import DDIMScheduler
    if not 1 <= rev_diff_steps <= num_inference_steps:
        raise ValueError(f"rev_diff_steps must be in 1..{num_inference_steps}, got {rev_diff_steps}")
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(num_inference_steps)
    return [int(t) for t in ddim.timesteps[-rev_diff_steps:]]


# --------------------------------------------------------------------------- capture
class CrossAttentionCapture:
    """An attention processor that computes attention exactly like diffusers' classic
    ``AttnProcessor`` and adds the head-averaged probabilities to running sums.

    ``sums`` has shape (images, level groups, resolutions, tokens, h, w) on the latent
    grid (h, w). Before each UNet call the caller says which image and level group each
    batch row belongs to (:meth:`route`).
    """

    def __init__(self, store: "AttentionStore", name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch*heads, Nq, tokens)
        self.store.add(self.name, probs.view(-1, attn.heads, *probs.shape[1:]).float().mean(1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@dataclass
class AttentionStore:
    """Running sums of cross-attention probabilities on the latent grid."""
    n_images: int
    n_groups: int
    resolutions: list[int]  # latent-grid rows of each captured resolution, largest first
    n_tokens: int
    grid: tuple[int, int]
    device: torch.device = torch.device("cpu")
    layer_res: dict = field(default_factory=dict)  # layer name -> resolution index

    def __post_init__(self):
        h, w = self.grid
        self.sums = torch.zeros(self.n_images, self.n_groups, len(self.resolutions), self.n_tokens, h, w,
                                device=self.device)
        self.counts = torch.zeros(self.n_groups, len(self.resolutions), device=self.device)
        self._img = self._grp = None

    def route(self, image_idx: torch.Tensor, group_idx: torch.Tensor) -> None:
        self._img, self._grp = image_idx.to(self.device), group_idx.to(self.device)

    def add(self, name: str, probs: torch.Tensor) -> None:
        """probs: (batch, Nq, tokens) for one layer; batch rows routed by :meth:`route`."""
        h, w = self.grid
        n = probs.shape[1]
        f = int(round((h * w / n) ** 0.5))
        if (h // f) * (w // f) != n:
            raise ValueError(f"layer {name}: {n} queries do not tile the {h}x{w} latent grid")
        m = probs.transpose(1, 2).reshape(probs.shape[0], self.n_tokens, h // f, w // f)
        m = m.repeat_interleave(f, -2).repeat_interleave(f, -1)  # nearest (block) upsampling
        r = self.resolutions.index(h // f) if (h // f) in self.resolutions else None
        if r is None:
            raise ValueError(f"layer {name}: resolution {h // f} not in {self.resolutions}")
        flat = self.sums.view(-1, *self.sums.shape[2:])  # (images*groups, R, T, h, w)
        row = self._img * self.n_groups + self._grp
        flat[:, r].index_add_(0, row, m.to(self.sums.dtype))
        if name not in self.layer_res:
            self.layer_res[name] = r
        # counts[g, r]: (level sample, layer) maps summed into one image's group g, resolution r
        self.counts[:, r].index_add_(0, self._grp, torch.full(self._grp.shape, 1.0 / self.n_images,
                                                              device=self.device))


def _layer_resolutions(unet, latent: int) -> dict[str, int]:
    """Latent-grid rows of each cross-attention layer, from a dry shape walk of the UNet."""
    res = {}
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            depth = len(unet.config.block_out_channels) - 1
        else:
            block = int(name.split(".")[1])
            if name.startswith("down_blocks"):
                depth = block
            else:  # up blocks run from the deepest resolution back up
                depth = len(unet.config.block_out_channels) - 1 - block
        res[name] = latent // 2 ** depth
    return res


@contextmanager
def capture_cross_attention(unet, store: AttentionStore):
    """Swap a capturing processor into every ``attn2`` layer; restore the originals on exit
    (also when the body raises). Self-attention keeps its (SDPA) processor."""
    original = dict(unet.attn_processors)
    procs = {k: (CrossAttentionCapture(store, k) if k.endswith("attn2.processor") else v)
             for k, v in original.items()}
    unet.set_attn_processor(procs)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


# --------------------------------------------------------------------------- maps
@dataclass
class AttentionMaps:
    """Accumulated cross-attention of a batch of images.

    ``sums[i, g, r, k]``: sum over the layers of resolution r and the noise levels of
    group g of the (upsampled) probability map of token k for image i. ``counts[g, r]``:
    how many (level, layer) maps went into that sum for one image. Groups are the levels
    themselves with ``by_level=True``, else one group.
    """
    sums: torch.Tensor
    counts: torch.Tensor
    timesteps: list[int]
    resolutions: list[int]
    tokens: list[str]
    by_level: bool

    def mean(self, levels: slice | list[int] | None = None, resolutions: list[int] | None = None) -> torch.Tensor:
        """Mean over the chosen level groups and resolutions (weighted by their layer
        counts, i.e. the plain mean over all chosen (level, layer) maps): (images, tokens, h, w)."""
        g = slice(None) if levels is None else levels
        r = list(range(len(self.resolutions))) if resolutions is None else \
            [self.resolutions.index(x) for x in resolutions]
        s = self.sums[:, g][:, :, r].sum(dim=(1, 2))
        c = self.counts[g][:, r].sum()
        return s / c

    def last_levels(self, steps: int | None) -> slice:
        if steps is None or steps >= len(self.timesteps):
            return slice(None)
        if not self.by_level:
            raise ValueError("a mean over the last `steps` levels needs compute_attention_maps(..., by_level=True)")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return slice(len(self.timesteps) - steps, None)


def relevant_token_step_mean(maps: AttentionMaps, tok: int, steps: int | None = None) -> torch.Tensor:
    """The reference's default: token ``tok``, mean over the last ``steps`` levels and all layers."""
    return maps.mean(maps.last_levels(steps))[:, tok]


def multi_relevant_token_step_mean(maps: AttentionMaps, toks: list[int], steps: int | None = None) -> torch.Tensor:
    """SUM over tokens of each token's mean map (e.g. "human with arms and legs")."""
    return maps.mean(maps.last_levels(steps))[:, list(toks)].sum(1)


def all_mean(maps: AttentionMaps, steps: int | None = None) -> torch.Tensor:
    """Mean over every token of the mean map."""
    return maps.mean(maps.last_levels(steps)).mean(1)


def all_token_mean(maps: AttentionMaps, steps: int | None = None) -> torch.Tensor:
    """All 77 token maps, each the mean over levels and layers: (images, 77, h, w)."""
    return maps.mean(maps.last_levels(steps))


def diffusion_steps_mean(maps: AttentionMaps, tok: int) -> torch.Tensor:
    """Mean over all levels and layers of one token's map (relevant_token_step_mean over every level)."""
    return relevant_token_step_mean(maps, tok, None)


def extract(maps: AttentionMaps, extractor: str, token_indices: list[int], steps: int | None = None) -> torch.Tensor:
    """Apply an extractor by name; returns (images, h, w), or (images, 77, h, w) for all_token_mean."""
    if extractor == "relevant_token_step_mean":
        if len(token_indices) == 1:
            return relevant_token_step_mean(maps, token_indices[0], steps)
        return multi_relevant_token_step_mean(maps, token_indices, steps)  # a word of several BPE tokens
    if extractor == "multi_relevant_token_step_mean":
        return multi_relevant_token_step_mean(maps, token_indices, steps)
    if extractor == "all_mean":
        return all_mean(maps, steps)
    if extractor == "all_token_mean":
        return all_token_mean(maps, steps)
    if extractor == "diffusion_steps_mean":
        return multi_relevant_token_step_mean(maps, token_indices, None)
    raise ValueError(f"unknown extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """z0 = VAE posterior mean x scaling_factor, for images (B, 3, H, W) in [-1, 1]."""
    vae = pipe.vae
    x = images.to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def encode_prompt(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def compute_attention_maps(pipe, images: torch.Tensor, prompt: str, rev_diff_steps: int = 40,
                           num_inference_steps: int = 50, num_repeat_each_diffusion_step: int = 1,
                           by_level: bool = False, unet_batch: int = 40,
                           generator: torch.Generator | None = None) -> AttentionMaps:
    """Step 1 for a batch of placed images (B, 3, S, S) in [-1, 1].

    Every (image, level, repeat) sample is independent: they are flattened and sent
    through the UNet ``unet_batch`` at a time. Returns running sums, see AttentionMaps.
    """
    unet, dev = pipe.unet, pipe.unet.device
    z0 = encode_images(pipe, images)
    B, _, h, w = z0.shape
    ts = noise_levels(pipe.scheduler.config, num_inference_steps, rev_diff_steps)
    from diffusers import DDIMScheduler
    abar = DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.to(dev)
    cond = encode_prompt(pipe, prompt)
    n_tok = cond.shape[1]
    L, N = len(ts), num_repeat_each_diffusion_step
    res_of = _layer_resolutions(unet, h)
    resolutions = sorted(set(res_of.values()), reverse=True)
    store = AttentionStore(B, L if by_level else 1, resolutions, n_tok, (h, w), dev)
    # flattened samples: image-major, then level, then repeat (the order noise is drawn in)
    img_idx = torch.arange(B).repeat_interleave(L * N)
    lvl_idx = torch.arange(L).repeat_interleave(N).repeat(B)
    grp_idx = lvl_idx if by_level else torch.zeros_like(lvl_idx)
    t_all = torch.tensor(ts, device=dev)[lvl_idx.to(dev)]
    # all noise drawn at once, in that order: the result does not depend on unet_batch
    noise = torch.randn((len(img_idx), *z0.shape[1:]), generator=generator,
                        device=generator.device if generator is not None else "cpu")
    with capture_cross_attention(unet, store):
        for s in range(0, len(img_idx), unet_batch):
            sl = slice(s, s + unet_batch)
            zi, t = z0[img_idx[sl].to(dev)], t_all[sl]
            eps = noise[sl].to(dev, zi.dtype)
            a = abar[t].view(-1, 1, 1, 1).to(zi.dtype)
            zt = a.sqrt() * zi + (1 - a).sqrt() * eps
            store.route(img_idx[sl], grp_idx[sl])
            unet(zt, t, encoder_hidden_states=cond.expand(len(zt), -1, -1)).sample
    return AttentionMaps(store.sums.cpu(), store.counts.cpu(), ts, resolutions, prompt_tokens(pipe.tokenizer, prompt),
                         by_level)


# --------------------------------------------------------------------------- datasets
def seed_for(seed: int, key: str) -> int:
    """A per-image seed: results do not depend on batch composition or on resuming."""
    import zlib
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63


def attention_path(out_dir, item, subdir: str = "attention"):
    from pathlib import Path
    return Path(out_dir) / subdir / f"{item.key}.npz"


def save_attention_maps(pipe, dataset, out_dir, prompt: str = "a photo of a bird", object_word: str = "bird",
                        extractor: str = "relevant_token_step_mean", steps: int | None = None,
                        rev_diff_steps: int = 40, num_inference_steps: int = 50,
                        num_repeat_each_diffusion_step: int = 1, extra_words: tuple[str, ...] = ("photo",),
                        seed: int = 0, resize_mode: str = "pad", subdir: str = "attention", unet_batch: int = 40,
                        overwrite: bool = False, progress: bool = True):
    """Step 1 over a dataset: one ``<out_dir>/<subdir>/<key>.npz`` per image holding the
    extracted map of ``object_word`` on the latent grid (``map``), the maps of
    ``extra_words`` (``map_<word>``, controls such as the non-object token "photo") and the
    image's placement. Resumable; bad images are skipped and reported (StepReport)."""
    from .data import dataset_identity, load_item
    from .io import atomic_write_bytes
    from .models import canvas_size, model_fingerprint
    from .runs import for_each_item, step_outputs
    import io as _io
    from pathlib import Path
    if extractor not in EXTRACTORS:
        raise ValueError(f"parameter `extractor`: unknown {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    tok = find_token_indices(pipe.tokenizer, prompt, object_word)
    extra = {w: find_token_indices(pipe.tokenizer, prompt, w) for w in extra_words}
    canvas = canvas_size(pipe)
    dtype = pipe.unet.dtype
    dataset = list(dataset)
    config = dict(
        model=model_fingerprint(pipe), prompt=prompt, object_word=object_word, extractor=extractor, steps=steps,
        rev_diff_steps=rev_diff_steps, num_inference_steps=num_inference_steps,
        num_repeat_each_diffusion_step=num_repeat_each_diffusion_step, extra_words=list(extra_words), seed=seed,
        resize_mode=resize_mode, dataset=dataset_identity(dataset) if dataset else None)

    def work(item):
        x, pl, _ = load_item(item, canvas=canvas, mode=resize_mode)
        g = torch.Generator().manual_seed(seed_for(seed, item.key))
        maps = compute_attention_maps(pipe, x[None].to(dtype), prompt, rev_diff_steps, num_inference_steps,
                                      num_repeat_each_diffusion_step, by_level=steps is not None,
                                      unet_batch=unet_batch, generator=g)
        arrays = {"map": extract(maps, extractor, tok, steps)[0].numpy()}
        for w, idx in extra.items():
            arrays[f"map_{w}"] = extract(maps, "relevant_token_step_mean", idx, steps)[0].numpy()
        buf = _io.BytesIO()
        np.savez(buf, **arrays, placement=np.array([pl.canvas, pl.height, pl.width, pl.placed_h, pl.placed_w]),
                 scale=np.array(pl.scale), mode=np.array(pl.mode), timesteps=np.array(maps.timesteps))
        atomic_write_bytes(attention_path(out_dir, item, subdir), buf.getvalue())

    with step_outputs(Path(out_dir) / subdir, config, overwrite=overwrite, out_dir=out_dir):
        return for_each_item(f"step 1 ({subdir})", dataset, lambda it: [attention_path(out_dir, it, subdir)],
                             work, out_dir=out_dir, progress=progress)


def load_attention(out_dir, item, subdir: str = "attention", word: str | None = None):
    """(map on the latent grid, Placement) saved by :func:`save_attention_maps`."""
    from .data import DatasetError, Placement
    path = attention_path(out_dir, item, subdir)
    if not path.is_file():
        raise DatasetError(f"{path}: no step-1 map for {item.rel}; run step 1 first "
                           f"(notebook 01_attention, or fgbg.attention.save_attention_maps)")
    try:
        with np.load(path) as z:
            c, h, w, ph, pw = (int(v) for v in z["placement"])
            pl = Placement(canvas=c, scale=float(z["scale"]), height=h, width=w, placed_h=ph, placed_w=pw,
                           mode=str(z["mode"]))
            return z["map" if word is None else f"map_{word}"].astype(np.float32), pl
    except KeyError:
        raise
    except Exception as e:  # 0-byte, truncated or not an npz: name the file and what to do
        raise DatasetError(f"{path}: cannot read the step-1 map ({type(e).__name__}: {e}); rerun step 1 "
                           f"for it (a rerun recomputes outputs that do not open)") from e
