"""params/cub_sd14.yaml runs the notebooks unchanged, end to end, on data in the official
CUB-200-2011 layout at CUB's image size (500x375 JPEGs) without its segmentations (a user's
own dataset has none), through papermill, on the CPU.

SD v1.4 weights cannot be downloaded here and do not fit a CPU test's time, so the model is a
tiny random SD-architecture pipeline saved as a local diffusers folder (the same loading path
as a downloaded SD v1.4), and the long steps are shortened with overrides. Everything else is
the file's own settings: the CUB layout, resize_mode, 128 px segmenter, no controls.
Memory at SD size is measured on a GPU by benchmarks/gpu_memory_sd14.py, not here.

A second run, on request (FGBG_TEST_CPU_BF16=1, or `make test-bf16`), puts the pipeline in
bf16, as "dtype: auto" does on a GPU, so that the notebooks' handling of a half-precision
pipeline is exercised without one. It is not part of `make test`: bf16 on a CPU runs through
kernels that differ from CPU to CPU (here, torch's slow reference convolution, 1.8x the fp32
run's time), and in CI it once ran past 80 minutes without finishing (2026-11-25).
"""
import json
import os

import pytest

from fgbg import course
from fgbg.data import load_dataset, read_image, read_mask
from fgbg.inpaint import inpainted_path, refined_mask_path
from fgbg.masks import prelim_mask_path
from fgbg.miniworld import write_cub_like
from fgbg.models import random_pipeline
from fgbg.segmenter import predicted_mask_path

pytestmark = pytest.mark.slow

SHORT = {"rev_diff_steps": 2, "num_inference_steps": 4, "unet_batch": 2, "finetune_steps": 2,
         "finetune_batch_size": 2, "inpaint_batch_size": 2, "seg_iterations": 4, "seg_batch_size": 2,
         "seg_width": 4, "dprime_size": 2, "device": "cpu"}


CPU_BF16 = pytest.mark.skipif(os.environ.get("FGBG_TEST_CPU_BF16") != "1",
                              reason="bf16 on the CPU runs on request: FGBG_TEST_CPU_BF16=1 (make test-bf16)")


# bf16: the dtype the file gives a GPU ("auto"); on the CPU "auto" is fp32
@pytest.mark.parametrize("dtype", ["auto", pytest.param("bf16", marks=CPU_BF16)])
def test_cub_params_run_the_notebooks_unchanged_on_a_dataset_without_ground_truth(tmp_path, dtype):
    """A user's own data: the CUB layout, but the segmentations archive not there. Every
    notebook runs, every step writes its masks in each image's own pixels, metrics are
    simply absent (the notebooks say so instead of failing or printing NaN). Table 2 with
    ground truth is what nbval checks on the mini world (`make test`)."""
    import shutil
    base = write_cub_like(tmp_path / "cub", n_train=3, n_test=2)
    shutil.rmtree(base.parent / "segmentations")
    model = tmp_path / "sd-like"
    random_pipeline("tiny").save_pretrained(model)
    out = tmp_path / "run"
    params = {"model": str(model), "base_dir": str(base), "out_dir": str(out), **SHORT, "dtype": dtype}

    # notebook 02 before 01: one clear error naming what to run
    with pytest.raises(course.NotebookError) as e:
        course.run("params/cub_sd14.yaml", params, ["02_masks"], cell_timeout=300)
    msg = str(e.value)
    assert "\n" not in msg and "02_masks" in msg and "run step 1 first" in msg

    metrics = course.run("params/cub_sd14.yaml", params, list(course.NOTEBOOKS),
                         cell_timeout=600)  # a stuck cell fails here, naming the cell
    assert metrics == {} and not (out / "metrics.json").exists()

    # every per-image output is in the original 500x375 pixel grid, for both splits
    ds = load_dataset(base, splits=["train", "test"])
    assert len(ds) == 5 and not ds.has_ground_truth
    for it in ds:
        img = read_image(it.image_path)
        assert img.shape == (375, 500, 3)
        assert read_mask(prelim_mask_path(out, it)).shape == (375, 500)
        assert read_image(inpainted_path(out, it)).shape == (375, 500, 3)
        assert read_mask(refined_mask_path(out, it)).shape == (375, 500)
        assert read_mask(predicted_mask_path(out, "unet_refined", it)).shape == (375, 500)
    assert sorted(p.name for p in (out / "notebooks").glob("*.ipynb")) == [f"{n}.ipynb" for n in course.NOTEBOOKS]
    assert (out / "finetuned" / "model_index.json").is_file()
    assert len(list((out / "dprime" / "data" / "images").rglob("*.png"))) == SHORT["dprime_size"]
    # the checked summaries say that nothing was scored
    nb = json.loads((out / "notebooks" / "02_masks.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []))
    assert "no ground truth in base_dir" in text
