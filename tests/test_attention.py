"""Step 1 (cross-attention capture) pinned on a tiny random-weight SD-architecture pipeline
and on hand-made tensors. Expected values are computed independently of fgbg.attention
(softmax by hand, block upsampling with np.kron, plain means over explicit per-map arrays)."""
from collections import defaultdict

import numpy as np
import pytest
import torch

from fgbg import attention as A
from fgbg.attention import (
    AttentionMaps,
    AttentionStore,
    CrossAttentionCapture,
    all_mean,
    all_token_mean,
    capture_cross_attention,
    compute_attention_maps,
    diffusion_steps_mean,
    extract,
    find_token_indices,
    multi_relevant_token_step_mean,
    noise_levels,
    relevant_token_step_mean,
)

PROMPT = "a photo of a bird"


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(123)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1  # tiny canvas: 64 px -> 16x16 latent


def attn2_modules(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2")}


def hand_probs(attn, hs, ehs):
    """softmax(q k^T / sqrt(d)) per head, averaged over heads: (batch, Nq, tokens)."""
    q, k = attn.to_q(hs), attn.to_k(ehs)
    b, nq, inner = q.shape
    h = attn.heads
    d = inner // h
    q = q.view(b, nq, h, d).transpose(1, 2).double()
    k = k.view(b, k.shape[1], h, d).transpose(1, 2).double()
    return torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1).mean(1)


class Recorder:
    """Forward pre-hooks on every attn2 module: records each call's hand-computed probabilities."""

    def __init__(self, unet):
        self.calls = []  # (layer name, probs)
        self.handles = [m.register_forward_pre_hook(self._hook(n), with_kwargs=True)
                        for n, m in attn2_modules(unet).items()]

    def _hook(self, name):
        def f(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            self.calls.append((name, hand_probs(mod, hs, ehs)))
        return f

    def remove(self):
        for h in self.handles:
            h.remove()


def layers_per_resolution(unet, latent):
    """Resolution (query grid side) of each attn2 layer, measured by a forward pass."""
    rec = Recorder(unet)
    try:
        with torch.no_grad():
            unet(torch.zeros(1, unet.config.in_channels, latent, latent), torch.tensor([1]),
                 encoder_hidden_states=torch.zeros(1, 77, unet.config.cross_attention_dim))
    finally:
        rec.remove()
    res = {name: int(round(p.shape[1] ** 0.5)) for name, p in rec.calls}
    per = defaultdict(int)
    for r in res.values():
        per[r] += 1
    return res, dict(per)


# --------------------------------------------------------------------------- 1. capture is transparent
def test_capture_does_not_change_unet_and_restores(pipe):
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([781, 401, 1])
    ehs = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=ehs).sample
        store = AttentionStore(3, 1, [16, 8, 4], 77, (16, 16))
        store.route(torch.arange(3), torch.zeros(3, dtype=torch.long))
        with capture_cross_attention(unet, store):
            inside = dict(unet.attn_processors)
            out = unet(z, t, encoder_hidden_states=ehs).sample
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert store.counts.sum() > 0  # something was actually captured
    for k, v in inside.items():
        if k.endswith("attn2.processor"):
            assert isinstance(v, CrossAttentionCapture)
        else:
            assert v is before[k]  # self-attention keeps its processor
    assert any(k.endswith("attn1.processor") for k in inside)
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)

    # restored also when the body raises
    with pytest.raises(RuntimeError, match="boom"):
        with capture_cross_attention(unet, AttentionStore(1, 1, [16, 8, 4], 77, (16, 16))):
            assert any(isinstance(p, CrossAttentionCapture) for p in unet.attn_processors.values())
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(type(after[k]) is type(before[k]) and after[k] is before[k] for k in before)
    assert not any(isinstance(p, CrossAttentionCapture) for p in after.values())


