# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/fgbg-course/fgbg/blob/main/notebooks/04_inpaint.ipynb)
#
# # 4 · Paint the bird away: inpainting and refined masks M
#
# With a generator that knows "a photo of a background", we can **remove** the object:
# repaint the region of M_pre with background, keep the rest of the photo, and compare.
# Where the photo changed a lot, the object was.
#
# * **Inpainting**: DDIM, 50 steps, eta 0, guidance 1, from pure noise, prompt "a photo of
#   a background". Before every step the known region (outside M_pre) is replaced by the
#   original latent noised to the current level: `z = q_sample(z0, t) * (1 - M_pre) + z * M_pre`
#   (RePaint-style latent blending). The model only invents what is inside M_pre, and it
#   invents it to fit the background around it.
# * **Difference image**: `D = mean over RGB of |x - x_inpainted|`.
# * **Refined mask**: `M = up(M_pre) AND majority3x3(D > GMM-midpoint(D))`: the part of M_pre that
#   really changed. `up` brings the latent-grid M_pre to pixels as the reference does, by
#   bilinear interpolation, which widens it by up to half a latent cell. So refinement
#   removes the background that the coarse attention mask swallowed, and can win back
#   only a thin rim of bird that M_pre cut off (`m_pre_upsampling = "nearest"`: not even that).
#
# The paper's simpler baseline, **M_crop**, fills M_pre's box with mirrored background
# from beside it instead of inpainting.

# %%
# Colab: fetch the course and make it importable, without restarting the runtime.
# Everywhere else (JupyterLab, papermill, nbval) this cell does nothing.
import os
import sys

if "google.colab" in sys.modules or os.environ.get("FGBG_COLAB_ROOT"):  # the variable: tests only
    import subprocess
    repo = os.path.join(os.environ.get("FGBG_COLAB_ROOT", "/content"), "fgbg")
    if not os.path.exists(os.path.join(repo, "pyproject.toml")):
        subprocess.run(["git", "clone", "-q", "--depth", "1", os.environ.get("FGBG_REPOSITORY", "https://github.com/fgbg-course/fgbg"),
                        repo], check=True)
    if not os.environ.get("FGBG_COLAB_NO_INSTALL"):  # tests: the dependencies are there already
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{repo}[lowmem]"], check=True)
    os.chdir(repo)  # from /content, `import fgbg` would find the clone itself as a namespace package
    sys.path.insert(0, repo)
    for name in [m for m in sys.modules if m == "fgbg" or m.startswith("fgbg.")]:
        del sys.modules[name]
    from fgbg.models import describe_device
    print(describe_device())

# %% tags=["parameters"]
base_dir = "data/miniworld"
make_mini_world = True
out_dir = "runs/demo"
background_prompt = "a photo of a background"
foreground_prompt = "a photo of a bird"
splits = ["train", "test"]
limit = None
num_inference_steps = 50
inpaint_batch_size = 16
processes = 1   # > 1: step 4 on N processes, one per GPU (accelerate launch)
m_pre_upsampling = "bilinear"
close_and_fill = False
fg_bg_guidance = 3.0
resize_mode = "pad"
seed = 0
device = "auto"
dtype = "auto"
overwrite = False

# %%
import numpy as np

from fgbg import batch, course, data, evaluate, finetune, inpaint, masks, segmenter, viz

P = course.setup(globals())
tuned = finetune.load_finetuned(P["out_dir"], P["device"], P["dtype"])
ds = data.load_dataset(P["base_dir"], splits=P["splits"], limit=P["limit"])
print(ds.summary())

# %% [markdown]
# ## Inpaint, difference, refine: the whole dataset
# Images go through the sampler in batches; every image has its own seeded noise, so the
# result does not depend on the batch. Outputs (in the original pixel grid): the inpainted
# image, D, the refined mask M and the baseline M_crop.

# %%
if P["processes"] > 1:  # N processes do the work (fgbg.batch.launch); the call below then finds it done
    batch.launch("inpaint", P)
