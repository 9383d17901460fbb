"""Running the course: notebook set-up, and ``python -m fgbg.course`` for batch runs.

``python -m fgbg.course run -f params/demo.yaml`` checks the parameters, then executes
the notebooks in order with papermill into ``<out_dir>/notebooks/`` and prints the
results table from ``<out_dir>/metrics.json``.

What can go wrong is said in one line on stderr, with a non-zero exit status: a bad
parameter or a missing dataset or model folder before anything runs (status 2), a failing
notebook cell as ``error: <notebook> cell <n>: <error>`` and where the executed notebook
with the full traceback is (status 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .params import SCHEMA, ParameterError, from_namespace, gather

NOTEBOOKS = ("01_attention", "02_masks", "03_finetune", "04_inpaint", "05_segmentation", "06_synthetic")
# Test harnesses (make test) set this so that nbval never touches a user's runs/demo.
OUT_DIR_ENV = "FGBG_OUT_DIR"


def repo_root(start: str | Path | None = None) -> Path:
    """The repository root (the folder with pyproject.toml naming fgbg) above ``start``,
    or ``start`` itself when there is none (an installed package used elsewhere)."""
    here = Path(start or os.getcwd()).resolve()
    for p in (here, *here.parents):
        f = p / "pyproject.toml"
        if f.exists() and 'name = "fgbg"' in f.read_text():
            return p
    return here


def resolve(path: str, root: Path) -> Path:
    """``path`` made absolute: a relative one is taken relative to ``root``."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


COURSE_DATA = "data/miniworld"
"""The course's own data folder (relative to the repository root): the mini world's home."""


def check_out_dir(out_dir: str | Path, root: Path) -> Path:
    """Refuse an out_dir where the steps' outputs would overwrite the course itself: empty,
    the repository (or a folder above it), or a copy of the course (a folder holding fgbg/
    or pyproject.toml). Its notebooks/ folder is where ``fgbg.course run`` puts the
    executed notebooks, so that one is allowed."""
    if str(out_dir).strip() == "":
        raise ParameterError("parameter 'out_dir' is empty; give a folder for the outputs, e.g. runs/mine")
    out = Path(out_dir)
    if (root / "pyproject.toml").exists() and (out == root or out in root.parents):
        raise ParameterError(f"out_dir {out} is the course's repository or a folder above it: the outputs "
                             f"would mix with (and overwrite) the course's files; use a folder of its own, e.g. "
                             f"{root / 'runs' / 'mine'}")
    for own in ("fgbg", "pyproject.toml"):
        if (out / own).exists():
            raise ParameterError(f"out_dir {out} holds {own} (a copy of the course?); use an empty folder or a "
                                 f"new one for the outputs")
    return out


def prepare_mini_world(base: Path, root: Path, seed: int) -> str | None:
    """Write the mini world into ``base`` when that is safe, and say so; never into a
    user's data. Allowed: the course's own folder (``data/miniworld``), an existing empty
    folder, or a mini world written by fgbg (rewritten only when older than
    miniworld.json). Anything else without images.txt is an error: a mistyped path must
    not silently run on synthetic data."""
    from .miniworld import is_outdated_course_dataset, write_course_dataset
    own = base == (root / COURSE_DATA).resolve()
    if (base / "images.txt").exists():
        if is_outdated_course_dataset(base):
            write_course_dataset(base, seed=seed)
            return f"rewrote the mini world in {base} (it was written by an older fgbg)"
        return None
    empty = base.is_dir() and not any(base.iterdir())
    if own or empty:
        write_course_dataset(base, seed=seed)
        return f"wrote the mini-world course dataset to {base}"
    if not base.exists():
        raise ParameterError(f"base_dir {base} does not exist (a typo?); the mini world is written only to "
                             f"{root / COURSE_DATA} or an existing empty folder")
    raise ParameterError(f"base_dir {base} has no images.txt, so it is not a dataset; make_mini_world writes "
                         f"the mini world only to {root / COURSE_DATA}, an empty folder or an older mini world, "
                         f"never over other files; check the path or set make_mini_world false")


