"""The course's parameters: one schema for every notebook, checked before anything runs.

The notebooks' ``parameters`` cells hold the offline mini-world defaults; papermill
overrides them from ``params/*.yaml`` or ``-p name value``. Names follow the reference
code where it has one (base_dir, out_dir, rev_diff_steps,
num_repeat_each_diffusion_step, foreground_prompt, background_prompt).

An unknown name (a typo) or a value of the wrong type is an error that names the
parameter and the file: a misspelt ``rev_diff_step`` must not silently run the default.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

# name: (type or tuple of types, default, help). None in the types: may be null.
SCHEMA: dict[str, tuple[tuple, Any, str]] = {
    "model": ((str,), "teaching", "'teaching' (built in), a local diffusers folder, or a hub id"),
    "base_dir": ((str,), "data/miniworld", "dataset folder (reference or CUB_200_2011 layout)"),
    "make_mini_world": ((bool,), True, "write the mini-world dataset to base_dir if it is missing "
                        "(or older than miniworld.json)"),
    "out_dir": ((str,), "runs/demo", "where per-image outputs and metrics.json go"),
    "foreground_prompt": ((str,), "a photo of a bird", "prompt of step 1 (and the object prompt of step 3)"),
    "object_word": ((str,), "bird", "the word of the prompt whose attention is the object"),
    "background_prompt": ((str,), "a photo of a background", "prompt of the background concept (steps 3-4)"),
    "extractor": ((str,), "relevant_token_step_mean", "how step 1 aggregates maps (see fgbg.attention)"),
    "steps": ((int, type(None)), None, "mean over the last `steps` noise levels only (None: all)"),
    "rev_diff_steps": ((int,), 40, "T0: how many of the lowest DDIM levels step 1 uses"),
    "num_inference_steps": ((int,), 50, "T: the DDIM grid the levels come from"),
    "num_repeat_each_diffusion_step": ((int,), 1, "N: noise draws per level"),
    "splits": ((list,), ["train", "test"], "which splits steps 1-2 run on (the method needs train and test)"),
    "limit": ((int, type(None)), None, "at most this many images per split (None: all)"),
    "resize_mode": ((str,), "pad", "'pad' (reference: top-left on a -1 canvas) or 'resize'"),
    "controls": ((bool,), True, "also run the untrained-network control of step 1"),
    "unet_batch": ((int,), 40, "UNet samples per forward pass in step 1"),
    # step 3: fine-tuning (concept distillation)
    "finetune_steps": ((int,), 300, "UNet fine-tuning steps (the reference: about a day on 2 A6000)"),
    "finetune_batch_size": ((int,), 8, "fine-tuning batch size (reference 8)"),
    "finetune_lr": ((float, int), 1e-4, "AdamW learning rate, constant (reference 1e-4)"),
    # step 4: inpainting and refined masks
    "inpaint_batch_size": ((int,), 16, "images per batch of the inpainting sampler"),
    "m_pre_upsampling": ((str,), "bilinear", "M_pre to pixels for M: 'bilinear' (reference, dilates by up to "
                         "half a latent cell) or 'nearest' (exact blocks)"),
    "close_and_fill": ((bool,), False, "optional clean-up of M: 3x3 closing, then hole filling"),
    "fg_bg_guidance": ((float, int), 3.0, "scale s of foreground-vs-background guidance for samples"),
    # step 5: segmentation network
    "seg_size": ((int,), 64, "U-Net input size (the paper: 128)"),
    "seg_width": ((int,), 8, "U-Net channels of the first level, doubled per level (4 levels)"),
    "seg_iterations": ((int,), 600, "U-Net training iterations (the paper: about 12k)"),
    "seg_batch_size": ((int,), 16, "U-Net batch size (the paper: 32)"),
    "seg_lr": ((float, int), 2e-3, "Adam learning rate of the U-Net (the paper: 2e-3)"),
    "seed": ((int,), 0, "seed of every random draw"),
    "device": ((str,), "auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'"),
    "dtype": ((str,), "auto", "'auto' (bf16/fp16 on GPU, fp32 on CPU), 'fp32', 'fp16', 'bf16'"),
}
SPLIT_NAMES = ("train", "val", "test")
RESIZE_MODES = ("pad", "resize")


class ParameterError(ValueError):
    pass


def defaults() -> dict:
    return {k: v[1] for k, v in SCHEMA.items()}


def check(params: dict, source: str = "parameters", given_only: bool = False) -> dict:
    """Validate names and types; returns the full parameter dict (defaults filled in).

    ``given_only``: rules that relate two parameters apply only when both are in
    ``params`` (a notebook declares only the parameters of its own steps: notebook 04's
    ``num_inference_steps`` of the inpainting sampler is not checked against the default
    ``rev_diff_steps`` of step 1, which it does not use).
    """
    from .attention import EXTRACTORS
    from .inpaint import UPSAMPLINGS
    out = defaults()
    for name, value in params.items():
        if name not in SCHEMA:
            close = difflib.get_close_matches(name, SCHEMA, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParameterError(f"{source}: unknown parameter {name!r}{hint}; known: {', '.join(SCHEMA)}")
        types = SCHEMA[name][0]
        if isinstance(value, bool) and bool not in types:  # True is an int in Python; not here
            raise ParameterError(f"{source}: parameter {name!r} must be {_names(types)}, got {value!r}")
        if not isinstance(value, types):
            raise ParameterError(f"{source}: parameter {name!r} must be {_names(types)}, "
                                 f"got {type(value).__name__} {value!r}")
        out[name] = value
    for name in ("rev_diff_steps", "num_inference_steps", "num_repeat_each_diffusion_step", "unet_batch",
                 "finetune_batch_size", "inpaint_batch_size", "seg_size", "seg_batch_size", "seg_width"):
        if out[name] < 1:
            raise ParameterError(f"{source}: parameter {name!r} must be >= 1, got {out[name]}")
    both = not given_only or {"rev_diff_steps", "num_inference_steps"} <= set(params)
    if both and out["rev_diff_steps"] > out["num_inference_steps"]:
        raise ParameterError(f"{source}: rev_diff_steps ({out['rev_diff_steps']}) must not exceed "
                             f"num_inference_steps ({out['num_inference_steps']})")
    if out["extractor"] not in EXTRACTORS:
        raise ParameterError(f"{source}: parameter 'extractor' must be one of {', '.join(EXTRACTORS)}, "
                             f"got {out['extractor']!r}")
    if out["resize_mode"] not in RESIZE_MODES:
        raise ParameterError(f"{source}: parameter 'resize_mode' must be one of {RESIZE_MODES}")
    if out["m_pre_upsampling"] not in UPSAMPLINGS:
        raise ParameterError(f"{source}: parameter 'm_pre_upsampling' must be one of {UPSAMPLINGS}, "
                             f"got {out['m_pre_upsampling']!r}")
    bad = [s for s in out["splits"] if s not in SPLIT_NAMES]
    if bad or not out["splits"]:
        raise ParameterError(f"{source}: parameter 'splits' must be a non-empty list of {SPLIT_NAMES}, "
                             f"got {out['splits']!r}")
    both = not given_only or {"object_word", "foreground_prompt"} <= set(params)
    if both and out["object_word"] not in out["foreground_prompt"]:
        raise ParameterError(f"{source}: object_word {out['object_word']!r} is not in foreground_prompt "
                             f"{out['foreground_prompt']!r}")
    return out


def _names(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def load_yaml(path: str | Path) -> dict:
    """Read and check a params file; errors name the file (and line, for YAML syntax)."""
    import yaml
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParameterError(f"params file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ParameterError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping of parameter: value, got {type(data).__name__}")
    check(data, source=str(path))
    return data


def from_namespace(ns: dict) -> dict:
    """The checked parameters from a notebook's globals (after papermill's injection)."""
    return check({k: ns[k] for k in SCHEMA if k in ns}, source="notebook parameters", given_only=True)
