"""fgbg.viz: figures that compare maps on one scale, titles that never collide, and, in a
batch run (no one to move a slider), a static figure instead of a widget and no progress
bars."""
import itertools
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from fgbg import viz
from fgbg.runs import PROGRESS_ENV, progress_bar

matplotlib.use("Agg")
LONG = "images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"


def _items(n, rel="img{}.png"):
    return [SimpleNamespace(rel=rel.format(i), i=i) for i in range(n)]


def _panels(it):
    return [("image", np.full((6, 8, 3), it.i * 20, np.uint8)), ("map", np.random.rand(6, 8))]


def _three(it):
    """An image, a map, a mask, and a second map ten times brighter."""
    rng = np.random.default_rng(it.i)
    return [("image", np.zeros((6, 8, 3), np.uint8)), ("attention of a rather long word here", rng.random((6, 8))),
            ("mask", rng.random((6, 8)) > 0.5), ("map x10", 10 * rng.random((6, 8)))]


def _texts(fig):
    """Every non-empty title, axis label and suptitle of a drawn figure, with its box."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)  # a closed figure
    canvas.draw()
    r = canvas.get_renderer()
    texts = [t for ax in fig.axes for t in (ax.title, ax._left_title, ax._right_title, ax.yaxis.label, ax.xaxis.label)]
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    return [(t.get_text(), t.get_window_extent(r)) for t in texts if t.get_text() and t.get_visible()]


def _assert_no_overlap(fig):
    for (a, ba), (b, bb) in itertools.combinations(_texts(fig), 2):
        assert not ba.overlaps(bb), f"{a!r} overlaps {b!r}"


def test_browse_is_a_static_figure_in_a_batch_run(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "0")  # what fgbg.course run and the Makefile's nbval line set
    fig = viz.browse(_items(10), _panels)
    assert isinstance(fig, Figure)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4 * 2  # the first 4 cases, the same 2 panels each
    assert shown[0].get_ylabel() == "img0.png" and shown[1].get_title() == "map"  # the name beside its row
    assert shown[3].get_title() == ""  # the same title as above: written once
    assert isinstance(viz.browse(_items(1), _panels, static_cases=3), Figure)
    assert isinstance(viz.browse([], _panels), Figure)
    monkeypatch.delenv(PROGRESS_ENV)  # interactively: the slider


def test_browse_leaves_its_figure_as_a_plain_output(monkeypatch):
    """Interactively: a slider, and beneath it the chosen image's figure as an ordinary
    image output that the slider replaces, so that a notebook reopened without a kernel (or
    exported, or on GitHub) still shows a figure, not the widget's text."""
    import ipywidgets
    from IPython.core.interactiveshell import InteractiveShell
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    b = viz.browse(_items(3), _panels)
    assert isinstance(b, viz.ImageBrowser) and isinstance(b.slider, ipywidgets.IntSlider)
    assert b.slider.max == 2 and not b.slider.continuous_update
    shown, updated = [], []

    class Handle:
        def update(self, obj):
            updated.append(obj)

    def fake_display(obj, raw=False, display_id=None):
        shown.append((obj, raw, display_id))
        return Handle() if display_id else None

    monkeypatch.setattr("IPython.display.display", fake_display)
    InteractiveShell.instance()  # the figure's PNG formatter
    b._ipython_display_()
    (bundle, raw, _), (fig, _, did) = shown
    assert raw and "application/vnd.jupyter.widget-view+json" in bundle
    assert "kernel" in bundle["text/plain"] and "VBox" not in bundle["text/plain"]
    assert isinstance(fig, Figure) and did and fig._suptitle.get_text().startswith("1/3  img0.png")
    b.slider.value = 2  # moving the slider replaces the figure
    assert len(updated) == 1 and updated[0]._suptitle.get_text().startswith("3/3  img2.png")


