"""Colab from a badge: one repository URL (pyproject.toml) behind every badge and the set-up
cell, and a simulated Colab in which the cells after the first import fgbg and run.

Colab is simulated on this machine: a fake /content chosen by FGBG_COLAB_ROOT, the repository
cloned from this checkout's own committed HEAD (FGBG_REPOSITORY), a fresh kernel started in
the fake /content (where Colab starts it). pip is skipped (FGBG_COLAB_NO_INSTALL: this
environment has the dependencies already, and installing the clone here would replace the
fgbg under test).
"""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))


def _repository() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _colab_link(nb: Path) -> str:
    owner_repo = _repository().removeprefix("https://github.com/").strip("/")
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{nb.name}"


def test_badges_and_set_up_cells_use_the_one_repository_url():
    url = _repository()
    assert url.startswith("https://github.com/")
    readme = (ROOT / "README.md").read_text()
    assert _colab_link(NOTEBOOKS[0]) in readme
    from fgbg.course import NOTEBOOKS as NAMES
    assert [nb.stem for nb in NOTEBOOKS] == list(NAMES)
    template = (ROOT / "tools" / "colab_cell.py").read_text()
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(nb_path, as_version=4)
        first_md = next(c for c in nb.cells if c.cell_type == "markdown")
        assert _colab_link(nb_path) in first_md.source, nb_path.name
        setup = nb.cells[[c.cell_type for c in nb.cells].index("code")]
        assert "google.colab" in setup.source and f'"{url}"' in setup.source, nb_path.name
        # written literally in each lesson (notebooks/py/*.py and its notebook), the same everywhere:
        # tools/colab_cell.py with pyproject's URL (tools/set_repository_url.py changes them all)
        assert setup.source.strip() == template.replace("{repository}", url).strip(), nb_path.name
        # the set-up cell is the first code cell, before the parameters cell
        params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        assert params and nb.cells.index(setup) < params[0]


def _cell(nb, tag_or_text):
    return next(c for c in nb.cells if c.cell_type == "code" and (
        tag_or_text in c.metadata.get("tags", []) or tag_or_text in c.source))


def test_a_simulated_colab_clones_and_imports_fgbg_without_a_restart(tmp_path):
    import papermill as pm
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    content = tmp_path / "content"
    content.mkdir()
    src = nbformat.read(ROOT / "notebooks" / "01_attention.ipynb", as_version=4)
    setup = nbformat.v4.new_code_cell(src.cells[[c.cell_type for c in src.cells].index("code")].source)
    params = _cell(src, "parameters")
    body = _cell(src, "course.setup(globals())")
    check = nbformat.v4.new_code_cell(
        "import json, os, fgbg\n"
        "print(json.dumps({'fgbg': fgbg.__file__, 'cwd': os.getcwd(), 'model': P['model'],"
        " 'device': str(pipe.device)}))")
    nb = nbformat.v4.new_notebook(cells=[setup, params, body, check])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    inp, out = tmp_path / "colab.ipynb", tmp_path / "colab-out.ipynb"
    nbformat.write(nb, inp)
    env = {"FGBG_COLAB_ROOT": str(content), "FGBG_REPOSITORY": f"file://{ROOT}",
           "FGBG_COLAB_NO_INSTALL": "1", "FGBG_PROGRESS": "0"}
    code = (f"import os, papermill as pm\nos.environ.update({env!r})\n"
            f"pm.execute_notebook({str(inp)!r}, {str(out)!r}, cwd={str(content)!r}, progress_bar=False,"
            f" parameters={{'out_dir': {str(tmp_path / 'run')!r}, 'limit': 1}}, execution_timeout=300)")
    # a fresh interpreter and kernel, whose working directory is the fake /content
    res = subprocess.run([sys.executable, "-c", code], cwd=content, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ran = nbformat.read(out, as_version=4)
    setup_out = "".join(o.get("text", "") for o in ran.cells[0].outputs)
    assert "the course runs on the CPU" in setup_out or "GPU" in setup_out
    last = json.loads("".join(o.get("text", "") for o in ran.cells[-1].outputs).strip().splitlines()[-1])
    clone = content / "fgbg"
    assert (clone / "pyproject.toml").is_file()
    assert Path(last["fgbg"]).resolve() == (clone / "fgbg" / "__init__.py").resolve()  # the package, not the clone
    assert Path(last["cwd"]).resolve() == clone.resolve() and last["model"] == "teaching"
