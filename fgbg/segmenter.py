"""Step 5 of the method: a segmentation U-Net trained on the refined masks.

Steps 1-4 give every training image a mask without any human label: M_pre (step 2) or
the refined mask M (step 4). The masks are noisy, but a network trained on many of them
averages the noise out: it learns what a bird looks like, not the errors of single masks.
The paper's Table 2 shows this: the U-Net trained on M beats M itself (IoU 75.1 vs 63.6
on CUB), and one trained on M_pre beats M_pre by far (66.5 vs 29.0).

Training (the paper's recipe, METHOD.md "Step 5")::

    f = UNet(3 -> 1 channel logits),  p = sigmoid(f(x))
    loss = BCE(p, M) = -mean[ M log p + (1 - M) log(1 - p) ]   (BCE with logits)
    Adam, lr 2e-3, batch 32, ~12k iterations at 128 x 128 input,
    augmentation: random crop (resized to the input size) and horizontal flip.

At test time the whole image is resized to the input size, the probabilities are resized
back to the original pixels and thresholded at 0.5; the metrics are pooled over all test
pixels (:class:`fgbg.metrics.Confusion`). Ground truth is only used for testing.

Which masks the network learns from is the caller's choice (``mask_fn``): the refined
masks M (the method), M_pre (the ablation "U-Net trained on M_pre") or the ground truth
(the "fully supervised" upper bound).

Mini-world defaults are smaller than the paper's: 64 x 64 input (the mini world's
images are 64 x 64), 1500 iterations and a U-Net with channels (16, 32, 64, 128) instead
of the standard U-Net (64, 128, 256, 512, 1024) at 128 x 128 input. For CUB use
``size=128, iterations=12000`` and e.g. ``channels=(64, 128, 256, 512, 1024)``.

Files: :func:`save_segmenter` writes ``<path>`` (safetensors weights) and
``<path>.with_suffix(".json")`` (the constructor arguments, plus optional metadata).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import DatasetError, read_image, read_mask
from .metrics import Confusion, _as_binary

DEFAULT_CHANNELS = (16, 32, 64, 128)
"""Mini-world U-Net widths; the paper's standard U-Net is (64, 128, 256, 512, 1024)."""


def channels_for_width(width: int, levels: int = 4) -> tuple[int, ...]:
    """The U-Net's channels from the course's ``seg_width`` parameter: the width doubles
    at each of ``levels`` levels, ``(w, 2w, 4w, 8w)``."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"seg_width: expected a positive integer, got {width!r}")
    return tuple(width * 2 ** i for i in range(levels))

_EXPECTED = (DatasetError, OSError, ValueError)  # per-image problems: skip the image, go on


# ----------------------------------------------------------------------------- the network
def _block(c_in: int, c_out: int) -> nn.Sequential:
    """(3x3 conv -> GroupNorm -> ReLU) twice: one U-Net level."""
    def norm(c: int) -> nn.GroupNorm:
        return nn.GroupNorm(math.gcd(8, c), c)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A small U-Net: ``(B, 3, H, W)`` image -> ``(B, 1, H, W)`` foreground logits.

    Encoder: one block per entry of ``channels``, 2x2 max-pooling between them. Decoder:
    bilinear 2x upsampling, concatenation with the encoder's features of the same
    resolution (skip connection), one block. A 1x1 convolution gives the logits; apply
    ``sigmoid`` for probabilities (:func:`predict` does).

    GroupNorm rather than BatchNorm: training and eval mode compute the same function and
    an image's prediction does not depend on the other images of its batch.

    H and W must be divisible by ``2 ** (len(channels) - 1)`` (8 for the default).
    """

    def __init__(self, channels: tuple[int, ...] = DEFAULT_CHANNELS, in_channels: int = 3):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"UNet: channels must be positive widths, got {channels}")
        self.channels, self.in_channels = channels, int(in_channels)
        self.down = nn.ModuleList(_block(c_in, c_out)
                                  for c_in, c_out in zip((in_channels,) + channels[:-1], channels))
        self.up = nn.ModuleList(_block(channels[i + 1] + channels[i], channels[i])
                                for i in range(len(channels) - 1))
        self.head = nn.Conv2d(channels[0], 1, 1)

    @property
    def factor(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def config(self) -> dict:
        """The constructor arguments (what :func:`save_segmenter` stores)."""
        return {"channels": list(self.channels), "in_channels": self.in_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"UNet: input {x.shape[-2]}x{x.shape[-1]} is not divisible by {self.factor} "
                             f"(2 ** (len(channels) - 1)); resize it first")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([x, skips[i]], dim=1))
        return self.head(x)


