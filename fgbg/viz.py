"""Figures and ipywidgets for the notebooks (matplotlib; small figures, low dpi)."""
from __future__ import annotations

import numpy as np

DPI = 72


def _fig(n: int, size: float = 2.0, rows: int = 1, extra_width: float = 0.0):
    """A grid of ``n`` panels, axes off, laid out by matplotlib's constrained layout (which
    makes room for titles, a suptitle and colour bars instead of letting them collide)."""
    import matplotlib.pyplot as plt
    cols = int(np.ceil(n / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + extra_width, size * rows + 0.3), dpi=DPI,
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def to_uint8(x) -> np.ndarray:
    """A (3, H, W) tensor in [-1, 1] or an (H, W, 3) uint8 array -> (H, W, 3) uint8."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
        x = np.clip((x.transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(x)


def is_map(a) -> bool:
    """A panel that is a map (2-D, numbers): drawn with a colour map, and on the shared
    scale. Images (H, W, 3) and masks (2-D bool) are drawn as they are, without a bar."""
    a = np.asarray(a)
    return a.ndim == 2 and a.dtype != bool


def _shorten(text: str, width_in: float, fontsize: float = 8, lines: int = 2) -> str:
    """``text`` wrapped to ``width_in`` inches, at most ``lines`` lines, "..." where cut."""
    import textwrap
    chars = max(8, int(width_in * 72 / (0.6 * fontsize)))
    out = textwrap.wrap(str(text), chars, break_long_words=True) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][:chars - 3] + "..."
    return "\n".join(out)


def _name(item, width_in: float, fontsize: float = 8) -> str:
    """An item's name (its path in the dataset) on one line of ``width_in`` inches: the end
    of a long path, where the file's name is, with "..." in front."""
    text = str(getattr(item, "rel", item))
    chars = max(8, int(width_in * 72 / (0.6 * fontsize)))
    return text if len(text) <= chars else "..." + text[-(chars - 3):]


def _draw(ax, a, cmap: str, limits=None):
    """One panel: an image as it is, a mask in black and white, a map in ``cmap`` (on
    ``limits`` = (vmin, vmax) when the scale is shared)."""
    a = np.asarray(a)
    if a.ndim == 3:
        return ax.imshow(a, interpolation="nearest")
    if a.dtype == bool:
        return ax.imshow(a, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    vmin, vmax = limits if limits is not None else (None, None)
    return ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")


def _limits(arrays) -> tuple[float, float] | None:
    """The common (vmin, vmax) of the maps among ``arrays``; None without maps."""
    maps = [np.asarray(a, dtype=np.float64) for a in arrays if is_map(a)]
    maps = [m[np.isfinite(m)] for m in maps]
    maps = [m for m in maps if m.size]
    if not maps:
        return None
    lo, hi = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    return (lo, hi) if hi > lo else (lo, lo + 1e-12)


def _colorbar(fig, mappable, axes, label: str | None, rows: int = 1):
    bar = fig.colorbar(mappable, ax=axes, shrink=0.85 if rows == 1 else 0.5, aspect=15 if rows == 1 else 25,
                       pad=0.02)
    bar.ax.tick_params(labelsize=7)
    if label:
        bar.set_label(label, fontsize=8)
    return bar


def show_row(panels: list[tuple[str, np.ndarray]], size: float = 2.0, cmap: str = "magma", rows: int = 1,
             shared: bool = False, label: str | None = None):
    """One panel per (title, image, mask or map); maps get a colour map.

    ``shared=True``: every map of the figure on one colour scale, with one colour bar
    (titled ``label``), so that the maps can be compared by their colours; images and masks
    keep theirs. Without it each map is scaled to its own minimum and maximum."""
    limits = _limits(a for _, a in panels) if shared else None
    fig, axes = _fig(len(panels), size, rows, extra_width=0.8 if limits else 0.0)
    mappable = None
    for ax, (title, a) in zip(axes, panels):
        im = _draw(ax, a, cmap, limits)
        if is_map(a):
            mappable = im
        ax.set_title(_shorten(title, size), fontsize=8)
    if limits is not None and mappable is not None:
        _colorbar(fig, mappable, axes, label, rows)
    return fig


def show_rows(rows: dict[str, list[np.ndarray]], size: float = 1.5, cmap: str = "magma"):
    """Rows of images (e.g. samples of a prompt), one row per key: the key, wrapped to the
    row's width, is the row's title, left-aligned above it; the panels have no titles."""
    rows = {k: list(v) for k, v in rows.items()}
    cols = max((len(v) for v in rows.values()), default=1)
    fig, axes = _fig(max(1, len(rows)) * cols, size, rows=max(1, len(rows)))
    for r, (name, images) in enumerate(rows.items()):
        for c, a in enumerate(images):
            _draw(axes[r * cols + c], a, cmap)
        axes[r * cols].set_title(_shorten(name, size * cols, lines=1), fontsize=8, loc="left")
    return fig


def show_by_resolution(image, maps, tok: int):
    """The map of token ``tok`` from each cross-attention resolution, then their mean, on
    one colour scale."""
    panels = [("image", to_uint8(image))]
    for r in maps.resolutions:
        panels.append((f"{r}x{r} layers", maps.mean(resolutions=[r])[0, tok].numpy()))
    panels.append(("mean of all layers", maps.mean()[0, tok].numpy()))
    return show_row(panels, shared=True, label="attention probability")


def show_by_level(maps, tok: int, n: int = 6):
    """The map of token ``tok`` at a few noise levels (needs by_level=True), on one scale."""
    idx = np.linspace(0, len(maps.timesteps) - 1, n).round().astype(int)
    return show_row([(f"t = {maps.timesteps[i]}", maps.mean(levels=[int(i)])[0, tok].numpy()) for i in idx],
                    shared=True, label="attention probability")


def token_label(token: str) -> str:
    """A CLIP token as a short label: 'bird', <sot>, <eot>."""
    return token.replace("</w>", "").replace("<|startoftext|>", "<sot>").replace("<|endoftext|>", "<eot>")


def show_by_token(maps, indices: list[int]):
    """The maps of several tokens of the prompt, on one colour scale: where each token's
    share of the attention goes (at every position the shares of all 77 tokens sum to 1)."""
    m = maps.mean()[0]
    return show_row([(repr(token_label(maps.tokens[i])), m[i].numpy()) for i in indices],
                    shared=True, label="attention probability")


def token_mass(maps, n_tokens: int | None = None) -> dict[int, np.ndarray]:
    """Mean attention probability mass of each token, per resolution: {res: (tokens,)}."""
    out = {}
    for r in maps.resolutions:
        m = maps.mean(resolutions=[r])[0]  # (tokens, h, w)
        out[r] = m.mean(dim=(1, 2)).numpy()[:n_tokens]
    return out


def plot_token_mass(maps, n_tokens: int = 10):
    """Bar chart: how much attention each of the first tokens gets, per layer resolution."""
    import matplotlib.pyplot as plt
    mass = token_mass(maps, n_tokens)
    labels = [token_label(t) for t in maps.tokens[:n_tokens]]
    fig, ax = plt.subplots(figsize=(7, 2.4), dpi=DPI, layout="constrained")
    w = 0.8 / len(mass)
    for k, (r, v) in enumerate(mass.items()):
        ax.bar(np.arange(len(v)) + k * w, v, w, label=f"{r}x{r}")
    ax.set_xticks(np.arange(len(labels)) + 0.4 - w / 2, labels, rotation=30, fontsize=8)
    ax.set_ylabel("attention mass")
    ax.legend(fontsize=7, title="layers", title_fontsize=7)
    return fig


def gmm_means(values, seed: int = 0) -> tuple[float, float] | None:
    """The two means of the 2-component Gaussian mixture that
    :func:`fgbg.masks.gmm_midpoint_threshold` fits (same fit, same seed), low first; None
    when all values are equal."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or x.min() == x.max():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        means = GaussianMixture(n_components=2, random_state=seed).fit(x.reshape(-1, 1)).means_.ravel()
    return float(means.min()), float(means.max())


def plot_gmm_threshold(values, threshold: float, bins: int = 40, seed: int = 0,
                       xlabel: str = "attention value", ylabel: str = "latent cells"):
    """Histogram of a map's values, the two Gaussian means of the mixture and the
    threshold half-way between them (the means are drawn when their midpoint is the
    threshold given, i.e. when it came from the same fit: ``seed``)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 2.4), dpi=DPI, layout="constrained")
    ax.hist(np.ravel(values), bins=bins, color="grey")
    means = gmm_means(values, seed)
    if means is not None and np.isclose(sum(means) / 2, threshold, rtol=1e-6, atol=1e-12):
        for m, name in zip(means, ("background mean", "object mean")):
            ax.axvline(m, color="tab:blue", ls="--", lw=1)
            ax.annotate(name, (m, 1), xycoords=("data", "axes fraction"), xytext=(2, -2),
                        textcoords="offset points", ha="left", va="top", fontsize=7, color="tab:blue")
    ax.axvline(threshold, color="red", label=f"threshold {threshold:.3g} (midpoint)")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="center right")
    return fig


