"""The synthetic set D': training images the fine-tuned generator draws itself.

The paper's optional last step (its best row of Table 2, "U-Net trained on M plus D'"):

1. **Sample D'** (:func:`synthesize`): images of "a photo of a bird" from the *fine-tuned*
   model, steered away from the background concept with the foreground-vs-background
   guidance of :func:`fgbg.inpaint.sample_fg_bg`,
   ``eps = eps(bg) + s (eps(fg) - eps(bg))``. They are written as an ordinary dataset in the
   reference layout (``images.txt``, every image in the train split, no ground truth), so
   that nothing below needs to know they are synthetic.
2. **Masks for D'**: steps 1, 2 and 4 run on it exactly as on the photos (the same
   functions, the same settings), into their own folder (:func:`dprime_run_dir`).
3. **Train on M plus D'** (:func:`training_set`): the step-5 U-Net sees the real training
   images with their refined masks M and the synthetic ones with theirs.

What the reference does: ``scripts/sample_background_prelim_masks.py`` in its synthesis mode
("full" caption mask: the whole latent is generated) samples the foreground prompt with
classifier-free guidance against the background prompt (``--caption fg --scale s``); the
README then says to "repeat step 1 and step 2" on the samples. The size of D' and the scale
are not fixed there; fgbg's choices are in ``params/*.yaml`` (``dprime_size``,
``fg_bg_guidance``) and docs/method_notes.md.

Image k of D' (``images/dprime/dprime_<k>.png``) is seeded by ``(seed, its key)``, so D' can
grow, be resumed or be sampled in other batches and every image stays the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .attention import seed_for
from .data import Item, load_dataset
from .io import atomic_write_text, save_png
from .models import model_fingerprint
from .runs import for_each_batch, step_outputs

DPRIME_CLASS = "dprime"


def dprime_data_dir(out_dir) -> Path:
    """``out_dir/dprime/data``: D' as a dataset (reference layout)."""
    return Path(out_dir) / "dprime" / "data"


def dprime_run_dir(out_dir) -> Path:
    """``out_dir/dprime/run``: the out_dir of steps 1, 2 and 4 on D'."""
    return Path(out_dir) / "dprime" / "run"


def _items(base: Path, n: int) -> list[Item]:
    rels = [f"images/{DPRIME_CLASS}/{DPRIME_CLASS}_{k:05d}.png" for k in range(n)]
    return [Item(rel=r, split=1, image_path=base / r, gt_path=None, line=k + 1) for k, r in enumerate(rels)]


def synthesize(pipe, out_dir, n: int, fg_prompt: str = "a photo of a bird",
               bg_prompt: str = "a photo of a background", scale: float = 3.0, num_inference_steps: int = 50,
               seed: int = 0, batch_size: int = 16, overwrite: bool = False, progress: bool = True):
    """Sample the ``n`` images of D' with the fine-tuned ``pipe`` and write them as a dataset
    in :func:`dprime_data_dir`; returns ``(dataset, StepReport)``.

    The folder records the fine-tuned model's fingerprint and the settings (not ``n``: a
    larger D' keeps the images it already has); another model or setting is refused
    (:class:`fgbg.runs.RunConfigError`) unless ``overwrite``. ``images.txt`` lists the
    images that exist, written last.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"synthesize: n must be a positive integer, got {n!r}")
    base = dprime_data_dir(out_dir)
    config = dict(model=model_fingerprint(pipe), fg_prompt=fg_prompt, bg_prompt=bg_prompt, scale=scale,
                  num_inference_steps=num_inference_steps, seed=seed)
    items = _items(base, n)

    def sample(seeds: list[int]) -> list[np.ndarray]:
        from .inpaint import sample_fg_bg
        return list(sample_fg_bg(pipe, fg_prompt, bg_prompt, scale, len(seeds), num_inference_steps,
                                 batch_size=len(seeds), seeds=seeds))

    with step_outputs(base, config, overwrite=overwrite, out_dir=out_dir):
        report = for_each_batch("D' (sampling)", items, lambda it: [it.image_path], lambda it: seed_for(seed, it.key),
                                sample, lambda it, _, img: save_png(it.image_path, img) and None,
                                batch_size=batch_size, out_dir=out_dir, progress=progress)
        done = [it for it in items if it.image_path.is_file()]
        atomic_write_text(base / "images.txt", "".join(f"{it.rel} 1\n" for it in done))
        atomic_write_text(base / "README.txt", "fgbg D': images sampled from the fine-tuned model "
                                               "(fgbg.synthetic.synthesize); no ground truth.\n")
    return load_dataset(base, splits=["train"]), report


def training_set(train_items, dprime_items, out_dir):
    """Step 5's training set "M plus D'": ``(items, mask_fn)`` with the real training images
    and their refined masks M (``out_dir``) followed by the images of D' and theirs
    (:func:`dprime_run_dir`). Keys cannot collide: D' lives in its own dataset folder."""
    from .data import read_image, read_mask
    from .inpaint import refined_mask_path
    run = dprime_run_dir(out_dir)
    dprime_items = list(dprime_items)
    synthetic = {Path(it.image_path).resolve() for it in dprime_items}

    def mask_fn(item):
        src = run if Path(item.image_path).resolve() in synthetic else out_dir
        return read_mask(refined_mask_path(src, item), read_image(item.image_path).shape[:2])
    return list(train_items) + list(dprime_items), mask_fn


