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

Two worlds: **v1** (the course's; classes differ only in fine shape, on stationary
textures) and **v2** (``world="v2"``, ``--world v2``; :func:`render_v2`): classes with
typical, never exclusive colours, contexts, sizes, proportions and textures, on two-region
backgrounds with clutter, shadows, lighting gradients and some camouflage. v1's output does
not depend on v2 existing.

Run ``python -m fgbg.miniworld --help``.

Shapes are rendered by 4x supersampling; the mask of an object is where its coverage of
the pixel is at least one half, after occlusion by the objects drawn over it.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
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
# Words that no caption of either world contains (tests/test_miniworld.py checks it), each one
# token of CLIP's BPE. A model trained on mini-world captions never updates their embeddings,
# so "a photo of a zebra" is a control for step 1: what an attention map shows without any
# meaning of its word.
UNSEEN_WORDS = ("zebra", "guitar", "piano", "lamp", "chair")


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
    # world v2 only (a v1 object keeps the defaults, and its JSON leaves them out):
    aspect: float = 1.0  # thickness across the body relative to the class's shape (v scaled by 1/aspect)
    texture: str = "plain"  # internal pattern of body and wings: see V2_TEXTURES
    camo: float = 0.0  # 0..1: how far the body colour is blended into the background under it

    def to_json(self) -> dict:
        d = asdict(self)
        for k, default in _V2_OBJ_DEFAULTS.items():
            if d[k] == default:
                del d[k]
        return d