def headless() -> bool:
    """Whether this is a batch run (papermill through ``python -m fgbg.course run``, nbval
    through ``make test``, ``make notebooks``): no one to move a slider, so no widgets.

    One environment variable says so, ``fgbg.runs.PROGRESS_ENV`` (``FGBG_PROGRESS=0``),
    which those runs set for their kernels; it also turns the progress bars off."""
    import os

    from .runs import PROGRESS_ENV
    return os.environ.get(PROGRESS_ENV) == "0"


def browse(items, panels_for, titles: list[str] | None = None, static_cases: int = 4, shared: bool = False,
           label: str | None = None):
    """An image browser: a slider over ``items`` and, beneath it, the figure of the chosen
    one; ``panels_for(item)`` returns [(title, array)] (``shared``, ``label``: as in
    :func:`show_row`).

    In a batch run (:func:`headless`) a widget would only wait for a browser that never
    comes (a papermill kernel was seen hanging in this cell), so it returns instead a
    static matplotlib Figure: the same panels for the first ``static_cases`` items, one
    row each. Interactively it returns an :class:`ImageBrowser`, whose figure is an
    ordinary output of the cell, so that it stays in the saved notebook."""
    if headless():
        return static_grid(items[:static_cases], panels_for, shared=shared, label=label)
    return ImageBrowser(items, panels_for, shared=shared, label=label)


