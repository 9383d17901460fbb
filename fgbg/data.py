"""Datasets, images and masks: everything between files on disk and the model's input.

Three jobs, in the order a pipeline meets them:

1. **Find the images** (:func:`load_dataset`). Two layouts are recognised automatically:

   * the *reference* layout (the paper's code, and the course's mini world)::

         base_dir/images.txt                one "images/<class>/<name>.jpg <split>" per line
         base_dir/images/<class>/<name>.jpg split 0 = test, 1 = train, 2 = val
         base_dir/segmentations/<class>/<name>.png   optional ground truth

   * the *official CUB_200_2011* download::

         base_dir/images.txt                one "<id> <class>/<name>.jpg" per line
         base_dir/train_test_split.txt      one "<id> <1 train | 0 test>" per line
         base_dir/images/<class>/<name>.jpg
         base_dir/segmentations/<class>/<name>.png   or base_dir/../segmentations/...

     (the segmentations come as a separate archive, which unpacks *beside* CUB_200_2011).
     Official CUB has no validation split, so asking it for ``"val"`` gives nothing.

   Either way, a broken line does not stop the loading: it is recorded in
   ``Dataset.skipped`` with the file and line number, and the other lines are kept.

2. **Read pixels** (:func:`read_image`, :func:`read_mask`). Every image becomes
   ``uint8 (H, W, 3)`` whatever its mode (grey, palette, RGBA, 16 bit, CMYK), every mask a
   boolean ``(H, W)`` array. A missing, corrupt, truncated or absurdly large file raises
   :class:`ImageError` naming the file, instead of crashing deep inside a model later.

3. **Place the image on the model's square canvas** (:func:`place_image`) and bring
   results back to the original pixels (:func:`map_back`). Stable Diffusion wants a fixed
   square input (512 x 512 for SD v1); a photo is rarely square. The reference pastes the
   image unresized into the top-left corner of a canvas filled with -1 (black in the
   model's [-1, 1] range), shrinking it only when its long edge exceeds the canvas. A
   :class:`Placement` remembers where the image went, so that a mask computed on the
   canvas (or on the 64 x 64 latent grid) maps back to exactly the original pixels.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

SPLITS: dict[str, int] = {"test": 0, "train": 1, "val": 2}
"""Split names and their numbers in the reference's images.txt."""

DEFAULT_MAX_PIXELS = 8192 * 8192


class DatasetError(ValueError):
    """A dataset cannot be used as it is; the message names the file (and line)."""


class ImageError(DatasetError):
    """An image or mask file cannot be read; the message names the file."""


# --------------------------------------------------------------------------------------
# 1. Finding the images
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One image of a dataset.

    ``rel`` is the image path relative to ``base_dir`` (for official CUB, whose
    images.txt is relative to ``images/``, the ``images/`` prefix is added so that both
    layouts give the same ``rel``). ``line`` is the 1-based line in images.txt, handy in
    error messages. ``gt_path`` / ``distractor_path`` are None when no such file exists.
    """

    rel: str
    split: int
    image_path: Path
    gt_path: Path | None
    line: int
    distractor_path: Path | None = None

    @property
    def key(self) -> str:
        """``rel`` without its extension: outputs mirror it, e.g. ``out_dir/<key>.png``."""
        return PurePosixPath(self.rel).with_suffix("").as_posix()


@dataclass
class Dataset:
    """The selected items of a dataset, plus what was skipped and why.

    ``skipped`` holds ``(what, why)`` pairs, e.g. ``("images.txt line 7",
    "expected '<path> <split>', got 'foo'")``; file names are relative to ``base_dir``.
    Print them with ``for what, why in ds.skipped: print(f"{what}: {why}")``.
    """

    base_dir: Path
    layout: str  # "reference" or "cub"
    items: list[Item]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    @property
    def has_ground_truth(self) -> bool:
        """True when at least one item has a ground-truth mask file."""
        return any(item.gt_path is not None for item in self.items)

    def summary(self) -> str:
        """What the notebooks print: the counts, whether there is ground truth, and every
        line of the image list that was left out, with its file, line number and reason."""
        n = {k: sum(it.split == v for it in self.items) for k, v in SPLITS.items()}
        counts = ", ".join(f"{v} {k}" for k, v in n.items() if v)
        gt = sum(it.gt_path is not None for it in self.items)
        lines = [f"{len(self)} images ({counts}; {self.layout} layout) in {self.base_dir}; "
                 f"ground truth for {gt} of them"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} line(s) of the image list left out:")
            lines += [f"  {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)


def _parse_splits(splits: str | int | Iterable[str | int]) -> list[int]:
    """Turn ("train", 0, ...) into split numbers; a lone name or number is allowed too."""
    if isinstance(splits, (str, numbers.Integral)):
        splits = [splits]
    out: list[int] = []
    for s in splits:
        if isinstance(s, str):
            n = SPLITS.get(s)
        else:  # a number; bool is an int in Python, but True is no split
            n = int(s) if isinstance(s, numbers.Integral) and not isinstance(s, bool) else None
        if n not in SPLITS.values():
            raise ValueError(f"splits: unknown split {s!r}; allowed: "
                             f"{', '.join(repr(k) for k in SPLITS)} or {sorted(SPLITS.values())}")
        if n not in out:
            out.append(n)
    return out


def _lines(path: Path, skipped: list | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped text) of every non-blank line.

    A line that is not UTF-8 text is left out and recorded in ``skipped`` (file and line)."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # tolerate a byte-order mark
        raw = raw[3:]
    for n, bline in enumerate(raw.splitlines(), start=1):
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            if skipped is not None:
                skipped.append((f"{path.name} line {n}", f"not UTF-8 text ({e.reason} at byte {e.start}): "
                                                          f"{bline[:80]!r}"))
            continue
        if line.strip():
            yield n, line.strip()


def _normalise_rel(rel: str) -> str:
    """One spelling per file: backslashes as slashes, ``.`` and repeated slashes removed."""
    return PurePosixPath(rel.replace("\\", "/")).as_posix()


def _unsafe(rel: str) -> str | None:
    """Why a path of images.txt cannot be used (outputs are written to out_dir/<key>), or None."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        return f"path {rel!r} leaves the dataset folder"
    if not p.parts or p.name in ("", ".") or not PurePosixPath(p.name).stem:
        return f"path {rel!r} names no file"
    return None


