"""fgbg.viz.browse: in a batch run (no one to move a slider) a static figure, not a widget."""
from types import SimpleNamespace

import numpy as np
from matplotlib.figure import Figure

from fgbg import viz
from fgbg.runs import PROGRESS_ENV


def _items(n):
    return [SimpleNamespace(rel=f"img{i}.png", i=i) for i in range(n)]


def _panels(it):
    return [("image", np.full((6, 8, 3), it.i * 20, np.uint8)), ("map", np.random.rand(6, 8))]


def test_browse_is_a_static_figure_in_a_batch_run(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "0")  # what fgbg.course run and the Makefile's nbval line set
    fig = viz.browse(_items(10), _panels)
    assert isinstance(fig, Figure)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4 * 2  # the first 4 cases, the same 2 panels each
    assert "img0.png" in shown[0].get_title() and shown[1].get_title() == "map"
    assert isinstance(viz.browse(_items(1), _panels, static_cases=3), Figure)
    assert isinstance(viz.browse([], _panels), Figure)
    monkeypatch.delenv(PROGRESS_ENV)  # interactively: the slider
    import ipywidgets
    assert isinstance(viz.browse(_items(3), _panels), ipywidgets.VBox)
