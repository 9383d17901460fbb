"""Write the course notebooks from the cell lists in tools/notebook_cells/.

The committed .ipynb files are the product; this script is how they are edited in
review-friendly Python. Cells are separated by lines ``# %% [markdown]``, ``# %%``,
``# %% parameters`` (the papermill parameters cell), ``# %% check`` (a cell whose
printed output nbval compares; the marker ``# NBVAL_CHECK_OUTPUT`` is added) and
``# %% colab`` (the Colab set-up cell, ``tools/colab_cell.py``, with the repository URL of
pyproject.toml). The first markdown cell gets the notebook's "Open in Colab" badge.

    python tools/build_notebooks.py            # write notebooks/*.ipynb without outputs
    python tools/build_notebooks.py --execute  # ... then run them and keep only the
                                               # outputs of check cells (for nbval)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tools" / "notebook_cells"
OUT = ROOT / "notebooks"
CHECK = "# NBVAL_CHECK_OUTPUT"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository() -> str:
    """The repository's URL: pyproject.toml's [project.urls] Repository, its one home."""
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def colab_url(notebook: str) -> str:
    """The "Open in Colab" link of ``notebooks/<notebook>.ipynb`` on the main branch."""
    owner_repo = repository().removeprefix("https://github.com/").removesuffix(".git").strip("/")
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{notebook}.ipynb"


def colab_badge(notebook: str) -> str:
    return f"[![Open In Colab]({BADGE})]({colab_url(notebook)})"


def parse(text: str) -> list:
    cells = []
    parts = re.split(r"^# %%(.*)$", text, flags=re.M)
    for head, body in zip(parts[1::2], parts[2::2]):
        head, body = head.strip(), body.strip("\n")
        if head == "[markdown]":
            md = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(md.strip()))
        elif head == "parameters":
            cells.append(nbformat.v4.new_code_cell(body, metadata={"tags": ["parameters"]}))
        elif head == "check":
            cells.append(nbformat.v4.new_code_cell(f"{CHECK}\n{body}"))
        elif head == "colab":
            code = (ROOT / "tools" / "colab_cell.py").read_text().replace("{repository}", repository())
            cells.append(nbformat.v4.new_code_cell(code.strip("\n") + ("\n" + body if body.strip() else "")))
        elif head == "":
            cells.append(nbformat.v4.new_code_cell(body))
        else:
            raise ValueError(f"unknown cell header '# %%{head}'")
    return cells


def build(name: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = parse((SRC / f"{name}.py").read_text())
    first = next(c for c in nb.cells if c.cell_type == "markdown")
    first.source = f"{colab_badge(name)}\n\n{first.source}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    path = OUT / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def keep_check_outputs(executed: Path, target: Path) -> None:
    """Copy the outputs of check cells from an executed notebook into the clean one."""
    ran = nbformat.read(executed, as_version=4)
    clean = nbformat.read(target, as_version=4)
    by_source = {c.source: c for c in ran.cells if c.cell_type == "code"}
    for c in clean.cells:
        if c.cell_type == "code" and c.source.startswith(CHECK):
            r = by_source[c.source]
            c.outputs = [o for o in r.outputs if o.get("output_type") == "stream" and o.get("name") == "stdout"]
            c.execution_count = 1
    nbformat.write(clean, target)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*")
    p.add_argument("--execute", action="store_true")
    a = p.parse_args()
    names = a.names or sorted(f.stem for f in SRC.glob("[0-9]*.py"))
    paths = [build(n) for n in names]
    print("wrote", ", ".join(str(p.relative_to(ROOT)) for p in paths))
    if a.execute:
        import os
        import papermill as pm
        import shutil
        run_dir = ROOT / "runs" / "build"
        shutil.rmtree(run_dir, ignore_errors=True)  # never reuse outputs of an earlier model or code
        from fgbg.course import OUT_DIR_ENV
        from fgbg.runs import PROGRESS_ENV
        os.environ[OUT_DIR_ENV] = str(run_dir)
        os.environ[PROGRESS_ENV] = "0"  # no progress widgets in headless kernels (fgbg.runs.progress_bar)
        os.environ["TQDM_DISABLE"] = "1"  # nor the libraries' own bars
        import time
        t_all = time.time()
        for path in paths:
            out = run_dir / "notebooks" / path.name
            out.parent.mkdir(parents=True, exist_ok=True)
            print("executing", path.name, end=" ", flush=True)
            t0 = time.time()
            pm.execute_notebook(str(path), str(out), cwd=str(ROOT), progress_bar=False)
            print(f"{time.time() - t0:.0f} s", flush=True)
            keep_check_outputs(out, path)
        print(f"all notebooks: {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
