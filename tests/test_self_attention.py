"""Self-attention refinement of step 1 (an option, off by default): the propagation A^k x on
hand-built affinities, its axis, the resampling between the latent grid and the
self-attention grid, the capture in the same UNet passes (transparent, restored, equal to
a softmax computed here by hand), the dataset step's outputs and run config, and the
evaluation row. Expected values are written out by hand or computed here without
fgbg.attention."""
import json

import numpy as np
import pytest
import torch

from fgbg import attention as A
from fgbg import evaluate, masks, params
from fgbg.attention import (
    AttentionStore,
    CrossAttentionCapture,
    SelfAttentionCapture,
    capture_cross_attention,
    compute_attention_maps,
    propagate,
    refine_with_self_attention,
)
from fgbg.data import load_dataset

PROMPT = "a photo of a bird"


# --------------------------------------------------------------------------- 1. propagation, by hand
def test_propagate_a_permutation_k_times():
    perm = [2, 0, 3, 1]  # query i attends only to key perm[i]: one cycle 0 -> 2 -> 3 -> 1 -> 0
    a = torch.zeros(4, 4)
    a[range(4), perm] = 1.0
    x = torch.tensor([10.0, 20.0, 30.0, 40.0])
    assert propagate(a, x, 0).tolist() == [10, 20, 30, 40]
    assert propagate(a, x, 1).tolist() == [30, 10, 40, 20]  # x[perm]
    assert propagate(a, x, 2).tolist() == [40, 30, 20, 10]  # x[perm[perm]]
    assert propagate(a, x, 3).tolist() == [20, 40, 10, 30]
    assert propagate(a, x, 4).tolist() == [10, 20, 30, 40]  # a 4-cycle: back where it started
    with pytest.raises(ValueError, match=">= 0"):
        propagate(a, x, -1)


def test_propagate_axis_rows_are_queries():
    """(A x)[i] = sum_j A[i, j] x[j]: row i (query i) sums to 1 over the keys j."""
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0],
                      [0.0, 1.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 1.0],
                      [0.25, 0.25, 0.25, 0.25]])
    x = torch.tensor([4.0, 8.0, 12.0, 16.0])
    np.testing.assert_allclose(propagate(a, x, 1), [6, 8, 16, 10])
    np.testing.assert_allclose(propagate(a, x, 2), [7, 8, 10, 10])  # A applied to [6, 8, 16, 10]
    # the other axis (keys spreading their value, x @ A) would give [6, 14, 4, 16]
    assert not np.allclose(propagate(a, x, 1), [6, 14, 4, 16])
    # leading batch axes: each vector on its own; a constant stays constant (rows sum to 1)
    xs = torch.stack([x, torch.full((4,), 3.0)])
    np.testing.assert_allclose(propagate(a, xs, 1), [[6, 8, 16, 10], [3, 3, 3, 3]])