def setup(namespace: dict) -> dict:
    """Check a notebook's parameters and resolve its paths; seed everything.

    Relative paths are relative to the repository root, so a notebook gives the same
    result whether it runs from notebooks/ (JupyterLab) or the root (papermill, nbval).
    ``python -m fgbg.course run`` makes the paths given to it absolute first, relative to
    the folder it is started in. An out_dir that would overwrite the course is refused
    (:func:`check_out_dir`); the mini world is written only where that is safe
    (:func:`prepare_mini_world`).
    """
    import numpy as np
    import torch
    P = from_namespace(namespace)
    if os.environ.get(OUT_DIR_ENV):
        P["out_dir"] = os.environ[OUT_DIR_ENV]
    root = repo_root()
    if str(P["out_dir"]).strip() == "":
        check_out_dir("", root)
    P["base_dir"] = str(resolve(P["base_dir"], root))
    P["out_dir"] = str(check_out_dir(resolve(P["out_dir"], root), root))
    torch.manual_seed(P["seed"])
    np.random.seed(P["seed"])
    if P["make_mini_world"]:
        said = prepare_mini_world(Path(P["base_dir"]), root, P["seed"])
        if said:
            print(said)
    elif not Path(P["base_dir"]).is_dir():
        raise ParameterError(f"base_dir {P['base_dir']} does not exist")
    Path(P["out_dir"]).mkdir(parents=True, exist_ok=True)
    return P


def untrained_copy(pipe, seed: int = 0):
    """The same pipeline with freshly initialised UNet and text encoder (the VAE is kept,
    so the UNet sees the same latents): the "untrained network" control of step 1."""
    import copy
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(pipe.unet.config).to(pipe.unet.device, pipe.unet.dtype).eval()
    te = type(pipe.text_encoder)(pipe.text_encoder.config).to(pipe.text_encoder.device,
                                                                pipe.text_encoder.dtype).eval()
    clone = copy.copy(pipe)  # shallow: shares VAE, tokenizer and scheduler
    clone.register_modules(unet=unet, text_encoder=te)
    return clone


def _notebook_params(nb_path: Path) -> set[str]:
    import papermill as pm
    return set(pm.inspect_notebook(str(nb_path)))


class NotebookError(RuntimeError):
    """A notebook of a batch run failed; the message is one line naming the notebook, the
    cell, the error, and the executed notebook that holds the full traceback."""


def _first_line(text, limit: int = 300) -> str:
    lines = str(text).strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _from_cwd(path: str) -> Path:
    """A path given to the CLI, absolute: a relative one is relative to the folder the CLI
    runs in (not the repository root, which the notebooks use)."""
    return resolve(path, Path.cwd())


_HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
_DOWNLOAD = "hf download CompVis/stable-diffusion-v1-4 --local-dir sd14"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except Exception:  # a hub client too old or too new to ask: assume it is there
        return True


