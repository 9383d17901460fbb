"""Step 1 at SD v1.4 size: a random-weight SD v1.4-shaped pipeline, one 512x512 image,
2 noise levels. Minutes on a CPU: run with `pytest -m slow tests/test_sd14_slow.py`."""
from collections import Counter

import pytest
import torch

from fgbg.attention import compute_attention_maps, find_token_indices, relevant_token_step_mean
from fgbg.models import random_pipeline

pytestmark = pytest.mark.slow


def test_sd14_shaped_attention_maps():
    pipe = random_pipeline("sd14")
    unet = pipe.unet
    names = [k[:-len(".processor")] for k in unet.attn_processors if k.endswith("attn2.processor")]
    assert len(names) == 16  # SD v1.x: 16 cross-attention layers
    # per block, from the names: 2 per CrossAttnDownBlock (down 0-2), 1 in the mid block,
    # 3 per CrossAttnUpBlock (up 1-3)
    blocks = Counter(n.split(".attentions")[0] for n in names)
    assert blocks == {"down_blocks.0": 2, "down_blocks.1": 2, "down_blocks.2": 2, "mid_block": 1,
                      "up_blocks.1": 3, "up_blocks.2": 3, "up_blocks.3": 3}

    # resolution of each attn2 layer, measured from its query count during the run
    side = {}
    modules = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    assert sorted(modules) == sorted(names)

    def hook(name):
        def f(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            side[name] = int(round(hs.shape[1] ** 0.5))
        return f

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 512, 512, generator=g) * 2 - 1
    prompt = "a photo of a bird"
    try:
        maps = compute_attention_maps(pipe, image, prompt, rev_diff_steps=2, unet_batch=2, generator=g)
    finally:
        for h in handles:
            h.remove()
    per_res = Counter(side.values())
    assert per_res == {64: 5, 32: 5, 16: 5, 8: 1}
    # the blocks' layers sit where the UNet's depth puts them
    assert {side[n] for n in names if n.startswith(("down_blocks.0", "up_blocks.3"))} == {64}
    assert {side[n] for n in names if n.startswith("mid_block")} == {8}

    assert maps.resolutions == [64, 32, 16, 8]
    assert maps.timesteps == [21, 1]
    assert maps.sums.shape == (1, 1, 4, 77, 64, 64)
    want = torch.tensor([[2.0 * per_res[r] for r in maps.resolutions]])
    torch.testing.assert_close(maps.counts, want)
    torch.testing.assert_close(maps.mean().sum(1), torch.ones(1, 64, 64), atol=1e-4, rtol=0)
    tok = find_token_indices(pipe.tokenizer, prompt, "bird")
    assert tok == [5]
    rel = relevant_token_step_mean(maps, tok[0])
    assert rel.shape == (1, 64, 64)
    assert torch.isfinite(rel).all() and (rel >= 0).all() and (rel <= 1).all()