def test_refine_area_down_propagate_nearest_up():
    m = torch.arange(16.0).reshape(4, 4)  # 4x4 latent grid, self-attention on 2x2 (N = 4)
    swap = torch.tensor([[0.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])  # cells 0 <-> 3
    # 2x2 block means, row-major cells: {0,1,4,5} 2.5, {2,3,6,7} 4.5, {8,9,12,13} 10.5, {10,11,14,15} 12.5
    want = np.array([[12.5, 12.5, 4.5, 4.5], [12.5, 12.5, 4.5, 4.5],
                     [10.5, 10.5, 2.5, 2.5], [10.5, 10.5, 2.5, 2.5]])
    np.testing.assert_allclose(refine_with_self_attention(m, swap, 1, match_range=False), want)
    # k = 0 is the identity (no resampling either)
    assert torch.equal(refine_with_self_attention(m, swap, 0), m)
    with pytest.raises(ValueError, match="does not tile"):
        refine_with_self_attention(m, torch.eye(9), 1)


def test_refine_equals_the_block_expanded_affinity_at_the_latent_grid():
    """Documented equivalence: down-propagate-up == A_hi^k at the latent grid, where latent
    position p has its cell's attention row, shared equally by the 4 positions of a key cell."""
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(4, 4, generator=g) * 2, -1).double()
    m = torch.rand(4, 4, generator=g).double()

    def cell(p):  # row-major latent position on 4x4 -> row-major cell on 2x2
        return (p // 4 // 2) * 2 + (p % 4) // 2
    a_hi = np.array([[a[cell(p), cell(q)].item() / 4 for q in range(16)] for p in range(16)])
    np.testing.assert_allclose(a_hi.sum(1), np.ones(16))
    for k in (1, 2, 3):
        want = (np.linalg.matrix_power(a_hi, k) @ m.numpy().ravel()).reshape(4, 4)
        np.testing.assert_allclose(refine_with_self_attention(m, a, k, match_range=False).numpy(), want,
                                   rtol=1e-12)


def test_match_range_rescales_to_the_input_range_and_keeps_the_order():
    g = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(16, 16, generator=g), -1)
    m = torch.rand(2, 4, 4, generator=g)  # two maps at once, each rescaled on its own
    plain = refine_with_self_attention(m, a, 2, match_range=False)
    out = refine_with_self_attention(m, a, 2)
    for i in range(2):
        assert out[i].min().item() == pytest.approx(m[i].min().item(), abs=1e-6)
        assert out[i].max().item() == pytest.approx(m[i].max().item(), abs=1e-6)
        assert torch.equal(out[i].flatten().argsort(), plain[i].flatten().argsort())
        lo, hi = plain[i].min(), plain[i].max()  # affine: hand formula
        np.testing.assert_allclose(out[i], m[i].min() + (plain[i] - lo) * (m[i].max() - m[i].min()) / (hi - lo),
                                   rtol=1e-5)
    uniform = torch.full((16, 16), 1 / 16)  # every position attends to all alike: a constant
    np.testing.assert_allclose(refine_with_self_attention(m[0], uniform, 1), torch.full((4, 4), m[0].mean()),
                               rtol=1e-6)


# --------------------------------------------------------------------------- 2. the store
def test_store_add_self_routing_and_level_rows():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 4, 4, generator=g), -1)
    q = torch.softmax(torch.randn(3, 4, 4, generator=g), -1)
    store = AttentionStore(2, 1, [4, 2], 3, (4, 4), self_resolution=2)  # 2x2 self grid: N = 4
    assert store.self_sums.shape == (2, 4, 4) and store.self_grid == (2, 2)
    # rows -> images 1, 0, 1; the last row is of a level that does not count
    store.route(torch.tensor([1, 0, 1]), torch.zeros(3, dtype=torch.long), torch.tensor([True, True, False]))
    store.add_self("a.attn1.processor", p)
    store.add_self("b.attn1.processor", q)
    np.testing.assert_allclose(store.self_sums[0], p[1] + q[1], rtol=1e-6)
    np.testing.assert_allclose(store.self_sums[1], p[0] + q[0], rtol=1e-6)
    assert store.self_counts.tolist() == [2.0, 2.0]
    assert store.sums.abs().sum() == 0  # cross-attention sums untouched
    with pytest.raises(ValueError, match="expected 4x4"):
        store.add_self("c", torch.full((3, 16, 16), 1 / 16))
    with pytest.raises(ValueError, match="captures no self-attention"):
        AttentionStore(1, 1, [4], 3, (4, 4)).add_self("d", p[:1])
    with pytest.raises(ValueError, match="does not tile"):
        AttentionStore(1, 1, [4], 3, (4, 4), self_resolution=3)