# ----------------------------------------------------------------------------- pixels
def _to_input(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float in [-1, 1], the network's input range."""
    return img_u8.float() / 127.5 - 1.0


def _resize(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, h, w) to ``hw``: "bilinear" (antialiased when shrinking) or "nearest"
    (pixel centres, as :func:`fgbg.masks.upsample_mask`)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=hw, mode="nearest-exact")
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)


def _check_size(model: UNet, size: int) -> None:
    if size < 1 or size % model.factor:
        raise ValueError(f"size={size} must be a positive multiple of {model.factor} for this U-Net "
                         f"(channels {model.channels})")


# ----------------------------------------------------------------------------- training
def _load_training_set(items, mask_fn) -> tuple[list, list, list[tuple[str, str]]]:
    """Read every image and its target mask once; skip (and print) the bad ones."""
    imgs, masks, skipped = [], [], []
    for item in items:
        try:
            img = read_image(item.image_path)
            mask = _as_binary(mask_fn(item), f"mask of {item.image_path}")
            if mask.shape != img.shape[:2]:
                raise ValueError(f"{item.image_path}: image is {img.shape[0]}x{img.shape[1]} (HxW) but its "
                                 f"mask has shape {mask.shape}")
        except _EXPECTED as e:
            print(f"train_segmenter: skipping {item.rel}: {e}")
            skipped.append((item.rel, f"{type(e).__name__}: {e}"))
            continue
        imgs.append(torch.from_numpy(img).permute(2, 0, 1).contiguous())  # (3, H, W) uint8
        masks.append(torch.from_numpy(mask)[None].contiguous())           # (1, H, W) bool
    return imgs, masks, skipped