def _recorded(folder: Path, what: str) -> dict:
    from .runs import read_run_config
    cfg = read_run_config(folder)
    if cfg is None:
        raise FileNotFoundError(f"{folder}: no {what} run there; D' is made with the settings of the photos' "
                                f"run, so run notebooks 01-04 with this out_dir first")
    return cfg


def _kwargs(fn, config: dict, drop: tuple[str, ...] = ()) -> dict:
    """The recorded settings that are keyword arguments of ``fn`` (a run config's keys are
    the step function's argument names)."""
    import inspect
    names = set(inspect.signature(fn).parameters)
    # what identifies the inputs (the model, the dataset) is passed, not copied
    drop = (*drop, "pipe", "dataset", "items", "out_dir", "model")
    return {k: v for k, v in config.items() if k in names and k not in drop}


def masks_for(base_pipe, tuned_pipe, dprime, out_dir, unet_batch: int = 40, inpaint_batch_size: int = 16,
              overwrite: bool = False, progress: bool = True) -> dict:
    """Steps 1, 2 and 4 on D' with exactly the settings the photos' run recorded in
    ``out_dir`` (``attention/``, ``masks/prelim/``, ``inpaint/`` run configs), written to
    :func:`dprime_run_dir`: ``base_pipe`` must be the model of step 1 and ``tuned_pipe``
    the fine-tuned one of step 4 (their fingerprints are checked). Returns the three
    StepReports by step name."""
    from .attention import save_attention_maps
    from .inpaint import inpaint_and_refine, inpaint_dir
    from .masks import preliminary_masks, prelim_dir
    out_dir = Path(out_dir)
    cfg1 = _recorded(out_dir / "attention", "step-1")
    cfg2 = _recorded(prelim_dir(out_dir), "step-2")
    cfg4 = _recorded(inpaint_dir(out_dir), "step-4")
    for pipe, cfg, step in ((base_pipe, cfg1, "step 1"), (tuned_pipe, cfg4, "step 4")):
        if model_fingerprint(pipe) != cfg["model"]:
            raise ValueError(f"D': the model given for {step} is not the one the photos' {step} used "
                             f"({out_dir}); pass the same model")
    run = dprime_run_dir(out_dir)
    reports = {"step 1": save_attention_maps(base_pipe, dprime, run, unet_batch=unet_batch, overwrite=overwrite,
                                             progress=progress, **_kwargs(save_attention_maps, cfg1))}
    reports["step 2"] = preliminary_masks(dprime, run, overwrite=overwrite, progress=progress,
                                          **_kwargs(preliminary_masks, cfg2))
    reports["step 4"] = inpaint_and_refine(tuned_pipe, dprime, run, batch_size=inpaint_batch_size,
                                           overwrite=overwrite, progress=progress,
                                           **_kwargs(inpaint_and_refine, cfg4))
    return reports
