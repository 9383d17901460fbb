"""Refresh the course's notebooks and build their rendered lessons.

Each lesson is a jupytext pair (notebooks/jupytext.toml): ``notebooks/NAME.ipynb`` and
``notebooks/py/NAME.py`` (percent format). Edit either; this script brings the other up
to date (``jupytext --sync``), runs the notebooks, and writes what the repository keeps:

* ``notebooks/NAME.ipynb``: no outputs except those of the check cells (first line
  ``# NBVAL_CHECK_OUTPUT``), which nbval compares (``make test``);
* ``docs/lessons/NAME.ipynb``: the executed lesson with its figures, run headless (fgbg's
  image browser draws a static grid of cases), at most 500 KB each: GitHub shows them;
* ``docs/lessons/html/``: the same as a static site (nbconvert), git-ignored.

    python tools/notebooks.py refresh   # make notebooks: sync, run, keep check outputs, write docs/lessons/*.ipynb
    python tools/notebooks.py lessons   # make lessons: as refresh where docs/lessons/ is stale, then the HTML site
    python tools/notebooks.py sync      # only jupytext --sync
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
LESSONS = ROOT / "docs" / "lessons"
HTML = LESSONS / "html"
RUN_DIR = ROOT / "runs" / "build"
CHECK = "# NBVAL_CHECK_OUTPUT"
MAX_BYTES = 500 * 1024  # the most a notebook in the repository may weigh
SHRINK_ABOVE = 40 * 1024  # PNG outputs larger than this (base64) get a palette of 256 colours


def course_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("0*.ipynb"))


def solutions_notebook() -> Path:
    return NOTEBOOKS / "solutions" / "solutions.ipynb"


def paired_texts() -> list[Path]:
    return sorted(NOTEBOOKS.glob("py/*.py")) + sorted(NOTEBOOKS.glob("solutions/py/*.py"))


def sync() -> None:
    """jupytext --sync: of each pair, the file edited last gives the cells to the other
    (outputs stay in the .ipynb)."""
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", "--quiet", *map(str, paired_texts())],
                   check=True, cwd=ROOT)


def batch_env(out_dir: Path) -> dict:
    """The environment of a batch run: outputs in ``out_dir``, no progress bars, no widgets,
    one torch thread. The checked numbers depend on torch's thread count (float order); one
    thread, as nbval runs them in ``make test``, makes them the same on any number of cores."""
    from fgbg.course import OUT_DIR_ENV
    from fgbg.runs import BATCH_ENV
    return {**BATCH_ENV, OUT_DIR_ENV: str(out_dir), "OMP_NUM_THREADS": "1"}


def execute(path: Path, out: Path, env: dict) -> None:
    import papermill as pm
    from fgbg.runs import environment
    with environment(env):
        out.parent.mkdir(parents=True, exist_ok=True)
        print("executing", path.relative_to(ROOT), end=" ", flush=True)
        t0 = time.time()
        pm.execute_notebook(str(path), str(out), cwd=str(ROOT), progress_bar=False)
        print(f"{time.time() - t0:.0f} s", flush=True)


def keep_check_outputs(executed: Path, target: Path) -> None:
    """Write ``target`` with no outputs except the printed ones of its check cells, taken
    from ``executed`` (the same cells, run)."""
    ran = nbformat.read(executed, as_version=4)
    clean = nbformat.read(target, as_version=4)
    by_source = {c.source: c for c in ran.cells if c.cell_type == "code"}
    for c in clean.cells:
        if c.cell_type != "code":
            continue
        c.outputs, c.execution_count = [], None
        if c.source.startswith(CHECK):
            c.outputs = [o for o in by_source[c.source].outputs
                         if o.get("output_type") == "stream" and o.get("name") == "stdout"]
            c.execution_count = 1
    nbformat.write(clean, target)


def shrink_png(b64: str) -> str:
    """A large PNG output as a PNG of at most 256 colours, when that is smaller: the
    teaching model's noisy samples compress badly, and a lesson must stay under 500 KB."""
    from PIL import Image
    raw = base64.b64decode(b64)
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    buf = io.BytesIO()
    img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, "png", optimize=True)
    return base64.b64encode(buf.getvalue()).decode() + "\n" if buf.tell() < len(raw) else b64