# --------------------------------------------------------------------------- 2. probabilities and counts
def test_captured_probabilities_and_counts(pipe, images, monkeypatch):
    recorded = []
    orig_add = AttentionStore.add

    def add(self, name, probs):
        recorded.append((name, probs.clone()))
        orig_add(self, name, probs)

    monkeypatch.setattr(AttentionStore, "add", add)
    rec = Recorder(pipe.unet)
    try:
        L = 3
        maps = compute_attention_maps(pipe, images[:1], PROMPT, rev_diff_steps=L, by_level=True,
                                      generator=torch.Generator().manual_seed(0))
    finally:
        rec.remove()
    # the captured probabilities are the head-averaged softmax, computed here by hand
    assert len(recorded) == len(rec.calls) > 0
    for (name, p), (mname, hp) in zip(recorded, rec.calls):
        assert name == mname + ".processor"
        torch.testing.assert_close(p.double(), hp, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5, rtol=0)

    # the mean map sums to 1 over tokens everywhere
    m = maps.mean()
    torch.testing.assert_close(m.sum(1), torch.ones(1, 16, 16), atol=1e-5, rtol=0)

    # counts = levels x layers per resolution; layers per resolution from the attn_processors names,
    # each layer's resolution measured from its query count
    names = [k[:-len(".processor")] for k in pipe.unet.attn_processors if k.endswith("attn2.processor")]
    res_of, per = layers_per_resolution(pipe.unet, 16)
    assert sorted(res_of) == sorted(names)
    assert per == {16: 3, 8: 3, 4: 1}  # tiny UNet: down0 + 2 x up2, down1 + 2 x up1, mid
    assert maps.resolutions == [16, 8, 4]
    expected = torch.tensor([[per[r] for r in maps.resolutions]] * L, dtype=torch.float32)
    torch.testing.assert_close(maps.counts, expected)
    assert maps.timesteps == [41, 21, 1]
    assert len(maps.tokens) == 77 and maps.tokens[5] == "bird</w>"

    # by_level=False: one group, counts summed over levels (with repeats)
    m2 = compute_attention_maps(pipe, images[:1], PROMPT, rev_diff_steps=2, num_repeat_each_diffusion_step=2,
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m2.counts, torch.tensor([[2.0 * 2 * per[r] for r in m2.resolutions]]))


