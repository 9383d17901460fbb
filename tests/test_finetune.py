"""Step 3 (concept distillation): background boxes, the masked loss, fine-tuning and resume."""
import copy
from dataclasses import asdict
import json
import re
import sys

import numpy as np
import pytest
import torch

from fgbg import finetune as ft
from fgbg.data import load_dataset, read_mask
from fgbg.io import save_png
from fgbg.masks import prelim_mask_path
from conftest import declare_m_pre_run
from fgbg.models import ModelLoadError


# --------------------------------------------------------------------------- boxes
def _bbox(mask):
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def test_background_box_constraints():
    # a 10x10 object in the middle of a 64x64 latent grid; default sides 11..32.
    # The box's bounding box can be recovered from the mask exactly: its top-left corner is a
    # background pixel, and a whole bottom row / right column of foreground would need a box
    # side <= 10, which only a box clipped at the bottom/right border has, far from the object.
    fg = np.zeros((64, 64), bool)
    fg[27:37, 27:37] = True
    rng = np.random.default_rng(0)
    cut_fg = 0
    for _ in range(400):
        m = ft.sample_background_box(fg, rng)
        assert m.dtype == bool and m.shape == fg.shape
        assert not (m & fg).any()
        r0, r1, c0, c1 = _bbox(m)
        box = np.zeros_like(fg)
        box[r0:r1, c0:c1] = True
        np.testing.assert_array_equal(m, box & ~fg)
        assert m[r0, c0]  # the corner is a background pixel
        for side, end in ((r1 - r0, r1), (c1 - c0, c1)):
            assert side <= 32 and (side >= 11 or end == 64)  # shorter only when clipped
        assert m.sum() >= 2 / 3 * box.sum() - 1e-9
        cut_fg += bool((box & fg).any())
    assert cut_fg > 0  # some accepted boxes did overlap the object, and lost those pixels
    # the 2/3 rule does something: without it some boxes are mostly object
    rng = np.random.default_rng(0)
    fracs = []
    for _ in range(400):
        m = ft.sample_background_box(fg, rng, min_bg_frac=0.0)
        r0, r1, c0, c1 = _bbox(m)
        fracs.append(m.sum() / ((r1 - r0) * (c1 - c0)))
    assert min(fracs) < 2 / 3


def test_default_sides_scale_with_the_grid():
    rng = np.random.default_rng(1)
    sides = set()
    for _ in range(300):
        r0, r1, c0, c1 = _bbox(ft.sample_background_box(np.zeros((16, 16), bool), rng))
        if r1 < 16:
            sides.add(r1 - r0)
        if c1 < 16:
            sides.add(c1 - c0)
    assert sides == set(range(3, 9))  # round(11 * 16 / 64) = 3 .. round(32 * 16 / 64) = 8


def test_box_fallback_and_all_foreground():
    fg = np.ones((64, 64), bool)
    fg[0, 0] = fg[0, 1] = fg[1, 0] = False  # any box from these corners is >= 11x11: 3/121 background
    m = ft.sample_background_box(fg, np.random.default_rng(0))
    np.testing.assert_array_equal(m, ~fg)
    m = ft.sample_background_box(np.ones((16, 16), bool), np.random.default_rng(0))
    assert m.shape == (16, 16) and not m.any()


def test_background_boxes_avoid_padding():
    rng = np.random.default_rng(0)
    fg = np.zeros((16, 16), bool)
    for _ in range(200):
        m = ft._background_mask(fg, (10, 16), rng, 3, 8)
        assert m.any() and not m[10:].any()


