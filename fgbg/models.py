"""Loading the generator: SD v1.x by hub id or local folder, or the built-in teaching model.

One call, :func:`load_pipeline`, takes

* ``"teaching"``: the small SD-architecture model shipped with fgbg (trained on the mini
  world by ``python -m fgbg.teaching_model train``);
* a local diffusers folder (``save_pretrained`` layout), e.g. a downloaded SD v1.4;
* a hub id such as ``"CompVis/stable-diffusion-v1-4"`` (needs internet once).

and picks the device (CUDA, then Apple MPS, then CPU) and dtype (bf16 on GPUs that
support it, else fp16; fp32 on CPU).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# the parts it shares with fgbg.teaching_model (which it never imports): see fgbg.sd_parts
from .sd_parts import (ASSET_DIR, CLIP_TOKENIZER_DIR, SCALED_LINEAR, TeachingConfig,  # noqa: F401
                       build_text_encoder, build_unet, build_vae, dtype_kwarg, library_progress_bars_off,
                       load_tokenizer, pick_device)

TEACHING = ("teaching", "builtin", "teaching-model")


class ModelLoadError(RuntimeError):
    pass


def _first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message, first line only, at most ``limit`` characters."""
    lines = str(e).strip().splitlines()
    line = lines[0].strip() if lines else type(e).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _only_pickles(folder: Path) -> bool:
    """Whether a component folder has pickled weights (.bin, .pt, .ckpt, .pth) and no safetensors."""
    files = [f.name for f in folder.iterdir()] if folder.is_dir() else []
    return (not any(f.endswith(".safetensors") for f in files)
            and any(f.endswith((".bin", ".pt", ".ckpt", ".pth")) for f in files))


