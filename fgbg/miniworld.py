"""The mini world: a seeded procedural dataset with exact ground-truth masks.

Real datasets (CUB-200-2011) and real Stable Diffusion weights cannot be downloaded
offline, so the course runs on a small world of its own. Every image is drawn from a
*scene* - a background texture plus one to three objects - and everything about the
scene is known exactly: each object's class, colour, pose and pixel mask, and a caption
that names them ("a photo of a red bird and a yellow fish on grass").

Two products, from disjoint seeds:

* the **course dataset** (:func:`write_course_dataset`), in the reference code's layout
  (``images.txt`` with ``images/<folder>/<name>.png <split>`` lines, split 0 = test,
  1 = train, 2 = val; ``segmentations/<same path>.png`` holding the *bird* mask). Every
  course image holds one bird; the folder ``distractor`` holds test images where a
  non-bird object shares the image, whose masks are in ``distractors/<same path>.png``.
* the **captioned corpus** (:func:`make_corpus`) the teaching model is trained on:
  images with captions only, no masks are ever written or used for training.

Run ``python -m fgbg.miniworld --help``.

Shapes are rendered by 4x supersampling; the mask of an object is where its coverage of
the pixel is at least one half, after occlusion by the objects drawn over it.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .io import atomic_write_text, save_png

SS = 4  # supersampling factor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (240, 130, 20),
    "yellow": (240, 215, 40),
    "green": (50, 160, 50),
    "blue": (40, 80, 210),
    "purple": (130, 50, 170),
    "pink": (240, 130, 180),
    "brown": (120, 75, 35),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
}
BACKGROUNDS = ("sky", "grass", "water", "sand", "brick", "snow", "forest", "wall")
OBJECTS = ("bird", "fish", "flower", "house", "car", "ball")
DISTRACTORS = tuple(o for o in OBJECTS if o != "bird")


@dataclass
class Obj:
    cls: str
    colour: str
    cx: float  # centre, in pixels
    cy: float
    size: float  # body length, in pixels
    angle: float  # radians
    flip: bool
    pose: int  # class-specific variant


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)
    seed: int = 0

    def caption(self, colour: bool = True, background: bool = True) -> str:
        """The caption, e.g. "a photo of a red bird and a yellow fish on grass"."""
        return caption_for(self, [colour] * len(self.objects), background)

    def to_json(self) -> dict:
        return {"background": self.background, "seed": self.seed,
                "objects": [asdict(o) for o in self.objects]}


# how a caption names each background, after the objects and alone
BACKGROUND_PHRASES = {"sky": ("in the sky", "the sky"), "grass": ("on grass", "grass"),
                      "water": ("on water", "water"), "sand": ("on sand", "sand"),
                      "brick": ("by a brick wall", "a brick wall"), "snow": ("on snow", "snow"),
                      "forest": ("in a forest", "a forest"), "wall": ("by a wall", "a wall")}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(scene: Scene, colours: list[bool], background: bool) -> str:
    """Caption naming every object (with or without its colour) and maybe the background."""
    after, alone = BACKGROUND_PHRASES[scene.background]
    if not scene.objects:
        return f"a photo of {alone}"
    names = [(f"{o.colour} {o.cls}" if c else o.cls) for o, c in zip(scene.objects, colours)]
    text = "a photo of " + " and ".join(f"{_article(n)} {n}" for n in names)
    return text + (f" {after}" if background else "")


# --------------------------------------------------------------------------- textures
def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = h // scale + 2, w // scale + 2
    g = rng.random((gh, gw))
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def render_background(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A textured background as float RGB in [0, 1], shape (h, w, 3)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    n1 = _smooth_noise(rng, h, w, max(2, h // 8))[..., None]
    n2 = rng.random((h, w, 1))
    jitter = rng.uniform(-0.06, 0.06, 3)
    if kind == "sky":
        top, bottom = np.array([0.35, 0.6, 0.95]), np.array([0.7, 0.85, 1.0])
        img = top + (bottom - top) * yy[..., None]
        clouds = np.clip((_smooth_noise(rng, h, w, max(2, h // 5)) - 0.55) * 4, 0, 1)[..., None]
        img = img * (1 - clouds) + 0.97 * clouds
    elif kind == "grass":
        img = np.array([0.25, 0.55, 0.2]) + 0.15 * (n1 - 0.5) + 0.12 * (n2 - 0.5) * np.array([0.5, 1, 0.3])
    elif kind == "water":
        waves = 0.5 + 0.5 * np.sin(xx * 40 + 6 * n1[..., 0] + yy * 8)[..., None]
        img = np.array([0.1, 0.35, 0.6]) + 0.12 * waves + 0.05 * (n2 - 0.5)
    elif kind == "sand":
        img = np.array([0.86, 0.76, 0.52]) + 0.08 * (n1 - 0.5) + 0.1 * (n2 - 0.5)
    elif kind == "brick":
        bh = max(3, h // 8)
        row = (np.arange(h) // bh)[:, None]
        bw = 2 * bh
        col = ((np.arange(w)[None, :] + (row % 2) * bw // 2) % bw)
        mortar = ((np.arange(h)[:, None] % bh) == 0) | (col == 0)
        img = np.array([0.65, 0.25, 0.18]) + 0.1 * (n1 - 0.5) + 0.06 * (n2 - 0.5)
        img = np.where(mortar[..., None], np.array([0.8, 0.78, 0.72]), img)
    elif kind == "snow":
        img = np.array([0.92, 0.94, 0.97]) + 0.05 * (n1 - 0.5) + 0.04 * (n2 - 0.5)
    elif kind == "forest":
        trunks = (np.sin(xx * 25 + 3 * n1[..., 0]) > 0.6)[..., None]
        img = np.array([0.12, 0.3, 0.12]) + 0.12 * (n1 - 0.5) + 0.08 * (n2 - 0.5)
        img = np.where(trunks, np.array([0.3, 0.2, 0.1]) + 0.05 * (n2 - 0.5), img)
    elif kind == "wall":
        img = np.array([0.78, 0.72, 0.62]) + 0.05 * (n1 - 0.5) + 0.03 * (n2 - 0.5)
    else:
        raise ValueError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    return np.clip(img + jitter * 0.5, 0, 1)


# --------------------------------------------------------------------------- shapes
# Each shape is a boolean function of coordinates (u, v) in the object's own frame:
# u along the body (forward), v across it (down), both in units of the object size.
def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _triangle(u, v, p0, p1, p2):
    def side(a, b):
        return (b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0])
    s0, s1, s2 = side(p0, p1), side(p1, p2), side(p2, p0)
    return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))


def _rect(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _parts(o: Obj, u: np.ndarray, v: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """The object's parts as (coverage mask, colour role) pairs, drawn in order."""
    if o.cls == "bird":
        wing_v = (-0.28, 0.0, 0.02)[o.pose % 3]  # wings up, level, folded
        parts = [
            (_triangle(u, v, (-0.3, -0.02), (-0.62, -0.16), (-0.6, 0.14)), "body"),  # tail
            (_ellipse(u, v, -0.02, 0.0, 0.34, 0.19), "body"),
            (_ellipse(u, v, 0.3, -0.13, 0.13, 0.13), "body"),  # head
            (_triangle(u, v, (0.4, -0.17), (0.4, -0.07), (0.56, -0.11)), "beak"),
            (_ellipse(u, v, -0.05, wing_v - 0.04, 0.22, 0.11 if o.pose % 3 == 0 else 0.08), "wing"),
            (_ellipse(u, v, 0.34, -0.16, 0.025, 0.025), "eye"),
        ]
        if o.pose % 3 != 0:  # perched birds show legs
            parts.append((_rect(u, v, -0.06, -0.03, 0.15, 0.32) | _rect(u, v, 0.04, 0.07, 0.15, 0.32), "beak"))
        return parts
    if o.cls == "fish":
        return [
            (_triangle(u, v, (-0.25, 0.0), (-0.55, -0.22), (-0.55, 0.22)), "body"),
            (_ellipse(u, v, 0.05, 0.0, 0.36, 0.17 + 0.04 * (o.pose % 2)), "body"),
            (_triangle(u, v, (-0.05, -0.14), (0.15, -0.14), (-0.12, -0.3)), "wing"),
            (_ellipse(u, v, 0.27, -0.04, 0.03, 0.03), "eye"),
        ]
    if o.cls == "flower":
        parts = [(_rect(u, v, -0.03, 0.03, 0.0, 0.5), "stem")]
        k = 5 + o.pose % 3
        for i in range(k):
            a = 2 * math.pi * i / k
            parts.append((_ellipse(u, v, 0.17 * math.cos(a), -0.12 + 0.17 * math.sin(a), 0.11, 0.11), "body"))
        parts.append((_ellipse(u, v, 0.0, -0.12, 0.09, 0.09), "centre"))
        return parts
    if o.cls == "house":
        return [
            (_rect(u, v, -0.3, 0.3, -0.08, 0.4), "body"),
            (_triangle(u, v, (-0.4, -0.06), (0.4, -0.06), (0.0, -0.42)), "roof"),
            (_rect(u, v, -0.06, 0.08, 0.16, 0.4), "door"),
        ]
    if o.cls == "car":
        return [
            (_rect(u, v, -0.45, 0.45, -0.08, 0.14), "body"),
            (_rect(u, v, -0.22, 0.2, -0.26, -0.06), "body"),
            (_rect(u, v, -0.16, 0.0, -0.22, -0.09) | _rect(u, v, 0.04, 0.15, -0.22, -0.09), "window"),
            (_ellipse(u, v, -0.27, 0.15, 0.11, 0.11) | _ellipse(u, v, 0.27, 0.15, 0.11, 0.11), "wheel"),
        ]
    if o.cls == "ball":
        return [
            (_ellipse(u, v, 0.0, 0.0, 0.3, 0.3), "body"),
            (_ellipse(u, v, 0.0, 0.0, 0.3, 0.06 + 0.04 * (o.pose % 2)), "stripe"),
        ]
    raise ValueError(f"unknown object class {o.cls!r}; known: {', '.join(OBJECTS)}")