# --------------------------------------------------------------------------- loss
def test_masked_loss_by_hand_and_its_gradient():
    eps_hat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    eps = torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([[[[True, False], [False, True]]]])
    loss = ft.masked_eps_loss(eps_hat, eps, mask)
    assert loss.item() == pytest.approx((1 + 16) / 4)
    loss.backward()
    # d/dx of m (x - e)^2 / 4 = m (x - e) / 2
    torch.testing.assert_close(eps_hat.grad, torch.tensor([[[[0.5, 0.0], [0.0, 2.0]]]]))
    # (B, 1, h, w) masks broadcast over the channels; division by all B*C*H*W elements
    two = torch.stack([torch.ones(2, 2), 2 * torch.ones(2, 2)])[None]  # (1, 2, 2, 2)
    assert ft.masked_eps_loss(two, torch.zeros_like(two), mask).item() == pytest.approx((2 * 1 + 2 * 4) / 8)
    per = ft.masked_eps_loss(torch.cat([two, 2 * two]), torch.zeros(2, 2, 2, 2), mask.expand(2, 1, 2, 2),
                             reduction="none")
    torch.testing.assert_close(per, torch.tensor([10 / 8, 40 / 8]))


def test_masked_loss_all_zero_mask():
    eps_hat = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = ft.masked_eps_loss(eps_hat, torch.randn(2, 4, 3, 3), torch.zeros(2, 1, 3, 3))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(eps_hat.grad, torch.zeros_like(eps_hat))


# --------------------------------------------------------------------------- fine-tuning
def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def train_items(mini_dataset, tmp_path):
    """The 2 train + 1 val images, with M_pre = ground truth for the first two; the third has
    no M_pre file. Returns (items, out_dir)."""
    ds = load_dataset(mini_dataset, splits=["train", "val"])
    out = tmp_path / "out"
    for it in ds.items[:2]:
        save_png(prelim_mask_path(out, it), read_mask(it.gt_path).astype(np.uint8) * 255)
    declare_m_pre_run(out)
    return ds.items, out


def _copy_dir_prelims(src, dst, items):
    for it in items:
        if prelim_mask_path(src, it).exists():
            save_png(prelim_mask_path(dst, it), np.asarray(read_mask(prelim_mask_path(src, it)), np.uint8) * 255)
    declare_m_pre_run(dst)


