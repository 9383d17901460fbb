"""params/cub_sd14.yaml runs the five notebooks unchanged, end to end, on data in the official
CUB-200-2011 layout at CUB's image size (500x375 JPEGs, masks in the separate segmentations
folder), through papermill, on the CPU.

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

import numpy as np
import pytest

from fgbg import course
from fgbg.data import load_dataset, read_image, read_mask
from fgbg.inpaint import inpainted_path, refined_mask_path
from fgbg.masks import prelim_mask_path
from fgbg.miniworld import write_cub_like
from fgbg.models import random_pipeline

pytestmark = pytest.mark.slow

SHORT = {"rev_diff_steps": 2, "num_inference_steps": 4, "unet_batch": 2, "finetune_steps": 2,
         "finetune_batch_size": 2, "inpaint_batch_size": 2, "seg_iterations": 4, "seg_batch_size": 2,
         "seg_width": 4, "dprime_size": 2, "device": "cpu"}


CPU_BF16 = pytest.mark.skipif(os.environ.get("FGBG_TEST_CPU_BF16") != "1",
                              reason="bf16 on the CPU runs on request: FGBG_TEST_CPU_BF16=1 (make test-bf16)")


# bf16: the dtype the file gives a GPU ("auto"); on the CPU "auto" is fp32
@pytest.mark.parametrize("dtype", ["auto", pytest.param("bf16", marks=CPU_BF16)])
def test_cub_params_run_the_notebooks_unchanged(tmp_path, dtype):
    base = write_cub_like(tmp_path / "cub", n_train=3, n_test=2)
    model = tmp_path / "sd-like"
    random_pipeline("tiny").save_pretrained(model)
    out = tmp_path / "run"
    metrics = course.run("params/cub_sd14.yaml",
                         {"model": str(model), "base_dir": str(base), "out_dir": str(out), **SHORT, "dtype": dtype},
                         list(course.NOTEBOOKS),
                         cell_timeout=600)  # a stuck cell fails here, naming the cell

    for name in ("prelim", "crop", "unet_prelim", "refined", "unet_refined", "unet_refined_dprime"):
        row = metrics[name]
        assert set(row) >= {"acc", "iou", "miou", "dice"}, name
        assert all(0.0 <= row[k] <= 1.0 for k in ("acc", "iou", "miou", "dice")), (name, row)
    assert metrics["n_images"] == 2
    assert "untrained" not in metrics["controls"]  # cub_sd14.yaml: the untrained-network control is off
    assert json.loads((out / "metrics.json").read_text()) == metrics

    # every per-image output is in the original 500x375 pixel grid, for both splits
    ds = load_dataset(base, splits=["train", "test"])
    assert len(ds) == 5
    for it in ds:
        img = read_image(it.image_path)
        assert img.shape == (375, 500, 3)
        assert read_mask(prelim_mask_path(out, it)).shape == (375, 500)
        assert read_image(inpainted_path(out, it)).shape == (375, 500, 3)
        assert read_mask(refined_mask_path(out, it)).shape == (375, 500)
    assert sorted(p.name for p in (out / "notebooks").glob("*.ipynb")) == [
        f"{n}.ipynb" for n in course.NOTEBOOKS]
    assert (out / "finetuned" / "model_index.json").is_file()
    assert np.isfinite([metrics["unet_refined"]["iou"]]).all()