class ImageBrowser:
    """The interactive :func:`browse`: an ipywidgets slider, and beneath it the chosen
    image's figure as a plain image output that the slider replaces (``update_display``).

    Why not the figure inside an ``ipywidgets.Output``: what an Output widget shows lives
    only in the widget's state, which JupyterLab does not save by default. A notebook
    reopened without its kernel, exported to HTML or shown on GitHub then had no figure at
    all, only the widget's text (``VBox(children=(IntSlider...``). Here the figure of the
    image last shown is an ordinary PNG output and stays; the slider itself needs a kernel
    (without one it shows a line saying so, or JupyterLab's "model not found")."""

    def __init__(self, items, panels_for, shared: bool = False, label: str | None = None):
        import ipywidgets as w
        self.items, self.panels_for, self.shared, self.label = list(items), panels_for, shared, label
        self.slider = w.IntSlider(min=0, max=max(0, len(self.items) - 1), description="image",
                                  continuous_update=False)  # one figure when let go, not one per step
        self.handle = None
        self.slider.observe(lambda change: self.show(change["new"]), names="value")

    def figure(self, i: int):
        """The figure of ``items[i]``: its panels, titled "i+1/n  name"."""
        import matplotlib.pyplot as plt
        item = self.items[i]
        fig = show_row(self.panels_for(item), shared=self.shared, label=self.label)
        prefix = f"{i + 1}/{len(self.items)}  "
        fig.suptitle(prefix + _name(item, fig.get_figwidth() - len(prefix) * 8 * 0.6 / 72), fontsize=8)
        plt.close(fig)  # shown once, through the display handle, not again by the inline backend
        return fig

    def show(self, i: int) -> None:
        if self.handle is not None:
            self.handle.update(self.figure(i))

    def _ipython_display_(self):
        from IPython.display import display
        bundle = self.slider._repr_mimebundle_()
        bundle["text/plain"] = (f"[image browser: a slider over {len(self.items)} images; it moves where a kernel "
                                f"runs this notebook. Below: the image last shown]")
        display(bundle, raw=True)
        if self.items:
            self.handle = display(self.figure(self.slider.value), display_id=True)
        else:
            print("no images")