def test_finetune_files_weights_resume_and_skip(tiny_pipe, train_items, tmp_path):
    items, out = train_items
    cfg = ft.FinetuneConfig(steps=4, batch_size=2, save_every=2, seed=3)
    te0, vae0, unet0 = _state(tiny_pipe.text_encoder), _state(tiny_pipe.vae), _state(tiny_pipe.unet)

    pipe = copy.deepcopy(tiny_pipe)
    res = ft.finetune(pipe, items, out, cfg, progress=False)
    fin = out / "finetuned"
    assert res["path"] == str(fin) and res["steps"] == 4 and not res["reused"]
    # the val item has no M_pre: skipped, with the file named
    assert [rel for rel, _ in res["skipped"]] == [items[2].rel]
    assert str(prelim_mask_path(out, items[2])) in res["skipped"][0][1]
    for f in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "checkpoint.pt", "done.json"):
        assert (fin / f).is_file(), f
    assert len(res["loss"]) == 4 and all(np.isfinite(res["loss"]))
    recs = [json.loads(line) for line in (fin / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and [r["loss"] for r in recs] == res["loss"]
    kinds = {r["kind"] for r in recs}
    assert kinds <= {"object", "background", "mixed"} and len(kinds) > 1
    for r in recs:  # the batch loss is the mean of the per-sample losses
        if r["kind"] == "mixed":
            assert r["loss"] == pytest.approx((r["object"] + r["background"]) / 2)
    assert json.loads((fin / "done.json").read_text())["steps"] == 4

    # only the UNet changed; it holds the EMA weights (not the raw ones), in eval mode
    assert _equal(_state(pipe.text_encoder), te0) and _equal(_state(pipe.vae), vae0)
    assert not _equal(_state(pipe.unet), unet0)
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
    st = torch.load(fin / "checkpoint.pt", weights_only=True)
    assert st["step"] == 4
    params = list(pipe.unet.parameters())
    assert all(torch.equal(p, e) for p, e in zip(params, st["ema"]))
    raw = [st["unet"][k] for k, _ in pipe.unet.named_parameters()]
    assert not all(torch.equal(p, r) for p, r in zip(params, raw))
    # the saved pipeline is the EMA one
    loaded = ft.load_finetuned(out, device="cpu")
    assert _equal(_state(loaded.unet), _state(pipe.unet))

    # a rerun finds done.json and trains nothing
    mtime = (fin / "checkpoint.pt").stat().st_mtime_ns
    again = ft.finetune(copy.deepcopy(tiny_pipe), items, out, cfg, progress=False)
    assert again["reused"] and again["loss"] == res["loss"] and (fin / "checkpoint.pt").stat().st_mtime_ns == mtime

    # 2 steps, then resume to 4 (from a fresh copy of the original weights): same EMA weights
    out2 = tmp_path / "out2"
    _copy_dir_prelims(out, out2, items)
    half = ft.finetune(copy.deepcopy(tiny_pipe), items, out2, ft.FinetuneConfig(**{**cfg.__dict__, "steps": 2}),
                       progress=False)
    assert half["loss"] == res["loss"][:2]
    resumed_pipe = copy.deepcopy(tiny_pipe)
    resumed = ft.finetune(resumed_pipe, items, out2, cfg, progress=False)
    assert resumed["loss"] == res["loss"]
    assert _equal(_state(resumed_pipe.unet), _state(pipe.unet))

    # another config on the same folder is refused
    with pytest.raises(ValueError, match="another config"):
        ft.finetune(copy.deepcopy(tiny_pipe), items, out2, ft.FinetuneConfig(**{**cfg.__dict__, "lr": 1e-3}),
                    progress=False)


def test_finished_run_of_another_base_model_or_m_pre_is_refused(tiny_pipe, train_items, tmp_path):
    from fgbg.io import atomic_write_text
    from fgbg.masks import prelim_dir
    items, out = train_items
    atomic_write_text(prelim_dir(out) / "run_config.json", '{"seed": 0}')
    cfg = ft.FinetuneConfig(steps=1, batch_size=2, seed=3)
    ft.finetune(copy.deepcopy(tiny_pipe), items, out, cfg, progress=False)
    assert ft.finetune(copy.deepcopy(tiny_pipe), items, out, cfg, progress=False)["reused"]
    other = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        next(other.unet.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="another config.*base_model"):
        ft.finetune(other, items, out, cfg, progress=False)
    atomic_write_text(prelim_dir(out) / "run_config.json", '{"seed": 1}')
    with pytest.raises(ValueError, match="another config.*m_pre_run"):
        ft.finetune(copy.deepcopy(tiny_pipe), items, out, cfg, progress=False)


def test_finetune_without_usable_items(tiny_pipe, mini_dataset, tmp_path):
    ds = load_dataset(mini_dataset, splits=["train"])
    with pytest.raises(FileNotFoundError, match="run steps 1-2 first"):  # no step 2 at all
        ft.finetune(tiny_pipe, ds.items, tmp_path / "empty", ft.FinetuneConfig(steps=1, batch_size=1),
                    progress=False)
    declare_m_pre_run(tmp_path / "empty")  # a step-2 run whose masks are all missing
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))):
        ft.finetune(tiny_pipe, ds.items, tmp_path / "empty", ft.FinetuneConfig(steps=1, batch_size=1),
                    progress=False)


def test_load_finetuned_incomplete_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="done.json.*model_index.json.*unet.*rerun"):
        ft.load_finetuned(tmp_path)
    (tmp_path / "finetuned").mkdir()
    (tmp_path / "finetuned" / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError) as e:
        ft.load_finetuned(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "finetuned") in msg and "done.json" in msg and "model_index" not in msg