# --------------------------------------------------------------------------- 3. capture in the UNet
def test_capture_is_transparent_and_restored(pipe):
    unet = pipe.unet
    res = A._layer_resolutions(unet, 16, "attn1")
    at16 = {k for k, r in res.items() if r == 16}
    assert len(at16) == 3 and len(res) == 7  # tiny UNet: down0 + 2 x up2 at 16x16
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([781, 401, 1])
    ehs = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=ehs).sample
        store = AttentionStore(3, 1, [16, 8, 4], 77, (16, 16), self_resolution=16)
        store.route(torch.arange(3), torch.zeros(3, dtype=torch.long))
        with capture_cross_attention(unet, store):
            inside = dict(unet.attn_processors)
            out = unet(z, t, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for k, v in inside.items():
        if k in at16:
            assert type(v) is SelfAttentionCapture
        elif k.endswith("attn2.processor"):
            assert type(v) is CrossAttentionCapture
        else:
            assert v is before[k]  # the other self-attention layers keep diffusers' processor
    assert store.self_counts.tolist() == [3.0, 3.0, 3.0]  # one row per image, 3 layers
    np.testing.assert_allclose((store.self_sums / 3).sum(-1), np.ones((3, 256)), atol=1e-5)  # rows: queries
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    with pytest.raises(RuntimeError, match="boom"):
        with capture_cross_attention(unet, AttentionStore(1, 1, [16, 8, 4], 77, (16, 16), self_resolution=8)):
            assert sum(isinstance(p, SelfAttentionCapture) for p in unet.attn_processors.values()) == 3
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="no self-attention layer at resolution 2"):
        with capture_cross_attention(unet, AttentionStore(1, 1, [16, 8, 4], 77, (16, 16), self_resolution=2)):
            pass
    assert all(unet.attn_processors[k] is before[k] for k in before)


def _hand_self_probs(attn, hs):
    """softmax(q k^T / sqrt(d)) of a self-attention layer per head, averaged over heads."""
    q, k = attn.to_q(hs), attn.to_k(hs)
    b, n, inner = q.shape
    h = attn.heads
    d = inner // h
    q = q.view(b, n, h, d).transpose(1, 2).double()
    k = k.view(b, n, h, d).transpose(1, 2).double()
    return torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1).mean(1)