def _first_existing(roots: list[Path], rel: str) -> Path | None:
    for root in roots:
        if (root / rel).is_file():
            return root / rel
    return None


def _read_reference(base: Path, skipped: list) -> list[tuple[str, int, int]]:
    """(rel, split, line) of every good line of a reference images.txt."""
    entries = []
    for n, line in _lines(base / "images.txt", skipped):
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            skipped.append((f"images.txt line {n}",
                            f"expected '<path> <split>' with split 0, 1 or 2, got {line!r}"))
            continue
        entries.append((fields[0], int(fields[1]), n))
    return entries


def _read_cub(base: Path, skipped: list) -> list[tuple[str, int, int]]:
    """(rel, split, line) of every good line of an official CUB images.txt."""
    split_of: dict[str, int] = {}
    for n, line in _lines(base / "train_test_split.txt", skipped):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit() or fields[1] not in ("0", "1"):
            skipped.append((f"train_test_split.txt line {n}",
                            f"expected '<id> <1 train | 0 test>', got {line!r}"))
        elif fields[0] in split_of:
            skipped.append((f"train_test_split.txt line {n}", f"id {fields[0]} given twice"))
        else:  # CUB writes 1 = train, 0 = test: the reference's numbers, luckily
            split_of[fields[0]] = int(fields[1])
    entries = []
    for n, line in _lines(base / "images.txt", skipped):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            skipped.append((f"images.txt line {n}", f"expected '<id> <class>/<name>', got {line!r}"))
        elif fields[0] not in split_of:
            skipped.append((f"images.txt line {n}",
                            f"id {fields[0]} has no entry in train_test_split.txt"))
        else:
            entries.append(("images/" + fields[1], split_of[fields[0]], n))
    return entries


def detect_layout(base_dir: str | Path) -> str:
    """"cub" when train_test_split.txt exists and images.txt starts with an integer id,
    else "reference". Raises DatasetError when images.txt is missing."""
    base = Path(base_dir)
    if not (base / "images.txt").is_file():
        raise DatasetError(f"{base / 'images.txt'}: not found; is {base} a dataset folder?")
    first = next(_lines(base / "images.txt"), (0, ""))[1].split()
    is_cub = (base / "train_test_split.txt").is_file() and bool(first) and first[0].isdigit()
    return "cub" if is_cub else "reference"