def native_half_dtype(device: torch.device | str) -> torch.dtype:
    """The reduced precision ``device`` computes natively: the one rule behind ``dtype:
    auto`` (:func:`pick_dtype`, inference) and ``mixed_precision: auto`` (fine-tuning).

    * CUDA, compute capability >= 8.0 (A100, A10, RTX 30xx/40xx, H100): bf16;
    * CUDA, older (T4 = 7.5, V100 = 7.0): fp16. ``torch.cuda.is_bf16_supported()`` says
      True there too, because it counts emulation, but emulated bf16 is many times slower
      than fp16 (fine-tuning in fp16 uses loss scaling, see ``fgbg.finetune``);
    * Apple MPS: fp16;
    * CPU: fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, _minor = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def describe_device(device: str | None = None) -> str:
    """One line on the device the course will use and the precision ``dtype: auto`` gives it,
    e.g. "GPU: Tesla T4 (compute capability 7.5, 14.7 GiB): the pipeline runs in float16"."""
    dev = pick_device(device)
    dt = str(pick_dtype(dev)).removeprefix("torch.")
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return (f"GPU: {p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB): "
                f"the pipeline runs in {dt}")
    if dev.type == "mps":
        return f"Apple GPU (MPS): the pipeline runs in {dt}"
    return f"no GPU: the course runs on the CPU in {dt} (on Colab: Runtime > Change runtime type > T4 GPU)"


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``dtype`` when given (a torch dtype or fp32 / fp16 / bf16), else, for None or
    "auto", :func:`native_half_dtype` of ``device``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        try:
            return {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                    "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]
        except KeyError:
            raise ValueError(f"parameter `dtype`: unknown {dtype!r}; use auto, fp32, fp16 or bf16") from None
    return native_half_dtype(device)


def load_pipeline(model: str = "teaching", device: str | None = None, dtype: str | torch.dtype | None = None,
                  allow_pickle: bool = False):
    """A StableDiffusionPipeline on the chosen device, in eval mode, without safety checker.

    Weights are read from safetensors only: a pickled ``.bin`` can run code when it is
    loaded, so a folder or hub repository with only pickles is refused with a
    :class:`ModelLoadError` saying how to convert it, unless ``allow_pickle=True`` (for
    files you trust). Every ModelLoadError is one line.
    """
    from diffusers import StableDiffusionPipeline
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if model in TEACHING:
        path = ASSET_DIR
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"the built-in teaching model is missing at {path}; "
                                 "train it with `python -m fgbg.teaching_model train`")
        source = str(path)
    elif Path(model).expanduser().exists():
        path = Path(model).expanduser()
        missing = [p for p in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer")
                   if not (path / p).exists()]
        if missing:
            raise ModelLoadError(f"{path} is not a complete diffusers pipeline folder: missing {', '.join(missing)}")
        pickled = [p for p in ("unet", "vae", "text_encoder") if _only_pickles(path / p)]
        if pickled and not allow_pickle:
            raise ModelLoadError(
                f"{path}: the weights of {', '.join(pickled)} are pickles (.bin), which can run code when loaded; "
                f"convert the folder to safetensors once: python -c \"from diffusers import StableDiffusionPipeline "
                f"as P; P.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-safetensors')\" "
                f"and use {str(path) + '-safetensors'!r}, or, if you trust the files, "
                f"load_pipeline(..., allow_pickle=True)")
        source = str(path)
    else:
        source = model
    kw = dict(**dtype_kwarg(dt), safety_checker=None, requires_safety_checker=False,
              use_safetensors=None if allow_pickle else True)
    from .runs import PROGRESS_ENV
    # A batch run, where no bar would ever be watched: fgbg's switch, or tqdm's own TQDM_DISABLE.
    # tqdm honours TQDM_DISABLE in a terminal but not in a Jupyter kernel: tqdm.notebook passes
    # disable=False explicitly (tqdm 4.70), and the libraries' "Loading pipeline components..."
    # would stay in the executed notebook as widgets stuck at 0%. So fgbg applies it for them.
    if (os.environ.get(PROGRESS_ENV) == "0"
            or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")):
        library_progress_bars_off()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, **kw)
    except (OSError, ValueError, ConnectionError) as e:
        why = f"{type(e).__name__}: {_first_line(e)}"
        if source == model and "/" in model and not Path(model).exists():
            name = model.rstrip("/").split("/")[-1]
            if "safetensors" in str(e) and not allow_pickle:
                raise ModelLoadError(
                    f"could not load {model!r} from the Hugging Face hub ({why}): it seems to have no safetensors "
                    f"weights; if you trust its pickles, load_pipeline({model!r}, allow_pickle=True)") from e
            raise ModelLoadError(
                f"could not load {model!r} from the Hugging Face hub ({why}). Offline? Use the built-in model with "
                f"model='teaching', or download the pipeline where you have internet (`hf download {model} "
                f"--local-dir {name}`) and pass the local folder: model='{name}'") from e
        raise ModelLoadError(f"could not load the pipeline from {source} ({why})") from e
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


def clip_tokenizer():
    """The real CLIP tokenizer (OpenAI's BPE vocabulary), shipped with fgbg."""
    return load_tokenizer(CLIP_TOKENIZER_DIR)


def random_pipeline(kind: str = "tiny", seed: int = 0, device: str | None = "cpu"):
    """An SD-architecture pipeline with random weights, built locally (tests, benchmarks).

    ``tiny``: the teaching model's architecture, smaller still. ``sd14``: the shapes of
    SD v1.4 (UNet 320/640/1280/1280, 16 cross-attention layers, 768-d text, VAE f=8) at
    512x512, about 1 B parameters.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    if kind == "tiny":
        cfg = TeachingConfig(text_hidden=32, unet_channels=(32, 32, 64), vae_channels=(16, 16, 32),
                             attention_heads=(2, 2, 4))
        unet, vae, te = build_unet(cfg), build_vae(cfg), build_text_encoder(cfg)
        sched = DDIMScheduler(**SCALED_LINEAR)
    elif kind == "sd14":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512, scaling_factor=0.18215)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                          hidden_act="quick_gelu", projection_dim=768))
        sched = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    else:
        raise ValueError(f"kind must be 'tiny' or 'sd14', got {kind!r}")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(pick_device(device))
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


def canvas_size(pipe) -> int:
    """The image size the pipeline's UNet was trained at (512 for SD v1.x, 64 for the teaching model)."""
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


@torch.no_grad()
def model_fingerprint(pipe) -> str:
    """A short hash of the weights that shape the attention maps (UNet, text encoder, VAE)
    and their dtype: two pipelines with equal fingerprints give the same maps.
    Used to refuse reusing step-1 outputs that another model wrote."""
    import hashlib
    h = hashlib.sha1()
    for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae)):
        for pname, prm in module.named_parameters():
            x = prm.detach().double()
            h.update(f"{name}.{pname}:{tuple(x.shape)}:{prm.dtype}:{x.sum().item():.10e}:"
                     f"{x.square().sum().item():.10e}".encode())
    return h.hexdigest()[:16]
