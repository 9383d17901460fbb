"""Why is the teaching model's bird vs other low: is the class in the word? A diagnostic of
docs/teaching_model.md, on the distractor split (bird + one other object) of a course world.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/word_specificity.py \
        --model fgbg/assets/teaching-model --world v2 --out runs/wordspec/shipped

Step 1 exactly as the course runs it (default parameters, the same noise per image), but
with the maps kept per noise level and per layer resolution, and once more with the other
object's word in the prompt ("a photo of a car"), and once with both ("a photo of a bird
and a car"). Per model, and for the untrained network
(``fgbg.course.untrained_copy``):

- ``bird_vs_other``: the course's number (the "bird" map, mean over levels and layers,
  ranking the bird's pixels above the other object's);
- ``by_level``: the same from one quarter of the noise levels at a time (high noise first);
- ``by_resolution``: the same from the layers of one resolution only;
- ``other_word``: the map of the other object's word, ranking *its* object above the bird;
- ``word_contrast``: the "bird" map minus the other word's map (same image, same noise),
  ranking the bird above the other object. Near 0.5: the two words draw the same map, so
  the word carries no class. High while ``bird_vs_other`` is low: the class is in the word,
  but a shared "object here" part of the map outweighs it;
- ``named_together``: the map of "bird" under "a photo of a bird and a car" (both objects
  named), ranking the bird above the other object. Where the two words compete in the
  softmax, only the difference of their maps decides; ``bird_vs_other`` asks instead
  whether "bird" alone, against the padding and the prompt's other tokens, avoids an
  object nobody named;
- ``by_size``: the four, on the images where the bird is the larger object and where it is
  the smaller one (areas in pixels of the exact masks), and their Spearman correlation with
  log(bird area / other area); ``images``: every image's numbers;
- ``by_size_resolution``: bird vs other from the layers of one resolution only, on the
  images where the bird is the larger and the smaller object. If low-resolution maps
  smearing a small object were why the map prefers the larger object, the preference
  would shrink at the finest layers;
- ``unseen_word``: the map of a word that no training caption contains
  (``fgbg.miniworld.UNSEEN_WORDS``; a trained model's embedding of it is still the random
  one it started with) under "a photo of a zebra", ranking the bird above the other
  object, as ``bird_vs_other`` does for "bird"; the mean over the unseen words. Near
  ``bird_vs_other``: what the map of "bird" shows is not the word's doing;
- ``object_vs_background`` and ``unseen_object_vs_background``: the map of "bird" and of
  the unseen words, ranking both objects' pixels above the background's. High for the
  unseen words too: the objects' pixels attend away from the padding to whatever words the
  prompt has, a property of the image side of the attention, not of the word;
- ``token_mass``: where the attention goes under "a photo of a bird": the mean probability
  (over levels, layers and the region's pixels) of each group of tokens (start, the
  prompt's other words, "bird", end, padding) on the bird, on the other object and on
  the background. An untrained network gives each of the 77 tokens about 1/77.

None of this changes the course's evaluation; it says what limits it. Writes
``<out>/word_specificity.json`` and prints it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _auc(m, pos, neg):
    from fgbg.metrics import separation_auc
    return separation_auc(m, pos, neg)


def token_groups(tokens: list[str], word: list[int]) -> dict[str, list[int]]:
    """The positions of a prompt's tokens by role: ``start`` (position 0), ``other words``
    (the prompt's words but ``word``), ``word``, ``end`` (the first end token) and
    ``padding`` (every position after it). ``tokens``: the 77 decoded tokens of
    ``fgbg.attention.prompt_tokens``."""
    end = next(i for i, t in enumerate(tokens) if i > 0 and t == "<|endoftext|>")
    return {"start": [0], "other words": [i for i in range(1, end) if i not in word], "word": list(word),
            "end": [end], "padding": list(range(end + 1, len(tokens)))}


def score(pipe, items, scenes: dict, P: dict) -> dict:
    import torch
    from fgbg.attention import compute_attention_maps, find_token_indices, seed_for
    from fgbg.data import load_item, map_back, read_mask
    from fgbg.miniworld import UNSEEN_WORDS
    from fgbg.models import canvas_size
    canvas = canvas_size(pipe)
    per = {k: [] for k in ("bird_vs_other", "other_word", "word_contrast", "named_together", "unseen_word",
                           "object_vs_background", "unseen_object_vs_background")}
    by_level, by_res, images = {}, {}, []
    groups = None
    mass = {}
    for it in items:
        others = [o["cls"] for o in scenes[it.rel]["objects"] if o["cls"] != "bird"]
        if len(set(others)) != 1:
            continue
        other = others[0]
        x, pl, _ = load_item(it, canvas=canvas, mode=P["resize_mode"])
        shape = (pl.height, pl.width)
        gt, dis = read_mask(it.gt_path, shape), read_mask(it.distractor_path, shape)
        dis = dis & ~gt
        if not gt.any() or not dis.any():
            continue
        maps = {}
        for name, prompt, word in (("bird", "a photo of a bird", "bird"), (other, f"a photo of a {other}", other),
                                   ("together", f"a photo of a bird and a {other}", "bird"),
                                   *((f"unseen {w}", f"a photo of a {w}", w) for w in UNSEEN_WORDS)):
            tok = find_token_indices(pipe.tokenizer, prompt, word)
            g = torch.Generator().manual_seed(seed_for(P["seed"], it.key))  # the course's noise for this image
            maps[name] = (compute_attention_maps(pipe, x[None].to(pipe.unet.dtype), prompt, P["rev_diff_steps"],
                                                 P["num_inference_steps"], P["num_repeat_each_diffusion_step"],
                                                 by_level=True, unet_batch=P["unet_batch"], generator=g), tok)
        mb, tb = maps["bird"]
        mo, to = maps[other]
        back = lambda a: map_back(a.numpy(), pl, "bilinear")  # noqa: E731
        bird = back(mb.mean()[0, tb].sum(0))
        oth = back(mo.mean()[0, to].sum(0))
        per["bird_vs_other"].append(_auc(bird, gt, dis))
        per["other_word"].append(_auc(oth, dis, gt))
        per["word_contrast"].append(_auc(bird - oth, gt, dis))
        mt, tt = maps["together"]
        per["named_together"].append(_auc(back(mt.mean()[0, tt].sum(0)), gt, dis))
        unseen = [back(m.mean()[0, t].sum(0)) for m, t in (maps[f"unseen {w}"] for w in UNSEEN_WORDS)]
        per["unseen_word"].append(float(np.mean([_auc(u, gt, dis) for u in unseen])))
        per["object_vs_background"].append(_auc(bird, gt | dis, ~gt & ~dis))
        per["unseen_object_vs_background"].append(float(np.mean([_auc(u, gt | dis, ~gt & ~dis) for u in unseen])))
        images.append({"key": it.key, "other": other, "bird_pixels": int(gt.sum()), "other_pixels": int(dis.sum()),
                       **{k: round(v[-1], 4) for k, v in per.items()}})
        L = len(mb.timesteps)
        for q in range(4):
            lv = slice(q * L // 4, (q + 1) * L // 4)
            key = f"t {mb.timesteps[lv.start]}-{mb.timesteps[lv.stop - 1]}"
            by_level.setdefault(key, []).append(_auc(back(mb.mean(lv)[0, tb].sum(0)), gt, dis))
        for r in mb.resolutions:
            auc = _auc(back(mb.mean(resolutions=[r])[0, tb].sum(0)), gt, dis)
            by_res.setdefault(f"{r}x{r}", []).append(auc)
            images[-1][f"bird_vs_other {r}x{r}"] = round(auc, 4)
        if groups is None:
            groups = token_groups(mb.tokens, tb)
        every = mb.mean()[0]
        for name, toks in groups.items():
            a = back(every[toks].sum(0))
            for region, msk in (("bird", gt), ("other", dis), ("background", ~gt & ~dis)):
                mass.setdefault(region, {}).setdefault(name, []).append(float(a[msk].mean()))
    mean = lambda v: round(float(np.mean(v)), 4)  # noqa: E731
    out = {k: mean(v) for k, v in per.items()}
    out["n"] = len(per["bird_vs_other"])
    out["by_level"] = {k: mean(v) for k, v in by_level.items()}
    out["by_resolution"] = {k: mean(v) for k, v in by_res.items()}
    # the objects' areas: is the map of a word about its class, or about the larger object?
    bigger = [im for im in images if im["bird_pixels"] > im["other_pixels"]]
    smaller = [im for im in images if im["bird_pixels"] <= im["other_pixels"]]
    out["by_size"] = {name: {"n": len(g), **({k: mean([im[k] for im in g]) for k in per} if g else {})}
                      for name, g in (("bird larger", bigger), ("bird smaller", smaller))}
    out["by_size_resolution"] = {f"{r}x{r}": {name: mean([im[f"bird_vs_other {r}x{r}"] for im in g])
                                              for name, g in (("bird larger", bigger), ("bird smaller", smaller)) if g}
                                 for r in (mb.resolutions if images else [])}
    out["token_mass"] = {region: {k: mean(v) for k, v in d.items()} for region, d in mass.items()}
    if len(images) > 2:
        from scipy.stats import spearmanr
        ratio = [np.log(im["bird_pixels"] / im["other_pixels"]) for im in images]
        out["spearman_with_log_area_ratio"] = {k: round(float(spearmanr(ratio, [im[k] for im in images])[0]), 3)
                                               for k in per}
    out["images"] = images
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--world", default="v2")
    ap.add_argument("--data", default="runs/ab/data", help="course datasets, one folder per world")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-untrained", action="store_true")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from fgbg import course, evaluate, miniworld, models, params
    from fgbg.data import load_dataset
    P = params.defaults()
    base = ROOT / a.data / a.world
    if not (base / "images.txt").is_file():
        miniworld.write_course_dataset(base, n_train=miniworld.FIRST_TRAIN, world=a.world)
    items = evaluate.split_subsets(load_dataset(base, splits=["test"]))["distractor"]
    scenes = json.loads((base / "scenes.json").read_text())
    pipe = models.load_pipeline(a.model, "cpu", P["dtype"])
    res = {"model": a.model, "world": a.world, "model_scores": score(pipe, items, scenes, P)}
    if not a.no_untrained:
        res["untrained"] = score(course.untrained_copy(pipe, seed=P["seed"]), items, scenes, P)
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "word_specificity.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