_V2_OBJ_DEFAULTS = {"aspect": 1.0, "texture": "plain", "camo": 0.0}


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)
    seed: int = 0
    world: str = "v1"  # "v1": textures and shape-only classes; "v2": see render_v2

    def caption(self, colour: bool = True, background: bool = True) -> str:
        """The caption, e.g. "a photo of a red bird and a yellow fish on grass"."""
        return caption_for(self, [colour] * len(self.objects), background)

    def to_json(self) -> dict:
        d = {"background": self.background, "seed": self.seed, "objects": [o.to_json() for o in self.objects]}
        if self.world != "v1":  # v1 scenes keep their first JSON, byte for byte
            d["world"] = self.world
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(d["background"], [Obj(**o) for o in d["objects"]], d["seed"], d.get("world", "v1"))


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
    A scene of world v2 is drawn by :func:`render_v2`.
    """
    if scene.world == "v2":
        return render_v2(scene, h, w, full)
    if scene.world != "v1":
        raise ValueError(f"unknown world {scene.world!r}; known: {', '.join(WORLDS)}")
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


def _course_scene(rng, h, w, distractor: bool, world: str = "v1") -> Scene:
    classes = ["bird"]
    if distractor:
        classes.append(str(rng.choice(DISTRACTORS)))
        rng.shuffle(classes)
    return (random_scene_v2 if _check_world(world) == "v2" else random_scene)(rng, classes, h, w)


def _check_world(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
    return world


FIRST_TRAIN = 64
"""Train images drawn in the course stream before val/test; further ones have their own stream."""


def write_course_dataset(base_dir: str | Path, n_train: int = 128, n_val: int = 8, n_test: int = 40,
                         n_distractor: int | None = None, size: int = 64, seed: int = 0, world: str = "v1") -> Path:
    """Write the course dataset in the reference layout (see module docstring).

    Returns ``base_dir``. Existing files are overwritten, so the same arguments always
    give the same bytes; ``miniworld.json`` records the arguments.

    Seeds: the first 64 train images, then the val, test and distractor images come from
    one stream, in that order (as in the first release, whose train split had 64 images);
    train images 64 and beyond come from a stream of their own. So growing the train split
    never changes a test image.

    ``world``: "v1" (the course's world) or "v2" (:func:`render_v2`, from streams of its own:
    10 and 14 instead of 1 and 4). ``n_distractor`` None: 24 in v1, 48 in v2.
    """
    base = Path(base_dir)
    v2 = _check_world(world) == "v2"
    if n_distractor is None:
        n_distractor = 48 if v2 else 24
    rng = np.random.default_rng([seed, 10 if v2 else 1])  # stream 1: course; the corpus uses stream 2
    more = np.random.default_rng([seed, 14 if v2 else 4])  # stream 4: train images beyond the first 64
    lines: dict[str, list[str]] = {}
    meta = {}
    plan = [("train", 1, min(n_train, FIRST_TRAIN), False, rng), ("val", 2, n_val, False, rng),
            ("test", 0, n_test, False, rng), ("distractor", 0, n_distractor, True, rng),
            ("train", 1, max(0, n_train - FIRST_TRAIN), False, more)]
    for folder, split, n, distract, r in plan:
        for _ in range(n):
            _write_course_image(base, folder, split, _course_scene(r, size, size, distract, world), size, lines, meta)
    _write_course_lists(base, lines, meta)
    atomic_write_text(base / "README.txt", (
        f"fgbg mini world course dataset (python -m fgbg.miniworld course{' --world v2' if v2 else ''}).\n"
        "images.txt: '<relative path> <split>' with split 0 = test, 1 = train, 2 = val.\n"
        "segmentations/: bird masks (0/255). distractors/: masks of the non-bird object\n"
        "in the distractor test subset. scenes.json: the scene behind every image.\n"
        "miniworld.json: the arguments that wrote it.\n"))
    record = dict(kind="course", n_train=n_train, n_val=n_val, n_test=n_test, n_distractor=n_distractor, size=size,
                  seed=seed)
    if v2:  # a v1 record stays as it was
        record["world"] = world
    atomic_write_text(base / "miniworld.json", json.dumps(record, indent=1))
    return base


def _write_course_image(base: Path, folder: str, split: int, scene: Scene, size: int, lines: dict, meta: dict) -> None:
    """One course image: the picture, the bird's mask, and for a picture with other objects
    their mask in distractors/; its images.txt line and scene go to ``lines`` and ``meta``."""
    i = len(lines.setdefault(folder, []))
    img, masks = render(scene, size, size)
    rel = f"images/{folder}/{folder}_{i:04d}.png"
    save_png(base / rel, img)
    bird = [m for o, m in zip(scene.objects, masks) if o.cls == "bird"][0]
    save_png(base / "segmentations" / rel[len("images/"):], bird.astype(np.uint8) * 255)
    if len(scene.objects) > 1:
        other = np.any([m for o, m in zip(scene.objects, masks) if o.cls != "bird"], axis=0)
        save_png(base / "distractors" / rel[len("images/"):], other.astype(np.uint8) * 255)
    lines[folder].append(f"{rel} {split}")
    meta[rel] = {"caption": scene.caption(), **scene.to_json()}


def _write_course_lists(base: Path, lines: dict, meta: dict) -> None:
    atomic_write_text(base / "images.txt", "".join(f"{line}\n" for f in ("train", "val", "test", "distractor")
                                                   for line in lines.get(f, [])))
    atomic_write_text(base / "scenes.json", json.dumps(meta, indent=1))


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


CORPUS_BIRD_SHARE = 0.5
"""The teaching corpus's default share of birds among its objects (the rest: the other
classes, equally often)."""


def corpus_scene(rng: np.random.Generator, size: int = 64, world: str = "v1",
                 bird_share: float = CORPUS_BIRD_SHARE) -> Scene:
    """A scene of the teaching model's corpus: 0-3 objects, each a bird with probability
    ``bird_share`` (default: birds the main class; ``1 / len(OBJECTS)``: every class
    equally often). The number of objects in a scene does not depend on ``bird_share``."""
    if not 0.0 <= bird_share <= 1.0:
        raise ValueError(f"bird_share must be in [0, 1], got {bird_share!r}")
    n = int(rng.choice([0, 1, 2, 3], p=[0.06, 0.44, 0.35, 0.15]))
    classes = [("bird" if rng.random() < bird_share else str(rng.choice(DISTRACTORS))) for _ in range(n)]
    return (random_scene_v2 if _check_world(world) == "v2" else random_scene)(rng, classes, size, size)


def make_corpus(n: int, size: int = 64, seed: int = 0, start: int = 0,
                world: str = "v1", bird_share: float = CORPUS_BIRD_SHARE) -> tuple[np.ndarray, list[Scene]]:
    """Images (n, size, size, 3) uint8 and scenes of the teaching corpus, items start..start+n.

    Item i is drawn from its own seed, so any slice of the corpus can be made on its own,
    and the corpus never shares a seed stream with the course dataset. ``world`` "v2":
    world v2 scenes, from stream 12 instead of 2. ``bird_share``: see :func:`corpus_scene`.
    """
    imgs = np.empty((n, size, size, 3), np.uint8)
    scenes = []
    stream = 12 if _check_world(world) == "v2" else 2
    for k in range(n):
        rng = np.random.default_rng([seed, stream, start + k])
        scene = corpus_scene(rng, size, world, bird_share)
        imgs[k] = render(scene, size, size)[0]
        scenes.append(scene)
    return imgs, scenes


def write_corpus(out: str | Path, n: int, size: int = 64, seed: int = 0, workers: int = 1, world: str = "v1",
                 bird_share: float = CORPUS_BIRD_SHARE) -> Path:
    """Write the captioned corpus: ``images.npy`` (n, size, size, 3), ``scenes.jsonl`` and
    ``corpus.json`` (:func:`corpus_record`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        chunk = (n + workers - 1) // workers
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(make_corpus, [min(chunk, n - s) for s in range(0, n, chunk)],
                                [size] * workers, [seed] * workers, list(range(0, n, chunk)), [world] * workers,
                                [bird_share] * workers))
        imgs = np.concatenate([p[0] for p in parts])
        scenes = [s for p in parts for s in p[1]]
    else:
        imgs, scenes = make_corpus(n, size, seed, world=world, bird_share=bird_share)
    tmp = out / "images.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, imgs)
    tmp.replace(out / "images.npy")
    atomic_write_text(out / "scenes.jsonl", "".join(json.dumps(s.to_json()) + "\n" for s in scenes))
    atomic_write_text(out / "corpus.json", json.dumps(corpus_record(n, size, seed, world, bird_share)))
    return out


