"""The course's parameters: one schema for every notebook, checked before anything runs.

The notebooks' ``parameters`` cells hold the offline mini-world defaults; papermill
overrides them from ``params/*.yaml`` or ``-p name value``. Names follow the reference
code where it has one (base_dir, out_dir, rev_diff_steps,
num_repeat_each_diffusion_step, foreground_prompt, background_prompt).

An unknown name (a typo), a value of the wrong type or a value outside the parameter's
allowed range or set (``SCHEMA``'s last field: ``seg_iterations`` >= 1, ``dtype`` one of
auto/fp32/fp16/bf16, ...) is an error that names the parameter and where it came from
(the file, or the command line's ``-p``): a misspelt ``rev_diff_step`` must not silently
run the default, and ``seg_iterations: -1`` must not silently train nothing.
"""
from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

SPLIT_NAMES = ("train", "val", "test")
RESIZE_MODES = ("pad", "resize")
DTYPES = ("auto", "fp32", "fp16", "bf16")


class Allowed:
    """The values a parameter may take beyond its type: ``text`` says which (it ends the
    error message "parameter 'x' must be <text>"), ``test(value)`` says whether ``value``
    is one. ``text`` may be a function, for sets known only after a lazy import."""

    def __init__(self, text: str | Callable[[], str], test: Callable[[Any], bool]):
        self._text, self.test = text, test

    @property
    def text(self) -> str:
        return self._text() if callable(self._text) else self._text

    def __repr__(self) -> str:
        return f"Allowed({self.text!r})"


def at_least(n: int) -> Allowed:
    return Allowed(f">= {n}", lambda v: v >= n)


