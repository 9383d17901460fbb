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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/fgbg-course/fgbg/blob/main/notebooks/01_attention.ipynb)
#
# # 1 · Where does the model look when it reads "bird"?
#
# A text-to-image diffusion model such as Stable Diffusion turns the prompt
# *"a photo of a bird"* into an image by repeatedly **denoising** a latent image. Inside
# its UNet, every pixel of the latent asks, through **cross-attention**, which words of the
# prompt matter to it. Pixels that draw the bird attend to the word *bird*.
#
# The paper we follow (Dombrowski et al., *Foreground-Background Separation through
# Concept Distillation from Generative Image Foundation Models*, ICCV 2023) turns that
# around: show the model a **real** photo, slightly noised, together with the prompt, and
# read off where the pixels attend to *bird*. No mask or box is needed: the object's
# location is *distilled* from a model that only ever learnt to generate images.
#
# This lesson is **step 1** of the method: the raw attention maps.
#
# | step | notebook | what it makes |
# |---|---|---|
# | 1 | **01_attention** | raw cross-attention maps of the object word |
# | 2 | 02_masks | preliminary masks M_pre |
# | 3 | 03_finetune | a generator that knows "a photo of a background" |
# | 4 | 04_inpaint | inpainted backgrounds and refined masks M |
# | 5 | 05_segmentation | a segmentation network trained on M |
#
# Offline, the course runs on the **mini world**: procedural images with exact masks, and
# a small teaching model with Stable Diffusion's architecture (same tokenizer, text
# encoder, UNet, VAE and noise schedule, much smaller). The same cells run SD v1.4 on
# CUB-200-2011 with `params/cub_sd14.yaml`.

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
model = "teaching"
base_dir = "data/miniworld"
make_mini_world = True
out_dir = "runs/demo"
foreground_prompt = "a photo of a bird"
object_word = "bird"
extractor = "relevant_token_step_mean"
steps = None
rev_diff_steps = 40
num_inference_steps = 50
num_repeat_each_diffusion_step = 1
splits = ["train", "test"]
limit = None
resize_mode = "pad"
controls = True
unet_batch = 40
processes = 1   # > 1: step 1 on N processes, one per GPU (accelerate launch)
self_attention_k = 0   # > 0: refine the maps with the UNet's self-attention, A_self^k (not in the reference)
self_attention_resolution = None
seed = 0
device = "auto"
dtype = "auto"
overwrite = False

# %%
import matplotlib.pyplot as plt
import torch

from fgbg import attention, batch, course, data, models, viz

P = course.setup(globals())  # checks every parameter, resolves paths, seeds, writes the mini world if needed
pipe = models.load_pipeline(P["model"], P["device"], P["dtype"])
canvas = models.canvas_size(pipe)
print(f"model: {P['model']} on {pipe.device} ({pipe.unet.dtype}), canvas {canvas}x{canvas}")

# %% [markdown]
# ## What the model draws
#
# Before we read its attention, look at what the model *generates*. Each row is one prompt,
# sampled with 50 DDIM steps and classifier-free guidance (scale 4, against the prompt
# "a photo of"). The teaching model is small and coarse: colours and backgrounds follow
# the prompt, but its birds are blobs. What this course needs from it is not beauty but
# the attention maps below.

# %%
from fgbg.finetune import sample

prompts = [P["foreground_prompt"], "a photo of a red bird on grass", "a photo of a blue fish on water"]
pipe.set_progress_bar_config(disable=True)
samples = {p: sample(pipe, p, 6, P["num_inference_steps"], seed=P["seed"], guidance_scale=4.0,
                     negative_prompt="a photo of") for p in prompts}
viz.show_rows(samples);

# %% [markdown]
# ## The prompt and its tokens
#
# CLIP's tokenizer puts `<|startoftext|>` at position 0, then one or more tokens per word,
# then `<|endoftext|>`, padded to 77 positions. The word *bird* is token 5 of
# *"a photo of a bird"*, but we never hard-code that: we look it up.

# %%
tok = attention.find_token_indices(pipe.tokenizer, P["foreground_prompt"], P["object_word"])
tokens = attention.prompt_tokens(pipe.tokenizer, P["foreground_prompt"])
print("tokens:", tokens[:8], "...")
print(f"{P['object_word']!r} is at position {tok}")

# %% [markdown]
# ## One image, step by step
#
# 1. **Place** the image on the model's square canvas (here the reference's way: top-left,
#    unresized, the rest filled with -1) and encode it with the VAE to the latent `z0`.
# 2. **Noise** it at the `rev_diff_steps` = 40 lowest levels of a 50-step DDIM grid,
#    t = 781, 761, ..., 1, each level *independently* with fresh noise:
#    `z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`.
# 3. Run **one** UNet pass per level with the prompt, and catch the softmax probabilities
#    of every cross-attention layer (diffusers lets us swap in our own *attention
#    processor* for exactly those layers).
# 4. **Average**: upsample each layer's map to the latent grid, average over heads, layers
#    and levels.
#
# The 40 levels do not depend on each other (this is not a denoising trajectory), so they
# go through the UNet as one batch.