def test_a_batch_run_has_no_progress_bars(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert viz.headless() and progress_bar(range(3), disable=False).disable
    monkeypatch.delenv(PROGRESS_ENV)
    assert not viz.headless() and not progress_bar(range(3)).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")  # tqdm's own switch, which diffusers' bars honour too
    bar = progress_bar(range(3), disable=False)  # callers pass disable=not progress
    assert bar.disable and list(bar) == [0, 1, 2]
    assert not viz.headless()  # only FGBG_PROGRESS says a run is headless
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    assert progress_bar(range(3)).mininterval == 5.0
    monkeypatch.delenv("TQDM_MININTERVAL")
    assert progress_bar(range(3)).mininterval == 1.0


def test_shared_maps_have_one_scale_and_one_colour_bar():
    panels = _three(SimpleNamespace(i=0))
    fig = viz.show_row(panels, shared=True, label="attention probability")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    limits = [im.get_clim() for ax in fig.axes if ax.get_label() != "<colorbar>" for im in ax.images
              if ax.get_title() not in ("image", "mask")]
    lo, hi = min(a.min() for _, a in panels[1::2]), max(a.max() for _, a in panels[1::2])
    assert limits == [(pytest.approx(lo), pytest.approx(hi))] * 2
    assert len(bars) == 1 and bars[0].get_ylabel() == "attention probability"
    mask = next(ax for ax in fig.axes if ax.get_title() == "mask").images[0]
    assert mask.get_clim() == (0, 1) and mask.get_cmap().name == "gray"  # masks stay black and white
    _assert_no_overlap(fig)
    # without sharing: each map on its own scale, and no colour bar
    fig = viz.show_row(panels)
    assert not [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    own = [ax.images[0].get_clim() for ax in fig.axes if ax.get_title() in ("map x10",)]
    assert own[0][1] == pytest.approx(panels[3][1].max())


def test_static_grid_shares_one_scale_over_all_rows_and_names_never_collide():
    fig = viz.static_grid(_items(3, LONG + "{}"), _three, shared=True, label="D")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    limits = {im.get_clim() for ax in fig.axes if ax not in bars for im in ax.images if im.get_array().ndim == 2
              and im.get_cmap().name != "gray"}
    assert len(limits) == 1
    names = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel() and ax not in bars]
    # the end of each long path, where the file's name is
    assert [n[:3] for n in names] == ["..."] * 3 and [n[-12:] for n in names] == [f"0046_18.jpg{i}" for i in range(3)]
    _assert_no_overlap(fig)


def test_browse_title_and_long_titles_do_not_collide(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    fig = viz.show_row(_three(SimpleNamespace(i=1)), shared=True)
    fig.suptitle(viz._name(SimpleNamespace(rel=LONG), fig.get_figwidth()), fontsize=8)  # as browse() does
    _assert_no_overlap(fig)
    rows = {"a photo of a bird": [np.zeros((4, 4, 3), np.uint8)] * 3,
            "a photo of a red bird on grass, with a much longer prompt than a row is wide": [np.zeros((4, 4, 3))] * 3}
    fig = viz.show_rows(rows)
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles[0] == "a photo of a bird" and titles[1].endswith("...") and len(titles) == 2
    assert not [ax for ax in fig.axes if ax.get_title()]  # the panels themselves: untitled
    _assert_no_overlap(fig)


def test_gmm_histogram_has_labelled_axes_and_both_means():
    from fgbg.masks import gmm_midpoint_threshold
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.02, 0.003, 200), rng.normal(0.08, 0.01, 40)])
    t = gmm_midpoint_threshold(values, seed=0)
    fig = viz.plot_gmm_threshold(values, t, seed=0)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "attention value" and ax.get_ylabel() == "latent cells"
    lines = sorted(line.get_xdata()[0] for line in ax.lines)
    lo, hi = viz.gmm_means(values, seed=0)
    assert lines == pytest.approx(sorted([lo, t, hi])) and (lo + hi) / 2 == pytest.approx(t)
    assert lo == pytest.approx(0.02, abs=0.005) and hi == pytest.approx(0.08, abs=0.01)
    # a threshold from another fit: no means drawn beside it (they would not be its means)
    assert len(viz.plot_gmm_threshold(values, 0.05, seed=0).axes[0].lines) == 1
    _assert_no_overlap(fig)


def test_lesson_summaries():
    m = {"step1_auc": 0.96, "prelim": {"iou": 0.43}, "baselines": {"centre": {"auc": 0.67}, "saliency": {"auc": 0.99}},
         "controls": {"untrained": {"auc": 0.59}},
         "distractor": {"bird_vs_distractor_auc": 0.58, "baselines": {"centre": {"bird_vs_distractor_auc": 0.5}}},
         "crop": {"acc": 0.9, "iou": 0.7, "miou": 0.8, "dice": 0.8},
         "refined": {"acc": 0.9, "iou": 0.65, "miou": 0.8, "dice": 0.8}}
    fig = viz.plot_steps12(m)
    assert len(fig.axes) == 2 and [t.get_text() for t in fig.axes[0].get_yticklabels()][0] == "attention (step 1)"
    _assert_no_overlap(fig)
    fig = viz.plot_table2(m, ["prelim", "crop", "refined"])
    labels = {t.get_text() for t in fig.axes[0].get_yticklabels()}
    assert labels == {"preliminary masks M_pre", "simple inpainting M_crop", "refined masks M"}
    assert fig.axes[0].get_xlabel().startswith("IoU")
    assert viz.plot_steps12({}) is None and viz.plot_table2({}) is None  # no ground truth: nothing to draw


def test_truth_panel_without_ground_truth_is_grey_not_a_map(tmp_path):
    title, a = viz.truth_panel(SimpleNamespace(gt_path=None), (5, 7, 3))
    assert title == "no ground truth" and a.shape == (5, 7, 3) and not viz.is_map(a)


def test_tqdm_disable_alone_turns_the_libraries_bars_off(monkeypatch):
    """In a Jupyter kernel tqdm.notebook ignores TQDM_DISABLE (it passes disable=False
    itself), so diffusers' "Loading pipeline components..." stayed in batch-run notebooks as
    a widget at 0%; load_pipeline turns the libraries' bars off for tqdm's switch too."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from fgbg import models
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()
    try:
        models.load_pipeline("teaching", "cpu")
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
