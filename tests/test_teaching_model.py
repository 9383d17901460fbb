"""The teaching model's training code: captions, their token ids, and a few real steps."""
import json

import numpy as np
import pytest
import torch

from fgbg import teaching_model as tm
from fgbg.miniworld import Obj, Scene
from fgbg.models import CLIP_TOKENIZER_DIR, load_pipeline


def _scene(*classes, background="grass"):
    objs = [Obj(c, "red", 20 + 10 * i, 30, 20, 0.0, False, 0) for i, c in enumerate(classes)]
    return Scene(background, objs, 0)


@pytest.fixture(scope="module")
def tok():
    return tm.load_tokenizer(CLIP_TOKENIZER_DIR)


def test_caption_names_every_object_without_omission():
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = tm.training_caption(_scene("bird", "fish", "car"), rng, p_omit=0.0)
        assert all(w in c.split() for w in ("bird", "fish", "car")), c


def test_caption_omission_keeps_one_object_and_drops_some():
    rng = np.random.default_rng(1)
    counts = []
    for _ in range(400):
        c = tm.training_caption(_scene("bird", "fish"), rng, p_omit=0.5).split()
        counts.append(("bird" in c) + ("fish" in c))
    counts = np.array(counts)
    assert counts.min() == 1 and counts.max() == 2
    # both named with probability 1/4; otherwise exactly one
    assert 0.15 < (counts == 2).mean() < 0.35
    # a single object is never dropped
    assert all("bird" in tm.training_caption(_scene("bird"), rng, p_omit=0.9) for _ in range(50))


def test_caption_none_names_only_the_background():
    rng = np.random.default_rng(3)
    assert tm.training_caption(_scene("bird", "fish"), rng, p_none=1.0) == "a photo of grass"
    named = [any(w in tm.training_caption(_scene("bird", "fish"), rng, p_omit=0.6, p_none=0.5).split()
                 for w in ("bird", "fish")) for _ in range(400)]
    assert 0.4 < np.mean(named) < 0.6
    # a scene without objects is captioned as before; p_none 0 draws nothing, so every
    # caption (and the random stream after it) is the one of a recipe without the option
    assert tm.training_caption(_scene(background="sky"), rng, p_none=1.0) == "a photo of the sky"
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    assert [tm.training_caption(_scene("bird", "fish", "car"), a, p_omit=0.3) for _ in range(50)] == \
        [tm.training_caption(_scene("bird", "fish", "car"), b, p_omit=0.3, p_none=0.0) for _ in range(50)]


def test_caption_extra_words_name_nothing_in_the_scene(tok):
    from fgbg.miniworld import UNSEEN_WORDS
    extra = tm.extra_vocabulary(tok)
    # never an unseen word (the step-1 control) nor a word of a mini-world caption; one token each
    rng = np.random.default_rng(6)
    caption_words = {w for _ in range(300) for w in tm.training_caption(
        _scene(*rng.choice(["bird", "fish", "flower", "house", "car", "ball"], int(rng.integers(0, 4))),
               background=str(rng.choice(["sky", "brick", "forest", "water", "wall"]))), rng, p_none=0.2).split()}
    assert {"bird", "photo", "brick"} <= caption_words
    assert not (set(UNSEEN_WORDS) | caption_words) & set(extra) and len(extra) > 1000
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in rng.choice(extra, 200))
    # p_extra 1: one to three of them, inserted after the first word; the rest of the caption unchanged
    for _ in range(100):
        plain = tm.training_caption(_scene("bird", "fish"), np.random.default_rng(7), p_omit=0.3).split()
        words = tm.training_caption(_scene("bird", "fish"), np.random.default_rng(7), p_omit=0.3, p_extra=1.0,
                                    extra_words=extra).split()
        added = [w for w in words if w not in plain]
        assert 1 <= len(added) <= 3 and set(added) <= set(extra) and words[0] == "a"
        assert [w for w in words if w in plain] == plain
    # p_extra 0 draws nothing: the stream of a recipe without the option
    a, b = np.random.default_rng(8), np.random.default_rng(8)
    assert [tm.training_caption(_scene("bird", "car"), a, p_omit=0.3) for _ in range(50)] == \
        [tm.training_caption(_scene("bird", "car"), b, p_omit=0.3, p_extra=0.0, extra_words=extra) for _ in range(50)]
    with pytest.raises(ValueError, match="extra_words"):
        tm.training_caption(_scene("bird"), rng, p_extra=1.0)