def positive() -> Allowed:
    return Allowed("a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def one_of(values: tuple | Callable[[], tuple]) -> Allowed:
    get = values if callable(values) else (lambda: values)
    return Allowed(lambda: "one of " + ", ".join(map(str, get())), lambda v: v in get())


def _extractors() -> tuple:
    from .attention import EXTRACTORS  # lazy: torch
    return tuple(EXTRACTORS)


def _upsamplings() -> tuple:
    from .inpaint import UPSAMPLINGS  # lazy: torch
    return tuple(UPSAMPLINGS)


def _step2_rules() -> tuple:
    from .masks import STEP2_RULES  # lazy, like the others
    return tuple(STEP2_RULES)


NON_EMPTY = Allowed("a non-empty string", lambda v: bool(v.strip()))
DEVICE = Allowed("'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps'",
                 lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None)
SPLITS = Allowed(f"a non-empty list of {SPLIT_NAMES}, each at most once",
                 lambda v: bool(v) and all(isinstance(s, str) and s in SPLIT_NAMES for s in v)
                 and len(set(v)) == len(v))
SEED = Allowed("an integer in 0 .. 2**32 - 1", lambda v: 0 <= v < 2 ** 32)  # numpy's seed range
SEG_SIZE = Allowed("a positive multiple of 8 (the U-Net halves it 3 times)", lambda v: v >= 8 and v % 8 == 0)


class Param(NamedTuple):
    """One parameter: its types (None in them: may be null), default, help, and the values
    it may take (checked for every value but null)."""
    types: tuple
    default: Any
    help: str
    allowed: Allowed | None = None


_p = Param
NULL = type(None)
SCHEMA: dict[str, Param] = {
    "model": _p((str,), "teaching", "'teaching' (built in), a local diffusers folder, or a hub id", NON_EMPTY),
    "base_dir": _p((str,), "data/miniworld", "dataset folder (reference or CUB_200_2011 layout)", NON_EMPTY),
    "make_mini_world": _p((bool,), True, "write the mini-world dataset to base_dir if it is missing "
                         "(or older than miniworld.json)"),
    "out_dir": _p((str,), "runs/demo", "where per-image outputs and metrics.json go", NON_EMPTY),
    "overwrite": _p((bool,), False, "recompute every step's outputs instead of refusing outputs of other settings"),
    "foreground_prompt": _p((str,), "a photo of a bird", "prompt of step 1 (and the object prompt of step 3)",
                           NON_EMPTY),
    "object_word": _p((str,), "bird", "the word of the prompt whose attention is the object", NON_EMPTY),
    "background_prompt": _p((str,), "a photo of a background", "prompt of the background concept (steps 3-4)",
                           NON_EMPTY),
    "extractor": _p((str,), "relevant_token_step_mean", "how step 1 aggregates maps (see fgbg.attention)",
                   one_of(_extractors)),
    "steps": _p((int, NULL), None, "mean over the last `steps` noise levels only (None: all)", at_least(1)),
    "rev_diff_steps": _p((int,), 40, "T0: how many of the lowest DDIM levels step 1 uses", at_least(1)),
    "num_inference_steps": _p((int,), 50, "T: the DDIM grid the levels come from", at_least(1)),
    "num_repeat_each_diffusion_step": _p((int,), 1, "N: noise draws per level", at_least(1)),
    "splits": _p((list,), ["train", "test"], "which splits steps 1-2 run on (the method needs train and test)",
                SPLITS),
    "limit": _p((int, NULL), None, "at most this many images per split (None: all)", at_least(1)),
    "resize_mode": _p((str,), "pad", "'pad' (reference: top-left on a -1 canvas) or 'resize'", one_of(RESIZE_MODES)),
    "controls": _p((bool,), True, "also run the untrained-network control of step 1 and its self-attention "
                  "comparison (test split)"),
    "unet_batch": _p((int,), 40, "UNet samples per forward pass in step 1", at_least(1)),
    "self_attention_k": _p((int,), 0, "refine step 1's maps with the UNet's own self-attention, A_self^k "
                          "(0: off, the reference; see fgbg.attention.refine_with_self_attention)", at_least(0)),
    "self_attention_resolution": _p((int, NULL), None, "latent rows of the self-attention layers used when "
                                   "self_attention_k > 0 (None: the largest below the latent grid, at most 32: "
                                   "SD 32, the teaching model 8)", at_least(1)),
    # step 2: preliminary masks
    "step2_rules": _p((str,), "reference", "step 2's rules: 'reference' (GMM on every cell of the latent map, "
                     "canvas padding included; the 3x3 majority leaves the grid's border cells as thresholded) "
                     "or 'fgbg' (GMM on the image's cells only; padding and outside the grid count as "
                     "background); see fgbg.masks.STEP2_RULES", one_of(_step2_rules)),
    "processes": _p((int,), 1, "processes for steps 1, 3, 4 and D' (one per GPU): more than 1 hands the step from "
                    "the notebook to `accelerate launch --multi_gpu --num_processes N -m fgbg.batch STEP` "
                    "(fgbg.batch.launch); on a machine without CUDA, N CPU processes", at_least(1)),
    # step 3: fine-tuning (concept distillation)
    "finetune_steps": _p((int,), 300, "UNet fine-tuning steps (the reference: about a day on 2 A6000)",
                        at_least(1)),
    "finetune_batch_size": _p((int,), 8, "fine-tuning batch size, effective: over all processes and accumulation "
                              "steps (reference 8: 4 on each of 2 GPUs)", at_least(1)),
    "finetune_gradient_accumulation_steps": _p((int,), 1, "micro-batches per optimizer step; each process runs "
                                               "finetune_batch_size / (processes x this) samples at a time",
                                               at_least(1)),
    "finetune_lr": _p((float, int), 1e-4, "AdamW learning rate, constant (reference 1e-4)", positive()),
    # step 3's memory-saving options (fgbg.finetune.FinetuneConfig; docs/memory.md): defaults = the paper's
    "finetune_gradient_checkpointing": _p((bool, NULL), None, "recompute activations in the backward pass "
                                          "(null: on for CUDA, off on the CPU)", one_of((True, False))),
    "finetune_mixed_precision": _p((str,), "auto", "autocast over fp32 master weights: 'auto' (bf16 from compute "
                                   "capability 8.0, fp16 with loss scaling on older GPUs, none on CPU), 'no', "
                                   "'bf16', 'fp16' (CUDA only)", one_of(("auto", "no", "bf16", "fp16"))),
    "finetune_optimizer": _p((str,), "adamw", "'adamw', or 'adamw8bit' (bitsandbytes' 8-bit AdamW, CUDA only: "
                             "pip install bitsandbytes)", one_of(("adamw", "adamw8bit"))),
    "finetune_lora_rank": _p((int,), 0, "0: fine-tune the whole UNet (the paper); r > 0: only a LoRA of rank r on "
                             "the attention projections trains (needs peft), merged into the UNet when saved",
                             at_least(0)),
    "finetune_ema": _p((str,), "gpu", "EMA of the weights: 'gpu' (on the training device), 'cpu' (in CPU "
                       "memory), 'off' (save the raw weights)", one_of(("gpu", "cpu", "off"))),
    "finetune_ema_every": _p((int,), 1, "update the EMA every N steps", at_least(1)),
    # step 4: inpainting and refined masks
    "inpaint_batch_size": _p((int,), 16, "images per batch of the inpainting sampler", at_least(1)),
    "m_pre_upsampling": _p((str,), "bilinear", "M_pre to pixels for M: 'bilinear' (reference, dilates by up to "
                          "half a latent cell) or 'nearest' (exact blocks)", one_of(_upsamplings)),
    "close_and_fill": _p((bool,), False, "optional clean-up of M: 3x3 closing, then hole filling"),
    "fg_bg_guidance": _p((float, int), 3.0, "scale s of foreground-vs-background guidance for samples", positive()),
    # step 5: segmentation network
    "seg_size": _p((int,), 64, "U-Net input size (the paper: 128)", SEG_SIZE),
    "seg_width": _p((int,), 8, "U-Net channels of the first level, doubled per level (4 levels)", at_least(1)),
    "seg_iterations": _p((int,), 600, "U-Net training iterations (the paper: about 12k)", at_least(1)),
    "seg_batch_size": _p((int,), 16, "U-Net batch size (the paper: 32)", at_least(1)),
    "seg_lr": _p((float, int), 2e-3, "Adam learning rate of the U-Net (the paper: 2e-3)", positive()),
    # D': the synthetic set (notebook 06)
    "dprime_size": _p((int,), 32, "images in the synthetic set D' (sampled from the fine-tuned model with "
                      "fg_bg_guidance; 0: no D')", at_least(0)),
    "seed": _p((int,), 0, "seed of every random draw", SEED),
    "device": _p((str,), "auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'", DEVICE),
    "dtype": _p((str,), "auto", "'auto' (bf16/fp16 on GPU, fp32 on CPU), 'fp32', 'fp16', 'bf16'", one_of(DTYPES)),
}
del _p


class ParameterError(ValueError):
    pass


def defaults() -> dict:
    return {k: v.default for k, v in SCHEMA.items()}


def check(params: dict, source: str = "parameters", given_only: bool = False,
          origins: dict[str, str] | None = None) -> dict:
    """Validate names, types and values (``SCHEMA``'s ``allowed``); returns the full
    parameter dict (defaults filled in).

    ``given_only``: rules that relate two parameters apply only when both are in
    ``params`` (a notebook declares only the parameters of its own steps: notebook 04's
    ``num_inference_steps`` of the inpainting sampler is not checked against the default
    ``rev_diff_steps`` of step 1, which it does not use).

    ``origins``: where each given parameter comes from, when not all from ``source``
    (e.g. ``{"limit": "command line (-p limit)"}``); errors name that place.
    """
    origins = origins or {}

    def where(*names: str) -> str:
        return " and ".join(dict.fromkeys(origins.get(n, source) for n in names))

    out = defaults()
    for name, value in params.items():
        if name not in SCHEMA:
            close = difflib.get_close_matches(name, SCHEMA, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParameterError(f"{where(name)}: unknown parameter {name!r}{hint}; known: {', '.join(SCHEMA)}")
        types, allowed = SCHEMA[name].types, SCHEMA[name].allowed
        if isinstance(value, bool) and bool not in types:  # True is an int in Python; not here
            raise ParameterError(f"{where(name)}: parameter {name!r} must be {_names(types)}, got {value!r}")
        if not isinstance(value, types):
            raise ParameterError(f"{where(name)}: parameter {name!r} must be {_names(types)}, "
                                 f"got {type(value).__name__} {value!r}")
        if value is not None and allowed is not None and not allowed.test(value):
            raise ParameterError(f"{where(name)}: parameter {name!r} must be {allowed.text}, got {value!r}")
        out[name] = value
    both = not given_only or {"rev_diff_steps", "num_inference_steps"} <= set(params)
    if both and out["rev_diff_steps"] > out["num_inference_steps"]:
        raise ParameterError(f"{where('rev_diff_steps', 'num_inference_steps')}: rev_diff_steps "
                             f"({out['rev_diff_steps']}) must not exceed num_inference_steps "
                             f"({out['num_inference_steps']})")
    both = not given_only or {"object_word", "foreground_prompt"} <= set(params)
    if both and out["object_word"] not in out["foreground_prompt"]:
        raise ParameterError(f"{where('object_word', 'foreground_prompt')}: object_word {out['object_word']!r} "
                             f"is not in foreground_prompt {out['foreground_prompt']!r}")
    return out


def _names(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def load_yaml(path: str | Path, check_values: bool = True) -> dict:
    """Read (and, with ``check_values``, check) a params file; errors name the file (and
    line, for YAML syntax). Returns the parameters the file gives."""
    import yaml
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParameterError(f"params file {path} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ParameterError(f"{path}: not valid YAML{at}: {what}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping of parameter: value, got {type(data).__name__}")
    if check_values:
        check(data, source=str(path))
    return data


def gather(params_file: str | Path | None, overrides: dict) -> tuple[dict, dict, dict[str, str]]:
    """The parameters of a batch run: a params file, then ``-p NAME VALUE`` overrides.

    Returns ``(given, checked, origins)``: the parameters given (file and overrides), the
    full checked dict (defaults filled in), and where each given one came from, so that a
    bad value names its place: ``"command line (-p seg_iterations): parameter
    'seg_iterations' must be >= 1, got -1"``, not the params file."""
    given = load_yaml(params_file, check_values=False) if params_file else {}
    origins = {k: str(params_file) for k in given}
    for k, v in overrides.items():
        given[k] = v
        origins[k] = f"command line (-p {k})"
    return given, check(given, source=str(params_file or "command line"), origins=origins), origins


def from_namespace(ns: dict) -> dict:
    """The checked parameters from a notebook's globals (after papermill's injection)."""
    return check({k: ns[k] for k in SCHEMA if k in ns}, source="notebook parameters", given_only=True)
