"""A user's own dataset without ground truth runs through all five notebooks (papermill),
writing every mask; metrics are simply absent. Notebook 02 run before 01 stops with one
line that says what to run.

The model is the shipped teaching model and every loop is cut to a few steps: this checks
the paths through the notebooks, not the numbers.
"""
import json

import pytest

from fgbg import course
from fgbg.data import SPLITS, load_dataset, read_image, read_mask
from fgbg.inpaint import refined_mask_path
from fgbg.masks import prelim_mask_path
from fgbg.miniworld import write_course_dataset
from fgbg.segmenter import predicted_mask_path

pytestmark = pytest.mark.slow

SHORT = {"limit": 2, "rev_diff_steps": 2, "num_inference_steps": 4, "unet_batch": 2, "controls": False,
         "finetune_steps": 2, "finetune_batch_size": 2, "inpaint_batch_size": 2, "seg_iterations": 4,
         "seg_batch_size": 2, "seg_width": 4, "dprime_size": 2, "device": "cpu", "make_mini_world": False}


def test_a_dataset_without_ground_truth_runs_all_notebooks_and_writes_every_mask(tmp_path):
    import shutil
    base = write_course_dataset(tmp_path / "mine", n_train=2, n_val=1, n_test=2, n_distractor=1, seed=2)
    shutil.rmtree(base / "segmentations")
    shutil.rmtree(base / "distractors")
    out = tmp_path / "run"
    params = {"base_dir": str(base), "out_dir": str(out), **SHORT}

    # notebook 02 before 01: one clear error naming what to run
    with pytest.raises(course.NotebookError) as e:
        course.run(None, params, ["02_masks"], cell_timeout=300)
    msg = str(e.value)
    assert "\n" not in msg and "02_masks" in msg and "run step 1 first" in msg

    metrics = course.run(None, params, list(course.NOTEBOOKS), cell_timeout=600)
    assert metrics == {} and not (out / "metrics.json").exists()
    ds = load_dataset(base, splits=["train", "test"], limit=2)
    every = load_dataset(base, splits=list(SPLITS), limit=2)
    assert len(ds) == 4 and len(every) == 5
    for it in ds:
        shape = read_image(it.image_path).shape[:2]
        assert read_mask(prelim_mask_path(out, it)).shape == shape
        assert read_mask(refined_mask_path(out, it)).shape == shape
    for it in every:  # the U-Net's masks: every split, val included
        assert read_mask(predicted_mask_path(out, "unet_refined", it)).shape == read_image(it.image_path).shape[:2]
    # the checked summaries say that nothing was scored, instead of printing NaN or failing
    nb = json.loads((out / "notebooks" / "02_masks.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []))
    assert "no ground truth in base_dir" in text