def test_caption_absent_word_names_a_class_the_scene_does_not_hold():
    from fgbg.miniworld import OBJECTS
    rng = np.random.default_rng(5)
    scene = _scene("bird", "fish")
    with_absent = 0
    for _ in range(400):
        words = tm.training_caption(scene, rng, p_omit=0.6, p_absent=0.5).split()
        named = [w for w in words if w in OBJECTS]
        assert {"bird", "fish"} & set(named)  # a present object is still named
        absent = [w for w in named if w not in ("bird", "fish")]
        assert len(absent) <= 1 and len(named) == len(set(named))
        with_absent += bool(absent)
    assert 0.4 < with_absent / 400 < 0.6
    # every other class can be the absent one, and a scene without objects gets one too
    seen = {w for _ in range(300) for w in tm.training_caption(scene, rng, p_absent=1.0).split() if w in OBJECTS}
    assert seen == set(OBJECTS)
    empty = tm.training_caption(_scene(background="grass"), rng, p_absent=1.0).split()
    assert len([w for w in empty if w in OBJECTS]) == 1
    # a scene that holds every class has no absent one; p_absent 0 draws nothing
    assert set(tm.training_caption(_scene(*OBJECTS), rng, p_absent=1.0).split()) >= set(OBJECTS)
    a, b = np.random.default_rng(6), np.random.default_rng(6)
    assert [tm.training_caption(scene, a, p_omit=0.3) for _ in range(50)] == \
        [tm.training_caption(scene, b, p_omit=0.3, p_absent=0.0) for _ in range(50)]


def test_caption_tokenizer_equals_the_tokenizer(tok):
    fast = tm.CaptionTokenizer(tok)
    rng = np.random.default_rng(2)
    caps = [tm.training_caption(_scene(*rng.choice(["bird", "fish", "flower", "house"], int(rng.integers(0, 4))),
                                       background=str(rng.choice(["sky", "brick", "forest"]))), rng, p_omit=0.3)
            for _ in range(100)]
    caps += ["a photo of a bird", "A  photo of an orange bird by a brick wall", " ".join(["bird"] * 100)]
    want = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(fast(caps), want, rtol=0, atol=0)