# %%
ds = data.load_dataset(P["base_dir"], splits=["test"], limit=P["limit"])
item = ds.items[0]
x, placement, img = data.load_item(item, canvas=canvas, mode=P["resize_mode"])
maps = attention.compute_attention_maps(
    pipe, x[None].to(pipe.unet.dtype), P["foreground_prompt"], rev_diff_steps=P["rev_diff_steps"],
    num_inference_steps=P["num_inference_steps"],
    num_repeat_each_diffusion_step=P["num_repeat_each_diffusion_step"], by_level=True,
    generator=torch.Generator().manual_seed(P["seed"]))
print(item.rel, "noise levels:", maps.timesteps[:3], "...", maps.timesteps[-2:])

# %% [markdown]
# ### Per layer resolution
# The UNet has cross-attention at several resolutions. Coarse layers see the whole object,
# fine layers see its outline; the method simply averages all of them.

# %%
viz.show_by_resolution(x, maps, tok[0]);

# %% [markdown]
# ### Per noise level
# At high noise (large t) the model must guess the layout from the prompt; at low noise
# it sees the image almost clean. Step 1 averages the 40 levels.

# %%
viz.show_by_level(maps, tok[0]);

# %% [markdown]
# ### Per token
# Not every word attends to the object; *photo* has no place in the picture. In Stable
# Diffusion `<|startoftext|>` soaks up most of the attention everywhere (a "sink"); the
# teaching model, whose text encoder has no transformer layers, gives it little: compare its
# bars with those of *bird* in the chart.

# %%
viz.show_by_token(maps, [0, 1, 2, 4, *tok]);
viz.plot_token_mass(maps, n_tokens=8);

# %% [markdown]
# ## Controls: what is knowledge, and what is mere saliency?
#
# A map that lights up on the bird is not yet proof that the model *knows* birds. Two
# controls, run exactly like step 1:
#
# * the **untrained network**: same architecture, random weights. Random features already
#   respond to edges and colour blobs, so it is not at 0.5 AUC;
# * the **"photo" token**: a word that names no object. Training taught it to stay off
#   objects, so it is an easy control to beat; exercise 6 tries a stricter one, a word the
#   model never saw.
#
# and two trivial baselines without any network: a **centre prior** (objects tend to be
# in the middle) and **border-colour saliency** (objects differ from the image border).
# Notebook 02 scores all of them against ground truth.

# %%
from fgbg.baselines import border_colour_saliency, centre_prior

untrained = course.untrained_copy(pipe, seed=P["seed"])
maps_u = attention.compute_attention_maps(
    untrained, x[None].to(pipe.unet.dtype), P["foreground_prompt"], rev_diff_steps=P["rev_diff_steps"],
    num_inference_steps=P["num_inference_steps"], generator=torch.Generator().manual_seed(P["seed"]))
viz.show_row([("image", img), viz.truth_panel(item, img.shape),
              (f"{P['object_word']!r}", data.map_back(maps.mean()[0, tok].sum(0), placement, "bilinear")),
              ("'photo'", data.map_back(maps.mean()[0, 2], placement, "bilinear")),
              ("untrained network", data.map_back(maps_u.mean()[0, tok].sum(0), placement, "bilinear"))],
             shared=True, label="attention probability");
viz.show_row([("centre prior", centre_prior(*img.shape[:2])), ("border-colour saliency", border_colour_saliency(img))],
             shared=True, label="baseline score");

# %% [markdown]
# ## The whole dataset
#
# `save_attention_maps` runs step 1 on every image of the chosen splits and writes one
# small `.npz` per image (the map on the latent grid, the map of "photo" as a control, and
# where the image sits on the canvas). It keeps **running sums**, never the maps of every
# layer and level: for SD at 512x512 that would be about 1.3 GB per image. A rerun skips
# finished images; an unreadable image is reported and skipped.

# %%
full = data.load_dataset(P["base_dir"], splits=P["splits"], limit=P["limit"])
print(full.summary())
if P["processes"] > 1:  # N processes do the work (fgbg.batch.launch); the call below then finds it done
    batch.launch("attention", P)
report = attention.save_attention_maps(
    pipe, full, P["out_dir"], prompt=P["foreground_prompt"], object_word=P["object_word"],
    extractor=P["extractor"], steps=P["steps"], rev_diff_steps=P["rev_diff_steps"],
    num_inference_steps=P["num_inference_steps"],
    num_repeat_each_diffusion_step=P["num_repeat_each_diffusion_step"], seed=P["seed"],
    resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], overwrite=P["overwrite"],
    self_attention_k=P["self_attention_k"], self_attention_resolution=P["self_attention_resolution"])
