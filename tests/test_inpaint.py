"""Step 4: latent blending, D, refined masks, the M_crop baseline, the dataset run, fg-vs-bg sampling."""
import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from fgbg import inpaint
from fgbg.attention import encode_images, seed_for
from fgbg.data import Placement, load_dataset, load_item, place_mask, read_image, read_mask
from fgbg.io import save_png
from conftest import declare_m_pre_run
from fgbg.masks import fill_and_close, prelim_mask_path

STEPS = 3


def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 3, 64, 64), generator=g) * 2 - 1
    m = torch.zeros((n, 1, 16, 16))
    m[:, :, 4:11, 3:9] = 1
    return x, m


# --------------------------------------------------------------------------- blending
def test_blend_known_by_hand():
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    t = 500
    abar = float(sched.alphas_cumprod[t])
    z, z0, noise = torch.full((1, 1, 1, 2), 1.0), torch.full((1, 1, 1, 2), 2.0), torch.full((1, 1, 1, 2), 3.0)
    mask = torch.tensor([[[[1.0, 0.0]]]])
    out = inpaint.blend_known(z, z0, mask, t, sched, noise)
    expected = torch.tensor([[[[1.0, 2 * abar ** 0.5 + 3 * (1 - abar) ** 0.5]]]])
    torch.testing.assert_close(out, expected)


def test_known_region_is_the_renoised_original_before_every_step(tiny_pipe, monkeypatch):
    x, m = _batch(1)
    unet_in, blends = [], []
    real_blend, real_forward = inpaint.blend_known, tiny_pipe.unet.forward

    def blend(z, z0, mask, t, scheduler, noise):
        blends.append((z.clone(), noise.clone()))
        return real_blend(z, z0, mask, t, scheduler, noise)

    def forward(sample, timestep, *a, **kw):
        unet_in.append((sample.clone(), int(timestep)))
        return real_forward(sample, timestep, *a, **kw)

    monkeypatch.setattr(inpaint, "blend_known", blend)
    monkeypatch.setattr(tiny_pipe.unet, "forward", forward)
    inpaint.inpaint_background(tiny_pipe, x, m, num_inference_steps=STEPS,
                               generators=[torch.Generator().manual_seed(7)])
    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    assert [t for _, t in unet_in] == [int(t) for t in sched.timesteps] and len(blends) == STEPS
    z0 = encode_images(tiny_pipe, x)
    g = torch.Generator().manual_seed(7)  # documented order: initial noise, then one draw per step
    draws = [torch.randn((4, 16, 16), generator=g) for _ in range(STEPS + 1)]
    torch.testing.assert_close(blends[0][0][0], draws[0])  # starts from pure noise
    for i, ((z_in, t), (z_before, noise)) in enumerate(zip(unet_in, blends)):
        torch.testing.assert_close(noise[0], draws[i + 1])  # fresh noise every step
        abar = float(sched.alphas_cumprod[t])
        q = abar ** 0.5 * z0 + (1 - abar) ** 0.5 * noise
        torch.testing.assert_close(z_in * (1 - m), q * (1 - m), rtol=0, atol=1e-6)
        torch.testing.assert_close(z_in * m, z_before * m, rtol=0, atol=0)  # M_pre: the trajectory's own latent
        assert not torch.allclose(z_in * (1 - m), z_before * (1 - m))


def test_inpainting_is_deterministic_and_batch_independent(tiny_pipe):
    x, m = _batch(2)
    m[1, :, 2:6, 10:15] = 1  # the two masks differ

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = inpaint.inpaint_background(tiny_pipe, x, m, num_inference_steps=STEPS, generators=gens(10, 11))
    alone = inpaint.inpaint_background(tiny_pipe, x[1:], m[1:], num_inference_steps=STEPS, generators=gens(11))
    again = inpaint.inpaint_background(tiny_pipe, x[1:], m[1:], num_inference_steps=STEPS, generators=gens(11))
    other = inpaint.inpaint_background(tiny_pipe, x[1:], m[1:], num_inference_steps=STEPS, generators=gens(12))
    assert both.shape == (2, 3, 64, 64) and both.dtype == torch.float32
    torch.testing.assert_close(alone, again, rtol=0, atol=0)
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-4)
    assert (other - alone).abs().max() > 1e-2
    lat = inpaint.inpaint_background(tiny_pipe, x[1:], m[1:], num_inference_steps=STEPS, generators=gens(11),
                                     return_latents=True)
    assert lat.shape == (1, 4, 16, 16)
    cfg = inpaint.inpaint_background(tiny_pipe, x[1:], m[1:], num_inference_steps=STEPS, guidance_scale=3.0,
                                     generators=gens(11))
    assert (cfg - alone).abs().max() > 1e-3
    with pytest.raises(ValueError, match="latent grid"):
        inpaint.inpaint_background(tiny_pipe, x, torch.zeros(2, 1, 8, 8), num_inference_steps=STEPS)