_ACCENT = {"beak": (235, 160, 30), "eye": (10, 10, 10), "stem": (40, 120, 40), "centre": (250, 220, 60),
           "roof": (110, 40, 30), "door": (70, 45, 25), "window": (170, 210, 240), "wheel": (20, 20, 20),
           "stripe": (245, 245, 245)}


def _part_colour(o: Obj, role: str) -> np.ndarray:
    base = np.array(COLOURS[o.colour], dtype=float) / 255
    if role == "body":
        return base
    if role == "wing":
        return base * 0.75 + 0.05
    if role == "centre" and o.colour == "yellow":
        return np.array([0.5, 0.3, 0.1])
    if role == "stripe" and o.colour == "white":
        return np.array([0.1, 0.1, 0.1])
    return np.array(_ACCENT[role], dtype=float) / 255


def _downsample(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // SS, a.shape[1] // SS
    return a.reshape(h, SS, w, SS, *a.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene, h: int = 64, w: int = 64, full: bool = False):
    """Render a scene: uint8 RGB image (h, w, 3) and one boolean visible mask per object.

    With ``full=True`` also the masks each object would have if nothing covered it.
    """
    rng = np.random.default_rng(scene.seed)
    bg = render_background(scene.background, h, w, rng)
    H, W = h * SS, w * SS
    ys, xs = (np.mgrid[0:H, 0:W] + 0.5) / SS
    canvas = np.repeat(np.repeat(bg, SS, 0), SS, 1)
    owner = np.full((H, W), -1, dtype=np.int8)
    whole = []
    for k, o in enumerate(scene.objects):
        dx, dy = xs - o.cx, ys - o.cy
        ca, sa = math.cos(o.angle), math.sin(o.angle)
        u = (dx * ca + dy * sa) / o.size
        v = (-dx * sa + dy * ca) / o.size
        if o.flip:
            u = -u
        shade = 1.0 + 0.08 * rng.standard_normal()
        cover_all = np.zeros((H, W), bool)
        for cover, role in _parts(o, u, v):
            canvas[cover] = np.clip(_part_colour(o, role) * shade, 0, 1)
            owner[cover] = k
            cover_all |= cover
        whole.append(_downsample(cover_all.astype(np.float32)) >= 0.5)
    img = np.clip(_downsample(canvas) * 255 + 0.5, 0, 255).astype(np.uint8)
    masks = [_downsample((owner == k).astype(np.float32)) >= 0.5 for k in range(len(scene.objects))]
    return (img, masks, whole) if full else (img, masks)


# --------------------------------------------------------------------------- scenes
def random_object(rng: np.random.Generator, cls: str, h: int, w: int) -> Obj:
    s = min(h, w)
    size = rng.uniform(0.35, 0.7) * s
    # centres may lie close to the border: objects are cut by it sometimes
    return Obj(cls=cls, colour=str(rng.choice(list(COLOURS))),
               cx=float(rng.uniform(0.12, 0.88) * w), cy=float(rng.uniform(0.15, 0.85) * h),
               size=float(size), angle=float(rng.normal(0, 0.25)), flip=bool(rng.random() < 0.5),
               pose=int(rng.integers(0, 6)))


def random_scene(rng: np.random.Generator, classes: list[str], h: int = 64, w: int = 64,
                 background: str | None = None) -> Scene:
    """A scene with the given object classes, placed so that each stays mostly visible."""
    bg = background or str(rng.choice(BACKGROUNDS))
    seed = int(rng.integers(0, 2**31))
    for _ in range(50):
        objs = [random_object(rng, c, h, w) for c in classes]
        scene = Scene(bg, objs, seed)
        if not objs:
            return scene
        _, masks, whole = render(scene, h, w, full=True)
        if all(m.sum() >= 0.6 * f.sum() and m.sum() >= 20 for m, f in zip(masks, whole)):
            return scene
    return scene


def _course_scene(rng, h, w, distractor: bool) -> Scene:
    classes = ["bird"]
    if distractor:
        classes.append(str(rng.choice(DISTRACTORS)))
        rng.shuffle(classes)
    return random_scene(rng, classes, h, w)


FIRST_TRAIN = 64
"""Train images drawn in the course stream before val/test; further ones have their own stream."""


def write_course_dataset(base_dir: str | Path, n_train: int = 128, n_val: int = 8, n_test: int = 40,
                         n_distractor: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Write the course dataset in the reference layout (see module docstring).

    Returns ``base_dir``. Existing files are overwritten, so the same arguments always
    give the same bytes; ``miniworld.json`` records the arguments.

    Seeds: the first 64 train images, then the val, test and distractor images come from
    one stream, in that order (as in the first release, whose train split had 64 images);
    train images 64 and beyond come from a stream of their own. So growing the train split
    never changes a test image.
    """
    base = Path(base_dir)
    rng = np.random.default_rng([seed, 1])  # stream 1: course; the corpus uses stream 2
    more = np.random.default_rng([seed, 4])  # stream 4: train images beyond the first 64
    lines: dict[str, list[str]] = {}
    meta = {}
    plan = [("train", 1, min(n_train, FIRST_TRAIN), False, rng), ("val", 2, n_val, False, rng),
            ("test", 0, n_test, False, rng), ("distractor", 0, n_distractor, True, rng),
            ("train", 1, max(0, n_train - FIRST_TRAIN), False, more)]
    for folder, split, n, distract, r in plan:
        for _ in range(n):
            i = len(lines.setdefault(folder, []))
            scene = _course_scene(r, size, size, distract)
            img, masks = render(scene, size, size)
            rel = f"images/{folder}/{folder}_{i:04d}.png"
            save_png(base / rel, img)
            bird = [m for o, m in zip(scene.objects, masks) if o.cls == "bird"][0]
            save_png(base / "segmentations" / rel[len("images/"):], bird.astype(np.uint8) * 255)
            if distract:
                other = np.any([m for o, m in zip(scene.objects, masks) if o.cls != "bird"], axis=0)
                save_png(base / "distractors" / rel[len("images/"):], other.astype(np.uint8) * 255)
            lines[folder].append(f"{rel} {split}")
            meta[rel] = {"caption": scene.caption(), **scene.to_json()}
    atomic_write_text(base / "images.txt", "".join(f"{line}\n" for f in ("train", "val", "test", "distractor")
                                                   for line in lines.get(f, [])))
    atomic_write_text(base / "scenes.json", json.dumps(meta, indent=1))
    atomic_write_text(base / "README.txt", (
        "fgbg mini world course dataset (python -m fgbg.miniworld course).\n"
        "images.txt: '<relative path> <split>' with split 0 = test, 1 = train, 2 = val.\n"
        "segmentations/: bird masks (0/255). distractors/: masks of the non-bird object\n"
        "in the distractor test subset. scenes.json: the scene behind every image.\n"
        "miniworld.json: the arguments that wrote it.\n"))
    atomic_write_text(base / "miniworld.json", json.dumps(dict(
        kind="course", n_train=n_train, n_val=n_val, n_test=n_test, n_distractor=n_distractor, size=size,
        seed=seed), indent=1))
    return base


def is_outdated_course_dataset(base_dir: str | Path) -> bool:
    """Whether ``base_dir`` holds a course dataset written before ``miniworld.json`` existed
    (session 2 and earlier: 64 train images). A folder that is not a mini world, or one
    written with any arguments since, is never outdated."""
    base = Path(base_dir)
    try:
        written_by_fgbg = (base / "README.txt").read_text().startswith("fgbg mini world course dataset")
    except OSError:
        return False
    return written_by_fgbg and not (base / "miniworld.json").exists()


def write_cub_like(root: str | Path, n_train: int = 4, n_test: int = 4, h: int = 375, w: int = 500,
                   seed: int = 0) -> Path:
    """Mini-world bird images in the *official* CUB-200-2011 layout, at CUB's typical size.

    ``root/CUB_200_2011/{images.txt, train_test_split.txt, images/<class>/<name>.jpg}`` and
    the masks beside it in ``root/segmentations/<class>/<name>.png``, where CUB's separate
    archive unpacks. For checking the CUB parameters (params/cub_sd14.yaml) end to end
    without the real dataset. Returns the CUB_200_2011 folder.
    """
    root = Path(root)
    base = root / "CUB_200_2011"
    rng = np.random.default_rng([seed, 3])  # stream 3: neither the course nor the corpus
    ids, splits = [], []
    for i in range(n_train + n_test):
        scene = random_scene(rng, ["bird"], h, w)
        img, masks = render(scene, h, w)
        rel = f"{1 + i % 2:03d}.Mini_{'Bird' if i % 2 else 'Fowl'}/mini_{i:04d}.jpg"
        (base / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(base / "images" / rel, quality=95)
        save_png(root / "segmentations" / rel.replace(".jpg", ".png"), masks[0].astype(np.uint8) * 255)
        ids.append(f"{i + 1} {rel}\n")
        splits.append(f"{i + 1} {int(i < n_train)}\n")
    atomic_write_text(base / "images.txt", "".join(ids))
    atomic_write_text(base / "train_test_split.txt", "".join(splits))
    return base


def corpus_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """A scene of the teaching model's corpus: 0-3 objects, birds the main class."""
    n = int(rng.choice([0, 1, 2, 3], p=[0.06, 0.44, 0.35, 0.15]))
    classes = [("bird" if rng.random() < 0.5 else str(rng.choice(DISTRACTORS))) for _ in range(n)]
    return random_scene(rng, classes, size, size)


def make_corpus(n: int, size: int = 64, seed: int = 0, start: int = 0) -> tuple[np.ndarray, list[Scene]]:
    """Images (n, size, size, 3) uint8 and scenes of the teaching corpus, items start..start+n.

    Item i is drawn from its own seed, so any slice of the corpus can be made on its own,
    and the corpus never shares a seed stream with the course dataset.
    """
    imgs = np.empty((n, size, size, 3), np.uint8)
    scenes = []
    for k in range(n):
        rng = np.random.default_rng([seed, 2, start + k])
        scene = corpus_scene(rng, size)
        imgs[k] = render(scene, size, size)[0]
        scenes.append(scene)
    return imgs, scenes


def write_corpus(out: str | Path, n: int, size: int = 64, seed: int = 0, workers: int = 1) -> Path:
    """Write the captioned corpus: ``images.npy`` (n, size, size, 3) and ``scenes.jsonl``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        chunk = (n + workers - 1) // workers
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(make_corpus, [min(chunk, n - s) for s in range(0, n, chunk)],
                                [size] * workers, [seed] * workers, list(range(0, n, chunk))))
        imgs = np.concatenate([p[0] for p in parts])
        scenes = [s for p in parts for s in p[1]]
    else:
        imgs, scenes = make_corpus(n, size, seed)
    tmp = out / "images.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, imgs)
    tmp.replace(out / "images.npy")
    atomic_write_text(out / "scenes.jsonl", "".join(json.dumps(s.to_json()) + "\n" for s in scenes))
    return out


def load_corpus(path: str | Path) -> tuple[np.ndarray, list[Scene]]:
    path = Path(path)
    imgs = np.load(path / "images.npy", mmap_mode="r")
    scenes = []
    for line in (path / "scenes.jsonl").read_text().splitlines():
        d = json.loads(line)
        scenes.append(Scene(d["background"], [Obj(**o) for o in d["objects"]], d["seed"]))
    return imgs, scenes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fgbg.miniworld", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("course", help="write the course dataset (reference layout)")
    c.add_argument("base_dir")
    c.add_argument("--n-train", type=int, default=128)
    c.add_argument("--n-val", type=int, default=8)
    c.add_argument("--n-test", type=int, default=40)
    c.add_argument("--n-distractor", type=int, default=24)
    c.add_argument("--size", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    u = sub.add_parser("cub", help="write mini-world birds in the official CUB-200-2011 layout")
    u.add_argument("root", help="CUB_200_2011/ and segmentations/ are written inside")
    u.add_argument("--n-train", type=int, default=4)
    u.add_argument("--n-test", type=int, default=4)
    u.add_argument("--height", type=int, default=375)
    u.add_argument("--width", type=int, default=500)
    u.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("corpus", help="write the teaching model's captioned corpus")
    k.add_argument("out")
    k.add_argument("-n", type=int, default=20000)
    k.add_argument("--size", type=int, default=64)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    if a.cmd == "course":
        write_course_dataset(a.base_dir, a.n_train, a.n_val, a.n_test, a.n_distractor, a.size, a.seed)
        print(f"wrote course dataset to {a.base_dir}")
    elif a.cmd == "cub":
        base = write_cub_like(a.root, a.n_train, a.n_test, a.height, a.width, a.seed)
        print(f"wrote {a.n_train + a.n_test} images in the CUB layout to {base}")
    else:
        write_corpus(a.out, a.n, a.size, a.seed, a.workers)
        print(f"wrote {a.n} captioned images to {a.out}")


if __name__ == "__main__":
    main()
