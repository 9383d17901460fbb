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


# --------------------------------------------------------------------------- the CLI's errors: one line
def _cli(*args, cwd, env=None):
    import subprocess
    import sys
    e = {**os.environ, **(env or {})}
    e.pop("FGBG_OUT_DIR", None)
    return subprocess.run([sys.executable, "-m", "fgbg.course", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(r) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def test_cli_missing_base_dir_is_one_line(tmp_path):
    # the old CLI ran notebook 01 into a 45-line traceback; now it stops before any notebook
    r = _cli("run", "-p", "base_dir", "no/such/dir", "-p", "make_mini_world", "false", "-p", "out_dir", "out",
             "--notebooks", "01_attention", cwd=tmp_path)
    line = _one_error_line(r)
    assert "base_dir 'no/such/dir' does not exist" in line and str(tmp_path / "no/such/dir") in line
    assert "-p base_dir" in line  # what to do
    assert not (tmp_path / "out").exists()  # nothing ran


def test_cli_missing_model_folder_or_uncached_hub_id_is_one_line(tmp_path, mini_dataset):
    common = ["run", "-p", "base_dir", str(mini_dataset), "-p", "make_mini_world", "false", "-p", "out_dir", "out",
              "--notebooks", "01_attention"]
    line = _one_error_line(_cli(*common, "-p", "model", str(tmp_path / "sd14"), cwd=tmp_path))
    assert f"model '{tmp_path / 'sd14'}'" in line and "does not exist" in line and "hf download" in line
    # a hub id is fine online; offline, without a cached copy, it cannot load: say so before running
    r = _cli(*common, "-p", "model", "nobody/no-such-model", cwd=tmp_path,
             env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf")})
    line = _one_error_line(r)
    assert "'nobody/no-such-model'" in line and "HF_HUB_OFFLINE" in line
    assert "hf download nobody/no-such-model --local-dir no-such-model" in line
    assert "huggingface-cli" not in line  # not installed by the hub client any more: `hf` is
    assert not (tmp_path / "out").exists()


def test_a_failing_notebook_is_one_line_naming_notebook_cell_and_traceback(tmp_path, monkeypatch, capsys):
    """Starts one kernel: a notebook that fails in its second cell, as notebook 02 does
    when step 1's outputs are missing."""
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "02_masks.ipynb", "x = 1",
              "raise FileNotFoundError('runs/x/attention: no step-1 outputs;\\nrun notebook 01 first')", "x = 2")
    monkeypatch.setattr(course, "repo_root", lambda start=None: tmp_path)
    monkeypatch.chdir(tmp_path)
    assert course.main(["run", "-p", "out_dir", "out", "--notebooks", "02_masks"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    executed = tmp_path / "out" / "notebooks" / "02_masks.ipynb"
    failed = [c for c in nbformat.read(executed, as_version=4).cells
              if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and "raise FileNotFoundError" in failed[0].source  # the full traceback is there
    assert len(err) == 1, err
    assert err[0].startswith(f"error: 02_masks cell {failed[0].execution_count}: FileNotFoundError: "
                             "runs/x/attention: no step-1 outputs")
    assert "run notebook 01 first" not in err[0] and str(executed) in err[0]


def test_cli_cell_timeout_has_a_default_and_0_means_none(monkeypatch):
    seen = []
    monkeypatch.setattr(course, "run", lambda *a, **k: seen.append(a[4]) or {})
    assert course.main(["run", "--notebooks", "01_attention"]) == 0
    assert course.main(["run", "--notebooks", "01_attention", "--cell-timeout", "0"]) == 0
    assert course.main(["run", "--notebooks", "01_attention", "--cell-timeout", "7"]) == 0
    assert seen[0] is not None and 0 < seen[0] < float("inf") and seen[1:] == [None, 7]