def static_grid(items, panels_for, size: float = 2.0, cmap: str = "magma", shared: bool = False,
                label: str | None = None):
    """``panels_for(item)`` of each item, one row per item: the static stand-in for
    :func:`browse`. The item's name runs up the left edge of its row (the end of a long
    path, to fit the row's height); a panel title is written where it differs from the one above it, so
    titles and names never overlap. ``shared``: every map of the grid on one colour scale,
    with one colour bar.

    The figure is closed in pyplot, so a notebook shows it once, as the cell's value,
    not a second time when the inline backend flushes the open figures."""
    import matplotlib.pyplot as plt
    items = list(items)
    rows = [panels_for(it) for it in items]
    cols = max((len(r) for r in rows), default=1)
    limits = _limits(a for r in rows for _, a in r) if shared else None
    fig, axes = _fig(max(1, len(rows)) * cols, size, rows=max(1, len(rows)), extra_width=0.8 if limits else 0.0)
    if not rows:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center")
    mappable = None
    for r, (item, panels) in enumerate(zip(items, rows)):
        for c, (title, a) in enumerate(panels):
            ax = axes[r * cols + c]
            im = _draw(ax, a, cmap, limits)
            if is_map(a):
                mappable = im
            above = rows[r - 1][c][0] if r > 0 and c < len(rows[r - 1]) else None
            if title != above:
                ax.set_title(_shorten(title, size), fontsize=8)
        first = axes[r * cols]
        first.axis("on")
        first.set_xticks([])
        first.set_yticks([])
        for spine in first.spines.values():
            spine.set_visible(False)
        first.set_ylabel(_name(item, size, fontsize=7), fontsize=7)
    if limits is not None and mappable is not None:
        _colorbar(fig, mappable, axes, label, len(rows))
    plt.close(fig)
    return fig


def truth_panel(item, shape) -> tuple[str, np.ndarray]:
    """The ground-truth panel of an item: its mask, or, for a dataset without ground truth,
    an empty grey panel titled so (never the image or another mask in its place)."""
    from .data import read_mask
    if item.gt_path is None:
        return "no ground truth", np.full((*tuple(shape[:2]), 3), 128, np.uint8)
    return "ground truth", read_mask(item.gt_path, tuple(shape[:2]))


