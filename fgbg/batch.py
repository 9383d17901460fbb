"""The dataset steps from the command line, on one process or many (Hugging Face accelerate).

Steps 1 and 4 (and D' sampling) treat every image on its own, so they split a dataset
between processes the way diffusers' distributed-inference guide does
(``PartialState().split_between_processes``): each process takes its shard, writes its
images' outputs as always (atomic, resumable), and the main process merges the reports
(the skipped images of every process) once all have finished. One process without
accelerate behaves exactly as the notebooks do. Parameters come from a params file and
``-p`` overrides, as for ``python -m fgbg.course run``::

    # one process (CPU or one GPU)
    python -m fgbg.batch attention -f params/cub_sd14.yaml -p base_dir data/CUB_200_2011
    # every GPU of this machine, one process each
    accelerate launch --num_processes 8 -m fgbg.batch attention -f params/cub_sd14.yaml ...
    # two CPU processes (a test of the same path)
    accelerate launch --cpu --num_processes 2 -m fgbg.batch attention -f params/quick.yaml

``attention`` runs step 1 (and the untrained control when ``controls`` is on), ``finetune``
step 3 (data-parallel through accelerate's Accelerator: gradients averaged over the
processes, the effective batch ``finetune_batch_size`` shared by them; needs step 2's M_pre),
``inpaint`` step 4 (needs steps 2 and 3 in the same out_dir), ``dprime`` samples D'. Step 2
(masks, seconds) runs as usual, in notebook 02 or ``fgbg.masks.preliminary_masks``.
Each command prints its report, and the last line is a JSON summary (``done``, ``reused``,
``skipped`` counts) for scripts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .params import ParameterError


def _device(P: dict):
    """Each process's device: accelerate's for this process (its own GPU) when ``device``
    is "auto" or "cuda"."""
    from .runs import process_group
    state = process_group()
    if P["device"] in ("auto", "cuda") and state is not None:
        return str(state.device)
    return P["device"]


def step1(P: dict, progress: bool = True) -> list:
    """Step 1 (and the untrained-network control on the test split) over ``P``'s dataset."""
    from . import attention, course, data, models
    pipe = models.load_pipeline(P["model"], _device(P), P["dtype"])
    ds = data.load_dataset(P["base_dir"], splits=P["splits"], limit=P["limit"])
    kw = dict(prompt=P["foreground_prompt"], object_word=P["object_word"], extractor=P["extractor"],
              steps=P["steps"], rev_diff_steps=P["rev_diff_steps"], num_inference_steps=P["num_inference_steps"],
              num_repeat_each_diffusion_step=P["num_repeat_each_diffusion_step"], seed=P["seed"],
              resize_mode=P["resize_mode"], unet_batch=P["unet_batch"], overwrite=P["overwrite"], progress=progress,
              self_attention_k=P["self_attention_k"], self_attention_resolution=P["self_attention_resolution"])
    reports = [attention.save_attention_maps(pipe, ds, P["out_dir"], **kw)]
    if P["controls"]:
        test = [it for it in ds if it.split == 0]
        if test:
            untrained = course.untrained_copy(pipe, seed=P["seed"])
            reports.append(attention.save_attention_maps(untrained, test, P["out_dir"], subdir="attention_untrained",
                                                         **kw))
    return reports


def step3(P: dict, progress: bool = True) -> dict:
    """Step 3, data-parallel over the processes (``fgbg.finetune.finetune``): M_pre from
    steps 1-2 in the same out_dir; the effective batch stays ``finetune_batch_size``."""
    from . import data, finetune, models
    pipe = models.load_pipeline(P["model"], _device(P), P["dtype"])
    train = data.load_dataset(P["base_dir"], splits=["train"], limit=P["limit"])
    return finetune.finetune(pipe, train, P["out_dir"], finetune.FinetuneConfig.from_params(P), progress=progress,
                             overwrite=P["overwrite"])


def step4(P: dict, progress: bool = True) -> list:
    """Step 4 over ``P``'s dataset with the fine-tuned model of ``out_dir``."""
    from . import data, finetune, inpaint
    tuned = finetune.load_finetuned(P["out_dir"], _device(P), P["dtype"])
    ds = data.load_dataset(P["base_dir"], splits=P["splits"], limit=P["limit"])
    return [inpaint.inpaint_and_refine(
        tuned, ds, P["out_dir"], prompt=P["background_prompt"], num_inference_steps=P["num_inference_steps"],
        batch_size=P["inpaint_batch_size"], seed=P["seed"], resize_mode=P["resize_mode"],
        m_pre_upsampling=P["m_pre_upsampling"], close_and_fill=P["close_and_fill"], overwrite=P["overwrite"],
        progress=progress)]


