"""fgbg.course.run: a stuck cell ends the run with an error instead of hanging it."""
import os
import time

import nbformat
import pytest

from fgbg import course
from fgbg.runs import PROGRESS_ENV


def _notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('out_dir = "runs/x"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)


def test_cell_timeout_stops_a_stuck_cell_and_restores_the_environment(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "stuck.ipynb", "import time\ntime.sleep(600)")
    monkeypatch.setattr(course, "repo_root", lambda start=None: tmp_path)
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    t0 = time.time()
    with pytest.raises(Exception, match="(?i)timed out|timeout"):
        course.run(None, {"out_dir": str(tmp_path / "out")}, ["stuck"], cell_timeout=5)
    assert time.time() - t0 < 120  # the kernel's start plus 5 s, never the cell's 600 s
    assert PROGRESS_ENV not in os.environ  # run() put the environment back


def test_a_finished_notebook_writes_its_copy(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "ok.ipynb", f"import os\nprint(os.environ[{PROGRESS_ENV!r}])")
    monkeypatch.setattr(course, "repo_root", lambda start=None: tmp_path)
    assert course.run(None, {"out_dir": str(tmp_path / "out")}, ["ok"], cell_timeout=60) == {}
    out = nbformat.read(tmp_path / "out" / "notebooks" / "ok.ipynb", as_version=4)
    assert out.cells[-1].outputs[0]["text"].strip() == "0"  # the kernel ran without progress widgets
    assert out.cells[1].source.startswith('# Parameters\nout_dir = "')  # papermill injected out_dir