# --------------------------------------------------------------------------- D and M
def test_difference_image_by_hand():
    a = np.array([[[10, 20, 30], [0, 0, 0]]], np.uint8)
    b = np.array([[[13, 20, 24], [255, 0, 0]]], np.uint8)
    d = inpaint.difference_image(a, b)
    assert d.dtype == np.float32 and d.shape == (1, 2)
    np.testing.assert_allclose(d, [[3.0, 85.0]])
    x = torch.zeros(3, 1, 1)
    y = torch.tensor([0.5, -0.5, 1.0]).view(3, 1, 1)
    np.testing.assert_allclose(inpaint.difference_image(x, y), [[2 / 3]], rtol=1e-6)
    with pytest.raises(ValueError):
        inpaint.difference_image(a, torch.zeros(3, 1, 2))


def test_refined_mask_by_hand():
    diff = np.zeros((8, 8))
    diff[1:5, 1:5] = 10.0  # a 4x4 block of change: GMM midpoint 5
    m_pre = np.zeros((8, 8), bool)
    m_pre[:, :4] = True  # M_pre: the left half
    expected = np.zeros((8, 8), bool)
    expected[1:5, 1:4] = True  # the block inside M_pre ...
    expected[1, 1] = expected[4, 1] = False  # ... less the block's corners (4 of 9 votes)
    np.testing.assert_array_equal(inpaint.refine_mask(m_pre, diff), expected)


def test_refined_mask_close_and_fill():
    diff = np.zeros((12, 12))
    diff[1:10, 1:10] = 10.0
    diff[4:7, 4:7] = 0.0  # a 3x3 hole: the vote rounds its corners, leaves a plus-shaped hole
    m_pre = np.ones((12, 12), bool)
    plain = inpaint.refine_mask(m_pre, diff)
    closed = inpaint.refine_mask(m_pre, diff, close_and_fill=True)
    assert not plain[5, 5] and closed[5, 5]
    np.testing.assert_array_equal(closed, fill_and_close(plain))


def test_refined_mask_is_a_subset_of_m_pre():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m_pre = rng.random((20, 24)) < rng.random()
        diff = rng.gamma(rng.uniform(0.2, 3), size=(20, 24)) * rng.uniform(1, 100)
        m = inpaint.refine_mask(m_pre, diff, seed=int(rng.integers(10)))
        assert m.dtype == bool and m.shape == m_pre.shape and not (m & ~m_pre).any()


def test_upsampled_m_pre_by_hand():
    # 4x4 latent grid over a 16x16 canvas (cells of 4 pixels), a 16x16 image pasted unscaled
    pl = Placement(canvas=16, scale=1.0, height=16, width=16, placed_h=16, placed_w=16, mode="pad")
    m_lat = np.zeros((4, 4), bool)
    m_lat[1, 1] = True
    block = np.zeros((16, 16), bool)
    block[4:8, 4:8] = True
    np.testing.assert_array_equal(inpaint.upsampled_m_pre(m_lat, pl, "nearest"), block)
    # bilinear between cell centres (pixels 1.5, 5.5, 9.5, 13.5): the weight of cell 1 is
    # positive from pixel 2 to pixel 9, i.e. the block dilated by 2 pixels = half a cell
    dilated = np.zeros((16, 16), bool)
    dilated[2:10, 2:10] = True
    np.testing.assert_array_equal(inpaint.upsampled_m_pre(m_lat, pl), dilated)
    # a foreground cell at the image border is not dilated into the (absent) outside
    m_lat[:] = False
    m_lat[0, 3] = True
    got = inpaint.upsampled_m_pre(m_lat, pl)
    assert got[:6, 10:].all() and got.sum() == 6 * 6
    with pytest.raises(ValueError, match="m_pre_upsampling"):
        inpaint.upsampled_m_pre(m_lat, pl, "bicubic")