# --------------------------------------------------------------------------- sampling
def test_sample_is_seeded_and_guidance_uses_the_negative_prompt(tiny_pipe):
    sched = tiny_pipe.scheduler
    a = ft.sample(tiny_pipe, "a photo of a bird", 2, num_inference_steps=2, seed=1)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, ft.sample(tiny_pipe, "a photo of a bird", 2, num_inference_steps=2, seed=1))
    g = ft.sample(tiny_pipe, "a photo of a bird", 2, num_inference_steps=2, seed=1, guidance_scale=3.0,
                  negative_prompt="a photo of a background")
    assert not np.array_equal(a, g)
    assert tiny_pipe.scheduler is sched
    with pytest.raises(ValueError, match="guidance_scale"):
        ft.sample(tiny_pipe, "a photo of a bird", 1, negative_prompt="a photo of a background")


# --------------------------------------------------------------------------- memory-saving options
def _linear_weights(unet):
    """(name, weight) of the UNet's attention projections and of everything else."""
    proj = {k for k in unet.state_dict() if any(f".{t}.weight" in k for t in ft.LORA_TARGETS)}
    return proj, set(unet.state_dict()) - proj


def test_lora_trains_only_the_projections_saves_a_plain_pipeline_and_resumes(tiny_pipe, train_items, tmp_path):
    from safetensors.torch import load_file
    items, out = train_items
    cfg = ft.FinetuneConfig(steps=4, batch_size=2, save_every=2, seed=3, lora_rank=4)
    before = _state(tiny_pipe.unet)
    pipe = copy.deepcopy(tiny_pipe)
    res = ft.finetune(pipe, items, out, cfg, progress=False)
    fin = out / "finetuned"
    # a plain UNet again (peft's layers merged away), same keys; only the projections moved
    assert not getattr(pipe.unet, "peft_config", None)
    after = _state(pipe.unet)
    assert after.keys() == before.keys()
    proj, rest = _linear_weights(pipe.unet)
    assert proj and all(torch.equal(after[k], before[k]) for k in rest)
    assert not _equal({k: after[k] for k in proj}, {k: before[k] for k in proj})
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
    saved = load_file(fin / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == before.keys()  # no lora_A/lora_B: load_pipeline needs no peft
    assert _equal(_state(ft.load_finetuned(out, device="cpu").unet), after)
    # the checkpoint holds the LoRA weights (and their EMA) only
    st = torch.load(fin / "checkpoint.pt", weights_only=True)
    assert st["unet"] and all(".lora_A." in k or ".lora_B." in k for k in st["unet"])
    assert len(st["ema"]) == len(st["unet"]) < len(before)
    assert all(e.dtype == torch.float32 for e in st["ema"])
    # 2 steps, then resumed to 4, with gradient checkpointing switched on (it may change): same weights
    out2 = tmp_path / "out2"
    _copy_dir_prelims(out, out2, items)
    ft.finetune(copy.deepcopy(tiny_pipe), items, out2, ft.FinetuneConfig(**{**cfg.__dict__, "steps": 2}),
                progress=False)
    resumed = copy.deepcopy(tiny_pipe)
    r2 = ft.finetune(resumed, items, out2, ft.FinetuneConfig(**{**cfg.__dict__, "gradient_checkpointing": True}),
                     progress=False)
    assert r2["loss"] == res["loss"]
    torch.testing.assert_close(_state(resumed.unet), after, rtol=0, atol=1e-6)
    # another rank, or full fine-tuning, never resumes this run
    for other in ({"lora_rank": 8}, {"lora_rank": 0}):
        with pytest.raises(ValueError, match="another config.*lora_rank"):
            ft.finetune(copy.deepcopy(tiny_pipe), items, out2, ft.FinetuneConfig(**{**cfg.__dict__, **other}),
                        progress=False)


def test_ema_off_cpu_and_every_n_steps(tiny_pipe, train_items, tmp_path):
    items, out = train_items
    base = dict(steps=4, batch_size=2, save_every=2, seed=3)

    def run(name, steps=4, **kw):
        o = tmp_path / name
        _copy_dir_prelims(out, o, items)
        pipe = copy.deepcopy(tiny_pipe)
        ft.finetune(pipe, items, o, ft.FinetuneConfig(**{**base, **kw, "steps": steps}), progress=False)
        return o, _state(pipe.unet)

    _, gpu = run("gpu")
    o, cpu = run("cpu", ema="cpu")  # on a CPU run both live in the same memory: the same weights
    assert _equal(cpu, gpu)
    # "off": no EMA in the checkpoint, and the raw weights are saved
    o, off = run("off", ema="off")
    st = torch.load(o / "finetuned" / "checkpoint.pt", weights_only=True)
    assert st["ema"] is None and _equal(off, st["unet"]) and not _equal(off, gpu)
    # every 3 steps: not the every-step EMA; an interrupted run (2 steps, then 4) gives the same weights
    o, every3 = run("every3", ema="cpu", ema_every=3)
    assert not _equal(every3, gpu) and not _equal(every3, off)
    st = torch.load(o / "finetuned" / "checkpoint.pt", weights_only=True)
    assert st["ema_step"] == 3  # the checkpoint keeps the EMA as of its last update
    o2, _ = run("every3b", steps=2, ema="cpu", ema_every=3)
    pipe = copy.deepcopy(tiny_pipe)
    ft.finetune(pipe, items, o2, ft.FinetuneConfig(**{**base, "ema": "gpu", "ema_every": 3}), progress=False)
    assert _equal(_state(pipe.unet), every3)  # resumed with the EMA on the other device: allowed
    with pytest.raises(ValueError, match="another config.*ema"):
        ft.finetune(copy.deepcopy(tiny_pipe), items, o2, ft.FinetuneConfig(**{**base, "ema": "off"}),
                    progress=False)


def test_ema_weight_is_the_product_of_the_per_step_decays():
    assert ft._ema_weight(0, 1, 0.999) == pytest.approx(1 - 1 / 10)
    assert ft._ema_weight(0, 2, 0.999) == pytest.approx(1 - (1 / 10) * (2 / 11))
    assert ft._ema_weight(10 ** 5, 10 ** 5 + 10, 0.999) == pytest.approx(1 - 0.999 ** 10)  # capped at 0.999
    assert ft._ema_weight(7, 7, 0.999) == 0.0


def test_which_options_identify_a_run():
    cfg = json.loads(json.dumps(ft.asdict(ft.FinetuneConfig())))
    same = ft._same_config
    for resumable in ({"gradient_checkpointing": True}, {"steps": 5}, {"ema": "cpu"}):
        assert same(cfg, {**cfg, **resumable}) == []
    for name, value in (("lora_rank", 4), ("optimizer", "adamw8bit"), ("ema", "off"), ("ema_every", 10),
                        ("mixed_precision", "fp16")):
        assert same(cfg, {**cfg, name: value}) == [name]
    assert same({**cfg, "ema": "off", "ema_every": 1}, {**cfg, "ema": "off", "ema_every": 10}) == []
    # a run recorded before the options existed was full fine-tuning, AdamW, EMA every step
    old = {k: v for k, v in cfg.items() if k not in ("optimizer", "lora_rank", "ema", "ema_every")}
    assert same(old, cfg) == [] and same(old, {**cfg, "lora_rank": 4}) == ["lora_rank"]


def test_adamw8bit_and_lora_say_what_is_missing(tiny_pipe, train_items, monkeypatch):
    items, out = train_items
    cfg = ft.FinetuneConfig(steps=1, batch_size=1, optimizer="adamw8bit")
    with pytest.raises(ValueError, match=r"adamw8bit.*needs a CUDA GPU.*pip install bitsandbytes.*device is cpu"):
        ft.finetune(copy.deepcopy(tiny_pipe), items, out, cfg, progress=False)
    assert not (out / "finetuned" / "loss.jsonl").exists()  # refused before any work
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes, which is not installed: pip install"):
        ft._check_options(ft.FinetuneConfig(optimizer="adamw8bit", mixed_precision="no"), torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"lora_rank=4 \(LoRA\) needs peft.*pip install peft"):
        ft.finetune(copy.deepcopy(tiny_pipe), items, out, ft.FinetuneConfig(steps=1, batch_size=1, lora_rank=4),
                    progress=False)


@pytest.mark.parametrize("bad, match", [
    ({"optimizer": "sgd"}, "optimizer"), ({"lora_rank": -1}, "lora_rank"), ({"lora_rank": 2.0}, "lora_rank"),
    ({"ema": "disk"}, "ema"), ({"ema_every": 0}, "ema_every"), ({"gradient_checkpointing": "yes"}, "gradient"),
])
def test_bad_memory_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=f"FinetuneConfig.{match}"):
        ft.FinetuneConfig(**bad).check()