def test_end_to_end_against_hand_reference(pipe, images):
    """Noisy latents, routing and accumulation rebuilt by hand for 2 images x 3 levels x 2 repeats."""
    B, L, N, seed = 2, 3, 2, 7
    unet = pipe.unet
    seen = []
    h_unet = unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].clone(), args[1].clone(),
                                               kwargs["encoder_hidden_states"].clone())), with_kwargs=True)
    rec = Recorder(unet)
    try:
        maps = compute_attention_maps(pipe, images, PROMPT, rev_diff_steps=L, num_repeat_each_diffusion_step=N,
                                      by_level=True, unet_batch=100, generator=torch.Generator().manual_seed(seed))
    finally:
        h_unet.remove()
        rec.remove()
    assert len(seen) == 1
    zt, t, ehs = seen[0]
    with torch.no_grad():
        z0 = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
    torch.testing.assert_close(ehs, cond.expand(B * L * N, -1, -1))
    ts = [41, 21, 1]
    rows = [(i, l) for i in range(B) for l in range(L) for _ in range(N)]  # image, level, repeat
    assert t.tolist() == [ts[l] for _, l in rows]
    eps = torch.randn((B * L * N, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    abar = pipe.scheduler.alphas_cumprod.double()
    for k, (i, l) in enumerate(rows):
        a = abar[ts[l]]
        want = a.sqrt() * z0[i].double() + (1 - a).sqrt() * eps[k].double()
        torch.testing.assert_close(zt[k].double(), want, atol=1e-5, rtol=1e-5)

    res_of, per = layers_per_resolution(unet, 16)
    R = [16, 8, 4]
    sums = np.zeros((B, L, len(R), 77, 16, 16))
    counts = np.zeros((L, len(R)))
    for name, p in rec.calls:
        s = res_of[name]
        r = R.index(s)
        f = 16 // s
        p = p.numpy()
        for k, (i, l) in enumerate(rows):
            for tok in range(77):
                sums[i, l, r, tok] += np.kron(p[k, :, tok].reshape(s, s), np.ones((f, f)))
            if i == 0:
                counts[l, r] += 1
    np.testing.assert_allclose(maps.sums.numpy(), sums, atol=1e-5)
    np.testing.assert_allclose(maps.counts.numpy(), counts)


# --------------------------------------------------------------------------- 3. AttentionStore.add
def test_store_add_block_upsampling_and_routing():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, 4, 3, generator=g), -1)  # 1 row, 4 queries (2x2), 3 tokens
    store = AttentionStore(1, 1, [4, 2], 3, (4, 4))
    store.route(torch.tensor([0]), torch.tensor([0]))
    store.add("x.attn2.processor", p)
    want = np.stack([np.kron(p[0, :, k].numpy().reshape(2, 2), np.ones((2, 2))) for k in range(3)])
    # the same by explicit block placement: query q = (row, col) in row-major order
    blocks = np.zeros((3, 4, 4))
    for q in range(4):
        i, j = divmod(q, 2)
        blocks[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = p[0, q].numpy()[:, None, None]
    np.testing.assert_allclose(want, blocks)
    np.testing.assert_allclose(store.sums[0, 0, 1].numpy(), want, rtol=1e-6)
    assert store.sums[0, 0, 0].abs().sum() == 0  # resolution 4 untouched
    assert store.counts.tolist() == [[0.0, 1.0]]
    assert store.layer_res == {"x.attn2.processor": 1}
    np.testing.assert_allclose(store.sums[0, 0, 1].sum(0).numpy(), np.ones((4, 4)), rtol=1e-6)

    # routing: 2 images x 3 groups; rows -> (image, group) = (1, 2), (0, 0), (1, 2), (0, 1)
    P = torch.softmax(torch.randn(4, 16, 3, generator=g), -1)  # full-resolution layer: no upsampling
    Q = torch.softmax(torch.randn(4, 4, 3, generator=g), -1)
    store = AttentionStore(2, 3, [4, 2], 3, (4, 4))
    img, grp = torch.tensor([1, 0, 1, 0]), torch.tensor([2, 0, 2, 1])
    store.route(img, grp)
    store.add("a", P)
    store.add("b", Q)
    want = np.zeros((2, 3, 2, 3, 4, 4))
    for row in range(4):
        i, gr = int(img[row]), int(grp[row])
        want[i, gr, 0] += P[row].numpy().T.reshape(3, 4, 4)
        for k in range(3):
            want[i, gr, 1, k] += np.kron(Q[row, :, k].numpy().reshape(2, 2), np.ones((2, 2)))
    np.testing.assert_allclose(store.sums.numpy(), want, rtol=1e-6, atol=1e-7)
    # counts per image: group 2 got 2 rows, groups 0 and 1 one each, over 2 images -> 1, 0.5, 0.5 ... per layer
    np.testing.assert_allclose(store.counts.numpy(), [[0.5, 0.5], [0.5, 0.5], [1.0, 1.0]])

    with pytest.raises(ValueError, match="tile"):
        store.add("c", torch.full((4, 5, 3), 1 / 3))
    with pytest.raises(ValueError, match="resolution 1"):
        store.add("d", torch.full((4, 1, 3), 1 / 3))


# --------------------------------------------------------------------------- 4. extractors
@pytest.fixture(scope="module")
def hand_maps():
    """Explicit per-(image, level, layer) maps of 4 tokens on a 2x2 grid; 3 levels;
    layers: 2 at resolution 2, 1 at resolution 1. Returns (AttentionMaps by level, the raw maps)."""
    rng = np.random.default_rng(0)
    n_img, n_lvl, T = 2, 3, 4
    layer_r = [0, 0, 1]  # resolution index of each layer
    raw = rng.random((n_img, n_lvl, len(layer_r), T, 2, 2))
    raw[:, :, 2] = raw[:, :, 2].mean(axis=(-1, -2), keepdims=True)  # the 1x1 layer is constant on the grid
    sums = np.zeros((n_img, n_lvl, 2, T, 2, 2))
    counts = np.zeros((n_lvl, 2))
    for layer, r in enumerate(layer_r):
        sums[:, :, r] += raw[:, :, layer]
        counts[:, r] += 1
    maps = AttentionMaps(torch.tensor(sums), torch.tensor(counts), [41, 21, 1], [2, 1],
                         [f"t{k}" for k in range(T)], True)
    return maps, raw


def test_extractors_by_hand(hand_maps):
    maps, raw = hand_maps
    last2 = raw[:, 1:].reshape(2, -1, 4, 2, 2).mean(1)  # plain mean over (level, layer) maps, last 2 levels
    every = raw.reshape(2, -1, 4, 2, 2).mean(1)
    np.testing.assert_allclose(relevant_token_step_mean(maps, 1, 2).numpy(), last2[:, 1])
    np.testing.assert_allclose(relevant_token_step_mean(maps, 1, 3).numpy(), every[:, 1])
    np.testing.assert_allclose(relevant_token_step_mean(maps, 1, 10).numpy(), every[:, 1])
    np.testing.assert_allclose(relevant_token_step_mean(maps, 2).numpy(), every[:, 2])
    np.testing.assert_allclose(relevant_token_step_mean(maps, 0, 1).numpy(), raw[:, 2].mean(1)[:, 0])
    np.testing.assert_allclose(multi_relevant_token_step_mean(maps, [1, 3], 2).numpy(),
                               last2[:, 1] + last2[:, 3])
    np.testing.assert_allclose(all_mean(maps, 2).numpy(), last2.mean(1))
    np.testing.assert_allclose(all_mean(maps).numpy(), every.mean(1))
    np.testing.assert_allclose(all_token_mean(maps, 2).numpy(), last2)
    assert all_token_mean(maps).shape == (2, 4, 2, 2)
    np.testing.assert_allclose(diffusion_steps_mean(maps, 3).numpy(), every[:, 3])
    # restricting resolutions: the 2 layers at resolution 2 only
    np.testing.assert_allclose(maps.mean(resolutions=[2]).numpy(), raw[:, :, :2].reshape(2, -1, 4, 2, 2).mean(1))
    with pytest.raises(ValueError):
        relevant_token_step_mean(maps, 1, 0)


def test_extractors_need_by_level(hand_maps):
    maps, raw = hand_maps
    flat = AttentionMaps(maps.sums.sum(1, keepdim=True), maps.counts.sum(0, keepdim=True), maps.timesteps,
                         maps.resolutions, maps.tokens, False)
    every = raw.reshape(2, -1, 4, 2, 2).mean(1)
    np.testing.assert_allclose(relevant_token_step_mean(flat, 1).numpy(), every[:, 1])
    np.testing.assert_allclose(relevant_token_step_mean(flat, 1, 3).numpy(), every[:, 1])
    np.testing.assert_allclose(diffusion_steps_mean(flat, 1).numpy(), every[:, 1])
    for f in (lambda: relevant_token_step_mean(flat, 1, 2), lambda: all_mean(flat, 1),
              lambda: multi_relevant_token_step_mean(flat, [0, 1], 2), lambda: all_token_mean(flat, 2),
              lambda: extract(flat, "relevant_token_step_mean", [1], 2)):
        with pytest.raises(ValueError, match="by_level"):
            f()


def test_extract_dispatch(hand_maps):
    maps, raw = hand_maps
    last2 = raw[:, 1:].reshape(2, -1, 4, 2, 2).mean(1)
    every = raw.reshape(2, -1, 4, 2, 2).mean(1)
    np.testing.assert_allclose(extract(maps, "relevant_token_step_mean", [2], 2).numpy(), last2[:, 2])
    # a word of several BPE tokens: the sum of the token maps
    np.testing.assert_allclose(extract(maps, "relevant_token_step_mean", [1, 2], 2).numpy(),
                               last2[:, 1] + last2[:, 2])
    np.testing.assert_allclose(extract(maps, "multi_relevant_token_step_mean", [0, 3]).numpy(),
                               every[:, 0] + every[:, 3])
    np.testing.assert_allclose(extract(maps, "all_mean", [1], 2).numpy(), last2.mean(1))
    np.testing.assert_allclose(extract(maps, "all_token_mean", [1]).numpy(), every)
    np.testing.assert_allclose(extract(maps, "diffusion_steps_mean", [3], 1).numpy(), every[:, 3])  # steps ignored
    with pytest.raises(ValueError, match="unknown extractor 'nope'"):
        extract(maps, "nope", [1])
    assert set(A.EXTRACTORS) == {"relevant_token_step_mean", "multi_relevant_token_step_mean", "all_mean",
                                 "all_token_mean", "diffusion_steps_mean"}


# --------------------------------------------------------------------------- 5. noise levels
def test_noise_levels(pipe):
    want = list(range(781, 0, -20))
    assert want[:2] == [781, 761] and want[-1] == 1 and len(want) == 40
    assert noise_levels(pipe.scheduler.config, 50, 40) == want
    assert noise_levels(pipe.scheduler.config, 50, 3) == [41, 21, 1]
    assert noise_levels(pipe.scheduler.config, 50, 50) == list(range(981, 0, -20))
    # SD v1.4's own scheduler (PNDM) config gives the same DDIM grid
    from diffusers import PNDMScheduler
    sd = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       skip_prk_steps=True, steps_offset=1)
    assert noise_levels(sd.config) == want
    for bad in (0, -1, 51):
        with pytest.raises(ValueError, match="rev_diff_steps"):
            noise_levels(pipe.scheduler.config, 50, bad)


