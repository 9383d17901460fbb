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

Optional (off by default, not in the reference): refine a map with the UNet's own
self-attention, ``A_self^k`` (DiffSegmenter, iSeg), captured in the same passes at one
resolution (:func:`refine_with_self_attention`, ``self_attention_k``).

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
        self._record(probs.view(-1, attn.heads, *probs.shape[1:]).float().mean(1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(self, probs: torch.Tensor) -> None:
        """probs: head-averaged (batch, Nq, tokens)."""
        self.store.add(self.name, probs)


class SelfAttentionCapture(CrossAttentionCapture):
    """The same classic attention for a self-attention (``attn1``) layer: adds the
    head-averaged (batch, N, N) probability matrix (row i: query position i's softmax over
    the key positions j, each row sums to 1) to the store's self-attention running sum
    (:meth:`AttentionStore.add_self`)."""

    def _record(self, probs: torch.Tensor) -> None:
        self.store.add_self(self.name, probs)


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
    self_resolution: int | None = None  # latent-grid rows of the captured self-attention layers (None: none)

    def __post_init__(self):
        h, w = self.grid
        self.sums = torch.zeros(self.n_images, self.n_groups, len(self.resolutions), self.n_tokens, h, w,
                                device=self.device)
        self.counts = torch.zeros(self.n_groups, len(self.resolutions), device=self.device)
        self._img = self._grp = self._self_rows = None
        self.self_sums = self.self_counts = None
        if self.self_resolution is not None:
            r = self.self_resolution
            if r < 1 or h % r or w % (h // r):
                raise ValueError(f"self-attention resolution {r} does not tile the {h}x{w} latent grid")
            self.self_grid = (r, w // (h // r))
            n = self.self_grid[0] * self.self_grid[1]
            # (images, N, N): per image, the sum over (level sample, layer) of the head-averaged
            # self-attention matrices; N^2 floats (16x16: 256 KB in fp32, 512 KB in fp64 as here;
            # 32x32: 4 / 8 MB)
            # float64 (not on mps, which has none): A^k contracts a map's contrast, keep its digits
            dt = torch.float32 if torch.device(self.device).type == "mps" else torch.float64
            self.self_sums = torch.zeros(self.n_images, n, n, device=self.device, dtype=dt)
            self.self_counts = torch.zeros(self.n_images, device=self.device, dtype=dt)

    def route(self, image_idx: torch.Tensor, group_idx: torch.Tensor, self_rows: torch.Tensor | None = None) -> None:
        """Which image and level group each batch row of the next UNet call belongs to;
        ``self_rows`` (bool per row, default all): the rows whose self-attention is summed."""
        self._img, self._grp = image_idx.to(self.device), group_idx.to(self.device)
        self._self_rows = None if self_rows is None else self_rows.to(self.device)

    def add_self(self, name: str, probs: torch.Tensor) -> None:
        """probs: (batch, N, N) head-averaged self-attention of one layer (rows: queries,
        columns: keys); batch rows routed by :meth:`route`."""
        if self.self_sums is None:
            raise ValueError(f"layer {name}: this store captures no self-attention")
        n = self.self_sums.shape[-1]
        if probs.shape[1:] != (n, n):
            raise ValueError(f"layer {name}: self-attention of shape {tuple(probs.shape[1:])}, expected "
                             f"{n}x{n} ({self.self_grid[0]}x{self.self_grid[1]} positions)")
        img, p = self._img, probs
        if self._self_rows is not None:
            img, p = img[self._self_rows], p[self._self_rows]
        self.self_sums.index_add_(0, img, p.to(self.self_sums.dtype))
        self.self_counts.index_add_(0, img, torch.ones(img.shape, device=self.device, dtype=self.self_counts.dtype))

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


def _layer_resolutions(unet, latent: int, kind: str = "attn2") -> dict[str, int]:
    """Latent-grid rows of each cross-attention layer (``kind="attn1"``: each self-attention
    layer), from a dry shape walk of the UNet."""
    res = {}
    for name in unet.attn_processors:
        if not name.endswith(f"{kind}.processor"):
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
    (also when the body raises). Self-attention keeps its (SDPA) processor, except, when
    ``store.self_resolution`` is set, the ``attn1`` layers of that resolution, which get a
    :class:`SelfAttentionCapture` for the same UNet passes."""
    original = dict(unet.attn_processors)
    self_layers = set()
    if store.self_resolution is not None:
        self_layers = {k for k, r in _layer_resolutions(unet, store.grid[0], "attn1").items()
                       if r == store.self_resolution}
        if not self_layers:
            raise ValueError(f"no self-attention layer at resolution {store.self_resolution}; the UNet has "
                             f"{sorted(set(_layer_resolutions(unet, store.grid[0], 'attn1').values()), reverse=True)}")
    procs = {k: (CrossAttentionCapture(store, k) if k.endswith("attn2.processor")
                 else SelfAttentionCapture(store, k) if k in self_layers else v)
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
    self_sums: torch.Tensor | None = None  # (images, N, N), see compute_attention_maps
    self_counts: torch.Tensor | None = None  # (images,)
    self_resolution: int | None = None

    def self_attention(self) -> torch.Tensor:
        """The mean self-attention matrix of each image, (images, N, N): row i is query
        position i's attention over the key positions (rows sum to 1), averaged over heads,
        the layers of ``self_resolution`` and the noise levels captured."""
        if self.self_sums is None:
            raise ValueError("no self-attention was captured; use compute_attention_maps(..., "
                             "self_attention_resolution=R)")
        if (self.self_counts <= 0).any():
            raise ValueError("an image has no captured self-attention matrix")
        return self.self_sums / self.self_counts[:, None, None]

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


# --------------------------------------------------------------------------- self-attention refinement
SELF_ATTENTION_MAX_AUTO = 32
"""The automatic self-attention resolution is at most this (32: SD's 32x32 layers, N = 1024
positions, an 8 MB float64 sum per image; never SD's 64x64 layers)."""

SELF_ATTENTION_COURSE_K = 1
"""The k of the course's comparison row when the parameter ``self_attention_k`` is 0."""

SELF_ATTENTION_SUBDIR = "attention_self_attn"
"""Where the course's comparison run (step 1 with self-attention refinement, test split)
writes its maps; :func:`fgbg.evaluate.evaluate_steps12` scores them when they are there."""


def self_attention_resolutions(unet, latent: int) -> list[int]:
    """The latent-grid rows of the UNet's self-attention layers, largest first."""
    return sorted(set(_layer_resolutions(unet, latent, "attn1").values()), reverse=True)


def choose_self_attention_resolution(unet, latent: int, requested: int | None = None,
                                     unet_batch: int = 40) -> int:
    """The self-attention resolution to capture: ``requested`` when the UNet has
    self-attention layers there (else ValueError), or automatically the largest one below
    the latent grid's own and at most :data:`SELF_ATTENTION_MAX_AUTO` (SD v1 at 512 px:
    32 of 64; the teaching model: 8 of 16, whose 16x16 self-attention is nearly uniform, see
    docs/method_notes.md); the largest at most that when none is below the latent grid.
    A requested resolution above the cap warns with its memory: N = r^2 positions cost
    N^2 x 8 B (float64) per image for the running sum (128 MB at SD's 64x64) and
    unet_batch x heads x N^2 x 4 B per UNet pass for the probabilities."""
    have = self_attention_resolutions(unet, latent)
    if not have:
        raise ValueError("the UNet has no self-attention layers")
    if requested is None:
        ok = [r for r in have if r <= SELF_ATTENTION_MAX_AUTO]
        ok = [r for r in ok if r < latent] or ok
        if not ok:
            raise ValueError(f"every self-attention resolution of the UNet ({have}) is above "
                             f"{SELF_ATTENTION_MAX_AUTO}; set self_attention_resolution explicitly")
        return ok[0]
    if requested not in have:
        raise ValueError(f"parameter `self_attention_resolution`: the UNet has self-attention at {have} "
                         f"(latent rows), not at {requested}")
    if requested > SELF_ATTENTION_MAX_AUTO:
        import warnings
        n = requested * requested
        heads = max((m.heads for k, m in unet.named_modules() if k.endswith("attn1")), default=1)
        per_pass = unet_batch * heads * n * n * 4 / 2 ** 30
        warnings.warn(f"self-attention at {requested}x{requested}: N = {n} positions, a running sum of "
                      f"{n * n * 8 / 2 ** 20:.0f} MB per image and about {per_pass:.1f} GB of probabilities per "
                      f"UNet pass of {unet_batch} samples; lower unet_batch if it does not fit", stacklevel=2)
    return requested


def propagate(affinity: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """``A^k x`` for a row-stochastic affinity A (N, N) and vectors x (..., N):
    ``(A x)[i] = sum_j A[i, j] x[j]``, each position i takes the mean of x over the
    positions it attends to (A[i, j]: query i's attention to key j). k = 0 returns x."""
    if k < 0:
        raise ValueError(f"self_attention_k must be >= 0, got {k}")
    a = affinity.to(torch.float64)
    y = x.to(torch.float64)
    for _ in range(k):
        y = y @ a.T  # y[..., i] = sum_j a[i, j] y[..., j]
    return y.to(x.dtype)


def refine_with_self_attention(amap: torch.Tensor, affinity: torch.Tensor, k: int,
                               match_range: bool = True) -> torch.Tensor:
    """Self-attention refinement of a map on the latent grid (DiffSegmenter, iSeg):
    ``A_self^k`` applied to the map at the self-attention's resolution.

    ``amap``: (..., h, w) on the latent grid; ``affinity``: (N, N), row-stochastic, over the
    r x c positions of the self-attention layers (h/r = w/c = f). The map is area-averaged
    to r x c (exact means over f x f blocks), propagated by :func:`propagate`, and brought back
    by block repetition (nearest), as the cross-attention layers are. That is exactly
    ``A_hi^k`` applied at the latent grid, where A_hi gives every latent position its
    cell's attention, shared equally among the f x f positions of each key cell.

    k = 0 returns ``amap`` unchanged. A row-stochastic A averages: ``A^k x`` tends to a
    constant as k grows (its contrast shrinks about like the second eigenvalue of A to the
    k-th power). ``match_range`` (default) therefore maps each result by an increasing affine
    function onto its input map's min and max (in float64), so that step 2's GMM, whose
    variance floor (sklearn's reg_covar = 1e-6) is not scale-free, sees values on the scale
    of a raw map; the order of the values, hence AUC, is that of ``A^k x``. A constant
    result stays constant.
    """
    r, c = amap.shape[-2:]
    n = affinity.shape[-1]
    f = int(round((r * c / n) ** 0.5))
    if f < 1 or r % f or c % f or (r // f) * (c // f) != n:
        raise ValueError(f"a {n}x{n} self-attention matrix does not tile the {r}x{c} map")
    if k == 0:
        return amap  # off: the map itself, not even resampled
    lead = amap.shape[:-2]
    x = amap.to(torch.float64)
    low = x.reshape(*lead, r // f, f, c // f, f).mean(dim=(-3, -1))
    out = propagate(affinity, low.reshape(*lead, n), k).reshape(*lead, r // f, c // f)
    out = out.repeat_interleave(f, -2).repeat_interleave(f, -1)
    if match_range and k > 0:
        lo_in, hi_in = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
        lo, hi = out.amin(dim=(-2, -1), keepdim=True), out.amax(dim=(-2, -1), keepdim=True)
        span = hi - lo
        scaled = lo_in + (out - lo) * (hi_in - lo_in) / torch.where(span > 0, span, torch.ones_like(span))
        out = torch.where(span > 0, scaled, out)
    return out.to(amap.dtype)


def refine_maps(maps: "AttentionMaps", m: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`refine_with_self_attention` of each image's map (images, ..., h, w) with that
    image's own mean self-attention (:meth:`AttentionMaps.self_attention`)."""
    if k == 0:
        return m
    a = maps.self_attention()
    return torch.stack([refine_with_self_attention(m[i], a[i], k) for i in range(len(m))])


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
                           generator: torch.Generator | None = None, self_attention_resolution: int | None = None,
                           self_attention_levels: int | None = None) -> AttentionMaps:
    """Step 1 for a batch of placed images (B, 3, S, S) in [-1, 1].

    Every (image, level, repeat) sample is independent: they are flattened and sent
    through the UNet ``unet_batch`` at a time. Returns running sums, see AttentionMaps.

    ``self_attention_resolution`` (latent rows, e.g. 16 or 32; None: none): also capture,
    in the same UNet passes, the self-attention probabilities of the ``attn1`` layers at
    that resolution, as one running sum per image over heads (then averaged), layers and
    levels: N^2 float64 per image for N positions (16x16: 512 KB; 32x32: 8 MB; SD's 64x64:
    128 MB, and its per-pass probabilities are many GB: see
    :func:`choose_self_attention_resolution`). ``self_attention_levels``: only the last
    that many levels are summed (None: all), to match an extractor's ``steps``.
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
    store = AttentionStore(B, L if by_level else 1, resolutions, n_tok, (h, w), dev,
                           self_resolution=self_attention_resolution)
    # flattened samples: image-major, then level, then repeat (the order noise is drawn in)
    img_idx = torch.arange(B).repeat_interleave(L * N)
    lvl_idx = torch.arange(L).repeat_interleave(N).repeat(B)
    grp_idx = lvl_idx if by_level else torch.zeros_like(lvl_idx)
    n_self = L if self_attention_levels is None else min(max(int(self_attention_levels), 1), L)
    self_rows = lvl_idx >= L - n_self
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
            store.route(img_idx[sl], grp_idx[sl], self_rows[sl])
            unet(zt, t, encoder_hidden_states=cond.expand(len(zt), -1, -1)).sample
    return AttentionMaps(store.sums.cpu(), store.counts.cpu(), ts, resolutions, prompt_tokens(pipe.tokenizer, prompt),
                         by_level, None if store.self_sums is None else store.self_sums.cpu(),
                         None if store.self_counts is None else store.self_counts.cpu(), self_attention_resolution)


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
                        overwrite: bool = False, progress: bool = True, self_attention_k: int = 0,
                        self_attention_resolution: int | None = None):
    """Step 1 over a dataset: one ``<out_dir>/<subdir>/<key>.npz`` per image holding the
    extracted map of ``object_word`` on the latent grid (``map``), the maps of
    ``extra_words`` (``map_<word>``, controls such as the non-object token "photo") and the
    image's placement. Resumable; bad images are skipped and reported (StepReport).

    ``self_attention_k`` > 0 (default 0: off, the reference): every map is refined by the
    image's own mean self-attention, ``A_self^k`` (:func:`refine_with_self_attention`),
    captured in the same UNet passes at ``self_attention_resolution`` (None: automatic, see
    :func:`choose_self_attention_resolution`) over the same levels as the extractor. Then
    ``map`` and ``map_<word>`` are the refined maps, ``map_raw`` and ``map_<word>_raw`` the
    raw ones (``load_attention(..., word="raw")``), and ``self_attention_k`` /
    ``self_attention_resolution`` are stored too; both are in the run config."""
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
    if isinstance(self_attention_k, bool) or not isinstance(self_attention_k, int) or self_attention_k < 0:
        raise ValueError(f"parameter `self_attention_k` must be an integer >= 0, got {self_attention_k!r}")
    sa_res = None
    if self_attention_k > 0:  # recorded only when on: runs with it off keep the reference's config
        sa_res = choose_self_attention_resolution(pipe.unet, canvas // pipe.vae_scale_factor,
                                                  self_attention_resolution, unet_batch)
        config.update(self_attention_k=self_attention_k, self_attention_resolution=sa_res)

    def work(item):
        x, pl, _ = load_item(item, canvas=canvas, mode=resize_mode)
        g = torch.Generator().manual_seed(seed_for(seed, item.key))
        maps = compute_attention_maps(pipe, x[None].to(dtype), prompt, rev_diff_steps, num_inference_steps,
                                      num_repeat_each_diffusion_step, by_level=steps is not None,
                                      unet_batch=unet_batch, generator=g, self_attention_resolution=sa_res,
                                      self_attention_levels=steps)
        raw = {"map": extract(maps, extractor, tok, steps)}
        for w, idx in extra.items():
            raw[f"map_{w}"] = extract(maps, "relevant_token_step_mean", idx, steps)
        arrays = {k: v[0].numpy() for k, v in raw.items()}
        if self_attention_k > 0:
            for k, v in raw.items():
                arrays[k] = refine_maps(maps, v, self_attention_k)[0].numpy()
                arrays[f"{k}_raw"] = v[0].numpy()
            arrays.update(self_attention_k=np.array(self_attention_k), self_attention_resolution=np.array(sa_res))
        buf = _io.BytesIO()
        np.savez(buf, **arrays, placement=np.array([pl.canvas, pl.height, pl.width, pl.placed_h, pl.placed_w]),
                 scale=np.array(pl.scale), mode=np.array(pl.mode), timesteps=np.array(maps.timesteps))
        atomic_write_bytes(attention_path(out_dir, item, subdir), buf.getvalue())

    with step_outputs(Path(out_dir) / subdir, config, overwrite=overwrite, out_dir=out_dir):
        return for_each_item(f"step 1 ({subdir})", dataset, lambda it: [attention_path(out_dir, it, subdir)],
                             work, out_dir=out_dir, progress=progress)


def load_attention(out_dir, item, subdir: str = "attention", word: str | None = None):
    """(map on the latent grid, Placement) saved by :func:`save_attention_maps`; ``word``:
    the map ``map_<word>`` instead (e.g. "photo"; "raw": the unrefined map of a run with
    self-attention refinement)."""
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


def self_attention_panels(out_dir, item, subdir: str = SELF_ATTENTION_SUBDIR, seed: int = 0,
                          **rules) -> list[tuple[str, np.ndarray]]:
    """Figure panels of one image from a step-1 run with self-attention refinement
    (``<out_dir>/<subdir>``): the image, the raw map and its M_pre, the refined map and its
    M_pre (step 2 with ``rules``, :func:`fgbg.masks.prelim_mask_of`), the ground truth;
    maps mapped back bilinearly to the original pixels."""
    from .data import map_back, read_image
    from .masks import prelim_mask_of
    from .viz import truth_panel
    raw, pl = load_attention(out_dir, item, subdir, word="raw")
    ref = load_attention(out_dir, item, subdir)[0]
    with np.load(attention_path(out_dir, item, subdir)) as z:
        k = int(z["self_attention_k"])
    img = read_image(item.image_path)
    return [("image", img), ("attention", map_back(raw, pl, "bilinear")),
            ("M_pre", prelim_mask_of(raw, pl, seed, **rules)),
            (f"+ self-attn (k={k})", map_back(ref, pl, "bilinear")),
            (f"M_pre, k={k}", prelim_mask_of(ref, pl, seed, **rules)), truth_panel(item, img.shape)]