FINETUNE_OPTIONS = {"finetune_gradient_checkpointing": "gradient_checkpointing",
                    "finetune_mixed_precision": "mixed_precision", "finetune_optimizer": "optimizer",
                    "finetune_lora_rank": "lora_rank", "finetune_ema": "ema", "finetune_ema_every": "ema_every",
                    "finetune_gradient_accumulation_steps": "gradient_accumulation_steps"}
NOTEBOOK_03 = "notebooks/py/03_finetune.py"  # the notebook's paired source


def test_memory_options_are_course_parameters_with_allowed_values():
    import yaml
    from fgbg import params
    for name, field in FINETUNE_OPTIONS.items():
        assert params.SCHEMA[name].default == getattr(ft.FinetuneConfig(), field), name
        assert params.SCHEMA[name].allowed is not None, name
    for name, good in (("finetune_gradient_checkpointing", None), ("finetune_gradient_checkpointing", False),
                       ("finetune_mixed_precision", "fp16"), ("finetune_optimizer", "adamw8bit"),
                       ("finetune_lora_rank", 16), ("finetune_ema", "cpu"), ("finetune_ema_every", 10)):
        assert params.check({name: good})[name] == good
    for name, bad in (("finetune_gradient_checkpointing", 1), ("finetune_mixed_precision", "fp8"),
                      ("finetune_optimizer", "sgd"), ("finetune_lora_rank", -1), ("finetune_ema", "disk"),
                      ("finetune_ema_every", 0)):
        with pytest.raises(params.ParameterError, match=f"parameter '{name}' must be"):
            params.check({name: bad}, source="x.yaml")
    # FinetuneConfig.from_params passes each one on (a value other than the default arrives);
    # the notebook declares each one; demo.yaml spells them out
    P = {name: s.default for name, s in params.SCHEMA.items()}
    for name, good in (("finetune_gradient_checkpointing", True), ("finetune_mixed_precision", "bf16"),
                       ("finetune_optimizer", "adamw8bit"), ("finetune_lora_rank", 4), ("finetune_ema", "off"),
                       ("finetune_ema_every", 3), ("finetune_gradient_accumulation_steps", 2),
                       ("finetune_steps", 7), ("finetune_batch_size", 6), ("finetune_lr", 0.5), ("seed", 11)):
        assert asdict(ft.FinetuneConfig.from_params({**P, name: good})) != asdict(ft.FinetuneConfig.from_params(P)), name
    for name, field in FINETUNE_OPTIONS.items():
        assert getattr(ft.FinetuneConfig.from_params({**P, name: "x"}), field) == "x", name
    cell = open(NOTEBOOK_03).read()
    assert "finetune.FinetuneConfig.from_params(P)" in cell
    demo = yaml.safe_load(open("params/demo.yaml"))
    for name in FINETUNE_OPTIONS:
        assert re.search(rf"^{name} = ", cell, re.M), name
        assert demo[name] == params.SCHEMA[name].default, name