def load_dataset(base_dir: str | Path, splits: str | int | Iterable[str | int] = ("test",),
                 limit: int | None = None, _allow_empty: bool = False) -> Dataset:
    """Read a dataset's image list (layout detected, see the module docstring).

    ``splits``: names ("train", "val", "test") or numbers (1, 2, 0). ``limit``: keep the
    first ``limit`` items of each requested split, in images.txt order. Broken lines go
    to ``Dataset.skipped``; lines whose path leaves base_dir, or repeats an earlier path,
    are skipped too (outputs are written to ``out_dir/<key>``). Image files are not opened
    here: a missing one raises :class:`ImageError` when it is read.

    Raises DatasetError when images.txt is missing or nothing is selected.
    """
    base = Path(base_dir)
    wanted = _parse_splits(splits)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
    layout = detect_layout(base)
    skipped: list[tuple[str, str]] = []
    if layout == "cub":
        entries = _read_cub(base, skipped)
        gt_roots = [r for r in (base / "segmentations", base.parent / "segmentations") if r.is_dir()]
    else:
        entries = _read_reference(base, skipped)
        gt_roots = [base / "segmentations"]
    distractor_roots = [base / "distractors"]

    items: list[Item] = []
    first_line: dict[str, int] = {}
    key_of: dict[str, tuple[str, int]] = {}  # output key -> (rel, line) of its first image
    per_split = dict.fromkeys(wanted, 0)
    for rel, split, n in entries:
        why = _unsafe(rel)
        if why:
            skipped.append((f"images.txt line {n}", why))
            continue
        rel = _normalise_rel(rel)
        if rel in first_line:
            skipped.append((f"images.txt line {n}", f"{rel!r} repeats line {first_line[rel]}"))
            continue
        first_line[rel] = n
        key = PurePosixPath(rel).with_suffix("").as_posix()
        if key in key_of:  # a.png and a.jpg: one output file and one ground truth for two images
            other, line = key_of[key]
            skipped.append((f"images.txt line {n}", f"{rel!r} and {other!r} (line {line}) would share the outputs "
                                                    f"{key}.* and the mask {key}.png; rename one of them"))
            continue
        key_of[key] = (rel, n)
        if split not in per_split or (limit is not None and per_split[split] >= limit):
            continue
        per_split[split] += 1
        # ground truth mirrors the path below images/, with .png
        sub = rel[len("images/"):] if rel.startswith("images/") else rel
        mask_rel = PurePosixPath(sub).with_suffix(".png").as_posix()
        items.append(Item(rel=rel, split=split, image_path=base / rel,
                          gt_path=_first_existing(gt_roots, mask_rel), line=n,
                          distractor_path=_first_existing(distractor_roots, mask_rel)))
    if not items and not _allow_empty:
        names = [k for k, v in SPLITS.items() if v in wanted]
        hint = " (official CUB has no val split)" if layout == "cub" and 2 in wanted else ""
        raise DatasetError(f"{base}: no items in splits {names} ({layout} layout, "
                           f"{len(skipped)} lines skipped){hint}")
    return Dataset(base_dir=base, layout=layout, items=items, skipped=skipped)


def _index_files(base: Path) -> list[Path]:
    return [p for p in (base / "images.txt", base / "train_test_split.txt") if p.is_file()]


def dataset_identity(items) -> dict:
    """What a dataset's outputs are made from: the resolved folder, and a fingerprint of
    its image list (images.txt, and train_test_split.txt for official CUB) and of the size
    and modification time of every image it lists. Cheap (one stat per image, no pixels
    read) and independent of ``splits`` and ``limit``, so a run on a few images and one on
    all share their outputs, while another dataset, or the same file names with other
    contents, never does.

    ``items``: a :class:`Dataset` or a list of its :class:`Item` (all from one folder).
    """
    import hashlib
    if isinstance(items, Dataset):
        base = items.base_dir
    else:
        items = list(items)
        if not items:
            raise ValueError("dataset_identity: no items")
        it = items[0]
        base = Path(str(it.image_path)[: len(str(it.image_path)) - len(it.rel)])
    base = base.resolve()
    h = hashlib.sha256()
    for f in _index_files(base):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    full = load_dataset(base, splits=list(SPLITS), limit=None, _allow_empty=True)
    for item in full.items:
        try:
            st = item.image_path.stat()
            h.update(f"{item.rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{item.rel}\0missing\n".encode())
    return {"base_dir": str(base), "layout": full.layout, "fingerprint": h.hexdigest()[:16]}


