"""D': images sampled from the (fine-tuned) generator, written as a dataset, seeded per image."""
import numpy as np
import pytest

from fgbg import synthetic
from fgbg.data import read_image
from fgbg.io import save_png
from fgbg.inpaint import refined_mask_path
from fgbg.runs import RunConfigError


def _synth(pipe, out, n, **kw):
    kw = {"num_inference_steps": 2, "scale": 2.0, "progress": False, **kw}
    return synthetic.synthesize(pipe, out, n, **kw)


def test_dprime_is_a_dataset_seeded_per_image(tiny_pipe, tmp_path):
    ds, rep = _synth(tiny_pipe, tmp_path / "a", 3, batch_size=2)
    assert len(ds) == 3 and len(rep.done) == 3 and ds.layout == "reference"
    assert all(it.split == 1 and it.gt_path is None for it in ds)
    imgs = [read_image(it.image_path) for it in ds]
    assert imgs[0].shape == (64, 64, 3) and not np.array_equal(imgs[0], imgs[1])
    # other batches, same images; a larger D' keeps the ones it has
    ds_b, _ = _synth(tiny_pipe, tmp_path / "b", 4, batch_size=3)
    for a, b in zip(ds, ds_b):  # up to float rounding of batched kernels: one grey level
        assert np.abs(read_image(a.image_path).astype(int) - read_image(b.image_path).astype(int)).max() <= 1
    ds4, rep4 = _synth(tiny_pipe, tmp_path / "a", 4, batch_size=2)
    assert len(ds4) == 4 and len(rep4.reused) == 3 and len(rep4.done) == 1
    # the guidance scale shapes the samples, and another one is refused in the same folder
    ds_s, _ = _synth(tiny_pipe, tmp_path / "c", 1, scale=1.0)
    assert not np.array_equal(read_image(ds_s[0].image_path), imgs[0])
    with pytest.raises(RunConfigError, match="scale"):
        _synth(tiny_pipe, tmp_path / "a", 4, scale=1.0)


def test_training_set_reads_each_mask_from_its_own_run(tmp_path):
    from fgbg.data import Item
    out = tmp_path / "out"
    real = Item(rel="images/a/x.png", split=1, image_path=tmp_path / "ds" / "images/a/x.png", gt_path=None, line=1)
    fake = Item(rel="images/dprime/dprime_00000.png", split=1,
                image_path=synthetic.dprime_data_dir(out) / "images/dprime/dprime_00000.png", gt_path=None, line=1)
    for it, value in ((real, 0), (fake, 255)):
        save_png(it.image_path, np.zeros((6, 5, 3), np.uint8))
    save_png(refined_mask_path(out, real), np.zeros((6, 5), np.uint8))
    save_png(refined_mask_path(synthetic.dprime_run_dir(out), fake), np.full((6, 5), 255, np.uint8))
    items, mask_fn = synthetic.training_set([real], [fake], out)
    assert items == [real, fake]
    assert not mask_fn(real).any() and mask_fn(fake).all()