print(report)
if P["controls"]:  # the untrained-network control, on the test split only
    test = [it for it in full if it.split == 0]
    print(attention.save_attention_maps(
        untrained, test, P["out_dir"], prompt=P["foreground_prompt"], object_word=P["object_word"],
        extractor=P["extractor"], steps=P["steps"], rev_diff_steps=P["rev_diff_steps"],
        num_inference_steps=P["num_inference_steps"], seed=P["seed"], resize_mode=P["resize_mode"],
        unet_batch=P["unet_batch"], subdir="attention_untrained", overwrite=P["overwrite"],
        self_attention_k=P["self_attention_k"], self_attention_resolution=P["self_attention_resolution"]))
del untrained

# %% [markdown]
# ### A refinement from outside the paper: the model's own self-attention
#
# Later training-free methods (DiffSegmenter, Dataset Diffusion, iSeg) sharpen raw
# cross-attention maps with the UNet's **self-attention**: in the same UNet passes, the
# self-attention layers of one resolution (the teaching model's 8x8 layers, as its 16x16
# ones attend almost uniformly; SD's 32x32 layers) say, for each position, which other
# positions it attends to: a row-stochastic N x N matrix `A_self` (averaged over heads,
# layers and levels, kept as a running sum). The refined map is `A_self^k @ map`: each
# position takes the attention-weighted mean of the map over the positions it attends to,
# k times. The parameter `self_attention_k` (default 0: off, as in the paper) refines the
# maps above; with the controls, step 1 runs once more on the test split with it on
# (k = `self_attention_k`, or 1 when that is 0) into its own folder. Notebook 02 compares
# both.

# %%
if P["controls"]:
    print(attention.save_attention_maps(
        pipe, test, P["out_dir"], prompt=P["foreground_prompt"], object_word=P["object_word"],
        extractor=P["extractor"], steps=P["steps"], rev_diff_steps=P["rev_diff_steps"],
        num_inference_steps=P["num_inference_steps"],
        num_repeat_each_diffusion_step=P["num_repeat_each_diffusion_step"], seed=P["seed"],
        resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], subdir=attention.SELF_ATTENTION_SUBDIR,
        self_attention_k=P["self_attention_k"] or attention.SELF_ATTENTION_COURSE_K,
        self_attention_resolution=P["self_attention_resolution"], overwrite=P["overwrite"]))

# %%
# NBVAL_CHECK_OUTPUT
amap, pl = attention.load_attention(P["out_dir"], full.items[0])
print(f"images: {len(full)} in splits {P['splits']}, skipped: {len(report.skipped) + len(full.skipped)}")
print(f"map on the latent grid: {amap.shape}, image {pl.height}x{pl.width}, sum over tokens is a probability")


# %% [markdown]
# ## Explore
# Move the slider: image, ground truth and the attention map of the object word.

# %%
def panels_for(it):
    m, p = attention.load_attention(P["out_dir"], it)
    im = data.read_image(it.image_path)
    return [("image", im), viz.truth_panel(it, im.shape), ("attention", data.map_back(m, p, "bilinear"))]

viz.browse(full.items[:40], panels_for, shared=True, label="attention probability")

# %% [markdown]
# ## Exercises
#
# Exercises 1-3 change a parameter and rerun the notebook. Step 1 records its settings in
# `out_dir` and will not mix outputs of two settings: a rerun into the same folder stops
# with a `RunConfigError` naming the difference. So, in the parameters cell, either set
# `out_dir` to a new folder (e.g. `out_dir = "runs/steps10"`; notebooks 02-05 then need
# the same `out_dir`), or set `overwrite = True` to recompute step 1 into the same folder
# (its old outputs are replaced).
#
# 1. Set `steps = 10` (the 10 least noisy levels only) and compare the maps. Which levels
#    localize best? (The paper found quality rises with T0 up to about 40.)
# 2. Change `object_word` and `foreground_prompt` to another object of the mini world
#    (`"a photo of a fish"`, `"fish"`): does the model find fish?
# 3. Use `extractor = "multi_relevant_token_step_mean"` with a prompt naming the colour
#    too ("a photo of a red bird"): what does the colour word attend to?
# 4. Look at `fgbg/attention.py`: `CrossAttentionCapture` is diffusers' classic attention
#    processor plus one line. Which line?
# 5. What does the model's *bird* mean: a bird's shape, or what usually comes with birds?
#    `fgbg.miniworld.write_cue_swap_dataset` draws a bird and a fish in one picture, twice:
#    once each with its own class's typical colour, texture, proportion and size, on a
#    bird's background; once with the two objects' cues swapped, on water (an orange,
#    barred bird of a fish's size beside a speckled brown fish). Score the map of *bird*
#    on the bird against the fish (`fgbg.metrics.separation_auc`) in both versions.
# 6. A word the model never saw: no mini-world caption contains *zebra*
#    (`fgbg.miniworld.UNSEEN_WORDS` lists five such words), so training never moved its
#    embedding. As in exercises 1-3, set `foreground_prompt = "a photo of a zebra"` and
#    `object_word = "zebra"` and rerun: how close does notebook 02's AUC of its map come
#    to that of *bird*, and what does that say about where the map's localisation comes from?
#
# Solutions, answered by running them: `notebooks/solutions/solutions.ipynb` (executed, with
# its figures: `docs/lessons/solutions.ipynb`). Try first.