def write_lesson(executed: Path, dest: Path) -> int:
    """The executed notebook as a rendered lesson: papermill's bookkeeping dropped, the
    machine's paths made relative, large figures shrunk; its size in bytes."""
    nb = nbformat.read(executed, as_version=4)
    root = str(ROOT) + os.sep
    nb.metadata.pop("papermill", None)
    for c in nb.cells:
        c.metadata.pop("papermill", None)
        c.metadata.pop("execution", None)
        if c.metadata.get("tags") == []:
            c.metadata.pop("tags")
        for o in c.get("outputs", []):
            if "text" in o:
                o.text = o.text.replace(root, "")
            data = o.get("data", {})
            if "text/plain" in data:
                data["text/plain"] = data["text/plain"].replace(root, "")
            if len(data.get("image/png", "")) > SHRINK_ABOVE:
                data["image/png"] = shrink_png(data["image/png"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    size = dest.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{dest.relative_to(ROOT)} is {size / 1024:.0f} KB, more than {MAX_BYTES // 1024} KB: "
                         "make its figures smaller (fewer panels, smaller size)")
    return size


def code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def stale_lessons() -> list[str]:
    """The lessons whose executed copy in docs/lessons/ ran other code than the notebook has."""
    pairs = [(nb, LESSONS / nb.name) for nb in course_notebooks()]
    pairs.append((solutions_notebook(), LESSONS / solutions_notebook().name))
    return [nb.stem for nb, lesson in pairs if not lesson.exists() or code_cells(lesson) != code_cells(nb)]


def copy_markdown(nb: Path, lesson: Path) -> None:
    """Text edits reach the rendered lesson without a run: the notebook's markdown cells
    into the executed copy (whose code cells are the same)."""
    src = [c for c in nbformat.read(nb, as_version=4).cells]
    out = nbformat.read(lesson, as_version=4)
    if [c.cell_type for c in src] != [c.cell_type for c in out.cells]:
        return
    changed = False
    for s, o in zip(src, out.cells):
        if s.cell_type == "markdown" and s.source != o.source:
            o.source, changed = s.source, True
    if changed:
        nbformat.write(out, lesson)


def refresh() -> None:
    """make notebooks: sync the pairs, run every notebook headless, keep the check outputs
    in notebooks/ and the executed lessons in docs/lessons/."""
    sync()
    shutil.rmtree(RUN_DIR, ignore_errors=True)  # never reuse outputs of an earlier model or code
    t_all = time.time()
    for nb in course_notebooks():
        executed = RUN_DIR / "notebooks" / nb.name
        execute(nb, executed, batch_env(RUN_DIR))
        keep_check_outputs(executed, nb)
        write_lesson(executed, LESSONS / nb.name)
    refresh_solutions()
    sync()  # the .py beside each rewritten .ipynb (their cells are unchanged)
    print(f"all notebooks: {time.time() - t_all:.0f} s")
    for p in sorted(LESSONS.glob("*.ipynb")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1024:.0f} KB")


def refresh_solutions() -> None:
    """The solutions notebook: its own small run (runs/build/solutions), rendered too."""
    sol = solutions_notebook()
    executed = RUN_DIR / "notebooks" / sol.name
    shutil.rmtree(RUN_DIR / "solutions", ignore_errors=True)
    execute(sol, executed, batch_env(RUN_DIR / "solutions"))
    keep_check_outputs(executed, sol)
    write_lesson(executed, LESSONS / sol.name)


def build_html() -> Path:
    """docs/lessons/html/: each executed lesson as a page (nbconvert's lab template), and
    an index."""
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(template_name="lab")
    HTML.mkdir(parents=True, exist_ok=True)
    links = []
    for lesson in sorted(LESSONS.glob("*.ipynb")):
        nb = nbformat.read(lesson, as_version=4)
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": lesson.stem}})
        (HTML / f"{lesson.stem}.html").write_text(body, encoding="utf-8")
        first = next((c.source for c in nb.cells if c.cell_type == "markdown"), lesson.stem)
        title = next((line.lstrip("# ").strip() for line in first.splitlines() if line.startswith("# ")), lesson.stem)
        links.append(f'<li><a href="{lesson.stem}.html">{title}</a></li>')
    index = HTML / "index.html"
    index.write_text("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>fgbg: the lessons</title>"
                     "<style>body{font-family:sans-serif;max-width:48em;margin:2em auto;line-height:1.5}</style>"
                     "</head><body>\n<h1>fgbg: the course's lessons, executed</h1>\n"
                     "<p>Run on the offline mini world with the teaching model, with the notebooks' own "
                     "parameters (<code>make lessons</code>). The image browsers are static here: a grid "
                     "of the first cases.</p>\n<ol>\n" + "\n".join(links) + "\n</ol>\n</body></html>\n",
                     encoding="utf-8")
    return index


def lessons() -> None:
    """make lessons: refresh where docs/lessons/ ran other code, else only carry over text
    edits; then the HTML site."""
    sync()
    stale = stale_lessons()
    if stale:
        print("docs/lessons/ ran other code for", ", ".join(stale), "-> running the notebooks (make notebooks)")
        refresh()
    else:
        for nb in course_notebooks() + [solutions_notebook()]:
            copy_markdown(nb, LESSONS / nb.name)
    print("wrote", build_html().relative_to(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["refresh", "lessons", "sync"])
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    {"refresh": refresh, "lessons": lessons, "sync": sync}[a.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