def dprime(P: dict, progress: bool = True) -> list:
    """D' sampling (notebook 06's first step) with the fine-tuned model of ``out_dir``."""
    from . import finetune, synthetic
    tuned = finetune.load_finetuned(P["out_dir"], _device(P), P["dtype"])
    return [synthetic.synthesize(tuned, P["out_dir"], P["dprime_size"], fg_prompt=P["foreground_prompt"],
                                 bg_prompt=P["background_prompt"], scale=P["fg_bg_guidance"],
                                 num_inference_steps=P["num_inference_steps"], seed=P["seed"],
                                 batch_size=P["inpaint_batch_size"], overwrite=P["overwrite"],
                                 progress=progress)[1]]


STEPS = {"attention": step1, "finetune": step3, "inpaint": step4, "dprime": dprime}


def summary(step: str, result) -> dict:
    """The last line a command prints: counts for scripts."""
    if step == "finetune":
        return {"step": step, "steps": result["steps"], "reused": result["reused"],
                "skipped": len(result["skipped"]), "last_loss": result["loss"][-1] if result["loss"] else None}
    return {"step": step, "done": sum(len(r.done) for r in result), "reused": sum(len(r.reused) for r in result),
            "skipped": sum(len(r.skipped) for r in result)}


def launch_command(step: str, params_file: str | Path, processes: int, port: int | None = None) -> list[str]:
    """The command that runs ``step`` on ``processes`` processes: ``accelerate launch
    --multi_gpu`` (one process per GPU; without CUDA, CPU processes talking over gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return cmd + ["-m", "fgbg.batch", step, "-f", str(params_file)]


def launch(step: str, P: dict, processes: int | None = None, echo: bool = True) -> dict:
    """Hand ``step`` to ``processes`` processes (default ``P["processes"]``) from a notebook:
    the notebook's parameters are written to ``<out_dir>/launch/<step>.yaml`` and
    :func:`launch_command` runs ``python -m fgbg.batch <step>`` with them, from the
    repository root. Each process writes its shard as always; the output is echoed as it
    comes. Returns the step's JSON summary (its last line); raises RuntimeError with the
    processes' last lines when they fail. The notebook then calls the same step in its own
    process, which finds every output done and only reports (or loads) them."""
    import os
    import socket
    import subprocess

    import yaml

    from .course import repo_root
    from .params import SCHEMA
    n = int(P["processes"] if processes is None else processes)
    folder = Path(P["out_dir"]) / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    params_file = folder / f"{step}.yaml"
    params_file.write_text(yaml.safe_dump({k: P[k] for k in SCHEMA if k in P}, sort_keys=False))
    with socket.socket() as sock:  # a free port on this machine for the processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from .runs import BATCH_ENV
    env = {**os.environ, **BATCH_ENV}
    if "OMP_NUM_THREADS" not in os.environ:  # CPU processes share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    proc = subprocess.Popen(launch_command(step, params_file, n, port), cwd=repo_root(Path(__file__).parent),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if echo:
            print(line, end="", flush=True)
    proc.wait()
    summaries = [ln for ln in lines if ln.startswith('{"step"')]
    if proc.returncode != 0 or not summaries:
        said = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]  # fgbg.batch's one-line errors
        why = said[0] if said else "\n" + "\n".join(lines[-15:])
        raise RuntimeError(f"step {step} on {n} processes failed (exit {proc.returncode}): {why}\n"
                           f"(command: {' '.join(launch_command(step, params_file, n))})")
    return json.loads(summaries[-1])


def main(argv=None) -> int:
    from .course import _first_line, precheck, repo_root
    from .params import gather
    p = argparse.ArgumentParser(prog="python -m fgbg.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("-f", "--params", help="params YAML (e.g. params/cub_sd14.yaml)")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="override one parameter (YAML value syntax); paths relative to the current folder")
    a = p.parse_args(argv)
    import yaml

    from .models import ModelLoadError
    from .runs import OutputError, RunConfigError, RunLockedError, process_group
    try:
        overrides = {k: yaml.safe_load(v) for k, v in a.param}
        given, P, origins = gather(a.params, overrides)
        P.update(precheck(given, P, origins, source=str(a.params or "command line")))
        if P["make_mini_world"]:
            from .course import prepare_mini_world
            state = process_group()
            if state is None or state.is_main_process:
                prepare_mini_world(Path(P["base_dir"]), repo_root(Path(__file__).parent), P["seed"])
            if state is not None:
                state.wait_for_everyone()
        result = STEPS[a.step](P, progress=False)
    except (ParameterError, RunConfigError, RunLockedError, OutputError, FileNotFoundError, ModelLoadError) as e:
        print(f"error: {_first_line(e, 400)}", file=sys.stderr)
        return 2
    state = process_group()
    if state is None or state.is_main_process:
        for r in result if isinstance(result, list) else []:
            print(r)
        print(json.dumps(summary(a.step, result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