def corpus_record(n: int, size: int = 64, seed: int = 0, world: str = "v1",
                  bird_share: float = CORPUS_BIRD_SHARE) -> dict:
    """What a corpus is made from (``corpus.json`` beside its scenes; a teaching pipeline
    trained on it records it too)."""
    return {"kind": "corpus", "n": n, "size": size, "seed": seed, "world": _check_world(world),
            "bird_share": bird_share}


def check_corpus(path: str | Path, want: dict) -> None:
    """Refuse a corpus folder that was not made from ``want`` (a :func:`corpus_record`):
    a ``ValueError`` naming each setting that differs. A corpus without ``corpus.json``
    (written before corpora recorded their settings) is refused too: what it was made from
    cannot be known."""
    f = Path(path) / "corpus.json"
    if not f.is_file():
        raise ValueError(f"{f.parent} has no corpus.json, so what it was made from is unknown; "
                         f"delete the folder to write it anew")
    have = json.loads(f.read_text())
    if have != want:
        from .runs import describe_diff  # not at the top: it imports torch, which the corpus writers do not need
        raise ValueError(f"{f.parent} holds another corpus ({describe_diff(have, want)}); "
                         f"use another folder or delete it")


def load_corpus(path: str | Path) -> tuple[np.ndarray, list[Scene]]:
    path = Path(path)
    imgs = np.load(path / "images.npy", mmap_mode="r")
    scenes = []
    for line in (path / "scenes.jsonl").read_text().splitlines():
        scenes.append(Scene.from_json(json.loads(line)))
    return imgs, scenes


# =========================================================================== world v2
# World v1 (above) differs between classes only in fine shape: every class comes in every
# colour, on every background, at about the same size, on stationary textures, so border
# colour saliency and M_crop beat the method there. World v2 gives classes the coarse cues of
# real photos and gives backgrounds structure and clutter. Every cue is *typical*, never
# exclusive: it is taken with probability P_TYPICAL, otherwise drawn as for any class.
WORLDS = ("v1", "v2")
P_TYPICAL = 0.7
V2_TEXTURES = ("plain", "speckle", "bars", "stripes", "spots")
V2_PALETTES = {"bird": ("brown", "grey", "black", "white", "blue"), "fish": ("orange", "yellow", "blue"),
               "flower": ("red", "pink", "purple", "yellow"), "house": ("white", "brown", "red"),
               "car": ("red", "blue", "black", "white"), "ball": ("red", "yellow", "green", "orange")}
V2_CONTEXTS = {"bird": ("sky", "forest", "grass", "snow"), "fish": ("water",), "flower": ("grass", "forest"),
               "house": ("grass", "snow", "brick"), "car": ("wall", "brick", "sand"), "ball": ("sand", "grass")}
V2_SIZES = {"bird": (0.3, 0.5), "fish": (0.4, 0.65), "flower": (0.3, 0.5), "house": (0.55, 0.8),
            "car": (0.5, 0.8), "ball": (0.25, 0.4)}  # body length / image side (v1: 0.35-0.7 for all)
V2_ASPECTS = {"bird": 1.15, "fish": 0.8, "flower": 1.0, "house": 1.1, "car": 0.85, "ball": 1.0}
V2_TEXTURE_OF = {"bird": "speckle", "fish": "bars", "flower": "plain", "house": "stripes", "car": "plain",
                 "ball": "spots"}
V2_CAMO = {"bird": 0.15, "other": 0.06}  # chance that an object is camouflaged
V2_LIGHT = (0.8, 0.15, 0.5)  # chance of a lighting gradient, and its range of strength
GROUND_CLASSES = ("flower", "house", "car", "ball")
# each background: (upper region, lower region, range of the horizon as a fraction of the height,
# chance of a horizon at all)
_V2_LAYOUTS = {"sky": ("sky", "hills", (0.72, 0.92), 0.5), "grass": ("sky", "grass", (0.2, 0.55), 1.0),
               "water": ("sky", "water", (0.15, 0.5), 1.0), "sand": ("sea", "sand", (0.2, 0.5), 1.0),
               "brick": ("brick", "pavement", (0.6, 0.88), 1.0), "snow": ("palesky", "snow", (0.2, 0.55), 1.0),
               "forest": ("forest", "ground", (0.65, 0.9), 0.6), "wall": ("wall", "floor", (0.6, 0.88), 1.0)}


def _typical(rng: np.random.Generator, typical, every):
    return str(rng.choice(typical)) if rng.random() < P_TYPICAL else str(rng.choice(list(every)))


