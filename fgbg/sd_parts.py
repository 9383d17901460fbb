"""The building blocks of a Stable-Diffusion-architecture pipeline that both
:mod:`fgbg.models` (loading pipelines) and :mod:`fgbg.teaching_model` (training the small
one) use: the shipped assets, the teaching model's configuration and its UNet, VAE and
text encoder, SD's noise schedule, the CLIP tokenizer, the device rule, and how to call
``from_pretrained`` quietly (the dtype keyword, the libraries' progress bars).

It imports neither of those two modules, so they need not import each other.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).parent / "assets" / "teaching-model"
CLIP_TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip-tokenizer"
SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                     steps_offset=1, prediction_type="epsilon")


@dataclass
class TeachingConfig:
    image_size: int = 64
    text_hidden: int = 128
    latent_channels: int = 4
    vae_channels: tuple = (16, 32, 64)
    unet_channels: tuple = (32, 64, 128)
    layers_per_block: int = 1
    # Heads per block. diffusers' UNet2DConditionModel calls this `attention_head_dim` but
    # uses it as the NUMBER of heads (SD v1's 8); (1, 2, 4) gives heads of 32 channels.
    attention_heads: tuple = (1, 2, 4)
    seed: int = 0


def build_text_encoder(cfg: TeachingConfig):
    from transformers import CLIPTextConfig, CLIPTextModel
    tc = CLIPTextConfig(vocab_size=49408, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                        num_hidden_layers=0, num_attention_heads=max(1, cfg.text_hidden // 64),
                        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                        pad_token_id=49407, projection_dim=cfg.text_hidden)
    return CLIPTextModel(tc)


def build_vae(cfg: TeachingConfig):
    from diffusers import AutoencoderKL
    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_channels,
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=16,
                         sample_size=cfg.image_size, scaling_factor=1.0)


def build_unet(cfg: TeachingConfig):
    from diffusers import UNet2DConditionModel
    f = 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // f, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_heads,
        norm_num_groups=32)


def load_tokenizer(folder: str | Path):
    """CLIPTokenizer from a folder with vocab.json + merges.txt (transformers 4 and 5).

    Never ``CLIPTokenizer(vocab_file=..., merges_file=...)``: transformers 5 ignores the
    files there and returns a tokenizer that maps every word to id 2.
    """
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    ids = tok("a photo of a cat").input_ids
    if ids != [49406, 320, 1125, 539, 320, 2368, 49407]:
        raise RuntimeError(f"tokenizer in {folder} is broken: 'a photo of a cat' -> {ids}")
    return tok


def pick_device(device: str | None = None) -> torch.device:
    """``device`` when given, else CUDA, then Apple MPS, then the CPU."""
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``{"dtype": dtype}`` for diffusers' ``from_pretrained`` where the installed diffusers
    reads ``dtype`` (and warns that ``torch_dtype`` is deprecated), else ``{"torch_dtype":
    dtype}`` (older diffusers, which would pass an unknown ``dtype`` on and ignore it)."""
    return {_dtype_keyword(): dtype}


@functools.cache
def _dtype_keyword() -> str:
    # from_pretrained takes **kwargs, so its signature cannot tell; its source can
    import inspect

    from diffusers import DiffusionPipeline
    try:
        source = inspect.getsource(DiffusionPipeline.from_pretrained)
    except (OSError, TypeError):
        source = ""
    return "dtype" if 'kwargs.pop("dtype"' in source else "torch_dtype"


def library_progress_bars_off() -> None:
    """diffusers' and transformers' own progress bars off for the rest of the process:
    "Loading pipeline components...", "Loading weights", "Writing model shards", the
    hub's downloads. For batch runs, where each bar would stay in the executed notebook as
    a widget stuck at 0%. (tqdm's own switch, ``TQDM_DISABLE=1`` in the environment a
    process starts with, turns them off too in a terminal, but not in a Jupyter kernel, where
    tqdm.notebook passes ``disable=False`` itself: :func:`fgbg.models.load_pipeline` calls
    this for either switch.)"""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