# --------------------------------------------------------------------------------------
# 2. Reading pixels
# --------------------------------------------------------------------------------------

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _to_8bit(img: Image.Image) -> np.ndarray:
    """A 16-bit grey image (0..65535) as uint8 (0..255), rounded: v -> round(v / 257).

    Mode "I" (32-bit) is treated as 16-bit data, which is what PNG/TIFF readers give."""
    a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _decode(path: str | Path, max_pixels: int, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open, check the size, decode fully, convert; every failure -> ImageError(path)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"{path}: {img.width}x{img.height} pixels is more than "
                                 f"max_pixels={max_pixels}")
            img.load()  # decode everything now: a truncated file fails here, not later
            return convert(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, Image.MAX_IMAGE_PIXELS
        raise ImageError(f"{path}: {e}") from e
    except Exception as e:  # unreadable, corrupt or truncated: name the file
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def _image_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT:
        return np.repeat(_to_8bit(img)[:, :, None], 3, axis=2)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # the palette may carry transparency; RGB drops it below
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file as ``uint8 (H, W, 3)`` RGB.

    Grey and palette images become RGB, alpha is dropped (not composited), 16-bit images
    are scaled to 8 bit (65535 -> 255), CMYK is converted. The EXIF orientation tag is
    ignored, so pixels stay aligned with ground-truth masks stored the same way.

    Raises ImageError (naming ``path``) when the file is missing, unreadable, truncated or
    has more than ``max_pixels`` pixels.
    """
    return _decode(path, max_pixels, _image_to_rgb)


def read_mask(path: str | Path, shape: tuple[int, ...] | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask file as a boolean ``(H, W)`` array: foreground where the grey
    level is 128 or more (the CUB convention; colour masks are converted to grey first).

    ``shape``: the image's shape ``(H, W)`` or ``(H, W, 3)``; a mask of another size
    raises ImageError naming the file and both sizes.
    """
    def binarise(img: Image.Image) -> np.ndarray:
        if img.mode in _SIXTEEN_BIT:
            return _to_8bit(img) >= 128
        if img.mode == "1":
            return np.asarray(img, dtype=bool).copy()
        return np.asarray(img.convert("L")) >= 128

    mask = _decode(path, max_pixels, binarise)
    if shape is not None and tuple(mask.shape) != tuple(shape[:2]):
        raise ImageError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but the "
                         f"image is {shape[0]}x{shape[1]}")
    return mask