# --------------------------------------------------------------------------- M_crop
def test_crop_baseline_mirrors_the_largest_side_by_hand():
    img = np.zeros((4, 7, 3), np.uint8)
    img[..., 0] = np.arange(7) * 10  # red = 10 x column
    img[..., 1] = np.arange(4)[:, None]  # green = row
    m = np.zeros((4, 7), bool)
    m[1, 4] = m[2, 5] = True  # box rows 1-2, columns 4-5; left strip 4x2 is the largest
    out = inpaint.crop_baseline(img, m)
    expected = img.copy()
    expected[1:3, 4] = img[1:3, 3]  # mirrored across the box's left edge
    expected[1:3, 5] = img[1:3, 2]
    np.testing.assert_array_equal(out, expected)
    assert out is not img and img[1, 4, 0] == 40  # the input is untouched


def test_crop_baseline_repeats_the_reflection_when_the_strip_is_thin():
    img = np.zeros((3, 8, 3), np.uint8)
    img[..., 2] = np.arange(8)
    m = np.zeros((3, 8), bool)
    m[:, 2:] = True  # full height, only a 2-column strip on the left
    out = inpaint.crop_baseline(img, m)
    np.testing.assert_array_equal(out[0, :, 2], [0, 1, 1, 0, 0, 1, 1, 0])


def test_crop_baseline_other_sides_and_degenerate_cases():
    img = (np.arange(25).reshape(5, 5, 1) * np.ones((1, 1, 3))).astype(np.uint8)
    m = np.zeros((5, 5), bool)
    m[0:2, 0:2] = True  # right and below tie (3x2 each): right wins
    out = inpaint.crop_baseline(img, m)
    expected = img.copy()
    expected[0:2, 1], expected[0:2, 0] = img[0:2, 2], img[0:2, 3]
    np.testing.assert_array_equal(out, expected)
    m = np.zeros((5, 5), bool)
    m[3, :] = True  # full width: only above (3 rows) and below (1 row)
    out = inpaint.crop_baseline(img, m)
    expected = img.copy()
    expected[3] = img[2]
    np.testing.assert_array_equal(out, expected)
    m[0, 2] = True  # box rows 0-3, full width: below (1 row) is the only room
    out = inpaint.crop_baseline(img, m)
    np.testing.assert_array_equal(out[:4], img[[4, 4, 4, 4]])
    np.testing.assert_array_equal(inpaint.crop_baseline(img, np.zeros((5, 5), bool)), img)
    np.testing.assert_array_equal(inpaint.crop_baseline(img, np.ones((5, 5), bool)), img)