# --------------------------------------------------------------------------- the GPU check's Python parts, on the CPU
def _gpu_benchmark():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_memory_sd14", "benchmarks/gpu_memory_sd14.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_measures_each_option_and_skips_what_cannot_run(tiny_pipe, train_items):
    bench = _gpu_benchmark()
    items, out = train_items
    options = {"LoRA 4": {"lora_rank": 4}, "EMA off": {"ema": "off"}, "8-bit": {"optimizer": "adamw8bit"}}
    pipe = copy.deepcopy(tiny_pipe)
    res = bench.finetune_options(pipe, items, out, {"mixed_precision": "no"}, [1, 2], 4, options)
    assert list(res) == [f"{o}, batch {b}" for o in options for b in (1, 2)]
    for key in ("LoRA 4, batch 2", "EMA off, batch 1"):
        assert res[key]["s_per_step"] > 0 and res[key]["peak_allocated_gib"] is None  # no GPU here
    assert res["8-bit, batch 1"]["skipped"].startswith("needs CUDA")
    assert not (out / "finetuned" / "checkpoint.pt").exists()  # disk writes are skipped
    assert not getattr(pipe.unet, "peft_config", None)


def test_kernel_startup_caps_memory_and_reports_the_peak(tmp_path, monkeypatch):
    bench = _gpu_benchmark()
    path = bench.write_kernel_startup(tmp_path / "ipython")
    assert path == tmp_path / "ipython" / "profile_default" / "startup" / "00-fgbg-gpu.py"
    hooks = []
    events = type("Events", (), {"register": lambda self, ev, f: hooks.append((ev, f))})()
    shell = type("Shell", (), {"events": events})()
    monkeypatch.setenv("FGBG_GPU_MEMORY_GIB", "14.5")
    monkeypatch.setenv("FGBG_PEAK_FILE", str(tmp_path / "peak.json"))
    exec(compile(path.read_text(), str(path), "exec"), {"get_ipython": lambda: shell})  # no GPU: no cap, no error
    assert [ev for ev, _ in hooks] == ["post_run_cell"]
    hooks[0][1](None)
    assert json.loads((tmp_path / "peak.json").read_text()) == {
        "device": "cpu", "peak_allocated_gib": None, "peak_reserved_gib": None, "cap_gib": 14.5}


