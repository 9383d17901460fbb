"""The exercises' solutions (notebooks/solutions/solutions.ipynb) run, end to end, with tiny
settings on a small mini world: every answer that is code is checked by running it."""
import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "notebooks" / "solutions" / "solutions.ipynb"
TINY = {"limit": 2, "rev_diff_steps": 4, "num_inference_steps": 8, "unet_batch": 8, "finetune_steps": 2,
        "finetune_batch_size": 2, "inpaint_batch_size": 4, "seg_iterations": 4, "seg_batch_size": 2,
        "seg_width": 4, "device": "cpu", "make_mini_world": False}


def test_the_solutions_notebook_runs_with_tiny_settings(tmp_path, mini_dataset):
    out = tmp_path / "solutions-out.ipynb"
    params = {**TINY, "base_dir": str(mini_dataset), "out_dir": str(tmp_path / "run")}
    env = {k: v for k, v in os.environ.items() if k != "FGBG_OUT_DIR"}
    env.update({"FGBG_PROGRESS": "0", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    code = ("import papermill as pm, sys\n"
            f"pm.execute_notebook({str(SOLUTIONS)!r}, {str(out)!r}, cwd={str(ROOT)!r}, progress_bar=False,"
            f" parameters={params!r}, execution_timeout=300)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    nb = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "best single level" in text and "self._record(" in text and "U-Net trained on ground truth" in text
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    stderr = [o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" and o.name == "stderr"]
    assert not errors and not stderr, stderr[:3]