def test_captured_self_attention_by_hand(pipe):
    """2 images x 3 levels, the last 2 levels counted, UNet batches of 4 (rows cross images)."""
    unet = pipe.unet
    g = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    at16 = [n[:-len(".processor")] for n, r in A._layer_resolutions(unet, 16, "attn1").items() if r == 16]
    mods = dict(unet.named_modules())
    calls = []
    handles = [mods[n].register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(_hand_self_probs(mod, args[0] if args else kwargs["hidden_states"])),
        with_kwargs=True) for n in at16]
    try:
        maps = compute_attention_maps(pipe, images, PROMPT, rev_diff_steps=3, unet_batch=4,
                                      generator=torch.Generator().manual_seed(7), self_attention_resolution=16,
                                      self_attention_levels=2)
    finally:
        for h in handles:
            h.remove()
    plain = compute_attention_maps(pipe, images, PROMPT, rev_diff_steps=3, unet_batch=4,
                                   generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(maps.sums, plain.sums, atol=1e-5, rtol=1e-5)  # cross-attention unchanged
    rows = [(i, lvl) for i in range(2) for lvl in range(3)]  # flattened samples: image-major, then level
    want, count = np.zeros((2, 256, 256)), np.zeros(2)
    for batch in (rows[0:4], rows[4:6]):
        for _ in at16:  # each layer of this UNet pass
            p = calls.pop(0).numpy()
            assert p.shape == (len(batch), 256, 256)
            for r, (i, lvl) in enumerate(batch):
                if lvl >= 1:  # the last 2 of 3 levels
                    want[i] += p[r]
                    count[i] += 1
    assert not calls
    assert maps.self_counts.tolist() == count.tolist() == [6.0, 6.0]  # 2 levels x 3 layers
    assert maps.self_resolution == 16
    np.testing.assert_allclose(maps.self_attention().numpy(), want / count[:, None, None], atol=1e-6)
    a = maps.self_attention()
    np.testing.assert_allclose(a.sum(-1), np.ones((2, 256)), atol=1e-6)  # rows (queries) sum to 1
    assert not np.allclose(a.sum(-2), 1, atol=1e-3)  # columns do not
    assert plain.self_sums is None
    with pytest.raises(ValueError, match="no self-attention was captured"):
        plain.self_attention()


def test_choose_resolution(pipe, monkeypatch):
    unet = pipe.unet
    assert A.self_attention_resolutions(unet, 16) == [16, 8, 4]
    assert A.choose_self_attention_resolution(unet, 16) == 8  # the largest below the latent grid (16)
    assert A.choose_self_attention_resolution(unet, 16, 16) == 16  # asked for
    assert A.choose_self_attention_resolution(unet, 16, 4) == 4
    with pytest.raises(ValueError, match=r"\[16, 8, 4\].*not at 5"):
        A.choose_self_attention_resolution(unet, 16, 5)
    monkeypatch.setattr(A, "SELF_ATTENTION_MAX_AUTO", 4)  # as SD's 64x64 layers are to the default 32
    assert A.choose_self_attention_resolution(unet, 16) == 4  # never above the cap unless asked
    with pytest.warns(UserWarning, match=r"8x8: N = 64 positions, a running sum of 0 MB"):
        assert A.choose_self_attention_resolution(unet, 16, 8) == 8
    monkeypatch.setattr(A, "SELF_ATTENTION_MAX_AUTO", 16)
    assert A.choose_self_attention_resolution(unet, 8) == 4  # latent 8: below it
    assert A.choose_self_attention_resolution(unet, 4) == 2
    monkeypatch.setattr(A, "SELF_ATTENTION_MAX_AUTO", 2)
    with pytest.raises(ValueError, match="set self_attention_resolution explicitly"):
        A.choose_self_attention_resolution(unet, 16)


# --------------------------------------------------------------------------- 4. the dataset step
def _run(pipe, ds, out, **kw):
    return A.save_attention_maps(pipe, ds, out, rev_diff_steps=3, num_inference_steps=50, seed=0, progress=False,
                                 **kw)


def test_save_attention_maps_with_self_attention(pipe, mini_dataset, tmp_path):
    from fgbg.data import load_item
    from fgbg.runs import RunConfigError, read_run_config
    ds = load_dataset(mini_dataset, splits=["test"])
    items = ds.items[:2]
    out = tmp_path / "out"
    _run(pipe, items, out)
    _run(pipe, items, out, subdir="sa", self_attention_k=2)
    plain_cfg, sa_cfg = read_run_config(out / "attention"), read_run_config(out / "sa")
    assert "self_attention_k" not in plain_cfg  # off: the reference's config, as before
    assert sa_cfg["self_attention_k"] == 2 and sa_cfg["self_attention_resolution"] == 8  # automatic
    assert {k: v for k, v in sa_cfg.items() if not k.startswith("self_attention")} == plain_cfg
    for it in items:
        raw, pl = A.load_attention(out, it, "sa", word="raw")
        ref, _ = A.load_attention(out, it, "sa")
        base, _ = A.load_attention(out, it)
        np.testing.assert_allclose(raw, base, atol=1e-6)  # the raw map is step 1's, capture or not
        with np.load(A.attention_path(out, it, "sa")) as z:
            assert int(z["self_attention_k"]) == 2 and int(z["self_attention_resolution"]) == 8
            assert set(z.files) >= {"map", "map_raw", "map_photo", "map_photo_raw"}
            photo, photo_raw = z["map_photo"], z["map_photo_raw"]
        # the refined maps: the image's own A_self (same noise: seed_for) applied twice
        x, _, _ = load_item(it, canvas=64, mode="pad")
        maps = compute_attention_maps(pipe, x[None], PROMPT, rev_diff_steps=3,
                                      generator=torch.Generator().manual_seed(A.seed_for(0, it.key)),
                                      self_attention_resolution=8)
        a = maps.self_attention()[0]
        assert a.shape == (64, 64)
        np.testing.assert_allclose(ref, refine_with_self_attention(torch.tensor(raw), a, 2).numpy(), atol=1e-6)
        np.testing.assert_allclose(photo, refine_with_self_attention(torch.tensor(photo_raw), a, 2).numpy(),
                                   atol=1e-6)
        assert np.abs(ref - raw).max() > 1e-4
    with pytest.raises(RunConfigError, match="self_attention_k"):
        _run(pipe, items, out, subdir="sa", self_attention_k=1)
    with pytest.raises(RunConfigError, match="self_attention"):
        _run(pipe, items, out, self_attention_k=1)  # maps of another setting are never reused
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="self_attention_k"):
            _run(pipe, items, tmp_path / "bad", self_attention_k=bad)