# --------------------------------------------------------------------------- 6. tokens
def test_find_token_indices(pipe):
    tok = pipe.tokenizer
    assert find_token_indices(tok, "a photo of a bird", "bird") == [5]
    assert find_token_indices(tok, "a photo of a hummingbird", "hummingbird") == [5]  # one BPE token
    # "pileated" is 2 BPE tokens (pile, ated</w>), "axolotl" 4 (ax, o, lot, l</w>)
    assert len(tok("pileated", add_special_tokens=False).input_ids) == 2
    assert find_token_indices(tok, "a photo of a pileated woodpecker", "pileated") == [5, 6]
    assert find_token_indices(tok, "a photo of a pileated woodpecker", "woodpecker") == [7]
    assert find_token_indices(tok, "a photo of a axolotl", "axolotl") == [5, 6, 7, 8]
    ids = tok("a photo of a axolotl").input_ids
    assert tok.decode(ids[5:9]).strip() == "axolotl"
    assert find_token_indices(tok, "A Photo of a BIRD", "bird") == [5]  # CLIP lower-cases
    for prompt, word in (("a photo of a bird", "cat"), ("a photo of a birdhouse", "bird")):
        with pytest.raises(ValueError) as e:
            find_token_indices(tok, prompt, word)
        assert repr(word) in str(e.value) and repr(prompt) in str(e.value)