def test_train_a_few_steps_resume_and_export(tmp_path):
    work = tmp_path / "work"
    args = ["--work", str(work), "--corpus-size", "12", "--vae-steps", "2", "--vae-batch", "4", "--threads", "1"]
    tm.main(["train", *args, "--steps", "2", "--batch", "4"])
    log = [json.loads(line) for line in (work / "unet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2] and np.isfinite(log[0]["loss"])
    assert torch.load(work / "unet_ckpt.pt")["step"] == 2
    # rerun with more steps: resumes from step 2, does not start again
    tm.main(["train", *args, "--steps", "3", "--batch", "4"])
    log = [json.loads(line) for line in (work / "unet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3]
    # resuming with another recipe is refused, not silently mixed
    with pytest.raises(SystemExit, match=r"p_omit: 0.6 then, 0.9 now"):
        tm.main(["train", *args, "--steps", "4", "--batch", "4", "--p-omit", "0.9"])
    with pytest.raises(SystemExit, match=r"batch: 4 then, 8 now"):
        tm.main(["train", *args, "--steps", "4", "--batch", "8"])
    with pytest.raises(SystemExit, match=r"p_none: 0.0 then, 0.3 now"):
        tm.main(["train", *args, "--steps", "4", "--batch", "4", "--p-none", "0.3"])
    with pytest.raises(SystemExit, match=r"p_extra: 0.0 then, 0.5 now"):
        tm.main(["train", *args, "--steps", "4", "--batch", "4", "--p-extra", "0.5"])
    with pytest.raises(SystemExit, match=r"p_absent: 0.0 then, 0.5 now"):
        tm.main(["train", *args, "--steps", "4", "--batch", "4", "--p-absent", "0.5"])
    assert torch.load(work / "unet_ckpt.pt")["step"] == 3
    # a checkpoint written before p_none existed trained with none: it resumes without it,
    # and is refused with another
    ck = torch.load(work / "unet_ckpt.pt")
    del ck["recipe"]["p_none"], ck["recipe"]["p_extra"], ck["recipe"]["p_absent"]
    torch.save(ck, work / "unet_ckpt.pt")
    with pytest.raises(SystemExit, match=r"p_none: 0.0 then, 0.3 now"):
        tm.main(["train", *args, "--steps", "4", "--batch", "4", "--p-none", "0.3"])
    tm.main(["train", *args, "--steps", "4", "--batch", "4"])
    assert torch.load(work / "unet_ckpt.pt")["step"] == 4
    # a corpus made from other settings is refused, not silently trained on
    for other, what in ((["--world", "v2"], "world: 'v1' then, 'v2' now"),
                        (["--bird-share", "1/6"], "bird_share: 0.5 then, 0.1666"),
                        (["--corpus-size", "13"], "n: 12 then, 13 now")):
        with pytest.raises(SystemExit, match=what):
            tm.main(["prepare", *args, *other])
    # another shape in the same work folder is refused, not silently loaded
    with pytest.raises(SystemExit, match="unet_channels"):
        tm.main(["train", *args, "--steps", "3", "--unet-channels", "32,32,64"])
    pipe = load_pipeline(str(work / "pipeline"), device="cpu")
    assert pipe.unet.config.block_out_channels == list(tm.TeachingConfig().unet_channels) or \
        tuple(pipe.unet.config.block_out_channels) == tm.TeachingConfig().unet_channels
    assert pipe.text_encoder.config.num_hidden_layers == 0
    rec = json.loads((work / "pipeline" / "fgbg_teaching.json").read_text())
    assert rec["unet_steps"] == 4 and rec["corpus"]["n"] == 12 and rec["corpus"]["bird_share"] == 0.5
    assert rec["recipe"] == {"batch": 4, "lr": 1e-3, "warmup": 200, "ema": 0.999, "p_high": 0.7, "p_omit": 0.6,
                             "p_none": 0.0, "p_extra": 0.0, "p_absent": 0.0}
    # export reads the folder's recorded configuration
    tm.main(["export", "--work", str(work), "--save-to", str(tmp_path / "exported")])
    assert json.loads((tmp_path / "exported" / "fgbg_teaching.json").read_text())["unet_steps"] == 4
    assert load_pipeline(str(tmp_path / "exported"), device="cpu").unet.config.sample_size == 16


def test_init_from_continues_a_saved_pipeline(tmp_path):
    """--init-from: the new folder starts from the pipeline's VAE, scaling factor, UNet and
    text encoder (with lr 0 one step changes nothing, so the export equals the source)."""
    from safetensors.torch import load_file
    small = ["--corpus-size", "12", "--vae-steps", "2", "--vae-batch", "4", "--threads", "1", "--batch", "4"]
    src = tmp_path / "src"
    tm.main(["train", "--work", str(tmp_path / "a"), *small, "--steps", "2", "--save-to", str(src)])
    tm.main(["train", "--work", str(tmp_path / "b"), *small, "--steps", "1", "--lr", "0",
             "--init-from", str(src), "--save-to", str(tmp_path / "cont")])
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(src / part), load_file(tmp_path / "cont" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    scale = json.loads((src / "vae" / "config.json").read_text())["scaling_factor"]
    assert torch.load(tmp_path / "b" / "latents.pt")["scaling_factor"] == scale
    rec = json.loads((tmp_path / "cont" / "fgbg_teaching.json").read_text())
    assert rec["unet_steps"] == 1 and rec["continued_from"] == {"pipeline": str(src), "unet_steps": 2}
    # a folder that trained its own VAE is refused: its latents are not the pipeline's
    with pytest.raises(SystemExit, match="own VAE"):
        tm.main(["train", "--work", str(tmp_path / "a"), *small, "--steps", "3", "--init-from", str(src)])
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        tm.main(["train", "--work", str(tmp_path / "c"), *small, "--steps", "1", "--init-from", str(tmp_path / "a")])


def test_vae_from_takes_only_the_vae(tmp_path):
    """--vae-from: the pipeline's VAE and scaling factor, but a fresh UNet and text encoder
    (with lr 0 one step changes nothing, so the export equals a from-scratch initialisation)."""
    from safetensors.torch import load_file
    src = tm.ASSET_DIR
    small = ["--corpus-size", "12", "--threads", "1", "--batch", "4"]
    out = tmp_path / "pipe"
    tm.main(["train", "--work", str(tmp_path / "w"), *small, "--steps", "1", "--lr", "0",
             "--vae-from", str(src), "--save-to", str(out)])
    part = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(src / part), load_file(out / part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scale = json.loads((src / "vae" / "config.json").read_text())["scaling_factor"]
    assert torch.load(tmp_path / "w" / "latents.pt")["scaling_factor"] == scale
    # the UNet is the seeded fresh initialisation of a from-scratch run, not the pipeline's
    torch.manual_seed(0)
    fresh = {k: v.half() for k, v in tm.build_unet(tm.TeachingConfig()).state_dict().items()}
    got, shipped = load_file(out / "unet/diffusion_pytorch_model.safetensors"), load_file(
        src / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(got[k], fresh[k]) for k in fresh)
    assert not all(torch.equal(got[k], shipped[k]) for k in shipped)
    rec = json.loads((out / "fgbg_teaching.json").read_text())
    assert rec["unet_steps"] == 1 and rec["vae_from"]["pipeline"] == str(src) and "continued_from" not in rec
    with pytest.raises(SystemExit, match="not both"):
        tm.main(["train", "--work", str(tmp_path / "x"), *small, "--steps", "1",
                 "--vae-from", str(src), "--init-from", str(src)])


def test_latents_record_names_the_vae_weights_and_the_corpus(tmp_path):
    """A one-ulp change of one VAE weight, or another corpus.json, changes the record;
    the same weights saved again do not."""
    vae = tm.build_vae(tm.TeachingConfig())
    sd = vae.state_dict()
    torch.save({"model": sd}, tmp_path / "a.pt")
    torch.save({"model": {k: v.clone() for k, v in sd.items()}}, tmp_path / "b.pt")
    (tmp_path / "corpus").mkdir()
    rec = tm.latents_record(tmp_path / "a.pt", tmp_path / "corpus")
    assert rec["corpus"] is None and rec == tm.latents_record(tmp_path / "b.pt", tmp_path / "corpus")
    k = next(iter(sd))
    sd2 = dict(sd, **{k: sd[k].clone()})
    sd2[k].view(-1)[0] = torch.nextafter(sd2[k].view(-1)[0], torch.tensor(float("inf")))
    torch.save({"model": sd2}, tmp_path / "c.pt")
    assert tm.latents_record(tmp_path / "c.pt", tmp_path / "corpus")["vae_sha256"] != rec["vae_sha256"]
    (tmp_path / "corpus" / "corpus.json").write_text(json.dumps({"n": 12}))
    assert tm.latents_record(tmp_path / "a.pt", tmp_path / "corpus") == {"vae_sha256": rec["vae_sha256"],
                                                                         "corpus": {"n": 12}}


def test_latents_of_another_vae_are_encoded_anew_never_trained_on(tmp_path, capsys):
    """Latents copied in from a folder with another VAE, or written before latents recorded
    what made them, are encoded again by prepare, and refused by train_unet."""
    small = ["--corpus-size", "12", "--vae-steps", "2", "--vae-batch", "4", "--threads", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    tm.main(["prepare", "--work", str(a), *small])
    lat_a = torch.load(a / "latents.pt")
    assert lat_a["made_from"] == tm.latents_record(a / "vae_ckpt.pt", a / "corpus")
    assert tm.stale_latents(lat_a, a / "vae_ckpt.pt", a / "corpus") is None
    # b: the same corpus, but the shipped VAE; a's latents copied in
    b.mkdir()
    for part in ("corpus", "tokenizer"):
        (b / part).mkdir()
        for f in (a / part).iterdir():
            (b / part / f.name).write_bytes(f.read_bytes())
    (b / "latents.pt").write_bytes((a / "latents.pt").read_bytes())
    tm.main(["prepare", "--work", str(b), *small, "--vae-from", str(tm.ASSET_DIR)])
    assert "were made from another VAE or corpus (vae_sha256:" in capsys.readouterr().out
    lat_b = torch.load(b / "latents.pt")
    assert lat_b["made_from"] == tm.latents_record(b / "vae_ckpt.pt", b / "corpus")
    assert lat_b["made_from"]["vae_sha256"] != lat_a["made_from"]["vae_sha256"]
    assert not torch.equal(lat_a["mean"], lat_b["mean"])
    # latents without a record: train_unet refuses them, prepare encodes them again (same values)
    old = {k: v for k, v in lat_a.items() if k != "made_from"}
    torch.save(old, a / "latents.pt")
    with pytest.raises(SystemExit, match="do not record which VAE"):
        tm.train_unet(a / "corpus", a, steps=1, batch=4, threads=1)
    tm.main(["prepare", "--work", str(a), *small])
    again = torch.load(a / "latents.pt")
    assert again["made_from"] == lat_a["made_from"] and torch.equal(again["mean"], lat_a["mean"])


def test_a_grown_vae_steps_trains_the_vae_on_but_never_under_a_trained_unet(tmp_path, capsys):
    """--vae-steps grown on a rerun trains the folder's VAE on and encodes its latents anew
    (never ignored); where a UNet already trained on the latents it is refused, and a UNet
    checkpoint is resumed or exported only beside the VAE whose latents it trained on."""
    work = tmp_path / "w"
    small = ["--work", str(work), "--corpus-size", "12", "--vae-batch", "4", "--threads", "1"]
    tm.main(["prepare", *small, "--vae-steps", "2"])
    first = torch.load(work / "latents.pt")["made_from"]
    capsys.readouterr()
    tm.main(["prepare", *small, "--vae-steps", "3"])
    out = capsys.readouterr().out
    assert "has 2 steps: training it on to --vae-steps 3" in out and "encoding them anew" in out
    assert torch.load(work / "vae_ckpt.pt")["step"] == 3
    grown = torch.load(work / "latents.pt")["made_from"]
    assert grown == tm.latents_record(work / "vae_ckpt.pt", work / "corpus") and grown != first
    tm.main(["prepare", *small, "--vae-steps", "2"])
    assert "has 3 steps, more than --vae-steps 2: kept as it is" in capsys.readouterr().out
    assert torch.load(work / "vae_ckpt.pt")["step"] == 3
    # trained on with another recipe: refused, not mixed
    with pytest.raises(SystemExit, match=r"vae_ckpt.pt was trained with another recipe \(batch: 4 then, 8 now\)"):
        tm.main(["prepare", *small, "--vae-steps", "4", "--vae-batch", "8"])
    assert torch.load(work / "vae_ckpt.pt")["step"] == 3
    # a UNet trains on the latents: its checkpoint names them
    tm.main(["train", *small, "--vae-steps", "3", "--steps", "1", "--batch", "4"])
    assert torch.load(work / "unet_ckpt.pt")["latents"] == grown
    with pytest.raises(SystemExit, match="trained on its latents: --vae-steps 4 would change them"):
        tm.main(["train", *small, "--vae-steps", "4", "--steps", "2", "--batch", "4"])
    assert torch.load(work / "vae_ckpt.pt")["step"] == 3
    # the VAE changed under the UNet (one weight, one ulp): its latents are encoded anew, and
    # the UNet is neither resumed on them nor exported beside that VAE
    vae = torch.load(work / "vae_ckpt.pt")
    k = next(iter(vae["model"]))
    vae["model"][k].view(-1)[0] = torch.nextafter(vae["model"][k].view(-1)[0], torch.tensor(float("inf")))
    torch.save(vae, work / "vae_ckpt.pt")
    with pytest.raises(SystemExit, match="unet_ckpt.pt trained on latents of another VAE or corpus"):
        tm.main(["train", *small, "--vae-steps", "3", "--steps", "2", "--batch", "4"])
    assert "encoding them anew" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="trained on latents of another VAE or corpus"):
        tm.main(["export", "--work", str(work), "--save-to", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()
    # a checkpoint from before checkpoints named their latents resumes, and says so
    ck = torch.load(work / "unet_ckpt.pt")
    del ck["latents"]
    torch.save(ck, work / "unet_ckpt.pt")
    tm.main(["train", *small, "--vae-steps", "3", "--steps", "2", "--batch", "4"])
    assert "does not record the latents it trained on" in capsys.readouterr().out
    assert torch.load(work / "unet_ckpt.pt")["latents"] == torch.load(work / "latents.pt")["made_from"]
