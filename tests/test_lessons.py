"""The lessons as the repository keeps them: jupytext pairs (notebooks/NAME.ipynb and
notebooks/py/NAME.py, notebooks/jupytext.toml) that agree, executed copies in docs/lessons/
that ran the notebooks' current code and show their figures, and no notebook over 500 KB.
`make notebooks` refreshes both (tools/notebooks.py)."""
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb")) + [ROOT / "notebooks" / "solutions" / "solutions.ipynb"]
LESSONS = ROOT / "docs" / "lessons"
SKIP = {".venv", "runs", "data", ".ipynb_checkpoints", "build", ".git"}


def _cells(nb):
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_and_its_paired_script_have_the_same_cells(path):
    script = path.parent / "py" / f"{path.stem}.py"
    assert script.is_file(), f"{script} missing: jupytext --sync {path.relative_to(ROOT)}"
    nb = nbformat.read(path, as_version=4)
    assert _cells(jupytext.read(script)) == _cells(nb), (
        f"{path.name} and {script.name} differ: run `make notebooks` (or jupytext --sync {script.relative_to(ROOT)})")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1  # papermill's parameters cell, tagged in the .py as `# %% tags=["parameters"]`
    for c in nb.cells:  # only check cells keep outputs (nbval compares them)
        if c.cell_type == "code" and not c.source.startswith("# NBVAL_CHECK_OUTPUT"):
            assert not c.outputs, f"{path.name}: outputs outside check cells"


def test_no_notebook_in_the_repository_is_larger_than_500_kb():
    big = [p for p in ROOT.rglob("*.ipynb") if not SKIP & set(p.relative_to(ROOT).parts)
           and p.stat().st_size > 500 * 1024]
    assert not big, big


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_rendered_lesson_ran_the_current_code_and_shows_figures(path):
    lesson = LESSONS / path.name
    assert lesson.is_file(), f"{lesson} missing: make notebooks"
    ran, nb = nbformat.read(lesson, as_version=4), nbformat.read(path, as_version=4)
    code = lambda n: [c.source for c in n.cells if c.cell_type == "code"]  # noqa: E731
    assert code(ran) == code(nb), f"docs/lessons/{path.name} ran other code than {path.name}: make notebooks"
    outputs = [o for c in ran.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], "red text in the lesson"
    # no widget: its view would be blank without its state (the image browser is a static grid here)
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs)
    assert str(ROOT) not in text  # no path of the machine that made it


def test_the_readme_links_the_rendered_lessons():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"docs/lessons/{path.name}" in readme, path.name
