"""fgbg's modules import in any order, without a circle, and quietly.

fgbg.models (loading pipelines) and fgbg.teaching_model (training the small one) share
the SD building blocks of fgbg.sd_parts and never import each other."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import fgbg

PACKAGE = Path(fgbg.__file__).parent
MODULES = sorted(f.stem for f in PACKAGE.glob("*.py") if f.stem != "__init__")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _imports(path: Path, module_level_only: bool) -> set[str]:
    """The fgbg modules a file imports (relative or absolute); with ``module_level_only``,
    only those imported when the module itself is imported (not inside a function)."""
    found = set()

    def visit(node, in_function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if not (module_level_only and in_function):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1 and base:
                    found.add(base.split(".")[0])
                elif node.level == 1:  # from . import x
                    found.update(a.name for a in node.names)
                elif base == "fgbg":
                    found.update(a.name for a in node.names)
                elif base.startswith("fgbg."):
                    found.add(base.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fgbg."))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(ast.parse(path.read_text()), False)
    return found & set(MODULES)


def test_no_import_circle_at_module_level():
    graph = {m: _imports(PACKAGE / f"{m}.py", module_level_only=True) for m in MODULES}
    done, path = set(), []

    def walk(m):
        assert m not in path, f"import circle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            walk(n)
        path.pop()
        done.add(m)

    for m in MODULES:
        walk(m)


def test_models_and_teaching_model_never_import_each_other():
    assert "teaching_model" not in _imports(PACKAGE / "models.py", module_level_only=False)
    assert "models" not in _imports(PACKAGE / "teaching_model.py", module_level_only=False)
    assert {"models", "teaching_model"}.isdisjoint(_imports(PACKAGE / "sd_parts.py", module_level_only=False))
    # in fresh interpreters, either one first, the other is not loaded with it
    for first, other in (("models", "teaching_model"), ("teaching_model", "models")):
        code = (f"import sys, fgbg.{first}\n"
                f"assert 'fgbg.{other}' not in sys.modules, sorted(m for m in sys.modules if m.startswith('fgbg'))\n"
                f"import fgbg.{other}\n"
                f"from fgbg.{other} import TeachingConfig, build_unet, load_tokenizer, pick_device, ASSET_DIR\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported first, then all the others, forwards and backwards: one
    interpreter per order (an import that works only after another would fail here)."""
    for order in (MODULES, MODULES[::-1]):
        code = "import importlib\nfor m in %r:\n    importlib.import_module('fgbg.' + m)\n" % (order,)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]


def test_loading_the_teaching_pipeline_prints_nothing(capfd, tmp_path):
    """In a batch run (FGBG_PROGRESS=0) loading the teaching model, and the cells after it,
    write nothing to stderr: no torchvision notice, no deprecation, no float32 notice, no
    loading or saving bars (a notebook would keep each as red text or a widget stuck at 0%).
    A fresh interpreter: the libraries warn once per process."""
    code = ("from fgbg import course, models\n"
            "pipe = models.load_pipeline('teaching')\n"
            "course.untrained_copy(pipe)\n"
            f"pipe.save_pretrained({str(tmp_path / 'saved')!r})  # step 3 saves its pipeline\n"
            "from diffusers.utils import logging as d\n"
            "from transformers.utils import logging as t\n"
            "assert not d.is_progress_bar_enabled() and not t.is_progress_bar_enabled()  # also for later saves\n"
            "print('loaded')\n")
    r = subprocess.run([sys.executable, "-c", code], env={**ENV, "FGBG_PROGRESS": "0"}, timeout=300)
    out, err = capfd.readouterr()
    assert r.returncode == 0, err[-2000:]
    assert out.strip() == "loaded"
    assert err == ""


def test_load_pipeline_passes_the_dtype_the_installed_diffusers_reads():
    """``dtype=`` where diffusers reads it (``torch_dtype`` is deprecated there), else
    ``torch_dtype=``: either way the pipeline comes in the dtype asked for (the teaching
    model is saved in fp16, and diffusers' default would be fp32), without a warning."""
    import warnings

    import torch

    from fgbg import models
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = models.load_pipeline("teaching", device="cpu", dtype="bf16")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert not [w for w in caught if "dtype" in str(w.message)], [str(w.message) for w in caught]