def _random_crop(img: torch.Tensor, mask: torch.Tensor, size: int, crop_scale: tuple[float, float],
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented training pair: a random crop whose sides are s * (H, W) with
    s ~ U(crop_scale), resized to size x size (bilinear image, nearest mask), flipped
    horizontally with probability 1/2. At s = 1 this is exactly what :func:`predict` sees."""
    H, W = img.shape[-2:]
    lo, hi = crop_scale
    s = lo + (hi - lo) * torch.rand((), generator=g).item()
    ch, cw = max(1, round(s * H)), max(1, round(s * W))
    top = int(torch.randint(H - ch + 1, (), generator=g))
    left = int(torch.randint(W - cw + 1, (), generator=g))
    flip = bool(torch.rand((), generator=g) < 0.5)
    x = _resize(_to_input(img[None, :, top:top + ch, left:left + cw]), (size, size), "bilinear")
    y = _resize(mask[None, :, top:top + ch, left:left + cw].float(), (size, size), "nearest")
    if flip:
        x, y = x.flip(-1), y.flip(-1)
    return x[0], y[0]


def train_segmenter(items, mask_fn, size: int = 64, iterations: int = 1500, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, device: str | None = None,
                    crop_scale: tuple[float, float] = (0.6, 1.0), progress: bool = True,
                    channels: tuple[int, ...] = DEFAULT_CHANNELS) -> tuple[UNet, list[float]]:
    """Train a :class:`UNet` on ``items`` with targets ``mask_fn(item) -> bool (H, W)``.

    Paper: ``size=128, iterations≈12000, batch_size=32, lr=2e-3`` with a standard U-Net;
    the defaults here are the mini world's (see the module docstring).

    All images and masks are read once and kept in memory (uint8 / bool, on ``device``;
    the CUB training set takes about 3.4 GB). An item whose image or mask cannot be read,
    or whose mask has another size than its image, is skipped with a printed message
    naming the file; the list of ``(item.rel, reason)`` is ``model.skipped``.

    Every iteration draws ``batch_size`` images (a fresh random permutation per epoch),
    augments each (:func:`_random_crop`) and takes one Adam step on the BCE-with-logits
    loss. The weights' initialisation, the image order, crops and flips all come from
    ``seed``, so a rerun on CPU gives identical losses (on GPU, up to cuDNN's
    non-determinism). Returns ``(model in eval mode, per-iteration losses)``.
    """
    from .models import pick_device
    from .runs import progress_bar

    if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
        raise ValueError(f"crop_scale={crop_scale}: expected 0 < low <= high <= 1")
    dev = pick_device(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        model = UNet(channels)
    _check_size(model, size)
    items = list(items)
    imgs, masks, skipped = _load_training_set(items, mask_fn)
    if not imgs:
        raise DatasetError(f"train_segmenter: none of the {len(items)} items could be used "
                           f"({len(skipped)} skipped, see the messages above)")
    imgs, masks = [t.to(dev) for t in imgs], [t.to(dev) for t in masks]
    # channels-last: oneDNN's (and cuDNN's) faster convolution layout; about 25 % less CPU
    # time per iteration for the mini world's U-Net (benchmarks: same function, other layout)
    model.to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    bar = progress_bar(range(iterations), desc="step 5 (U-Net)", disable=not progress, leave=False)
    for it in bar:
        while len(order) < batch_size:
            order += torch.randperm(len(imgs), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        pairs = [_random_crop(imgs[i], masks[i], size, crop_scale, g) for i in idx]
        x = torch.stack([p[0] for p in pairs]).contiguous(memory_format=torch.channels_last)
        y = torch.stack([p[1] for p in pairs])
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        if it % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.to(memory_format=torch.contiguous_format).eval()  # as load_segmenter gives it: same predictions
    model.skipped = skipped
    return model, losses


# ----------------------------------------------------------------------------- prediction
@torch.no_grad()
def _predict_batch(model: UNet, imgs: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Probabilities (H, W) float32 of uint8 images of any sizes, one forward pass."""
    dev = next(model.parameters()).device
    x = torch.cat([_resize(_to_input(torch.from_numpy(im).permute(2, 0, 1)[None].to(dev)), (size, size), "bilinear")
                   for im in imgs])
    prob = torch.sigmoid(model(x))
    return [_resize(p[None], im.shape[:2], "bilinear")[0, 0].float().cpu().numpy() for p, im in zip(prob, imgs)]


def predict(model: UNet, img: np.ndarray, size: int = 64, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probability and mask of one uint8 ``(H, W, 3)`` image, in its own pixels.

    The image is resized to ``size x size`` (the training input size), the sigmoid of the
    logits is resized back to (H, W) bilinearly, and ``mask = prob > threshold``.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"predict: expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    _check_size(model, size)
    model.eval()
    prob = _predict_batch(model, [img], size)[0]
    return prob, prob > threshold


def predict_items(model: UNet, items, size: int = 64, threshold: float = 0.5,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """:func:`predict` over ``items`` in batches: ``{item.key: bool mask (H, W)}``.

    Unreadable images are skipped with a printed message naming the file. Each image's
    result does not depend on its batch (GroupNorm; see :class:`UNet`).
    """
    _check_size(model, size)
    model.eval()
    out: dict[str, np.ndarray] = {}
    batch: list[tuple[str, np.ndarray]] = []

    def flush():
        for (key, _), prob in zip(batch, _predict_batch(model, [im for _, im in batch], size)):
            out[key] = prob > threshold
        batch.clear()

    for item in items:
        try:
            batch.append((item.key, read_image(item.image_path)))
        except _EXPECTED as e:
            print(f"predict_items: skipping {item.rel}: {e}")
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return out


def predicted_mask_path(out_dir, name: str, item) -> Path:
    """``out_dir/masks/<name>/<key>.png``: the mask segmenter ``name`` predicts for an item."""
    return Path(out_dir) / "masks" / name / f"{item.key}.png"


def weights_id(model: UNet) -> str:
    """A short hash of a segmenter's weights (what its predicted masks are made from)."""
    import hashlib
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_predicted_masks(model: UNet, items, out_dir, name: str, size: int = 64, threshold: float = 0.5,
                         batch_size: int = 64, progress: bool = True):
    """Step 5's product for a whole dataset: the mask the U-Net predicts for every item, as
    an 8-bit PNG (0/255) in the image's own pixels, ``out_dir/masks/<name>/<key>.png``
    (:func:`predicted_mask_path`). Works without ground truth. The folder records the
    weights it was made from; masks of an earlier, retrained segmenter are replaced, never
    kept beside the new ones. Returns a :class:`fgbg.runs.StepReport`."""
    from .io import save_png
    from .runs import for_each_batch, read_run_config, step_outputs

    _check_size(model, size)
    model.eval()
    folder = Path(out_dir) / "masks" / name
    config = {"segmenter": weights_id(model), "config": model.config(), "size": size, "threshold": threshold}
    # step 5 retrains every time: outputs of other weights are out of date, so replace them
    stale = read_run_config(folder) not in (None, json.loads(json.dumps(config)))
    with step_outputs(folder, config, overwrite=stale, out_dir=out_dir):
        return for_each_batch(
            f"step 5 ({name} masks)", items, lambda it: [predicted_mask_path(out_dir, name, it)],
            lambda it: read_image(it.image_path), lambda imgs: _predict_batch(model, imgs, size),
            lambda it, img, prob: save_png(predicted_mask_path(out_dir, name, it),
                                           (prob > threshold).astype(np.uint8) * 255) and None,
            batch_size=batch_size, out_dir=out_dir, progress=progress)


# ----------------------------------------------------------------------------- evaluation
def evaluate_masks(pred_fn, items) -> dict:
    """Score masks ``pred_fn(item) -> bool (H, W)`` against ground truth, pooled over pixels.

    Only items with ground truth (``item.gt_path``) are scored; ``gt = read_mask(gt_path,
    image shape)``. The same function scores M_pre, M_crop or M read from PNGs and the
    U-Net's predictions. An item that fails (unreadable file, wrong size) is skipped with a
    printed message. Returns::

        {"acc", "iou", "miou", "dice"}          pooled over all pixels (Confusion), 4 digits
        "per_image_iou": {"mean", "median", "p10", "p90"}  over images (nan-safe: an image
                                                 whose pred and gt are both empty is left out)
        "n_images": images scored, "skipped": ["<item.rel>: <reason>", ...]
    """
    conf, ious, skipped = Confusion(), [], []
    for item in items:
        if item.gt_path is None:
            continue
        try:
            gt = read_mask(item.gt_path, read_image(item.image_path).shape)
            c = Confusion().update(pred_fn(item), gt)
        except _EXPECTED as e:
            print(f"evaluate_masks: skipping {item.rel}: {e}")
            skipped.append(f"{item.rel}: {type(e).__name__}: {e}")
            continue
        conf += c
        ious.append(c.iou)
    v = np.array([x for x in ious if not np.isnan(x)], dtype=np.float64)
    stat = (lambda f: round(float(f(v)), 4)) if v.size else (lambda f: float("nan"))
    return {**conf.as_dict(4),
            "per_image_iou": {"mean": stat(np.mean), "median": stat(np.median),
                              "p10": stat(lambda a: np.percentile(a, 10)),
                              "p90": stat(lambda a: np.percentile(a, 90))},
            "n_images": len(ious), "skipped": skipped}


# ----------------------------------------------------------------------------- files
def save_segmenter(model: UNet, path: str | Path, meta: dict | None = None) -> Path:
    """Write the weights to ``path`` (safetensors) and ``{"config": constructor args,
    "meta": meta}`` to ``path.with_suffix(".json")``, both atomically. ``meta`` is free
    JSON-able information, e.g. ``{"size": 64, "iterations": 1500, "trained_on": "M"}``."""
    from safetensors.torch import save

    from .io import atomic_write_bytes, atomic_write_text

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps({"config": model.config(), "meta": meta or {}}, indent=1) + "\n")
    return path


def load_segmenter(path: str | Path, device: str | None = "cpu") -> UNet:
    """The :class:`UNet` saved by :func:`save_segmenter`, in eval mode on ``device``;
    the saved metadata is ``model.meta``."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path = path.with_suffix(".json")
    for p in (path, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (save_segmenter writes both {path.name} and {cfg_path.name})")
    info = json.loads(cfg_path.read_text())
    model = UNet(**info["config"])
    model.load_state_dict(load_file(str(path)))
    model.meta = info.get("meta", {})
    from .models import pick_device
    return model.to(pick_device(device)).eval()
