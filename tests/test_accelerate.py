"""Steps 1 and 4 on several processes with accelerate's PartialState, and step 3 data-parallel
with its Accelerator (two CPU processes, gloo, started by torchrun): the same outputs as one
process, a run with a killed process finishes every image exactly once when rerun, and a
fine-tuning checkpoint resumes on two processes or on one.

One thread per process everywhere (OMP_NUM_THREADS=1), so that the one-process and
two-process runs add their floats in the same order and the outputs are bit-identical.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fgbg import batch, masks
from fgbg.data import load_dataset
from fgbg.miniworld import write_course_dataset
from fgbg.models import random_pipeline
from fgbg.params import check

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 10, 6
SETTINGS = {"rev_diff_steps": 12, "num_inference_steps": 20, "unet_batch": 4, "inpaint_batch_size": 2,
            "controls": False, "make_mini_world": False, "limit": None}


def _launch(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    # torchrun, which `accelerate launch` wraps for GPUs: accelerate's own --cpu launcher
    # starts a single process unless MPI is set up (accelerate 1.15)
    import socket
    with socket.socket() as sock:  # a free port on this machine for the two processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "fgbg.batch", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FGBG_PROGRESS": "0"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _summary(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith('{"step"')][-1])


def _params(model, base, out) -> list[str]:
    args = ["-p", "model", str(model), "-p", "base_dir", str(base), "-p", "out_dir", str(out)]
    for k, v in SETTINGS.items():
        args += ["-p", k, json.dumps(v)]
    return args


def _arrays(path: Path) -> dict:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".npy":
        return {"": np.load(path)}
    from PIL import Image
    return {"": np.asarray(Image.open(path))}


def _same_outputs(a: Path, b: Path, folders: list[str]) -> int:
    n = 0
    for folder in folders:
        files = sorted(p.relative_to(a) for p in (a / folder).rglob("*") if p.is_file() and p.suffix != ".json")
        assert files == sorted(p.relative_to(b) for p in (b / folder).rglob("*")
                               if p.is_file() and p.suffix != ".json"), folder
        for f in files:
            x, y = _arrays(a / f), _arrays(b / f)
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), f
            n += 1
    return n


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    base = write_course_dataset(root / "ds", n_train=N_TRAIN, n_val=0, n_test=N_TEST, n_distractor=0, seed=4)
    model = root / "tiny"
    random_pipeline("tiny").save_pretrained(model)
    return root, base, model


def _one_process(step, model, base, out, **extra):
    P = check({"model": str(model), "base_dir": str(base), "out_dir": str(out), **SETTINGS, **extra})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return step(P, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_a_killed_two_process_step1_finishes_every_image_once_and_equals_one_process(world):
    import psutil
    root, base, model = world
    out2 = root / "two"
    proc = _launch(["attention", *_params(model, base, out2)], cwd=root)
    # kill one worker as soon as the first outputs exist
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((out2 / "attention").rglob("*.npz")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "fgbg.batch" in " ".join(c.cmdline())]
    victim = next(w for w in workers if w.environ().get("RANK") == "1")
    victim.kill()
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, log[-2000:]
    first = sorted(p for p in (out2 / "attention").rglob("*.npz"))
    assert 0 < len(first) < N_TRAIN + N_TEST, log[-2000:]

    again = _launch(["attention", *_params(model, base, out2)], cwd=root)
    log2, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log2[-3000:]
    s = _summary(log2)
    assert s["reused"] == len(first) and s["done"] == N_TRAIN + N_TEST - len(first) and s["skipped"] == 0
    assert not list(out2.rglob("*.tmp"))

    out1 = root / "one"
    rep = _one_process(batch.step1, model, base, out1)[0]
    assert len(rep.done) == N_TRAIN + N_TEST
    assert _same_outputs(out1, out2, ["attention"]) == N_TRAIN + N_TEST


def test_a_notebook_hands_step1_to_two_processes(world):
    """fgbg.batch.launch, the notebooks' way to N processes: the notebook's parameters go to a
    params file and `accelerate launch --multi_gpu` runs the step; the same outputs as one
    process. A failure raises with the processes' own error line."""
    root, base, model = world
    if not (root / "one" / "attention").is_dir():
        pytest.skip("needs the one-process step-1 outputs of the test above")
    out = root / "launched"
    P = check({"model": str(model), "base_dir": str(base), "out_dir": str(out), **SETTINGS, "processes": 2})
    summary = batch.launch("attention", P, echo=False)
    assert summary == {"step": "attention", "done": N_TRAIN + N_TEST, "reused": 0, "skipped": 0}
    assert (out / "launch" / "attention.yaml").is_file()
    assert _same_outputs(root / "one", out, ["attention"]) == N_TRAIN + N_TEST
    with pytest.raises(RuntimeError, match="model"):
        batch.launch("attention", {**P, "model": str(root / "no-such-model")}, echo=False)