# --------------------------------------------------------------------------- 5. evaluation row
def _copy_maps(out, items, subdir, transform, k=3):
    for it in items:
        with np.load(A.attention_path(out, it)) as z:
            arrays = dict(z)
        arrays["map"] = transform(arrays["map"])
        arrays.update(self_attention_k=np.array(k), self_attention_resolution=np.array(16))
        path = A.attention_path(out, it, subdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)


def test_evaluation_row_of_a_self_attention_folder(pipe, mini_dataset, tmp_path):
    """Hand-made self-attention folders: a copy of the raw maps scores exactly as step 1;
    the negated maps give 1 - AUC."""
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _run(pipe, ds, out)
    masks.preliminary_masks(ds, out, progress=False)
    _copy_maps(out, ds.items, "same", lambda m: m)
    _copy_maps(out, ds.items, "neg", lambda m: -m)
    m, _ = evaluate.evaluate_steps12(ds.items, out, None, self_attention_subdir="same")
    sa = m["self_attention"]
    assert (sa["k"], sa["resolution"], sa["n_images"]) == (3, 16, m["n_images"])
    assert sa["auc"] == m["step1_auc"] and sa["iou"] == m["prelim"]["iou"]
    assert sa["bird_vs_distractor_auc"] == m["bird_vs_distractor_auc"]
    n, _ = evaluate.evaluate_steps12(ds.items, out, None, self_attention_subdir="neg")
    assert n["self_attention"]["auc"] == pytest.approx(1 - m["step1_auc"], abs=1.5e-4)
    assert n["self_attention"]["bird_vs_distractor_auc"] == pytest.approx(1 - m["bird_vs_distractor_auc"], abs=1.5e-4)
    assert "self_attention" not in evaluate.evaluate_steps12(ds.items, out, None, self_attention_subdir="none")[0]
    # maps of two settings in one folder are refused
    _copy_maps(out, ds.items[:1], "same", lambda m: m, k=2)
    with pytest.raises(ValueError, match="several self-attention settings"):
        evaluate.evaluate_steps12(ds.items, out, None, self_attention_subdir="same")


def test_recorded_row_and_table(pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["test"])
    out = tmp_path / "out"
    _run(pipe, ds, out)
    masks.preliminary_masks(ds, out, progress=False)
    _copy_maps(out, ds.items, A.SELF_ATTENTION_SUBDIR, lambda m: m)
    res, _ = evaluate.evaluate_and_record_steps12(ds.items, out)  # the default folder is picked up
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["self_attention"]["k"] == 3 and "self_attention" in saved["distractor"]
    assert "attention_self_attn" in saved["made_from"]["self_attention"]
    table = evaluate.steps12_table(res)
    assert table.splitlines()[2].startswith("attn + self-attn (k=3)")
    hand = {"step1_auc": 0.9, "prelim": {"iou": 0.4}, "baselines": {"centre": {"auc": 0.5, "iou": 0.1},
                                                                     "saliency": {"auc": 0.6, "iou": 0.2}},
            "self_attention": {"k": 2, "auc": 0.912, "iou": 0.456, "bird_vs_distractor_auc": 0.7}}
    assert evaluate.steps12_table(hand).splitlines()[2] == "attn + self-attn (k=2)     0.91   0.46       0.70"


def test_parameters():
    assert params.SCHEMA["self_attention_k"].default == 0
    assert params.SCHEMA["self_attention_resolution"].default is None
    assert params.check({"self_attention_k": 4, "self_attention_resolution": 32})["self_attention_k"] == 4
    for name, bad in (("self_attention_k", -1), ("self_attention_resolution", 0)):
        with pytest.raises(params.ParameterError, match=rf"parameter '{name}' must be >= "):
            params.check({name: bad}, source="x.yaml")
    with pytest.raises(params.ParameterError, match="must be int"):
        params.check({"self_attention_k": "2"})