report = inpaint.inpaint_and_refine(
    tuned, ds, P["out_dir"], prompt=P["background_prompt"], num_inference_steps=P["num_inference_steps"],
    batch_size=P["inpaint_batch_size"], seed=P["seed"], resize_mode=P["resize_mode"],
    m_pre_upsampling=P["m_pre_upsampling"], close_and_fill=P["close_and_fill"], overwrite=P["overwrite"])
print(report)


# %% [markdown]
# ## Look
# Original, M_pre, inpainted background, difference image D, refined mask M, truth.

# %%
def panels_for(it):
    im = data.read_image(it.image_path)
    return [("image", im), ("M_pre", data.read_mask(masks.prelim_mask_path(P["out_dir"], it))),
            ("inpainted", data.read_image(inpaint.inpainted_path(P["out_dir"], it))),
            ("D", np.load(inpaint.diff_path(P["out_dir"], it)).astype(np.float32)),
            ("refined M", data.read_mask(inpaint.refined_mask_path(P["out_dir"], it))),
            viz.truth_panel(it, im.shape)]

test = evaluate.split_subsets(ds)["test"]
D_LABEL = "D = mean over RGB of |x - inpainted|"
viz.show_row(panels_for(test[0]), shared=True, label=D_LABEL);

# %%
viz.browse(test, panels_for, shared=True, label=D_LABEL)


# %% [markdown]
# ## Did refinement help?
# Pooled over the test split: M_pre (step 2), the baseline M_crop, and the refined M.

# %%
def read(path_fn):
    return evaluate.saved_masks(path_fn, P["out_dir"])

rows = {"prelim": segmenter.evaluate_masks(read(masks.prelim_mask_path), test),
        "crop": segmenter.evaluate_masks(read(inpaint.crop_mask_path), test),
        "refined": segmenter.evaluate_masks(read(inpaint.refined_mask_path), test)}
metrics = evaluate.record_table2_rows(P["out_dir"], rows, items=ds,
                                     sources=[masks.prelim_dir(P["out_dir"]), inpaint.inpaint_dir(P["out_dir"])])

# %%
# NBVAL_CHECK_OUTPUT
print(evaluate.table2({k: metrics[k] for k in rows if k in metrics})  # this notebook's rows only
      if ds.has_ground_truth else "no ground truth in base_dir: the masks are written, but not scored")

# %%
viz.plot_table2(metrics, list(rows));

# %% [markdown]
# ## Foreground-vs-background guidance
# The fine-tuned model knows both concepts, so sampling can be *steered* away from the
# background: `eps = eps_bg + s (eps_fg - eps_bg)`. With s > 1 the object stands out more.

# %%
viz.show_rows({f"s = {s}": inpaint.sample_fg_bg(tuned, P["foreground_prompt"], P["background_prompt"], s, n=4,
                                                 seed=P["seed"])
               for s in (1.0, P["fg_bg_guidance"])});

# %% [markdown]
# ## Exercises
#
# Exercises 1 and 3 change a parameter. Step 4 records its settings in `out_dir` and will
# not mix outputs of two settings: a rerun into the same folder stops with a
# `RunConfigError` naming the difference. So, in the parameters cell, either set `out_dir`
# to a new folder (run notebooks 01-03 there first), or set `overwrite = True` to recompute
# step 4 into the same folder (its old outputs are replaced; note the table first).
#
# 1. Set `close_and_fill = True`. Which images gain, which lose?
# 2. Inpaint with the *untuned* teaching model (`models.load_pipeline("teaching")`) and
#    compare D: what does concept distillation buy?
# 3. Set `m_pre_upsampling = "nearest"`: now M is always a subset of M_pre. How much IoU
#    did the reference's half-cell rim buy? Find a test image where the bird sticks out of
#    M_pre by more than that: what would it take to recover that part?
#
# Solutions, answered by running them: `notebooks/solutions/solutions.ipynb` (executed, with
# its figures: `docs/lessons/solutions.ipynb`). Try first.