def test_two_process_step4_equals_one_process(world):
    root, base, model = world
    for name in ("one", "two"):
        out = root / name
        if not (out / "attention").is_dir():
            pytest.skip("needs the step-1 outputs of the test above")
        ds = load_dataset(base, splits=["train", "test"])
        masks.preliminary_masks(ds, out, progress=False)
        shutil.rmtree(out / "finetuned", ignore_errors=True)
        random_pipeline("tiny", seed=1).save_pretrained(out / "finetuned")  # stands in for step 3's model
        (out / "finetuned" / "done.json").write_text("{}")
    _one_process(batch.step4, model, base, root / "one")
    proc = _launch(["inpaint", *_params(model, base, root / "two")], cwd=root)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert _summary(log)["done"] == N_TRAIN + N_TEST
    assert _same_outputs(root / "one", root / "two", ["inpaint", "diff", "masks/refined", "masks/crop"]) > 0


FINETUNE = {"finetune_batch_size": 4, "finetune_lr": 1e-3}


def _finetune_two(model, base, out, steps: int, root: Path) -> dict:
    args = [*_params(model, base, out), "-p", "finetune_steps", str(steps)]
    for k, v in FINETUNE.items():
        args += ["-p", k, json.dumps(v)]
    proc = _launch(["finetune", *args], cwd=root)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    return _summary(log)


def _losses(out: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (out / "finetuned" / "loss.jsonl").read_text().splitlines()])


def test_two_process_finetune_equals_one_process_and_resumes_on_two_or_one(world):
    """Step 3 on two processes shares each effective batch of 4 (2 samples each, gradients
    averaged): the same losses and weights as one process, up to the order of float
    additions; its checkpoint resumes on two processes and on one."""
    from conftest import declare_m_pre_run
    from fgbg.data import read_mask
    from fgbg.finetune import load_finetuned
    from fgbg.io import save_png
    root, base, model = world
    outs = {name: root / f"ft_{name}" for name in ("one", "two", "two_then_one")}
    for out in outs.values():  # M_pre = the ground truth: step 3's input without running steps 1-2
        for it in load_dataset(base, splits=["train"]):
            save_png(masks.prelim_mask_path(out, it), read_mask(it.gt_path).astype(np.uint8) * 255)
        declare_m_pre_run(out)

    one = _one_process(batch.step3, model, base, outs["one"], finetune_steps=4, **FINETUNE)
    assert one["steps"] == 4 and len(one["loss"]) == 4

    assert _finetune_two(model, base, outs["two"], 2, root)["steps"] == 2
    first = json.loads((outs["two"] / "finetuned" / "done.json").read_text())
    assert first["processes"] == 2 and first["items"] == N_TRAIN
    shutil.copytree(outs["two"] / "finetuned", outs["two_then_one"] / "finetuned")  # the same run at step 2
    resumed = _finetune_two(model, base, outs["two"], 4, root)  # resumes at step 2 on two processes
    assert resumed["steps"] == 4 and not resumed["reused"]
    assert _one_process(batch.step3, model, base, outs["two"], finetune_steps=4, **FINETUNE)["reused"]
    on_one = _one_process(batch.step3, model, base, outs["two_then_one"], finetune_steps=4, **FINETUNE)
    assert not on_one["reused"] and on_one["steps"] == 4  # resumed on one process (losses compared below)

    def flat(out):
        return torch.cat([p.detach().flatten() for _, p in sorted(load_finetuned(out, device="cpu").unet.named_parameters())])

    from fgbg.models import load_pipeline
    ref, untrained = flat(outs["one"]), torch.cat([p.detach().flatten() for _, p in sorted(
        load_pipeline(str(model), "cpu").unet.named_parameters())])
    moved = (ref - untrained).abs().mean().item()
    assert moved > 1e-4  # training changed the weights: the comparisons below mean something
    for name in ("two", "two_then_one"):
        np.testing.assert_allclose(_losses(outs[name]), _losses(outs["one"]), rtol=1e-4)
        # the mean change, not the largest: Adam turns the rounding noise of a gradient near 0
        # into a full lr-sized step, so a few of the million weights differ by up to 3e-4
        diff = (flat(outs[name]) - ref).abs().mean().item()
        assert diff < moved / 1000, (name, diff, moved)
