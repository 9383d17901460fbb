"""The teaching model: a small Stable-Diffusion-architecture generator for the mini world.

Same parts as SD v1.x, only smaller, so every line of the course runs unchanged on the
real model:

* the real CLIP tokenizer (OpenAI's BPE vocabulary, 49,408 tokens, 77 positions);
* a ``CLIPTextModel`` with **zero transformer layers**: ``last_hidden_state =
  final_layer_norm(token_embedding + position_embedding)``. A causal text transformer
  trained jointly with a small UNet copies the whole caption into the end and padding
  tokens, and the UNet then never needs to attend to the object's own word (its
  cross-attention stays uniform: see docs/teaching_model.md). Without mixing, the only
  way for a pixel to learn "bird" is to attend to the token "bird";
* ``AutoencoderKL`` with a downsampling factor of 4 (64x64 images, 16x16 latents);
* ``UNet2DConditionModel`` with cross-attention at the 16x16 and 8x8 latent resolutions
  and in the 4x4 middle block;
* SD's scaled-linear DDPM schedule (beta 0.00085 to 0.012, 1000 steps), epsilon
  prediction.

Training (``python -m fgbg.teaching_model train --help``) uses captions only: no mask,
box or attention target ever enters it. Localisation has to emerge from denoising.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import atomic_write_text
from .miniworld import CORPUS_BIRD_SHARE, WORLDS, check_corpus, corpus_record, parse_share, write_corpus
from .runs import describe_diff
# the parts it shares with fgbg.models (which it never imports): see fgbg.sd_parts
from .sd_parts import (ASSET_DIR, CLIP_TOKENIZER_DIR, SCALED_LINEAR, TeachingConfig,  # noqa: F401
                       build_text_encoder, build_unet, build_vae, load_tokenizer, pick_device)


def build_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(**{k: v for k, v in SCALED_LINEAR.items() if k != "set_alpha_to_one"})


def tokenizer_files_from_open_clip(out_dir: str | Path) -> Path:
    """Write vocab.json and merges.txt of OpenAI's CLIP BPE vocabulary to ``out_dir``.

    The vocabulary ships inside the open_clip_torch wheel (bpe_simple_vocab_16e6.txt.gz);
    this reads the file from a downloaded wheel or an installed package without importing
    open_clip (which imports torchvision). Only needed to build a model from scratch: a
    saved teaching model carries its tokenizer.
    """
    import gzip
    import importlib.util
    import zipfile
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = None
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
        if p.exists():
            raw = p.read_bytes()
    if raw is None:
        wheels = sorted(Path(os.environ.get("FGBG_WHEEL_DIR", ".whl")).glob("open_clip_torch-*.whl"))
        if not wheels:
            raise FileNotFoundError(
                "the CLIP BPE vocabulary was not found: `pip download --no-deps open_clip_torch -d .whl` "
                "(or set FGBG_WHEEL_DIR to the folder holding the wheel)")
        with zipfile.ZipFile(wheels[-1]) as z:
            raw = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    vocab = byte_chars + [v + "</w>" for v in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


# --------------------------------------------------------------------------- captions
def training_caption(scene, rng: np.random.Generator, p_colour: float = 0.5, p_background: float = 0.5,
                     p_omit: float = 0.0, p_none: float = 0.0, p_extra: float = 0.0,
                     extra_words: tuple[str, ...] = (), p_absent: float = 0.0) -> str:
    """A caption for one training step: objects in random order, each colour and the
    background named with probability 1/2. Without the dropout "bird" would never stand
    at position 5 of "a photo of a bird", the course's prompt.

    ``p_omit``: each object goes unnamed with this probability (one object always stays
    named). Real captions rarely name everything in a photo, and a scene with a bird and
    an unnamed fish, captioned "a photo of a bird", is the only place where training tells
    the fish's pixels not to attend to "bird": it is the distractor test of the course.

    ``p_none``: the chance that a caption of a scene with objects names none of them, only
    the background ("a photo of grass"), as real captions often do and as SD's training
    does with its empty captions. Otherwise every such caption names an object, and that
    word is the only part of the text that says "an object is here".

    ``p_extra``: the chance that a caption carries one to three words of ``extra_words``
    (:func:`extra_vocabulary`: words the picture does not show), each at a random place
    after the first word, as real captions carry words that name nothing in the picture.
    A pixel that attends to every word but the padding then reads noise, so training has
    a reason to attend to the words of what is there (docs/teaching_model.md, "Words the
    model never saw"). Nothing is drawn when it is 0.

    ``p_absent``: the chance that a caption (one that names objects, or a scene without
    any) also names an object of a class the scene does not hold, with a random colour, at
    a random place among the named ones ("a photo of a fish and a bird" for a bird alone).
    The absent word is a trained class word, so a pixel that attends to it reads another
    class's appearance: training has a reason to keep a class word off the objects of
    other classes, which omitted names alone do not give (docs/teaching_model.md, "Words
    that name an absent object"). Nothing is drawn when it is 0.
    """
    from .miniworld import COLOURS, OBJECTS, Obj, Scene, caption_for
    objs = list(scene.objects)
    if p_none > 0 and objs and rng.random() < p_none:
        caption = caption_for(Scene(scene.background, [], scene.seed), [], True)
    else:
        order = list(rng.permutation(len(objs))) if objs else []
        if p_omit > 0 and len(objs) > 1:
            keep = [i for i in order if rng.random() >= p_omit]
            order = keep or [order[0]]
        named = [objs[i] for i in order]
        if p_absent > 0 and rng.random() < p_absent:
            absent = [c for c in OBJECTS if c not in {o.cls for o in objs}]
            if absent:
                ghost = Obj(absent[int(rng.integers(len(absent)))], list(COLOURS)[int(rng.integers(len(COLOURS)))],
                            0.0, 0.0, 0.0, 0.0, False, 0)
                named.insert(int(rng.integers(len(named) + 1)), ghost)
        shown = Scene(scene.background, named, scene.seed)
        colours = [bool(rng.random() < p_colour) for _ in shown.objects]
        caption = caption_for(shown, colours, bool(rng.random() < p_background) or not objs)
    if p_extra > 0 and rng.random() < p_extra:
        if not extra_words:
            raise ValueError("p_extra > 0 needs extra_words (extra_vocabulary)")
        words = caption.split()
        for _ in range(int(rng.integers(1, 4))):
            words.insert(int(rng.integers(1, len(words) + 1)), extra_words[int(rng.integers(len(extra_words)))])
        caption = " ".join(words)
    return caption


def extra_vocabulary(tok) -> tuple[str, ...]:
    """The words :func:`training_caption` may add with ``p_extra``: every whole word of the
    tokenizer's vocabulary of three or more letters a-z, except the words of mini-world
    captions and ``fgbg.miniworld.UNSEEN_WORDS`` (which must stay unseen: they are the
    step-1 control). Each is one token; sorted, so a seed always draws the same words."""
    from .miniworld import BACKGROUND_PHRASES, COLOURS, OBJECTS, UNSEEN_WORDS
    taken = {*OBJECTS, *COLOURS, *UNSEEN_WORDS, "a", "an", "and", "photo", "of"}
    taken |= {w for phrases in BACKGROUND_PHRASES.values() for p in phrases for w in p.split()}
    return tuple(sorted(w[:-4] for w in tok.get_vocab() if w.endswith("</w>") and len(w) >= 7
                        and w[:-4].isascii() and w[:-4].isalpha() and w[:-4].islower() and w[:-4] not in taken))


class CaptionTokenizer:
    """Token ids of training captions, assembled word by word from a cache.

    CLIP's BPE splits a text into words before it merges (lower-cased, whitespace
    collapsed), so the ids of a caption are the ids of its words in order: tokenising
    each distinct word once gives exactly ``tok(caption, padding="max_length",
    truncation=True).input_ids`` (tests/test_teaching_model.py checks this) at a fraction
    of the cost: the tokenizer call took 66 ms per 512 captions on a 2-core CPU, on every
    step, in the process that drives the GPU.
    """

    def __init__(self, tok, length: int = 77):
        self.tok, self.length = tok, length
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.words: dict[str, list[int]] = {}

    def ids(self, caption: str) -> list[int]:
        out = [self.bos]
        for w in caption.lower().split():
            if w not in self.words:
                self.words[w] = self.tok(w, add_special_tokens=False).input_ids
            out += self.words[w]
        out = out[:self.length - 1] + [self.eos]
        return out + [self.pad] * (self.length - len(out))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([self.ids(c) for c in captions], dtype=torch.long)


# --------------------------------------------------------------------------- training
def _device_and_dtype(device: str | None):
    """The training device (the course's rule, ``fgbg.sd_parts.pick_device``) and the autocast
    dtype: bf16 on CUDA, none (fp32) elsewhere."""
    dev = pick_device(device)
    return dev, (torch.bfloat16 if dev.type == "cuda" else None)


def _batches(n: int, batch: int, rng: np.random.Generator):
    """Index batches, epoch after epoch, each a sorted draw without replacement."""
    if not 0 < batch <= n:
        raise ValueError(f"batch size {batch} needs 1 to {n} (the corpus size) items")
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            yield np.sort(perm[i:i + batch])


def _save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_vae(corpus: str | Path, out: str | Path, steps: int = 1500, batch: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-6, crop: int = 32, cfg: TeachingConfig | None = None,
              device: str | None = None, log_every: int = 50):
    """Train the AutoencoderKL on random ``crop`` x ``crop`` crops of corpus images
    (L1 + MSE + a tiny KL). The VAE is convolutional, so crops teach it the whole image
    at a quarter of the cost. Resumable."""
    from .miniworld import load_corpus
    from .runs import progress_bar
    cfg = cfg or TeachingConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev, amp = _device_and_dtype(device)
    torch.manual_seed(cfg.seed)
    imgs, _ = load_corpus(corpus)
    vae = build_vae(cfg).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step, ck = 0, out / "vae_ckpt.pt"
    recipe = {"batch": batch, "lr": lr, "kl_weight": kl_weight, "crop": crop}
    if ck.exists():
        st = torch.load(ck, map_location=dev, weights_only=True)
        vae.load_state_dict(st["model"]); step = st["step"]
        if st.get("opt") is not None:  # None: a VAE taken from a pipeline (--init-from)
            opt.load_state_dict(st["opt"])
            if step < steps:  # trained on: with the recipe it began with, else no record names the result
                check_recipe(ck, st.get("recipe"), recipe, since={})
    rng = np.random.default_rng([cfg.seed, 10, step])
    it = _batches(len(imgs), batch, rng)
    log = open(out / "vae_log.jsonl", "a")
    bar = progress_bar(total=steps, initial=step, desc="vae")
    while step < steps:
        x = torch.from_numpy(np.array(imgs[next(it)])).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
        if crop and crop < x.shape[-1]:
            i, j = (int(v) for v in rng.integers(0, (x.shape[-1] - crop) // 4 + 1, 2) * 4)
            x = x[..., i:i + crop, j:j + crop]
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == steps:
            log.write(json.dumps({"step": step, "loss": loss.item(), "kl": kl.item()}) + "\n"); log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            _save_ckpt(ck, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "recipe": recipe})
    bar.close()
    return vae


def latents_record(vae_ckpt: str | Path, corpus: str | Path) -> dict:
    """What a folder's ``latents.pt`` must have been encoded from: the VAE's weights (a
    SHA-256 over the tensors of ``vae_ckpt``) and the corpus (its ``corpus.json``, or None
    for a corpus written before corpora recorded their settings)."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(torch.load(vae_ckpt, map_location="cpu", weights_only=True)["model"].items()):
        h.update(k.encode()); h.update(str(v.dtype).encode()); h.update(v.contiguous().numpy().tobytes())
    f = Path(corpus) / "corpus.json"
    return {"vae_sha256": h.hexdigest(), "corpus": json.loads(f.read_text()) if f.is_file() else None}


def stale_latents(lat: dict, vae_ckpt: Path, corpus: Path) -> str | None:
    """None where the loaded ``latents.pt`` ``lat`` was encoded by ``vae_ckpt`` from
    ``corpus``; otherwise why not, in one phrase. Latents copied in from another folder, or
    left by a VAE that was trained further, would otherwise be trained on silently: a UNet
    must see its own VAE's latents."""
    have = lat.get("made_from")
    if have is None:
        return "they do not record which VAE and corpus made them"
    want = latents_record(vae_ckpt, corpus)
    return None if have == want else f"they were made from another VAE or corpus ({describe_diff(have, want)})"


@torch.no_grad()
def encode_corpus(vae, corpus: str | Path, out: str | Path, batch: int = 256, device: str | None = None,
                  made_from: dict | None = None, scaling_factor: float | None = None) -> float:
    """Encode every corpus image once (posterior mean and std) and return the scaling
    factor that gives the latents unit variance, as SD's 0.18215 does for its VAE, or
    ``scaling_factor`` where one is given (a saved pipeline's VAE: the factor its UNet was
    trained with). ``made_from`` (a :func:`latents_record`) is stored beside them, in the
    same single write."""
    from .miniworld import load_corpus
    dev, _ = _device_and_dtype(device)
    imgs, _ = load_corpus(corpus)
    vae = vae.to(dev).eval()
    means, stds = [], []
    for flip in (False, True):  # mirror images are free extra data: no caption names a side
        for i in range(0, len(imgs), batch):
            x = torch.from_numpy(np.array(imgs[i:i + batch])).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
            d = vae.encode(x.flip(-1) if flip else x).latent_dist
            means.append(d.mean.half().cpu()); stds.append(d.std.half().cpu())
    mean, std = torch.cat(means), torch.cat(stds)  # item k and k + n are one scene
    scale = float(1.0 / mean.float().std()) if scaling_factor is None else float(scaling_factor)
    _save_ckpt(Path(out) / "latents.pt", {"mean": mean, "std": std, "scaling_factor": scale, "made_from": made_from})
    return scale


def sample_timesteps(n: int, gen: torch.Generator, device, p_high: float = 0.7) -> torch.Tensor:
    """Training timesteps: with probability ``p_high`` uniform in [200, 1000), else in [0, 1000).

    At small t the noisy latent already shows the image and the caption adds little, so
    the cross-attention learns mostly from the middle and high noise levels; drawing
    them more often spends the small CPU budget where the words matter.
    """
    lo = torch.randint(0, 1000, (n,), generator=gen, device=device)
    hi = torch.randint(200, 1000, (n,), generator=gen, device=device)
    pick = torch.rand(n, generator=gen, device=device) < p_high
    return torch.where(pick, hi, lo)


# recipe settings added after checkpoints began to record their recipe, each with the value
# that every checkpoint written before it trained with
RECIPE_SINCE = {"p_none": 0.0, "p_extra": 0.0, "p_absent": 0.0}


def check_recipe(ckpt: Path, have: dict | None, want: dict, since: dict = RECIPE_SINCE) -> None:
    """Refuse to resume a checkpoint with another recipe (for the UNet: batch, learning rate,
    warm-up, EMA, timestep and omission chances; for the VAE: batch, learning rate, KL weight,
    crop): the result would be a mix that no record names. One ``SystemExit`` line names each
    setting that differs. ``since``: settings added after checkpoints began to record their
    recipe, with the value that older checkpoints trained with."""
    if have is None:
        raise SystemExit(f"{ckpt} does not record its training recipe (written by an older fgbg); "
                         f"resume it with that version, or train in a new --work folder")
    have = {**since, **have}
    if have != want:
        raise SystemExit(f"{ckpt} was trained with another recipe ({describe_diff(have, want)}); "
                         f"rerun with its settings, or train in a new --work folder")


def check_trained_on(ck: Path, st: dict, latents: dict) -> None:
    """Refuse a UNet checkpoint ``st`` (loaded from ``ck``) that trained on latents other
    than ``latents`` (a :func:`latents_record`: the VAE's weights and the corpus): resumed,
    or exported beside this VAE, it would be a model that no record names. A checkpoint
    written before checkpoints recorded their latents is taken as it is, with a printed line."""
    have = st.get("latents")
    if have is None:
        print(f"{ck} does not record the latents it trained on (written by an older fgbg): "
              f"taken to be this folder's")
    elif have != latents:
        raise SystemExit(f"{ck} trained on latents of another VAE or corpus ({describe_diff(have, latents)}); "
                         f"train it in a new --work folder")


def train_unet(corpus: str | Path, out: str | Path, steps: int = 6000, batch: int = 32, lr: float = 5e-4,
               warmup: int = 200, ema_decay: float = 0.998, cfg: TeachingConfig | None = None,
               device: str | None = None, tokenizer_dir: str | Path | None = None, log_every: int = 50,
               save_every: int = 250, threads: int | None = None, p_high: float = 0.7, p_omit: float = 0.0,
               p_none: float = 0.0, p_extra: float = 0.0, p_absent: float = 0.0, max_minutes: float | None = None,
               init_from: str | Path | None = None):
    """Train UNet + text encoder jointly on (latent, caption) pairs; epsilon MSE. Resumable.

    The text encoder is a lookup table (zero layers), so training it "jointly" means
    learning one embedding per word and position. ``p_high``: see :func:`sample_timesteps`;
    ``p_omit``, ``p_none``, ``p_extra``, ``p_absent``: see :func:`training_caption`. ``max_minutes`` stops early (after saving a
    checkpoint) when the budget is spent; a rerun resumes. ``init_from``: a saved teaching
    pipeline whose UNet and text encoder are the starting point (and the EMA's) when the
    folder has no checkpoint yet: continued training, with a fresh optimizer.
    """
    from .miniworld import load_corpus
    from .runs import progress_bar
    cfg = cfg or TeachingConfig()
    out = Path(out)
    if threads:
        torch.set_num_threads(threads)
    dev, amp = _device_and_dtype(device)
    torch.manual_seed(cfg.seed)
    _, scenes = load_corpus(corpus)
    lat = torch.load(out / "latents.pt", weights_only=True)
    why = stale_latents(lat, out / "vae_ckpt.pt", Path(corpus))
    if why is not None:
        raise SystemExit(f"{out / 'latents.pt'}: {why}; `python -m fgbg.teaching_model prepare` encodes them anew")
    mean, std, scale = lat["mean"].to(dev), lat["std"].to(dev), lat["scaling_factor"]
    tok = CaptionTokenizer(load_tokenizer(tokenizer_dir or out / "tokenizer"))
    extra = extra_vocabulary(tok.tok) if p_extra > 0 else ()
    unet, te = build_unet(cfg).to(dev), build_text_encoder(cfg).to(dev)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    sched = build_scheduler()
    abar = sched.alphas_cumprod.to(dev)
    step, ck = 0, out / "unet_ckpt.pt"
    # what a resumed run must share with the checkpoint (steps may grow; the device may change)
    recipe = {"batch": batch, "lr": lr, "warmup": warmup, "ema": ema_decay, "p_high": p_high, "p_omit": p_omit,
              "p_none": p_none, "p_extra": p_extra, "p_absent": p_absent}
    if ck.exists():
        st = torch.load(ck, map_location=dev, weights_only=True)
        check_recipe(ck, st.get("recipe"), recipe)
        check_trained_on(ck, st, lat["made_from"])
        unet.load_state_dict(st["unet"]); te.load_state_dict(st["te"]); opt.load_state_dict(st["opt"])
        ema = [e.to(dev) for e in st["ema"]]; step = st["step"]
    elif init_from is not None:
        src_unet, src_te = pipeline_weights(init_from)
        unet.load_state_dict(src_unet); te.load_state_dict(src_te)
        ema = [p.detach().clone() for p in params]
    rng = np.random.default_rng([cfg.seed, 20, step])
    gen = torch.Generator(dev).manual_seed(cfg.seed * 1000003 + step)
    it = _batches(len(mean), batch, rng)
    log = open(out / "unet_log.jsonl", "a")
    bar = progress_bar(total=steps, initial=step, desc="unet")
    t0 = time.time()
    while step < steps:
        idx = next(it)
        ids = tok([training_caption(scenes[i % len(scenes)], rng, p_omit=p_omit, p_none=p_none, p_extra=p_extra,
                                    extra_words=extra, p_absent=p_absent) for i in idx]).to(dev)
        z0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=gen, device=dev)) * scale
        t = sample_timesteps(len(idx), gen, dev, p_high)
        eps = torch.randn(z0.shape, generator=gen, device=dev)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            cond = te(ids).last_hidden_state
            pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == steps:
            log.write(json.dumps({"step": step, "loss": loss.item(), "sec": round(time.time() - t0, 1)}) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        out_of_time = max_minutes is not None and time.time() - t0 > 60 * max_minutes
        if step % save_every == 0 or step == steps or out_of_time:
            _save_ckpt(ck, {"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                            "ema": ema, "step": step, "recipe": recipe, "latents": lat["made_from"]})
        if out_of_time:
            print(f"stopping at step {step}: the {max_minutes}-minute budget is spent (rerun to resume)")
            break
    bar.close()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet, te


def assemble_pipeline(out: str | Path, cfg: TeachingConfig | None = None, save_to: str | Path | None = None,
                      dtype=torch.float16):
    """Build a StableDiffusionPipeline from the training folder (EMA weights) and save it
    in diffusers' save_pretrained layout (safetensors), loadable like SD v1.4."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    cfg = cfg or TeachingConfig()
    out = Path(out)
    vae = build_vae(cfg)
    vae.load_state_dict(torch.load(out / "vae_ckpt.pt", map_location="cpu", weights_only=True)["model"])
    vae.register_to_config(scaling_factor=torch.load(out / "latents.pt", weights_only=True)["scaling_factor"])
    unet, te = build_unet(cfg), build_text_encoder(cfg)
    st = torch.load(out / "unet_ckpt.pt", map_location="cpu", weights_only=True)
    check_trained_on(out / "unet_ckpt.pt", st, latents_record(out / "vae_ckpt.pt", out / "corpus"))
    unet.load_state_dict(st["unet"]); te.load_state_dict(st["te"])
    params = list(unet.parameters()) + list(te.parameters())
    with torch.no_grad():
        for p, e in zip(params, st["ema"]):
            p.copy_(e)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=load_tokenizer(out / "tokenizer"), unet=unet,
                                   scheduler=DDIMScheduler(**SCALED_LINEAR), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if save_to:
        pipe.to(dtype).save_pretrained(save_to, safe_serialization=True)
        tdir = Path(save_to) / "tokenizer"
        for f in ("vocab.json", "merges.txt"):  # transformers 4 reads these, 5 reads tokenizer.json
            (tdir / f).write_bytes((out / "tokenizer" / f).read_bytes())
        record = {"config": asdict(cfg), "unet_steps": st["step"]}
        if st.get("recipe") is not None:  # batch, lr, EMA, timestep and omission chances
            record["recipe"] = st["recipe"]
        if (out / "init_from.json").exists():  # continued training: steps counted from the source
            record["continued_from"] = json.loads((out / "init_from.json").read_text())
        if (out / "vae_from.json").exists():  # a fresh UNet on a saved pipeline's VAE
            record["vae_from"] = json.loads((out / "vae_from.json").read_text())
        if (out / "corpus" / "corpus.json").exists():  # what the corpus was made from
            record["corpus"] = json.loads((out / "corpus" / "corpus.json").read_text())
        (Path(save_to) / "fgbg_teaching.json").write_text(json.dumps(record, indent=1))
    return pipe


def _config(work: Path, seed: int | None, unet_channels: str | None) -> TeachingConfig:
    """The work folder's configuration: written by the first run, read by every later one
    (resume, export), so a checkpoint is never loaded into a differently shaped model.
    ``seed``/``unet_channels`` None: whatever the folder records."""
    f = work / "config.json"
    if f.exists():
        d = json.loads(f.read_text())
        cfg = TeachingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        asked = tuple(int(c) for c in unet_channels.split(",")) if unet_channels else cfg.unet_channels
        seed = cfg.seed if seed is None else seed
        if asked != cfg.unet_channels or seed != cfg.seed:
            raise SystemExit(f"{f} says unet_channels={cfg.unet_channels}, seed={cfg.seed}; this run asks "
                             f"{asked}, seed={seed}. Use another --work folder for another model.")
        return cfg
    cfg = TeachingConfig(seed=0 if seed is None else seed)
    if unet_channels:
        cfg.unet_channels = tuple(int(c) for c in unet_channels.split(","))
    work.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(asdict(cfg), indent=1))
    return cfg


def _saved_pipeline(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder}: not a saved pipeline (no model_index.json)")
    return folder


def pipeline_weights(folder: str | Path) -> tuple[dict, dict]:
    """The fp32 state dicts of a saved pipeline's UNet and text encoder (diffusers layout)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    folder = _saved_pipeline(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32)
    return unet.state_dict(), te.state_dict()


def prepare(work: Path, cfg: TeachingConfig, corpus_size: int, vae_steps: int, device: str | None = None,
            vae_batch: int = 32, init_from: str | Path | None = None, vae_from: str | Path | None = None,
            world: str = "v1", bird_share: float = CORPUS_BIRD_SHARE) -> None:
    """Corpus, tokenizer files, VAE and the encoded latents: everything the UNet trains on.
    Each part is skipped when it is already there; a corpus already there must have been
    made from ``corpus_size``, the image size, the seed, ``world`` and ``bird_share``
    (its ``corpus.json``), else it is refused. ``init_from``: take the VAE, and the
    latents' scaling factor, from this saved pipeline instead of training a new VAE, so
    that its UNet sees the latents it was trained on. ``vae_from``: the same for the VAE
    alone (recorded as ``vae_from.json``); the UNet and text encoder then start from scratch."""
    if init_from is not None and vae_from is not None:
        raise SystemExit("--init-from already takes the pipeline's VAE: give --init-from or --vae-from, not both")
    source, marker, flag = ((init_from, "init_from.json", "--init-from") if init_from is not None
                            else (vae_from, "vae_from.json", "--vae-from"))
    if source is not None:
        _saved_pipeline(source)
        if (work / "vae_ckpt.pt").exists() and not (work / marker).exists():
            raise SystemExit(f"{work} trains its own VAE (or took it otherwise); {flag} {source} needs a new "
                             f"--work folder (its UNet must see its own VAE's latents)")
        if not (work / "vae_ckpt.pt").exists():
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(Path(source), subfolder="vae", torch_dtype=torch.float32)
            work.mkdir(parents=True, exist_ok=True)
            record = Path(source) / "fgbg_teaching.json"
            atomic_write_text(work / marker, json.dumps(
                {"pipeline": str(source),
                 "unet_steps": json.loads(record.read_text()).get("unet_steps") if record.exists() else None}))
            _save_ckpt(work / "vae_ckpt.pt", {"model": vae.state_dict(), "opt": None, "step": vae_steps,
                                              "scaling_factor": float(vae.config.scaling_factor)})
    if not (work / "corpus" / "scenes.jsonl").exists():
        write_corpus(work / "corpus", corpus_size, cfg.image_size, cfg.seed, workers=max(1, (os.cpu_count() or 1)),
                     world=world, bird_share=bird_share)
    try:  # a corpus already there (left by an earlier run, or copied in) must be the one asked for
        check_corpus(work / "corpus", corpus_record(corpus_size, cfg.image_size, cfg.seed, world, bird_share))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not (work / "tokenizer" / "vocab.json").exists():
        (work / "tokenizer").mkdir(parents=True, exist_ok=True)
        if (CLIP_TOKENIZER_DIR / "vocab.json").exists():  # the shipped copy of the CLIP BPE files
            for f in ("vocab.json", "merges.txt"):
                (work / "tokenizer" / f).write_bytes((CLIP_TOKENIZER_DIR / f).read_bytes())
        else:
            tokenizer_files_from_open_clip(work / "tokenizer")
    ck, vae = work / "vae_ckpt.pt", None
    if ck.exists() and not any((work / m).exists() for m in ("init_from.json", "vae_from.json")):
        done = torch.load(ck, map_location="cpu", weights_only=True)["step"]
        if done < vae_steps:
            if (work / "unet_ckpt.pt").exists():
                raise SystemExit(f"{ck} has {done} steps and {work / 'unet_ckpt.pt'} trained on its latents: "
                                 f"--vae-steps {vae_steps} would change them under it; keep --vae-steps {done}, "
                                 f"or train in a new --work folder")
            print(f"{ck} has {done} steps: training it on to --vae-steps {vae_steps} (its latents are then encoded anew)")
            vae = train_vae(work / "corpus", work, vae_steps, vae_batch, cfg=cfg, device=device)
        elif done > vae_steps:
            print(f"{ck} has {done} steps, more than --vae-steps {vae_steps}: kept as it is")
    if (work / "latents.pt").exists():
        why = (stale_latents(torch.load(work / "latents.pt", weights_only=True), work / "vae_ckpt.pt", work / "corpus")
               if (work / "vae_ckpt.pt").exists() else "the folder has no VAE to check them against")
        if why is not None:
            print(f"{work / 'latents.pt'}: {why}; encoding them anew")
            (work / "latents.pt").unlink()
    if not (work / "latents.pt").exists():
        if vae is None:  # not just trained on above
            vae = train_vae(work / "corpus", work, vae_steps, vae_batch, cfg=cfg, device=device)
        # a pipeline's VAE keeps the factor its UNet was trained with
        fixed = torch.load(work / "vae_ckpt.pt", weights_only=True).get("scaling_factor")
        scale = encode_corpus(vae, work / "corpus", work, device=device, scaling_factor=fixed,
                              made_from=latents_record(work / "vae_ckpt.pt", work / "corpus"))
        print("kept the pipeline's scaling factor" if fixed is not None else "latent scaling factor", scale)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fgbg.teaching_model", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the teaching model from scratch (resumes when rerun); the "
                       "defaults are the shipped model's recipe (docs/teaching_model.md)")
    r = sub.add_parser("prepare", help="only corpus, tokenizer, VAE and latents (the first part of train)")
    for q in (t, r):
        q.add_argument("--work", default="data/teaching-train", help="working folder (corpus, checkpoints, logs)")
        q.add_argument("--corpus-size", type=int, default=30000)
        q.add_argument("--vae-steps", type=int, default=2000)
        q.add_argument("--vae-batch", type=int, default=32)
        q.add_argument("--unet-channels", default=None, help="e.g. 32,64,128 (the default)")
        q.add_argument("--device", default=None)
        q.add_argument("--threads", type=int, default=None)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--world", default="v1", choices=WORLDS, help="the mini world of the corpus")
        q.add_argument("--bird-share", type=parse_share, default=CORPUS_BIRD_SHARE,
                       help="share of birds among the corpus's objects (a number or a fraction such as 1/6)")
        q.add_argument("--vae-from", default=None, metavar="PIPELINE",
                       help="take only the VAE (and its latent scaling factor) of a saved teaching pipeline; "
                            "the UNet and text embeddings train from scratch")
    t.add_argument("--steps", type=int, default=2000, help="UNet steps")
    t.add_argument("--batch", type=int, default=1024)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--p-omit", type=float, default=0.6, help="chance that a caption leaves an object unnamed")
    t.add_argument("--p-none", type=float, default=0.0,
                   help="chance that a caption of a scene with objects names none of them, only the background")
    t.add_argument("--p-extra", type=float, default=0.0,
                   help="chance that a caption carries one to three words that name nothing in the picture")
    t.add_argument("--p-absent", type=float, default=0.0,
                   help="chance that a caption also names an object of a class the picture does not hold")
    t.add_argument("--p-high", type=float, default=0.7, help="chance of a timestep from [200, 1000)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this many minutes")
    t.add_argument("--save-to", default=None, help="write the finished pipeline here (default: the work folder/pipeline)")
    t.add_argument("--init-from", default=None, metavar="PIPELINE",
                   help="continue training a saved teaching pipeline (its VAE, UNet and text encoder) "
                        "instead of starting from scratch, e.g. fgbg/assets/teaching-model")
    e = sub.add_parser("export", help="write the pipeline of the latest checkpoint (EMA weights)")
    e.add_argument("--work", default="data/teaching-train")
    e.add_argument("--save-to", required=True)
    a = p.parse_args(argv)
    if a.cmd == "export":
        work = Path(a.work)
        cfg = _config(work, None, None) if (work / "config.json").exists() else TeachingConfig()
        assemble_pipeline(a.work, cfg, save_to=a.save_to)
        print(f"wrote {a.save_to}")
        return
    work = Path(a.work)
    cfg = _config(work, a.seed, a.unet_channels)
    if a.threads:
        torch.set_num_threads(a.threads)
    init_from = getattr(a, "init_from", None)
    prepare(work, cfg, a.corpus_size, a.vae_steps, a.device, a.vae_batch, init_from=init_from, vae_from=a.vae_from,
            world=a.world, bird_share=a.bird_share)
    if a.cmd == "prepare":
        return
    train_unet(work / "corpus", work, a.steps, a.batch, a.lr, ema_decay=a.ema, cfg=cfg, device=a.device,
               p_high=a.p_high, p_omit=a.p_omit, p_none=a.p_none, p_extra=a.p_extra, p_absent=a.p_absent,
               max_minutes=a.max_minutes, init_from=init_from)
    assemble_pipeline(work, cfg, save_to=a.save_to or work / "pipeline")


if __name__ == "__main__":
    main()
