"""Figures and ipywidgets for the notebooks (matplotlib; small figures, low dpi)."""
from __future__ import annotations

import numpy as np

DPI = 72


def _fig(n: int, size: float = 2.0, rows: int = 1):
    import matplotlib.pyplot as plt
    cols = int(np.ceil(n / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3), dpi=DPI, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def to_uint8(x) -> np.ndarray:
    """A (3, H, W) tensor in [-1, 1] or an (H, W, 3) uint8 array -> (H, W, 3) uint8."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
        x = np.clip((x.transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(x)


def show_row(panels: list[tuple[str, np.ndarray]], size: float = 2.0, cmap: str = "magma", rows: int = 1):
    """One panel per (title, image or map); maps get a colour map."""
    fig, axes = _fig(len(panels), size, rows)
    for ax, (title, a) in zip(axes, panels):
        a = np.asarray(a)
        ax.imshow(a, cmap=None if a.ndim == 3 else cmap, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def show_by_resolution(image, maps, tok: int):
    """The map of token ``tok`` from each cross-attention resolution, then their mean."""
    panels = [("image", to_uint8(image))]
    for r in maps.resolutions:
        panels.append((f"{r}x{r} layers", maps.mean(resolutions=[r])[0, tok].numpy()))
    panels.append(("mean of all layers", maps.mean()[0, tok].numpy()))
    return show_row(panels)


def show_by_level(maps, tok: int, n: int = 6):
    """The map of token ``tok`` at a few noise levels (needs by_level=True)."""
    idx = np.linspace(0, len(maps.timesteps) - 1, n).round().astype(int)
    return show_row([(f"t = {maps.timesteps[i]}", maps.mean(levels=[int(i)])[0, tok].numpy()) for i in idx])


def show_by_token(maps, indices: list[int]):
    """The maps of several tokens of the prompt."""
    m = maps.mean()[0]
    return show_row([(repr(maps.tokens[i].replace("</w>", "")), m[i].numpy()) for i in indices])


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
    labels = [t.replace("</w>", "").replace("<|startoftext|>", "<sot>").replace("<|endoftext|>", "<eot>")
              for t in maps.tokens[:n_tokens]]
    fig, ax = plt.subplots(figsize=(7, 2.4), dpi=DPI)
    w = 0.8 / len(mass)
    for k, (r, v) in enumerate(mass.items()):
        ax.bar(np.arange(len(v)) + k * w, v, w, label=f"{r}x{r}")
    ax.set_xticks(np.arange(len(labels)) + 0.4 - w / 2, labels, rotation=30, fontsize=8)
    ax.set_ylabel("attention mass")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_gmm_threshold(values, threshold: float, bins: int = 40):
    """Histogram of a map's values and the GMM-midpoint threshold."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 2.2), dpi=DPI)
    ax.hist(np.ravel(values), bins=bins, color="grey")
    ax.axvline(threshold, color="red", label=f"threshold {threshold:.3g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def headless() -> bool:
    """Whether this is a batch run (papermill through ``python -m fgbg.course run``, nbval
    through ``make test``, ``make notebooks``): no one to move a slider, so no widgets.

    One environment variable says so, ``fgbg.runs.PROGRESS_ENV`` (``FGBG_PROGRESS=0``),
    which those runs set for their kernels; it also turns the progress bars off."""
    import os

    from .runs import PROGRESS_ENV
    return os.environ.get(PROGRESS_ENV) == "0"


def browse(items, panels_for, titles: list[str] | None = None, static_cases: int = 4):
    """An ipywidgets slider over images; ``panels_for(item)`` returns [(title, array)].

    In a batch run (:func:`headless`) a widget would only wait for a browser that never
    comes (a papermill kernel was seen hanging in this cell), so it returns instead a
    static matplotlib Figure: the same panels for the first ``static_cases`` items, one
    row each."""
    if headless():
        return static_grid(items[:static_cases], panels_for)
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display
    out = w.Output()

    def show(i):
        out.clear_output(wait=True)
        with out:
            item = items[i]
            fig = show_row(panels_for(item))
            fig.suptitle(item.rel, fontsize=8)
            plt.show()

    slider = w.IntSlider(min=0, max=max(0, len(items) - 1), description="image")
    slider.observe(lambda ch: show(ch["new"]), names="value")
    show(0)
    return w.VBox([slider, out])


def static_grid(items, panels_for, size: float = 2.0, cmap: str = "magma"):
    """``panels_for(item)`` of each item, one row per item (its name in the first panel's
    title): the static stand-in for :func:`browse`.

    The figure is closed in pyplot, so a notebook shows it once, as the cell's value,
    not a second time when the inline backend flushes the open figures."""
    import matplotlib.pyplot as plt
    items = list(items)
    rows = [panels_for(it) for it in items]
    cols = max((len(r) for r in rows), default=1)
    fig, axes = _fig(max(1, len(rows)) * cols, size, rows=max(1, len(rows)))
    if not rows:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center")
    for r, (item, panels) in enumerate(zip(items, rows)):
        for c, (title, a) in enumerate(panels):
            a = np.asarray(a)
            ax = axes[r * cols + c]
            ax.imshow(a, cmap=None if a.ndim == 3 else cmap, interpolation="nearest")
            ax.set_title(f"{getattr(item, 'rel', item)}\n{title}" if c == 0 else title, fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def truth_panel(item, shape) -> tuple[str, np.ndarray]:
    """The ground-truth panel of an item: its mask, or, for a dataset without ground truth,
    an empty grey panel titled so (never the image or another mask in its place)."""
    from .data import read_mask
    if item.gt_path is None:
        return "no ground truth", np.full(tuple(shape[:2]), 0.5)
    return "ground truth", read_mask(item.gt_path, tuple(shape[:2]))