# --------------------------------------------------------------------------- lesson summaries
def plot_steps12(metrics: dict):
    """Notebook 02's summary: the AUC of every map of steps 1-2 on the test split, and on
    the distractor subset whether the map of the object word prefers the object's pixels
    over the other object's. 0.5 is chance. None when nothing was scored."""
    import matplotlib.pyplot as plt
    if not metrics or "step1_auc" not in metrics:
        return None
    dist = metrics.get("distractor") or {}
    rows = [("attention (step 1)", metrics.get("step1_auc"), dist.get("bird_vs_distractor_auc"))]
    if "self_attention" in metrics:
        sa, dsa = metrics["self_attention"], dist.get("self_attention", {})
        rows.append((f"attn + self-attn (k={sa.get('k')})", sa.get("auc"), dsa.get("bird_vs_distractor_auc")))
    for k, b in metrics.get("baselines", {}).items():
        rows.append((f"baseline: {k}", b.get("auc"), dist.get("baselines", {}).get(k, {}).get("bird_vs_distractor_auc")))
    for k, c in metrics.get("controls", {}).items():
        rows.append((f"control: {k}", c.get("auc"), dist.get("controls", {}).get(k, {}).get("bird_vs_distractor_auc")))
    panels = [("AUC, test split", 1), ("bird > other object AUC, distractor subset", 2)]
    panels = [(t, i) for t, i in panels if any(_number(r[i]) for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1.4, 0.28 * len(rows) + 0.9), dpi=DPI,
                             sharey=True, squeeze=False, layout="constrained")
    y = np.arange(len(rows))[::-1]
    colours = ["tab:red" if r[0].startswith(("attention", "attn")) else
               "tab:grey" if r[0].startswith("baseline") else "tab:blue" for r in rows]
    for ax, (title, i) in zip(axes[0], panels):
        v = np.array([r[i] if _number(r[i]) else np.nan for r in rows], dtype=float)
        ax.barh(y, np.nan_to_num(v), color=colours)
        for yy, vv in zip(y, v):
            ax.text(0.01 if np.isnan(vv) else vv + 0.01, yy, "-" if np.isnan(vv) else f"{vv:.2f}",
                    va="center", fontsize=7)
        ax.axvline(0.5, color="k", lw=0.8, ls=":")
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("dotted: chance (0.5)", fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(y, [r[0] for r in rows])
    return fig


def plot_table2(metrics: dict, rows=None):
    """The IoU of the rows of the paper's Table 2 that this run has (``rows``: keys of
    :data:`fgbg.evaluate.TABLE2_ROWS`, default all), beside the paper's on CUB. The summary
    of notebooks 04-06. None when no row was scored."""
    import matplotlib.pyplot as plt

    from .evaluate import PAPER_TABLE2, TABLE2_ROWS
    keys = [k for k in (rows or TABLE2_ROWS) if isinstance(metrics.get(k), dict) and _number(metrics[k].get("iou"))]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 0.3 * len(keys) + 0.9), dpi=DPI, layout="constrained")
    y = np.arange(len(keys))[::-1]
    ours = [100 * metrics[k]["iou"] for k in keys]
    paper = [PAPER_TABLE2[k][1] if k in PAPER_TABLE2 else np.nan for k in keys]
    ax.barh(y + 0.2, ours, 0.4, color="tab:red", label="this run")
    ax.barh(y - 0.2, paper, 0.4, color="tab:grey", label="paper (CUB)")
    for yy, v in zip(y, ours):
        ax.text(v + 1, yy + 0.2, f"{v:.1f}", va="center", fontsize=7)
    ax.set_yticks(y, [TABLE2_ROWS.get(k, k) for k in keys])
    ax.set_xlim(0, 105)
    ax.set_xlabel("IoU (%), test split", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncol=2, frameon=False)
    return fig


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and np.isnan(x))


def method_overview(out_dir, items, n: int = 3, size: float = 1.6):
    """The method on ``n`` test images of a finished course run, one row each: the photo,
    step 1's attention map, M_pre, the inpainted background, the refined mask M, the
    U-Net's mask and the ground truth (the README's figure, made from the course's own
    outputs)."""
    from . import attention, data, inpaint, masks, segmenter
    items = [it for it in items if segmenter.predicted_mask_path(out_dir, "unet_refined", it).is_file()][:n]

    def panels_for(it):
        img = data.read_image(it.image_path)
        amap, pl = attention.load_attention(out_dir, it)
        return [("photo", img), ("1: attention", data.map_back(amap, pl, "bilinear")),
                ("2: M_pre", data.read_mask(masks.prelim_mask_path(out_dir, it))),
                ("4: inpainted", data.read_image(inpaint.inpainted_path(out_dir, it))),
                ("4: refined M", data.read_mask(inpaint.refined_mask_path(out_dir, it))),
                ("5: U-Net on M", data.read_mask(segmenter.predicted_mask_path(out_dir, "unet_refined", it))),
                truth_panel(it, img.shape)]
    return static_grid(items, panels_for, size=size)


def main(argv=None) -> int:
    """``python -m fgbg.viz overview OUT_DIR BASE_DIR PNG``: :func:`method_overview` of a
    finished run, saved as a PNG."""
    import argparse

    from .data import load_dataset
    from .evaluate import split_subsets
    p = argparse.ArgumentParser(prog="python -m fgbg.viz", description=main.__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overview", help="the method on a few test images of a finished run, as a PNG")
    o.add_argument("out_dir")
    o.add_argument("base_dir")
    o.add_argument("png")
    o.add_argument("-n", type=int, default=3)
    a = p.parse_args(argv)
    test = split_subsets(load_dataset(a.base_dir, splits=["test"]))["test"]
    method_overview(a.out_dir, test, a.n).savefig(a.png, dpi=DPI, bbox_inches="tight")
    print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
