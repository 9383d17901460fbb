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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/fgbg-course/fgbg/blob/main/notebooks/03_finetune.ipynb)
#
# # 3 · Concept distillation: teach the generator what "background" means
#
# M_pre is coarse. To refine it, the paper removes the object from the photo and looks at
# what changed. Removing needs a generator that can paint *background only* on request.
# A text-to-image model has never been asked for "a photo of a background" in a
# controlled way, so the paper **fine-tunes** it on the dataset itself, with the
# preliminary masks as (noisy) supervision:
#
# * half of the samples: the whole image with *"a photo of a bird"*, denoising loss on
#   every latent pixel (the model keeps knowing the object);
# * the other half: the same kind of image with *"a photo of a background"*, loss **only
#   on background pixels inside one random rectangle** drawn from M_pre (corners on
#   background, sides 11-32 of 64 latent pixels, at least 2/3 background; foreground
#   pixels in the box get no loss).
#
# The mask only **weights the loss**; it is never an input of the UNet:
#
# `loss = mean over B, C, H, W of  m * (eps_hat - eps)^2`
#
# Text encoder and VAE stay frozen, the UNet is trained with AdamW at a constant learning
# rate, and samples come from an exponential moving average (EMA) of its weights. The
# reference trains about a day on two A6000 GPUs; the mini world needs minutes on a CPU.

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
background_prompt = "a photo of a background"
finetune_steps = 300
finetune_batch_size = 8
finetune_lr = 0.0001
# memory-saving options of step 3 (docs/memory.md); the defaults train the whole UNet, as the paper
finetune_gradient_checkpointing = None
finetune_mixed_precision = "auto"
finetune_optimizer = "adamw"
finetune_lora_rank = 0
finetune_ema = "gpu"
finetune_ema_every = 1
# the effective batch is finetune_batch_size, over all processes and accumulation steps
finetune_gradient_accumulation_steps = 1
processes = 1   # > 1: data-parallel on N processes, one per GPU (accelerate launch)
limit = None
resize_mode = "pad"
seed = 0
device = "auto"
dtype = "auto"
overwrite = False

# %%
import matplotlib.pyplot as plt
import numpy as np

from fgbg import batch, course, data, finetune, masks, models, viz

P = course.setup(globals())
pipe = models.load_pipeline(P["model"], P["device"], P["dtype"])
train = data.load_dataset(P["base_dir"], splits=["train"], limit=P["limit"])
print(train.summary())

# %% [markdown]
# ## The rectangle sampler
# Where may a background sample put its loss? Inside one random box whose corner lies on
# M_pre's background and which is at least 2/3 background. Each panel is one draw on the
# latent grid: grey = M_pre (no loss), yellow = the pixels that get loss.

# %%
item = train.items[0]
x, pl, img = data.load_item(item, canvas=models.canvas_size(pipe), mode=P["resize_mode"])
latent = pipe.unet.config.sample_size
m_pre = data.place_mask(data.read_mask(masks.prelim_mask_path(P["out_dir"], item), img.shape[:2]), pl, latent)
rng = np.random.default_rng(P["seed"])
draws = [finetune.sample_background_box(m_pre, rng) for _ in range(5)]
viz.show_row([("image", img), ("M_pre (latent grid)", m_pre)] +
             [(f"draw {i + 1}", m_pre * 0.4 + d * 1.0) for i, d in enumerate(draws)], cmap="viridis");

# %% [markdown]
# ## Before fine-tuning
# What does the teaching model draw for the two prompts? Before fine-tuning, "a photo of a
# background" is a prompt it has never seen.

# %%
before = {p: finetune.sample(pipe, p, n=4, seed=P["seed"]) for p in (P["foreground_prompt"], P["background_prompt"])}
viz.show_rows(before);

# %% [markdown]
# ## Fine-tune
# `finetune` writes the fine-tuned pipeline (EMA weights, diffusers layout, safetensors)
# to `out_dir/finetuned/` and resumes from its last checkpoint when rerun.

# %%
cfg = finetune.FinetuneConfig.from_params(P)  # the finetune_* parameters, the prompts, the seed
print(cfg)
if P["processes"] > 1:  # N processes do the work (fgbg.batch.launch); the call below then finds it done
    batch.launch("finetune", P)
result = finetune.finetune(pipe, train, P["out_dir"], cfg, overwrite=P["overwrite"])
for rel, why in result["skipped"]:
    print("skipped", rel, why)

# %%
loss = np.array(result["loss"])
if len(loss):
    fig, ax = plt.subplots(figsize=(5, 2.2), dpi=72)
    ax.plot(loss, lw=0.6, alpha=0.5)
    ax.plot(np.convolve(loss, np.ones(20) / 20, mode="valid"), lw=1.5)
    ax.set_xlabel("step"); ax.set_ylabel("masked eps-MSE")
    fig.tight_layout()

# %%
# NBVAL_CHECK_OUTPUT
import os
print(f"fine-tuned for {result['steps']} steps on {len(train) - len(result['skipped'])} images; "
      f"pipeline saved: {os.path.exists(os.path.join(P['out_dir'], 'finetuned', 'model_index.json'))}")

# %% [markdown]
# ## After fine-tuning
# The same seeds. "A photo of a background" should now give the mini world's backgrounds
# without birds; "a photo of a bird" should still give birds.

# %%
tuned = finetune.load_finetuned(P["out_dir"], P["device"], P["dtype"])
after = {p: finetune.sample(tuned, p, n=4, seed=P["seed"]) for p in (P["foreground_prompt"], P["background_prompt"])}
viz.show_rows(after);

# %% [markdown]
# ## Exercises
#
# Exercise 1 changes a parameter. Step 3 (and step 4 after it) records its settings in
# `out_dir` and will not reuse outputs of other settings: a rerun into the same folder stops
# with a `RunConfigError` naming the difference. So, in the parameters cells of 03 and 04,
# either set `out_dir` to a new folder (run 01 and 02 there first, or copy their outputs
# over), or set `overwrite = True` to recompute into the same folder (the old outputs are
# replaced).
#
# 1. Set `finetune_steps = 30`: how far has "a photo of a background" moved after a tenth of
#    the training, and what does step 4 (notebook 04) make of it?
# 2. In `fgbg/finetune.py`, change `p_background` to 1.0 (only background samples). What
#    happens to "a photo of a bird" after fine-tuning? Why does the paper keep the object
#    samples?
# 3. The loss of a background sample ignores the foreground pixels of its box. What would
#    the model learn if it did not?
#
# Solutions, answered by running them: `notebooks/solutions/solutions.ipynb` (executed, with
# its figures: `docs/lessons/solutions.ipynb`). Try first.