def precheck(given: dict, P: dict, origins: dict[str, str] | None = None, source: str = "parameters") -> dict:
    """What the CLI checks before any notebook runs, beyond the schema: the dataset folder
    exists (unless the mini world will be written to the course's own folder), and the
    model is the teaching model, a local pipeline folder, or a hub id (which, with
    ``HF_HUB_OFFLINE`` set, must be in the local cache). Raises ParameterError, one line.

    ``given``: the parameters given (file and command line), ``P``: all of them, checked.
    Paths given are relative to the current folder; returns them made absolute
    (``base_dir``, ``out_dir``, a local ``model``), for the notebooks, which would take
    them relative to the repository root."""
    import re
    import shlex
    origins = origins or {}
    root = repo_root(Path(__file__).parent)
    fixed = {}

    def where(name):
        return origins.get(name, source)

    default_base = SCHEMA["base_dir"].default
    own_world = P["make_mini_world"] and (Path(P["base_dir"]).as_posix() == default_base or
                                          _from_cwd(P["base_dir"]).resolve() == (root / default_base).resolve())
    if not own_world:
        base = _from_cwd(P["base_dir"]) if "base_dir" in given else root / P["base_dir"]
        if not base.is_dir():
            raise ParameterError(
                f"{where('base_dir')}: base_dir {P['base_dir']!r} does not exist ({base}); give the dataset's "
                f"folder (CUB_200_2011 or the reference layout) with -p base_dir DIR, or use the course's mini "
                f"world: -p base_dir {default_base} -p make_mini_world true")
        if "base_dir" in given:
            fixed["base_dir"] = str(base)
    if str(P["out_dir"]).strip() == "":
        check_out_dir("", root)
    out_dir = _from_cwd(P["out_dir"]) if "out_dir" in given else resolve(P["out_dir"], root)
    try:
        fixed["out_dir"] = str(check_out_dir(out_dir, root))
    except ParameterError as e:
        raise ParameterError(f"{where('out_dir')}: {e}") from None
    model = P["model"]
    if model != SCHEMA["model"].default:
        from .models import TEACHING  # fgbg.models imports torch: only when needed
    if model != SCHEMA["model"].default and model not in TEACHING:
        folder = _from_cwd(model)
        if folder.exists():
            if not (folder / "model_index.json").is_file():
                raise ParameterError(
                    f"{where('model')}: model {model!r} ({folder}) is not a diffusers pipeline folder (no "
                    f"model_index.json); save one with save_pretrained, or download SD v1.4: {_DOWNLOAD}")
            fixed["model"] = str(folder)
        elif not re.fullmatch(_HUB_ID, model):
            raise ParameterError(
                f"{where('model')}: model {model!r} is neither a folder ({folder} does not exist) nor a hub id "
                f"(owner/name); use 'teaching', a pipeline folder, or download SD v1.4 first: {_DOWNLOAD}")
        elif _hub_offline() and not _in_hub_cache(model):
            name = model.split("/")[-1]
            download = shlex.join(["hf", "download", model, "--local-dir", name])
            raise ParameterError(
                f"{where('model')}: model {model!r} is a hub id, but HF_HUB_OFFLINE is set and it is not in the "
                f"local cache; download it where there is internet ({download}) and pass the folder: -p model {name}")
    return fixed


def _stuck_cell(executed: Path) -> str:
    """The first line of the last cell papermill started in ``executed`` (a timed-out run)."""
    try:
        import nbformat
        nb = nbformat.read(executed, as_version=4)
        started = [c for c in nb.cells if c.get("metadata", {}).get("papermill", {}).get("start_time")]
        lines = [ln for ln in started[-1].source.splitlines() if ln.strip() and not ln.startswith("#")]
        return f"`{_first_line(lines[0] if lines else started[-1].source, 80)}`"
    except Exception:
        return "(unknown)"


def run(params_file: str | None, overrides: dict, notebooks: list[str], kernel: str | None = None,
        cell_timeout: float | None = None) -> dict:
    """Execute the notebooks in order with papermill; return the metrics.

    The parameters are checked first (:func:`fgbg.params.gather`, :func:`precheck`:
    ParameterError). A failing notebook raises :class:`NotebookError`, one line.

    ``cell_timeout``: seconds one cell may run before the run stops with an error naming
    the cell (None or 0: no limit, as a full-dataset fine-tuning cell runs for hours).
    """
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError
    given, P, origins = gather(params_file, overrides)
    params = {**given, **precheck(given, P, origins, source=str(params_file or "command line"))}
    root = repo_root(Path(__file__).parent)
    out = Path(params["out_dir"])
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    from .runs import BATCH_ENV, environment
    with environment(BATCH_ENV):  # the kernels inherit it: a batch run
        for name in notebooks:
            src = root / "notebooks" / f"{name}.ipynb"
            dest = out / "notebooks" / f"{name}.ipynb"
            wanted = _notebook_params(src)
            p = {k: v for k, v in params.items() if k in wanted}
            t0 = time.time()
            print(f"== {name} ({', '.join(f'{k}={v}' for k, v in p.items()) or 'defaults'})", flush=True)
            try:
                pm.execute_notebook(str(src), str(dest), parameters=p, cwd=str(root),
                                    kernel_name=kernel, progress_bar=False, log_output=False,
                                    execution_timeout=cell_timeout or None)
            except PapermillExecutionError as e:
                cell = e.exec_count if e.exec_count is not None else f"#{e.cell_index}"
                raise NotebookError(f"{name} cell {cell}: {e.ename}: {_first_line(e.evalue)} (full traceback in "
                                    f"the executed notebook {dest})") from None
            except CellTimeoutError:
                raise NotebookError(f"{name} cell {_stuck_cell(dest)} timed out: no result after {cell_timeout:g} s "
                                    f"(--cell-timeout; 0: no limit); the executed notebook so far: {dest}") from None
            except DeadKernelError as e:
                raise NotebookError(f"{name}: the kernel died ({_first_line(e) or 'out of memory?'}); the executed "
                                    f"notebook so far: {dest}") from None
            print(f"   done in {time.time() - t0:.0f} s", flush=True)
    from .evaluate import current_metrics
    return current_metrics(out)[0]  # this run's rows only