def _region(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One region's texture (h, w, 3) in [0, 1]: v1's backgrounds, a few more, tinted."""
    if kind in BACKGROUNDS:
        img = render_background(kind, h, w, rng)
    else:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        n1 = _smooth_noise(rng, h, w, max(2, h // 8))[..., None]
        n2 = rng.random((h, w, 1))
        if kind == "hills":
            img = np.array([0.2, 0.36, 0.2]) + 0.14 * (n1 - 0.5) + 0.05 * (n2 - 0.5)
        elif kind == "sea":
            img = np.array([0.15, 0.42, 0.62]) + 0.06 * np.sin(yy * 70 + 4 * n1[..., 0])[..., None] + 0.03 * (n2 - 0.5)
        elif kind == "pavement":
            tiles = ((np.arange(w)[None, :] % max(4, w // 6)) == 0)[..., None]
            img = np.array([0.55, 0.54, 0.5]) + 0.08 * (n1 - 0.5) + 0.08 * (n2 - 0.5) - 0.15 * tiles
        elif kind == "ground":
            img = np.array([0.4, 0.29, 0.16]) + 0.16 * (n1 - 0.5) + 0.12 * (n2 - 0.5)
        elif kind == "floor":
            planks = ((np.arange(h)[:, None] % max(3, h // 10)) == 0)[..., None]
            img = np.array([0.58, 0.4, 0.23]) + 0.08 * (n1 - 0.5) + 0.05 * (n2 - 0.5) - 0.15 * planks
        elif kind == "palesky":
            img = np.array([0.78, 0.82, 0.9]) + 0.08 * yy[..., None] + 0.03 * (n1 - 0.5)
        else:
            raise ValueError(f"unknown region {kind!r}")
    return np.clip(img * (1 + rng.uniform(-0.15, 0.15, 3)) + rng.uniform(-0.08, 0.08), 0, 1)


def _ss_grid(h: int, w: int):
    return (np.mgrid[0:h * SS, 0:w * SS] + 0.5) / SS  # ys, xs in output pixels


def _box(ys, x0, x1, y0, y1):
    """Slices of the supersampled grid that hold the box [x0, x1] x [y0, y1] (output pixels):
    clutter is drawn on small windows, not on the whole grid."""
    H, W = ys.shape
    r0, r1 = min(H, max(0, int(y0 * SS) - 1)), min(H, max(0, int(math.ceil(y1 * SS)) + 1))
    c0, c1 = min(W, max(0, int(x0 * SS) - 1)), min(W, max(0, int(math.ceil(x1 * SS)) + 1))
    return np.s_[r0:r1, c0:c1]


def _seg(ys, xs, p0, p1, width):
    """(window, mask in it) of the pixels within width/2 of the segment p0-p1 ((x, y) in output pixels)."""
    (x0, y0), (x1, y1) = p0, p1
    r = width / 2
    win = _box(ys, min(x0, x1) - r, max(x0, x1) + r, min(y0, y1) - r, max(y0, y1) + r)
    ys, xs = ys[win], xs[win]
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    return win, (xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2 <= r ** 2


def _blob(ys, xs, cx, cy, rx, ry, angle=0.0):
    """(window, mask in it) of a rotated ellipse."""
    r = max(rx, ry)
    win = _box(ys, cx - r, cx + r, cy - r, cy + r)
    ys, xs = ys[win], xs[win]
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = (xs - cx) * ca + (ys - cy) * sa, -(xs - cx) * sa + (ys - cy) * ca
    return win, (u / rx) ** 2 + (v / ry) ** 2 <= 1


def _paint(canvas, wm, colour):
    win, m = wm
    canvas[win][m] = colour


def _leaves(canvas, ys, xs, rng, cx, cy, spread, n):
    base = np.array([(0.2, 0.45, 0.15), (0.35, 0.55, 0.15), (0.55, 0.45, 0.1), (0.15, 0.32, 0.12)][rng.integers(4)])
    for _ in range(n):
        lx, ly = cx + rng.normal(0, spread), cy + rng.normal(0, spread * 0.7)
        _paint(canvas, _blob(ys, xs, lx, ly, rng.uniform(1.0, 2.6), rng.uniform(0.6, 1.4), rng.uniform(0, math.pi)),
               np.clip(base * rng.uniform(0.7, 1.3), 0, 1))


def _branch(canvas, ys, xs, rng, h, w, leafy: bool):
    side = rng.integers(2)
    x0 = -1.0 if side == 0 else w + 1.0
    y0 = rng.uniform(0.15, 0.75) * h
    ang = rng.uniform(-0.5, 0.5) + (0 if side == 0 else math.pi)
    length = rng.uniform(0.4, 0.9) * w
    x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
    col = np.array([0.3, 0.2, 0.12]) * rng.uniform(0.6, 1.4) + rng.uniform(-0.04, 0.04, 3)
    _paint(canvas, _seg(ys, xs, (x0, y0), (x1, y1), rng.uniform(1.2, 2.8)), np.clip(col, 0, 1))
    for _ in range(rng.integers(1, 4)):
        t = rng.uniform(0.3, 0.95)
        px, py = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        a = ang + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
        ln = rng.uniform(0.1, 0.25) * w
        qx, qy = px + ln * math.cos(a), py + ln * math.sin(a)
        _paint(canvas, _seg(ys, xs, (px, py), (qx, qy), rng.uniform(0.6, 1.3)), np.clip(col * 1.1, 0, 1))
        if leafy and rng.random() < 0.7:
            _leaves(canvas, ys, xs, rng, qx, qy, 2.0, int(rng.integers(3, 8)))


def _rock(canvas, ys, xs, rng, cx, cy, r):
    base = np.array([0.5, 0.48, 0.45]) * rng.uniform(0.6, 1.3) + rng.uniform(-0.06, 0.06, 3)
    rx, ry = r, r * rng.uniform(0.5, 0.8)
    win, m = _blob(ys, xs, cx, cy, rx, ry, rng.normal(0, 0.2))
    shade = np.clip(1.15 - 0.5 * (ys[win] - (cy - ry)) / (2 * ry), 0.6, 1.2)[..., None]
    canvas[win][m] = np.clip(base * shade[m], 0, 1)


def _cloud(canvas, ys, xs, rng, cx, cy, r):
    white = rng.uniform(0.88, 1.0)
    for _ in range(rng.integers(3, 6)):
        win, m = _blob(ys, xs, cx + rng.normal(0, r), cy + rng.normal(0, r * 0.3), r * rng.uniform(0.6, 1.1),
                       r * rng.uniform(0.4, 0.7))
        c = canvas[win]
        c[m] = c[m] * 0.15 + 0.85 * white


_V2_BG_CACHE: dict = {}


def v2_background(kind: str, h: int, w: int, seed: int) -> tuple[np.ndarray, float | None]:
    """World v2's background of a scene at 4x supersampling: float RGB (h*4, w*4, 3) and the
    horizon's mean row (output pixels; None: one region). Two regions split by a tilted,
    wavy horizon, then clutter that names no object class (branches, leaves, rocks, clouds,
    reeds). Depends only on (kind, h, w, seed); the last one is cached (read-only), as
    random_scene_v2 and render_v2 both need it."""
    key = (kind, h, w, seed)
    if key not in _V2_BG_CACHE:
        _V2_BG_CACHE.clear()
        canvas, horizon = _v2_background(kind, h, w, seed)
        canvas.setflags(write=False)
        _V2_BG_CACHE[key] = canvas, horizon
    return _V2_BG_CACHE[key]


def _v2_background(kind: str, h: int, w: int, seed: int) -> tuple[np.ndarray, float | None]:
    if kind not in _V2_LAYOUTS:
        raise ValueError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    rng = np.random.default_rng([seed, 20])
    top, bottom, (lo, hi), p_horizon = _V2_LAYOUTS[kind]
    ys, xs = _ss_grid(h, w)
    up = np.repeat(np.repeat(_region(top, h, w, rng), SS, 0), SS, 1)
    horizon = float(rng.uniform(lo, hi) * h) if rng.random() < p_horizon else None
    if horizon is None:
        canvas = up
    else:
        low = np.repeat(np.repeat(_region(bottom, h, w, rng), SS, 0), SS, 1)
        tilt, amp, freq = rng.normal(0, 0.12), rng.uniform(0, 0.04) * h, rng.uniform(0.05, 0.25)
        line = horizon + tilt * (xs - w / 2) + amp * np.sin(xs * freq + rng.uniform(0, 6.3))
        canvas = np.where((ys < line)[..., None], up, low)
    ground = (lambda y: True) if horizon is None else (lambda y: y > horizon + 2)
    sky_like = top in ("sky", "palesky") or kind == "sky"
    if sky_like:
        for _ in range(rng.integers(1, 4)):
            cy = rng.uniform(0.05, 0.9 if horizon is None else max(0.1, horizon / h - 0.05)) * h
            _cloud(canvas, ys, xs, rng, rng.uniform(0, w), cy, rng.uniform(0.06, 0.14) * w)
    n_branch = {"forest": (1, 4), "sky": (0, 2), "snow": (0, 3), "grass": (0, 2)}.get(kind, (0, 1))
    for _ in range(rng.integers(n_branch[0], n_branch[1] + 1)):
        _branch(canvas, ys, xs, rng, h, w, leafy=kind != "snow")
    if kind in ("forest", "grass", "wall", "brick") and rng.random() < 0.7:  # bushes, ivy, a pot plant
        for _ in range(rng.integers(1, 4)):
            _leaves(canvas, ys, xs, rng, rng.uniform(0, w), rng.uniform(0.3, 1.0) * h, rng.uniform(2, 6),
                    int(rng.integers(8, 25)))
    if horizon is not None and kind in ("grass", "water", "sand", "snow", "forest"):
        for _ in range(rng.integers(0, 5)):
            cy = rng.uniform(horizon + 3, h + 2)
            if ground(cy):
                _rock(canvas, ys, xs, rng, rng.uniform(0, w), cy, rng.uniform(1.5, 3 + 0.12 * w * (cy - horizon) / h))
    if kind == "water" and rng.random() < 0.6:  # reeds
        x = rng.uniform(0, w)
        for _ in range(rng.integers(3, 9)):
            xx = x + rng.normal(0, 3)
            _paint(canvas, _seg(ys, xs, (xx, h + 1), (xx + rng.normal(0, 2), h - rng.uniform(0.15, 0.45) * h),
                                rng.uniform(0.5, 1.0)), np.array([0.35, 0.42, 0.15]) * rng.uniform(0.7, 1.2))
    return canvas, horizon


def _v2_uv(o: Obj, ys, xs):
    dx, dy = xs - o.cx, ys - o.cy
    ca, sa = math.cos(o.angle), math.sin(o.angle)
    u = (dx * ca + dy * sa) / o.size
    v = (-dx * sa + dy * ca) / o.size / o.aspect
    return (-u if o.flip else u), v


def _pattern(texture: str, u, v) -> np.ndarray:
    """Where the object's internal pattern darkens (or lightens) its body."""
    if texture == "plain":
        return np.zeros(u.shape, bool)
    if texture == "speckle":
        return (np.sin(u * 55) + np.sin(v * 55 + u * 23)) > 1.1
    if texture == "bars":
        return np.sin(u * 2 * math.pi / 0.16) > 0.25
    if texture == "stripes":
        return np.sin(v * 2 * math.pi / 0.1) > 0.3
    if texture == "spots":
        return ((u % 0.18) - 0.09) ** 2 + ((v % 0.18) - 0.09) ** 2 < 0.04 ** 2
    raise ValueError(f"unknown texture {texture!r}; known: {', '.join(V2_TEXTURES)}")


def _v2_draw(scene: Scene, h: int, w: int, base: np.ndarray | None, horizon: float | None):
    """Objects (and their shadows) over ``base`` (None: masks only). Returns the canvas (or
    None), the owner map (-1: background) and each object's unoccluded coverage."""
    ys, xs = _ss_grid(h, w)
    rng = np.random.default_rng([scene.seed, 21])
    canvas = None if base is None else base.copy()
    owner = np.full(ys.shape, -1, dtype=np.int8)
    whole = []
    for k, o in enumerate(scene.objects):
        u, v = _v2_uv(o, ys, xs)
        parts = _parts(o, u, v)
        cover_all = np.zeros(ys.shape, bool)
        for cover, _ in parts:
            cover_all |= cover
        whole.append(cover_all)
        if canvas is None:
            for cover, _ in parts:
                owner[cover] = k
            continue
        on_ground = horizon is not None and o.cy > horizon and (o.cls in GROUND_CLASSES or rng.random() < 0.5)
        if on_ground and rng.random() < 0.8:  # a cast shadow, on the background only
            sx = o.cx + rng.uniform(-0.25, 0.25) * o.size
            sy = o.cy + 0.3 * o.size * o.aspect
            win, sh = _blob(ys, xs, sx, sy, 0.45 * o.size, 0.1 * o.size)
            sh &= (owner[win] < 0) & ~cover_all[win]
            c = canvas[win]
            c[sh] *= rng.uniform(0.5, 0.75)
        local = base[cover_all].mean(axis=0) if cover_all.any() else np.full(3, 0.5)
        shade = 1.0 + 0.08 * rng.standard_normal()
        light = np.clip(1.12 - 0.45 * v, 0.7, 1.2)  # lit from above, in the object's frame
        pat = _pattern(o.texture, u, v)
        for cover, role in parts:
            col = _part_colour(o, role)
            if role in ("body", "wing"):
                col = (1 - o.camo) * col + o.camo * local
                lum = col.mean()
                f = np.where(pat[cover], 0.62 if lum > 0.3 else 2.2, 1.0) * light[cover]
            else:
                f = np.ones(int(cover.sum()))
            canvas[cover] = np.clip(col[None, :] * (f * shade)[:, None], 0, 1)
            owner[cover] = k
    return canvas, owner, whole


def render_v2(scene: Scene, h: int = 64, w: int = 64, full: bool = False):
    """World v2's :func:`render`: same outputs, same exact masks (visible coverage >= 1/2;
    a pixel half covered by each of two objects belongs to the one in front)."""
    base, horizon = v2_background(scene.background, h, w, scene.seed)
    canvas, owner, whole = _v2_draw(scene, h, w, base, horizon)
    rng = np.random.default_rng([scene.seed, 22])
    if rng.random() < V2_LIGHT[0]:  # a lighting gradient over the whole picture
        ys, xs = _ss_grid(h, w)
        a = rng.uniform(0, 2 * math.pi)
        g = rng.uniform(*V2_LIGHT[1:])
        proj = ((xs - w / 2) * math.cos(a) + (ys - h / 2) * math.sin(a)) / max(h, w)
        canvas = canvas * np.clip(1 + g * proj, 0.5, 1.5)[..., None]
    img = _downsample(canvas) + rng.normal(0, 0.012, (h, w, 3))  # sensor noise
    img = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    masks = _visible_masks(owner, len(scene.objects))
    whole = [_downsample(c.astype(np.float32)) >= 0.5 for c in whole]
    return (img, masks, whole) if full else (img, masks)


def _visible_masks(owner: np.ndarray, n: int) -> list[np.ndarray]:
    """Each object's visible mask: pixels at least half covered by its visible part. A pixel
    half covered by each of two objects goes to the one in front, so masks never overlap."""
    taken = np.zeros((owner.shape[0] // SS, owner.shape[1] // SS), bool)
    masks = [taken] * n
    for k in reversed(range(n)):
        masks[k] = (_downsample((owner == k).astype(np.float32)) >= 0.5) & ~taken
        taken = taken | masks[k]
    return masks


def random_object_v2(rng: np.random.Generator, cls: str, h: int, w: int, horizon: float | None) -> Obj:
    """An object of world v2: colour, size, proportion and texture typical of its class with
    probability P_TYPICAL each, else drawn as for any class; ground classes stand below the
    horizon; some objects are camouflaged."""
    s = min(h, w)
    lo, hi = V2_SIZES[cls] if rng.random() < P_TYPICAL else (0.3, 0.75)
    size = float(rng.uniform(lo, hi) * s)
    colour = _typical(rng, V2_PALETTES[cls], COLOURS)
    aspect = V2_ASPECTS[cls] * rng.uniform(0.92, 1.08) if rng.random() < P_TYPICAL else rng.uniform(0.75, 1.25)
    texture = V2_TEXTURE_OF[cls] if rng.random() < P_TYPICAL else str(rng.choice(V2_TEXTURES))
    cx = rng.uniform(0.12, 0.88) * w
    if cls in GROUND_CLASSES and horizon is not None and horizon < 0.8 * h:
        cy = rng.uniform(max(horizon, 0.3 * h), 0.88 * h)
    else:
        cy = rng.uniform(0.15, 0.85) * h
    camo = float(rng.uniform(0.4, 0.7)) if rng.random() < V2_CAMO.get(cls, V2_CAMO["other"]) else 0.0
    return Obj(cls=cls, colour=colour, cx=float(cx), cy=float(cy), size=size,
               angle=float(rng.normal(0, 0.1 if cls in GROUND_CLASSES else 0.25)), flip=bool(rng.random() < 0.5),
               pose=int(rng.integers(0, 6)), aspect=round(float(aspect), 4), texture=texture, camo=round(camo, 4))


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    ref = np.array([COLOURS[n] for n in names], float) / 255
    return names[int(np.argmin(((ref - rgb) ** 2).sum(1)))]


def v2_context(rng: np.random.Generator, classes: list[str]) -> str:
    """The background of a world-v2 scene: typical of its first class with probability
    P_TYPICAL, else any background (a scene without objects: any)."""
    return _typical(rng, V2_CONTEXTS[classes[0]], BACKGROUNDS) if classes else str(rng.choice(BACKGROUNDS))


def _mostly_visible(scene: Scene, h: int, w: int, horizon: float | None) -> list[np.ndarray] | None:
    """The objects' whole supersampled shapes when each object shows at least 60% of itself
    and 20 pixels, else None."""
    _, owner, whole = _v2_draw(scene, h, w, None, horizon)
    masks = _visible_masks(owner, len(scene.objects))
    full = [_downsample(c.astype(np.float32)) >= 0.5 for c in whole]
    return whole if all(m.sum() >= 0.6 * f.sum() and m.sum() >= 20 for m, f in zip(masks, full)) else None


def random_scene_v2(rng: np.random.Generator, classes: list[str], h: int = 64, w: int = 64,
                    background: str | None = None) -> Scene:
    """A world-v2 scene: the background is typical of the first class (P_TYPICAL), each object
    stays mostly visible, and a camouflaged object is named by the colour nearest to the
    background under it (what a caption writer would see)."""
    bg = background or v2_context(rng, classes)
    seed = int(rng.integers(0, 2**31))
    base, horizon = v2_background(bg, h, w, seed)
    scene = Scene(bg, [], seed, "v2")
    for _ in range(50):
        objs = [random_object_v2(rng, c, h, w, horizon) for c in classes]
        scene = Scene(bg, objs, seed, "v2")
        if not objs:
            return scene
        whole = _mostly_visible(scene, h, w, horizon)
        if whole is not None:
            break
    for o, c in zip(scene.objects, whole):
        if o.camo > 0 and c.any():
            o.colour = _nearest_colour(base[c].mean(axis=0))
    return scene


CUE_SWAP = ("typical", "swapped")
"""The two versions of a cue-swap picture (:func:`cue_swap_pair`)."""
CUES = ("colour", "texture", "size", "aspect", "context")
"""The class cues that :func:`cue_swap_pair` can swap."""
CUE_SWAP_VERSION = 2
"""Changes when the same arguments of :func:`write_cue_swap_dataset` would draw other pictures
(recorded in its miniworld.json; 2: the typical picture no longer depends on ``swap``)."""


def cue_swap_pair(rng: np.random.Generator, h: int = 64, w: int = 64,
                  swap: tuple[str, ...] = CUES) -> tuple[Scene, Scene]:
    """What does a model's "bird" mean: shape, or the coarse cues that come with birds?

    A bird and a fish in one world-v2 picture, twice, with the same shapes, poses, places,
    picture seed and drawing order:

    * "typical": each object has its own class's typical cues (a palette colour that the
      other class does not share, texture, proportion, size), on a bird's context (sky,
      forest, grass or snow);
    * "swapped": each object has the *other* class's cues, on water (the fish's context):
      a barred orange bird of a fish's size and proportion beside a speckled brown fish.

    No camouflage. A model whose "bird" attends to bird shape separates the bird from the
    fish in both versions; one whose "bird" means bird-like colours and surroundings
    prefers the fish in the swapped version.

    ``swap``: which cues the swapped version swaps (default all of :data:`CUES`; e.g.
    ``("size",)`` swaps the sizes alone, and without "context" both versions share the
    typical background). The random draws do not depend on it, so every ``swap`` gives the
    same typical picture."""
    unknown = set(swap) - set(CUES)
    if unknown:
        raise ValueError(f"unknown cues {sorted(unknown)}; known: {', '.join(CUES)}")
    s = min(h, w)
    own = {"bird": [c for c in V2_PALETTES["bird"] if c not in V2_PALETTES["fish"]],
           "fish": [c for c in V2_PALETTES["fish"] if c not in V2_PALETTES["bird"]]}
    cues = {c: dict(colour=str(rng.choice(own[c])), size=float(rng.uniform(*V2_SIZES[c]) * s),
                    aspect=round(float(V2_ASPECTS[c] * rng.uniform(0.92, 1.08)), 4), texture=V2_TEXTURE_OF[c])
            for c in ("bird", "fish")}
    other = {"bird": "fish", "fish": "bird"}
    backgrounds = {"typical": str(rng.choice(V2_CONTEXTS["bird"]))}
    backgrounds["swapped"] = "water" if "context" in swap else backgrounds["typical"]
    seed = int(rng.integers(0, 2**31))
    horizons = [v2_background(bg, h, w, seed)[1] for bg in (backgrounds["typical"], "water")]
    # the places are drawn until both objects stay mostly visible under every swap of the
    # cues that change the shapes (size, aspect) and on both backgrounds, so that the draws,
    # and the typical picture, are the same whatever ``swap`` is
    geometries = [(), ("size",), ("aspect",), ("size", "aspect")]
    for _ in range(50):
        order = [str(c) for c in rng.permutation(["bird", "fish"])]
        place = {c: dict(cx=float(rng.uniform(0.15, 0.85) * w), cy=float(rng.uniform(0.2, 0.8) * h),
                         angle=float(rng.normal(0, 0.25)), flip=bool(rng.random() < 0.5),
                         pose=int(rng.integers(0, 6))) for c in order}

        def version(swapped: tuple, background: str) -> Scene:
            return Scene(background, [Obj(cls=c, **{cue: cues[other[c] if cue in swapped else c][cue]
                                                    for cue in cues[c]}, **place[c]) for c in order], seed, "v2")
        if all(_mostly_visible(version(g, backgrounds["typical"]), h, w, hz) is not None
               for g in geometries for hz in horizons):
            break
    return version((), backgrounds["typical"]), version(tuple(swap), backgrounds["swapped"])


def write_cue_swap_dataset(base_dir: str | Path, n: int = 48, size: int = 64, seed: int = 0,
                           swap: tuple[str, ...] = CUES) -> Path:
    """Two course-layout datasets of ``n`` pictures each, ``<base_dir>/typical`` and
    ``<base_dir>/swapped``: the versions of the same :func:`cue_swap_pair` pictures, as test
    images with the bird's mask in segmentations/ and the fish's in distractors/ (so the
    course's bird-vs-other scoring applies). ``swap``: the cues swapped (see
    :func:`cue_swap_pair`). Same arguments, same bytes."""
    base = Path(base_dir)
    rng = np.random.default_rng([seed, 15])  # a stream of its own (course 1/10/4/14, corpus 2)
    lines: dict[str, dict] = {k: {} for k in CUE_SWAP}
    meta: dict[str, dict] = {k: {} for k in CUE_SWAP}
    for _ in range(n):
        for k, scene in zip(CUE_SWAP, cue_swap_pair(rng, size, size, tuple(swap))):
            _write_course_image(base / k, "distractor", 0, scene, size, lines[k], meta[k])
    for k in CUE_SWAP:
        _write_course_lists(base / k, lines[k], meta[k])
        atomic_write_text(base / k / "miniworld.json", json.dumps(
            dict(kind="cue_swap", version=k, swap=list(swap), n=n, size=size, seed=seed, world="v2",
                 generator=CUE_SWAP_VERSION), indent=1))
    return base


def parse_share(text: str) -> float:
    """A share on the command line: a number or a fraction such as 1/6, in [0, 1]."""
    try:
        v = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction such as 1/6") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return v


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fgbg.miniworld", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("course", help="write the course dataset (reference layout)")
    c.add_argument("base_dir")
    c.add_argument("--n-train", type=int, default=128)
    c.add_argument("--n-val", type=int, default=8)
    c.add_argument("--n-test", type=int, default=40)
    c.add_argument("--n-distractor", type=int, default=None, help="default 24 (v1), 48 (v2)")
    c.add_argument("--world", choices=WORLDS, default="v1", help="v2: class cues and cluttered scenes")
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
    k.add_argument("--world", choices=WORLDS, default="v1", help="v2: class cues and cluttered scenes")
    k.add_argument("--bird-share", type=parse_share, default=CORPUS_BIRD_SHARE,
                   help=f"share of birds among the objects (default {CORPUS_BIRD_SHARE}; 1/6: every class equally often)")
    a = p.parse_args(argv)
    if a.cmd == "course":
        write_course_dataset(a.base_dir, a.n_train, a.n_val, a.n_test, a.n_distractor, a.size, a.seed, a.world)
        print(f"wrote course dataset to {a.base_dir}")
    elif a.cmd == "cub":
        base = write_cub_like(a.root, a.n_train, a.n_test, a.height, a.width, a.seed)
        print(f"wrote {a.n_train + a.n_test} images in the CUB layout to {base}")
    else:
        write_corpus(a.out, a.n, a.size, a.seed, a.workers, a.world, a.bird_share)
        print(f"wrote {a.n} captioned images to {a.out}")


if __name__ == "__main__":
    main()