def test_colab_t4_params_are_sd14_in_fp16_with_options_that_fit_a_t4():
    import yaml
    text = open("params/colab_t4.yaml").read()
    P = yaml.safe_load(text)
    assert P["model"] == "CompVis/stable-diffusion-v1-4" and P["base_dir"] == "data/CUB_200_2011"
    assert not P["make_mini_world"] and P["limit"] is not None  # a subset of CUB
    assert P["dtype"] == "fp16" and P["finetune_mixed_precision"] == "fp16"  # a T4: no native bf16
    # full fine-tuning with fp32 AdamW needs about 20 GiB (docs/memory.md): LoRA or 8-bit AdamW
    assert P["finetune_lora_rank"] > 0 or P["finetune_optimizer"] == "adamw8bit"
    for said in ("minutes", "GiB", "ESTIMATES", "tools/gpu_colab_check.sh"):
        assert said in text, said  # the comments state the expected time and memory, and their source


def test_lora_keeps_a_half_precision_base_under_autocast(tiny_pipe, train_items, monkeypatch):
    items, out = train_items
    pipe = copy.deepcopy(tiny_pipe).to(dtype=torch.bfloat16)
    seen = {}
    add = ft._add_lora

    def spy(unet, rank):
        seen["base"] = unet.conv_in.weight.dtype
        add(unet, rank)
        seen["lora"] = {p.dtype for p in unet.parameters() if p.requires_grad}

    monkeypatch.setattr(ft, "_add_lora", spy)
    ft.finetune(pipe, items, out, ft.FinetuneConfig(steps=2, batch_size=2, lora_rank=4, mixed_precision="bf16"),
                progress=False)
    assert seen == {"base": torch.bfloat16, "lora": {torch.float32}}  # the base is not copied to fp32
    assert pipe.unet.dtype == torch.bfloat16
    assert _equal(_state(ft.load_finetuned(out, device="cpu", dtype="bf16").unet), _state(pipe.unet))