def results_table(metrics: dict, table2: bool = False) -> str:
    """The course's results on the test split (and the distractor subset); with
    ``table2`` also the paper's Table 2 for this run, where steps 3-5 have run."""
    from .evaluate import TABLE2_ROWS, steps12_table
    from .evaluate import table2 as paper_table
    lines = []
    for name, m in (("test split", metrics), ("distractor subset", metrics.get("distractor"))):
        if m and "step1_auc" in m:
            lines += [f"-- steps 1-2, {name} ({m.get('n_images', '?')} images)", steps12_table(m), ""]
    if table2 and any(k in metrics for k in TABLE2_ROWS if k != "prelim"):
        lines += ["-- Table 2 for this run (test split)", paper_table(metrics), ""]
    return "\n".join(lines)


DEFAULT_CELL_TIMEOUT = 3600.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fgbg.course", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the course's notebooks with papermill")
    r.add_argument("-f", "--params", help="params YAML (e.g. params/demo.yaml)")
    r.add_argument("--notebooks", default=",".join(NOTEBOOKS), help="comma-separated, in order")
    r.add_argument("--kernel", default=None)
    r.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT, metavar="SECONDS",
                   help=f"stop with an error naming the cell when one cell runs longer than this (default "
                        f"{DEFAULT_CELL_TIMEOUT:g} s, so that a hung cell fails instead of waiting for ever; 0: no "
                        f"limit, e.g. for the full fine-tuning of params/cub_sd14.yaml, which runs for hours)")
    c = sub.add_parser("check", help="check a params file (and -p overrides) without running anything: "
                                     "names, types, allowed values, that base_dir and a local model exist")
    c.add_argument("params", nargs="?", help="params YAML (e.g. params/quick.yaml)")
    for q in (r, c):
        q.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="override one parameter (YAML value syntax); relative paths are relative to the "
                            "current folder")
    a = p.parse_args(argv)
    try:
        import yaml
        overrides = {}
        for k, v in a.param:
            try:
                overrides[k] = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise ParameterError(f"command line (-p {k}): not a YAML value: {v!r} ({_first_line(e)})") from None
        if a.cmd == "check":
            given, P, origins = gather(a.params, overrides)
            precheck(given, P, origins, source=str(a.params or "command line"))
            print(f"{a.params or 'parameters'}{' with -p overrides' if overrides else ''}: ok")
            return 0
        root = repo_root(Path(__file__).parent)
        names = [n for n in a.notebooks.split(",") if n]
        missing = [n for n in names if not (root / "notebooks" / f"{n}.ipynb").exists()]
        if missing:
            raise ParameterError(f"--notebooks: no such notebook(s): {', '.join(missing)}")
        if a.cell_timeout < 0:
            raise ParameterError(f"--cell-timeout must be >= 0 (0: no limit), got {a.cell_timeout:g}")
        t0 = time.time()
        metrics = run(a.params, overrides, names, a.kernel, a.cell_timeout or None)
        print(f"\nall notebooks done in {time.time() - t0:.0f} s\n")
        print(results_table(metrics, table2=True) or "no metrics for this run: its dataset has no ground truth "
                                                      "(the masks are in out_dir/masks/)")
        return 0
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