# --------------------------------------------------------------------------- dataset run
def _add_image(base, name, shape, rng):
    rel = f"images/test/{name}.png"
    save_png(base / rel, rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    with open(base / "images.txt", "a") as f:
        f.write(f"{rel} 0\n")


def _run(pipe, ds, out, **kw):
    kw = {"batch_size": 3, **kw}
    return inpaint.inpaint_and_refine(pipe, ds, out, num_inference_steps=STEPS, progress=False, **kw)


def test_dataset_run(tiny_pipe, mini_dataset, tmp_path):
    rng = np.random.default_rng(0)
    _add_image(mini_dataset, "small", (40, 56), rng)  # pasted unscaled: cropped back
    _add_image(mini_dataset, "large", (100, 80), rng)  # scaled down: mapped back bilinearly
    ds = load_dataset(mini_dataset, splits=["train", "val", "test"])
    by = {it.key.split("/")[-1]: it for it in ds}
    out = tmp_path / "out"
    for name, it in by.items():
        shape = read_image(it.image_path).shape[:2]
        if name == "train_0001":
            continue  # no M_pre
        if name == "val_0000":
            m = np.zeros((32, 32), bool)  # the image "changed" since step 2
        elif name == "test_0000":
            m = np.zeros(shape, bool)
        elif name == "test_0001":
            m = np.ones(shape, bool)
        elif it.gt_path is not None:
            m = read_mask(it.gt_path)
        else:
            m = np.zeros(shape, bool)
            m[shape[0] // 4:shape[0] * 3 // 4, shape[1] // 3:shape[1] * 2 // 3] = True
        save_png(prelim_mask_path(out, it), m.astype(np.uint8) * 255)
    declare_m_pre_run(out)

    rep = _run(tiny_pipe, ds, out)
    skipped = dict(rep.skipped)
    assert set(skipped) == {by["train_0001"].rel, by["val_0000"].rel}
    assert str(prelim_mask_path(out, by["train_0001"])) in skipped[by["train_0001"].rel]
    why = skipped[by["val_0000"].rel]
    assert str(by["val_0000"].image_path) in why and "64x64" in why and "32x32" in why
    assert (out / "skipped.txt").read_text().count("\n") == 2
    notes = dict(rep.notes)
    assert set(notes) == {by["test_0000"].rel, by["test_0001"].rel}
    assert "empty" in notes[by["test_0000"].rel] and "whole image" in notes[by["test_0001"].rel]
    assert len(rep.done) == len(ds) - 2 and "note" in str(rep)

    for name in ("train_0000", "test_0000", "test_0001", "test_0002", "small", "large"):
        it = by[name]
        img = read_image(it.image_path)
        m_pre = read_mask(prelim_mask_path(out, it))
        painted = read_image(inpaint.inpainted_path(out, it))
        d = np.load(inpaint.diff_path(out, it))
        d_png = np.asarray(Image.open(inpaint.diff_path(out, it, ".png")))
        m = read_mask(inpaint.refined_mask_path(out, it), img.shape)
        m_crop = read_mask(inpaint.crop_mask_path(out, it), img.shape)
        assert painted.shape == img.shape and d.shape == d_png.shape == img.shape[:2] and d.dtype == np.float16
        np.testing.assert_allclose(d, inpaint.difference_image(img, painted), atol=0.13)
        _, pl, _ = load_item(it, canvas=64)
        m_up = inpaint.upsampled_m_pre(place_mask(m_pre, pl, 16), pl)  # the default: the reference's bilinear
        assert not (m & ~m_up).any() and not (m_crop & ~m_up).any()
        np.testing.assert_array_equal(m_crop, inpaint.refine_mask(
            m_up, inpaint.difference_image(img, inpaint.crop_baseline(img, m_pre))))
    zero = by["test_0000"]
    np.testing.assert_array_equal(read_image(inpaint.inpainted_path(out, zero)), read_image(zero.image_path))
    assert not np.load(inpaint.diff_path(out, zero)).any() and not read_mask(inpaint.refined_mask_path(out, zero)).any()
    full = by["test_0001"]
    assert np.abs(read_image(inpaint.inpainted_path(out, full)).astype(int) - read_image(full.image_path)).mean() > 5

    # the unscaled image: its inpainted PNG is the top-left crop of the inpainted canvas
    small = by["small"]
    x, pl, _ = load_item(small, canvas=64)
    m_lat = torch.from_numpy(place_mask(read_mask(prelim_mask_path(out, small)), pl, 16)).float()[None, None]
    canvas = inpaint.inpaint_background(tiny_pipe, x[None], m_lat, num_inference_steps=STEPS,
                                        generators=[torch.Generator().manual_seed(seed_for(0, small.key))])
    expected = inpaint.to_uint8(canvas[0, :, :40, :56])
    assert np.abs(read_image(inpaint.inpainted_path(out, small)).astype(int) - expected).max() <= 1

    # rerun: everything reused, the two bad images fail again
    paths = [inpaint.inpainted_path(out, it) for it in ds if it.key in rep.done]
    before = [p.stat().st_mtime_ns for p in paths]
    rep2 = _run(tiny_pipe, ds, out)
    assert rep2.done == [] and sorted(rep2.reused) == sorted(rep.done) and len(rep2.skipped) == 2
    assert before == [p.stat().st_mtime_ns for p in paths]

    # another batch size and order give the same images (per-image generators)
    ds.items.reverse()
    rep3 = _run(tiny_pipe, ds, tmp_path / "out", batch_size=1, overwrite=True, crop=False)
    assert sorted(rep3.done) == sorted(rep.done)
    for p, t in zip(paths, before):
        assert p.stat().st_mtime_ns != t  # rewritten ...
    other = tmp_path / "other"
    for it in ds:
        if prelim_mask_path(out, it).exists():
            save_png(prelim_mask_path(other, it), np.asarray(Image.open(prelim_mask_path(out, it))))
    declare_m_pre_run(other)
    _run(tiny_pipe, ds, other, batch_size=2)
    for it in ds:
        if it.key in rep.done:  # ... and the same, whatever the batches
            a = read_image(inpaint.inpainted_path(out, it)).astype(int)
            b = read_image(inpaint.inpainted_path(other, it)).astype(int)
            assert np.abs(a - b).max() <= 1


def test_outputs_of_another_model_setting_or_m_pre_are_not_reused(tiny_pipe, mini_dataset, tmp_path):
    from fgbg.io import atomic_write_text
    from fgbg.masks import prelim_dir
    from fgbg.runs import RunConfigError
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    for it in ds:
        save_png(prelim_mask_path(out, it), read_mask(it.gt_path).astype(np.uint8) * 255)
    atomic_write_text(prelim_dir(out) / "run_config.json", '{"seed": 0}')
    first = _run(tiny_pipe, ds, out)
    assert len(first.done) == len(ds)
    assert len(_run(tiny_pipe, ds, out).reused) == len(ds)  # same settings: reused
    with pytest.raises(RunConfigError, match=r"seed: 0 then, 1 now"):
        _run(tiny_pipe, ds, out, seed=1)
    other = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        next(other.unet.parameters()).add_(1e-3)
    with pytest.raises(RunConfigError, match="model:"):
        _run(other, ds, out)
    # M_pre remade by another step-2 run: the inpainting of the old masks is stale
    atomic_write_text(prelim_dir(out) / "run_config.json", '{"seed": 1}')
    with pytest.raises(RunConfigError, match="m_pre:"):
        _run(tiny_pipe, ds, out)
    assert len(_run(tiny_pipe, ds, out, overwrite=True).done) == len(ds)  # overwrite recomputes and records


# --------------------------------------------------------------------------- fg-vs-bg sampling
def test_sample_fg_bg_scale_one_is_conditional_sampling(tiny_pipe):
    fg, bg = "a photo of a bird", "a photo of a background"

    def plain(prompt):  # diffusers' own DDIM loop, conditional only; float in [0, 1]
        return tiny_pipe(prompt, num_inference_steps=STEPS, guidance_scale=1.0, num_images_per_prompt=2,
                         output_type="np", generator=torch.Generator().manual_seed(5)).images

    ours = inpaint.sample_fg_bg(tiny_pipe, fg, bg, scale=1.0, n=2, num_inference_steps=STEPS, seed=5)
    assert ours.dtype == np.uint8 and ours.shape == (2, 64, 64, 3)
    assert np.abs(ours / 255.0 - plain(fg)).max() <= 0.5 / 255 + 1e-6  # equal up to the rounding to uint8
    zero = inpaint.sample_fg_bg(tiny_pipe, fg, bg, scale=0.0, n=2, num_inference_steps=STEPS, seed=5)
    assert np.abs(zero / 255.0 - plain(bg)).max() <= 0.5 / 255 + 1e-6  # scale 0: the background prompt alone
    # the random tiny text encoder barely separates the prompts: a large scale makes it visible
    steered = inpaint.sample_fg_bg(tiny_pipe, fg, bg, scale=20.0, n=2, num_inference_steps=STEPS, seed=5)
    assert np.abs(steered.astype(int) - ours).mean() > 0.5
    one = inpaint.sample_fg_bg(tiny_pipe, fg, bg, scale=20.0, n=2, num_inference_steps=STEPS, seed=5, batch_size=1)
    assert np.abs(one.astype(int) - steered).max() <= 1