# --------------------------------------------------------------------------- 7./8. determinism, batching
def test_determinism_and_by_level(pipe, images):
    kw = dict(rev_diff_steps=4)
    a = compute_attention_maps(pipe, images[:1], PROMPT, generator=torch.Generator().manual_seed(1), **kw)
    b = compute_attention_maps(pipe, images[:1], PROMPT, generator=torch.Generator().manual_seed(1), **kw)
    c = compute_attention_maps(pipe, images[:1], PROMPT, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a.sums, b.sums)
    assert (a.sums - c.sums).abs().max() > 1e-4
    d = compute_attention_maps(pipe, images[:1], PROMPT, by_level=True, generator=torch.Generator().manual_seed(1),
                               **kw)
    assert d.sums.shape[1] == 4 and a.sums.shape[1] == 1
    torch.testing.assert_close(d.mean(), a.mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d.sums.sum(1, keepdim=True), a.sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.counts.sum(0, keepdim=True), a.counts)


def test_unet_batch_equivalence(pipe, images):
    kw = dict(rev_diff_steps=5, by_level=True)  # 2 images x 5 levels = 10 samples: batches of 7 + 3
    a = compute_attention_maps(pipe, images, PROMPT, unet_batch=40, generator=torch.Generator().manual_seed(3), **kw)
    b = compute_attention_maps(pipe, images, PROMPT, unet_batch=7, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(a.sums, b.sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.counts, b.counts)
    assert not torch.allclose(a.sums[0], a.sums[1], atol=1e-3)  # the two images really differ
