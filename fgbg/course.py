"""Running the course: notebook set-up, and ``python -m fgbg.course`` for batch runs.

``python -m fgbg.course run -f params/demo.yaml`` checks the parameters, then executes
the notebooks in order with papermill into ``<out_dir>/notebooks/`` and prints the
results table from ``<out_dir>/metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .params import ParameterError, check, from_namespace, load_yaml

NOTEBOOKS = ("01_attention", "02_masks", "03_finetune", "04_inpaint", "05_segmentation")
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
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def setup(namespace: dict) -> dict:
    """Check a notebook's parameters and resolve its paths; seed everything.

    Relative paths are relative to the repository root, so a notebook gives the same
    result whether it runs from notebooks/ (JupyterLab) or the root (papermill, nbval).
    """
    import numpy as np
    import torch
    P = from_namespace(namespace)
    if os.environ.get(OUT_DIR_ENV):
        P["out_dir"] = os.environ[OUT_DIR_ENV]
    root = repo_root()
    P["base_dir"] = str(resolve(P["base_dir"], root))
    P["out_dir"] = str(resolve(P["out_dir"], root))
    Path(P["out_dir"]).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(P["seed"])
    np.random.seed(P["seed"])
    if P["make_mini_world"]:
        from .miniworld import is_outdated_course_dataset, write_course_dataset
        base = Path(P["base_dir"])
        # (re)write when missing or written by an older fgbg; never someone's own data
        if not (base / "images.txt").exists() or is_outdated_course_dataset(base):
            write_course_dataset(base, seed=P["seed"])
            print(f"wrote the mini-world course dataset to {base}")
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


def run(params_file: str | None, overrides: dict, notebooks: list[str], kernel: str | None = None,
        cell_timeout: float | None = None) -> dict:
    """Execute the notebooks in order with papermill; return the metrics.

    ``cell_timeout``: seconds one cell may run before papermill stops the run with an error
    naming the cell (None: no limit, as a full-dataset fine-tuning cell runs for hours).
    """
    import papermill as pm
    params = load_yaml(params_file) if params_file else {}
    params.update(overrides)
    P = check(params, source=params_file or "command line")
    root = repo_root(Path(__file__).parent)
    out = resolve(P["out_dir"], root)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    from .runs import PROGRESS_ENV
    before = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "0"  # the kernels inherit it: no progress widgets in a headless run
    try:
        for name in notebooks:
            src = root / "notebooks" / f"{name}.ipynb"
            wanted = _notebook_params(src)
            p = {k: v for k, v in params.items() if k in wanted}
            t0 = time.time()
            print(f"== {name} ({', '.join(f'{k}={v}' for k, v in p.items()) or 'defaults'})", flush=True)
            pm.execute_notebook(str(src), str(out / "notebooks" / f"{name}.ipynb"), parameters=p, cwd=str(root),
                                kernel_name=kernel, progress_bar=False, log_output=False,
                                execution_timeout=cell_timeout)
            print(f"   done in {time.time() - t0:.0f} s", flush=True)
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV)
        else:
            os.environ[PROGRESS_ENV] = before
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fgbg.course", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the course's notebooks with papermill")
    r.add_argument("-f", "--params", help="params YAML (e.g. params/demo.yaml)")
    r.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="override one parameter (YAML value syntax)")
    r.add_argument("--notebooks", default=",".join(NOTEBOOKS), help="comma-separated, in order")
    r.add_argument("--kernel", default=None)
    r.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop with an error when one cell runs longer (default: no limit)")
    c = sub.add_parser("check", help="check a params file without running anything")
    c.add_argument("params")
    a = p.parse_args(argv)
    try:
        if a.cmd == "check":
            load_yaml(a.params)
            print(f"{a.params}: ok")
            return 0
        import yaml
        overrides = {k: yaml.safe_load(v) for k, v in a.param}
        root = repo_root(Path(__file__).parent)
        names = [n for n in a.notebooks.split(",") if n]
        missing = [n for n in names if not (root / "notebooks" / f"{n}.ipynb").exists()]
        if missing:
            raise ParameterError(f"--notebooks: no such notebook(s): {', '.join(missing)}")
        t0 = time.time()
        metrics = run(a.params, overrides, names, a.kernel, a.cell_timeout)
        print(f"\nall notebooks done in {time.time() - t0:.0f} s\n")
        print(results_table(metrics, table2=True))
        return 0
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
