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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/fgbg-course/fgbg/blob/main/notebooks/05_segmentation.ipynb)
#
# # 5 · A segmentation network trained on distilled masks
#
# The refined masks M are good but not perfect, and computing them needs the generator at
# test time. The last step trains an ordinary **U-Net** (3 -> 1 channel, sigmoid) with
# binary cross-entropy on the refined masks of the training split. Its errors are not the
# masks' errors: a network that sees thousands of birds averages out the noise of
# individual masks. Ground truth is used only to test.
#
# The paper's numbers on CUB-200-2011 (IoU): M_pre 29.0 -> refined M 63.6 -> U-Net on M 75.1.
# Here the same table for this run.

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
limit = None
seg_size = 64
seg_width = 8
seg_iterations = 600
seg_batch_size = 16
seg_lr = 0.002
seed = 0
device = "auto"

# %%
import matplotlib.pyplot as plt
import numpy as np

from fgbg import course, data, evaluate, inpaint, masks, runs, segmenter, viz

P = course.setup(globals())
ds = data.load_dataset(P["base_dir"], splits=["train", "test"], limit=P["limit"])
train = [it for it in ds if it.split == 1]
test = evaluate.split_subsets(ds)["test"]
print(ds.summary())
print(f"train on {len(train)} images, test on {len(test)}")


def read(path_fn):
    return evaluate.saved_masks(path_fn, P["out_dir"])


# %% [markdown]
# ## Train on M (and, for comparison, on M_pre)
# Random crops and flips, Adam, BCE. The same recipe for both targets, so the difference
# in the table is the difference the refinement makes.

# %%
nets, losses = {}, {}
targets = {"unet_refined": (inpaint.refined_mask_path, inpaint.inpaint_dir(P["out_dir"])),
           "unet_prelim": (masks.prelim_mask_path, masks.prelim_dir(P["out_dir"]))}
for name, (target, source) in targets.items():
    nets[name], losses[name] = segmenter.train_segmenter(
        train, read(target), size=P["seg_size"], iterations=P["seg_iterations"],
        batch_size=P["seg_batch_size"], lr=P["seg_lr"], seed=P["seed"], device=P["device"],
        channels=segmenter.channels_for_width(P["seg_width"]))
    segmenter.save_segmenter(nets[name], f"{P['out_dir']}/segmenter/{name}.safetensors", meta={
        "trained_on": str(source), "made_from": runs.read_run_config(source), "size": P["seg_size"],
        "iterations": P["seg_iterations"], "seed": P["seed"], "train_images": len(train)})

fig, ax = plt.subplots(figsize=(5, 2.2), dpi=72)
for name, l in losses.items():
    ax.plot(np.convolve(l, np.ones(25) / 25, mode="valid"), label=name)
ax.set_xlabel("iteration"); ax.set_ylabel("BCE"); ax.legend(fontsize=7); fig.tight_layout()


# %% [markdown]
# ## Table 2 of the paper, for this run

# %%
def predicted(net):
    return lambda it: segmenter.predict(net, data.read_image(it.image_path), size=P["seg_size"])[1]

rows = {name: segmenter.evaluate_masks(predicted(net), test) for name, net in nets.items()}
metrics = evaluate.record_table2_rows(P["out_dir"], rows, items=ds,
                                     sources=[masks.prelim_dir(P["out_dir"]), inpaint.inpaint_dir(P["out_dir"])])

# %%
# NBVAL_CHECK_OUTPUT
print(evaluate.table2(metrics) if ds.has_ground_truth else "no ground truth in base_dir: nothing to score")

# %%
viz.plot_table2(metrics);

# %% [markdown]
# ## The product: a mask for every image
# The U-Net trained on M is what the method delivers: a segmenter for the object class,
# trained without a single human mask. It writes its mask of every image of the dataset
# (all splits, ground truth or not) to `out_dir/masks/unet_refined/`, in each image's own
# pixels.

# %%
every = data.load_dataset(P["base_dir"], splits=list(data.SPLITS), limit=P["limit"])
print(segmenter.save_predicted_masks(nets["unet_refined"], every, P["out_dir"], "unet_refined", size=P["seg_size"]))


# %% [markdown]
# ## Look at the predictions

# %%
def panels_for(it):
    im = data.read_image(it.image_path)
    return [("image", im), ("M_pre", read(masks.prelim_mask_path)(it)), ("refined M", read(inpaint.refined_mask_path)(it)),
            ("U-Net on M", predicted(nets["unet_refined"])(it)), viz.truth_panel(it, im.shape)]

viz.browse(test, panels_for)

# %% [markdown]
# ## Exercises
#
# 1. Train on the ground truth of the training split (`mask_fn=lambda it: data.read_mask(it.gt_path)`):
#    the paper's "fully supervised" row. How far is distillation from supervision here?
# 2. Halve `seg_iterations`. Which row suffers most? (Step 5 always retrains, so the same
#    `out_dir` works, but its rows in `metrics.json` are replaced: note the table first.)
# 3. Per-image IoU: which test images does the U-Net get wrong? Are they the ones where M
#    was wrong?
#
# Solutions, answered by running them: `notebooks/solutions/solutions.ipynb` (executed, with
# its figures: `docs/lessons/solutions.ipynb`). Try first.