# --------------------------------------------------------------------------------------
# 3. Placing the image on the canvas, and mapping results back
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where an image of ``height x width`` pixels went on a ``canvas x canvas`` square.

    It occupies the top-left ``placed_h x placed_w`` pixels. ``scale`` is the factor of the
    long edge (1.0 when the image was pasted unresized); in mode "resize" the two axes have
    different factors, ``placed_h / height`` and ``placed_w / width``.
    """

    canvas: int
    scale: float
    height: int
    width: int
    placed_h: int
    placed_w: int
    mode: str = "pad"


def place_image(img: np.ndarray, canvas: int = 512, mode: str = "pad") -> tuple[torch.Tensor, Placement]:
    """Put a ``uint8 (H, W, 3)`` image on a square canvas; returns a float32 tensor
    ``(3, canvas, canvas)`` in [-1, 1] and the :class:`Placement`.

    mode "pad" (the reference, default): paste the image unresized into the top-left
    corner of a canvas filled with -1; an image whose long edge exceeds ``canvas`` is first
    shrunk (bicubic) so that its long edge equals ``canvas``, keeping its aspect ratio.
    mode "resize": stretch the image to ``canvas x canvas``. It fills the whole canvas but
    distorts the aspect ratio of anything not square.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"place_image: expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    long = max(h, w)
    if mode == "resize":
        ph, pw = canvas, canvas
    elif mode == "pad":
        if long <= canvas:
            ph, pw = h, w
        else:  # long edge -> canvas; the short edge rounded, at least 1 pixel
            ph = max(1, (2 * h * canvas + long) // (2 * long))
            pw = max(1, (2 * w * canvas + long) // (2 * long))
    else:
        raise ValueError(f"mode: expected 'pad' or 'resize', got {mode!r}")
    if (ph, pw) != (h, w):
        img = np.asarray(Image.fromarray(img).resize((pw, ph), Image.Resampling.BICUBIC))
    x = torch.full((3, canvas, canvas), -1.0)
    x[:, :ph, :pw] = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x, Placement(canvas=canvas, scale=max(ph, pw) / long, height=h, width=w,
                        placed_h=ph, placed_w=pw, mode=mode)


def valid_region(placement: Placement, grid: int) -> tuple[int, int]:
    """(rows, cols) of a ``grid x grid`` array that the image touches (partly covered
    cells count); the cells beyond are padding and should be ignored."""
    p = placement
    return -(-p.placed_h * grid // p.canvas), -(-p.placed_w * grid // p.canvas)


def _cells(n_orig: int, n_placed: int, grid: int, canvas: int) -> np.ndarray:
    """For each original pixel along one axis, the grid cell its centre falls in.

    Pixel i has its centre at i + 1/2; on the canvas that is (i + 1/2) * n_placed / n_orig,
    in grid cells (i + 1/2) * n_placed * grid / (n_orig * canvas). Integer arithmetic
    keeps it exact."""
    i = np.arange(n_orig, dtype=np.int64)
    return np.minimum((2 * i + 1) * n_placed * grid // (2 * n_orig * canvas), grid - 1)


def _lerp_axis(a: np.ndarray, n_orig: int, n_placed: int, n_valid: int, canvas: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` at the original pixel centres (half-pixel
    convention), never reaching into padding cells."""
    grid = a.shape[axis]
    c = (np.arange(n_orig) + 0.5) * n_placed * grid / (n_orig * canvas) - 0.5
    c = np.clip(c, 0, n_valid - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_valid - 1)
    t = (c - i0).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    return np.take(a, i0, axis=axis) * (1 - t) + np.take(a, i1, axis=axis) * t


def map_back(array: np.ndarray | torch.Tensor, placement: Placement, order: str = "nearest") -> np.ndarray:
    """Bring a map computed on the canvas back to the original image's pixels.

    ``array`` is a 2-D ``G x G`` array over the whole canvas: the canvas itself (G = 512),
    the 64 x 64 latent grid, or any other square grid. The result has the original
    ``(height, width)``.

    order "nearest" (for masks and labels, dtype kept): every original pixel takes the
    value of the grid cell its centre falls in. Nothing is dilated or shifted, so a mask
    placed on the canvas maps back to exactly the original mask.
    order "bilinear" (for float maps such as attention): linear interpolation between cell
    centres, using only cells inside the valid region; the result is floating point.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"map_back: expected a square 2-D array, got shape {a.shape}")
    p, grid = placement, a.shape[0]
    if order == "nearest":
        rows = _cells(p.height, p.placed_h, grid, p.canvas)
        cols = _cells(p.width, p.placed_w, grid, p.canvas)
        return a[np.ix_(rows, cols)]
    if order == "bilinear":
        vr, vc = valid_region(p, grid)
        a = a.astype(np.result_type(a.dtype, np.float32))
        a = _lerp_axis(a, p.height, p.placed_h, vr, p.canvas, axis=0)
        return _lerp_axis(a, p.width, p.placed_w, vc, p.canvas, axis=1)
    raise ValueError(f"order: expected 'nearest' or 'bilinear', got {order!r}")


def place_mask(mask: np.ndarray, placement: Placement, grid: int | None = None) -> np.ndarray:
    """The inverse direction of :func:`map_back` for masks: an original-size ``(H, W)`` mask
    on a ``grid x grid`` array (default: the canvas), by nearest neighbour; padding cells
    get 0 / False. Each valid cell takes the original pixel under the cell's centre."""
    p = placement
    mask = np.asarray(mask)
    if mask.shape != (p.height, p.width):
        raise ValueError(f"place_mask: mask is {mask.shape}, placement expects {(p.height, p.width)}")
    grid = p.canvas if grid is None else grid
    vr, vc = valid_region(p, grid)
    # cell r has its centre at (r + 1/2) * canvas / grid on the canvas; in original pixels
    # that is (r + 1/2) * canvas * height / (grid * placed_h)
    rows = np.minimum((2 * np.arange(vr) + 1) * p.canvas * p.height // (2 * grid * p.placed_h), p.height - 1)
    cols = np.minimum((2 * np.arange(vc) + 1) * p.canvas * p.width // (2 * grid * p.placed_w), p.width - 1)
    out = np.zeros((grid, grid), dtype=mask.dtype)
    out[:vr, :vc] = mask[np.ix_(rows, cols)]
    return out


def load_item(item: Item, canvas: int = 512, mode: str = "pad",
              max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, Placement, np.ndarray]:
    """Read an item's image and place it: ``(tensor (3, canvas, canvas), placement, uint8 image)``."""
    img = read_image(item.image_path, max_pixels=max_pixels)
    x, placement = place_image(img, canvas=canvas, mode=mode)
    return x, placement, img


if __name__ == "__main__":  # python -m fgbg.data download cub DIR  (see fgbg.download)
    import sys

    from fgbg.download import main
    sys.exit(main())
