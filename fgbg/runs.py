"""Running a step over a whole dataset without losing work, and without mixing results.

Every per-image result is written atomically; a rerun skips images whose outputs
exist and open; an image that fails (unreadable file, wrong mask size, ...) is reported
and skipped, never fatal to the rest of the run. The skipped images are listed at the end
and appended to ``<out_dir>/skipped.txt``.

Each step writes into its own folders and declares what its outputs are made from
(model, settings, dataset, upstream run) in ``run_config.json`` before writing any (see
:func:`step_outputs`): a later run with anything else is refused, never mixed in; an
overwrite removes the old outputs *before* the new settings are declared, so a run
killed half-way never leaves results of the old setting under the new one. One process
at a time writes a step's folders (a lock beside them). An error that no next image can
avoid (disk full, read-only or forbidden out_dir) stops the run at once with
:class:`OutputError`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DatasetError, Item


PROGRESS_ENV = "FGBG_PROGRESS"
"""Set to "0" to turn fgbg's progress bars off (the Makefile's nbval run and
``python -m fgbg.course run`` do, for the kernels they start)."""

BATCH_ENV = {PROGRESS_ENV: "0", "TQDM_DISABLE": "1"}
"""The environment of a batch run, which nobody watches: no progress bars (fgbg's and, through
tqdm's own switch, the libraries') and no image-browser widgets (fgbg.viz.browse draws a
static figure instead; a widget can hang papermill)."""


@contextlib.contextmanager
def environment(updates: dict):
    """Set environment variables (which the kernels and processes started inside inherit)
    for the duration of the block, and restore them after."""
    before = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def progress_bar(iterable=None, **kwargs):
    """fgbg's progress bar: ``tqdm.auto`` updated at most once a second, off when the
    environment has ``FGBG_PROGRESS=0``.

    tqdm's own switches in the environment are honoured too, whenever they are set:
    ``TQDM_DISABLE=1`` turns the bar off (also where the caller passes ``disable=False``),
    as it turns off diffusers' and transformers' bars; ``TQDM_MININTERVAL`` (seconds)
    replaces the one second.

    Why not tqdm's defaults: in a notebook every update of the bar is a Jupyter message,
    up to ten a second. A client that reads the kernel's messages only after a cell has
    finished (nbval) can lose some of thousands of them, and when the lost one is the
    kernel's "idle" the run fails or waits for ever. Measured here: a cell with 3,000
    updates once delivered 1,162 messages and no "idle" (a second try delivered all). nbval
    failed with that symptom ("Timeout of 5 seconds exceeded waiting for output") on
    notebook 05's training cell: 140 s at up to 10 updates a second.
    """
    import os

    from tqdm.auto import tqdm
    try:
        kwargs.setdefault("mininterval", float(os.environ.get("TQDM_MININTERVAL", 1.0)))
    except ValueError:
        kwargs.setdefault("mininterval", 1.0)
    if (os.environ.get(PROGRESS_ENV) == "0"
            or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")):
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


class RunConfigError(ValueError):
    """Outputs in a folder were made with other settings than this run's."""


class RunLockedError(RuntimeError):
    """Another process is writing the same step's outputs right now."""


class OutputError(RuntimeError):
    """Outputs cannot be written at all (disk full, read-only or forbidden folder): no
    next image can avoid it, so the run stops at once instead of skipping every image."""


RUN_CONFIG = "run_config.json"

# errno values that no next image can avoid when writing outputs
_FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}


def fatal_output_error(e: BaseException, out_dir: str | Path | None = None) -> OutputError | None:
    """An :class:`OutputError` for an OSError that would hit every image alike (disk full,
    read-only file system; permission denied on a path under ``out_dir``), else None."""
    if not isinstance(e, OSError) or e.errno is None:
        return None
    name = e.filename
    denied_here = e.errno in _DENIED_ERRNOS and out_dir is not None and name is not None and \
        _is_under(Path(os.fsdecode(name)), Path(out_dir))
    if e.errno in _FATAL_ERRNOS or denied_here:
        where = f" ({os.fsdecode(name)})" if name is not None else ""
        return OutputError(f"cannot write outputs{where}: {e.strerror or e}; the run stops here "
                           f"(free space or fix the permissions of {out_dir or 'the output folder'}, then rerun: "
                           f"finished images are kept)")
    return None


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def read_run_config(folder: str | Path) -> dict | None:
    """The settings recorded by :func:`check_run_config` in ``folder``, or None."""
    path = Path(folder) / RUN_CONFIG
    return json.loads(path.read_text()) if path.exists() else None


def config_id(config: dict | None) -> str | None:
    """A short hash of a run's settings (what metrics and later steps record as their source)."""
    if config is None:
        return None
    import hashlib
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def folder_config_id(folder: str | Path) -> str | None:
    """:func:`config_id` of the run_config.json in ``folder`` (None when there is none)."""
    return config_id(read_run_config(folder))


def _normalise(config: dict) -> dict:
    return json.loads(json.dumps(config))  # tuples -> lists, as they come back from the file


def describe_diff(old: dict, new: dict) -> str:
    """Each key whose value differs between a recorded setting ``old`` and a requested one
    ``new``, as "key: old then, new now" (long values shortened), sorted, joined by "; "."""
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

    def short(v):
        r = repr(v)
        return r if len(r) <= 120 else r[:117] + "..."
    return "; ".join(f"{k}: {short(old.get(k))} then, {short(new.get(k))} now" for k in diff)


OVERWRITE_HINT = ("Use a new out_dir (e.g. `-p out_dir runs/other`, or `out_dir = \"runs/other\"` in the "
                  "parameters cell), or recompute this step's outputs with overwrite (`-p overwrite true`, "
                  "`overwrite = True`, or overwrite=True in Python).")


def clear_folder(folder: str | Path) -> None:
    """Remove ``folder`` and everything in it so that no old output survives: renamed
    away first (atomic), then deleted; leftovers of an interrupted clear are deleted too."""
    folder = Path(folder)
    parent = folder.parent
    for old in parent.glob(f".{folder.name}.stale-*") if parent.is_dir() else ():
        shutil.rmtree(old, ignore_errors=True)
    if not folder.exists():
        return
    stale = parent / f".{folder.name}.stale-{os.getpid()}"
    os.replace(folder, stale)
    shutil.rmtree(stale, ignore_errors=True)


def check_run_config(folder: str | Path, config: dict, overwrite: bool = False,
                     also: tuple[str | Path, ...] = ()) -> None:
    """Refuse to mix outputs of different settings in one folder.

    The first run writes ``<folder>/run_config.json``; a later run with a different
    ``config`` (another model, prompt, seed, dataset, upstream run, ...) raises
    :class:`RunConfigError` naming the differences, because skipping "finished" images
    would silently reuse the other run's results.

    ``overwrite=True``, or a folder holding outputs without a run_config.json, removes
    ``folder`` and the step's other output folders ``also`` *first* and only then records
    the new config: a run killed in between leaves no output of the old setting.
    """
    folder = Path(folder)
    path = folder / RUN_CONFIG
    config = _normalise(config)
    old = read_run_config(folder)
    if old is not None and not overwrite:
        if old != config:
            raise RunConfigError(f"{path}: these outputs were made with other settings ("
                                 f"{describe_diff(old, config)}). {OVERWRITE_HINT}")
        return
    for f in (*also, folder):  # the config goes last, so it is never declared over old outputs
        clear_folder(f)
    from .io import atomic_write_text
    atomic_write_text(path, json.dumps(config, indent=1))


@contextlib.contextmanager
def step_lock(folder: str | Path):
    """Hold an exclusive lock on a step's folder (``.<name>.lock`` beside it) while a step
    writes there; another process gets :class:`RunLockedError` at once instead of writing
    the same files. The lock goes with the process, also when it is killed."""
    import fcntl
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f".{folder.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunLockedError(f"{folder}: another process (pid {other}) is writing this step's outputs "
                                 f"right now; wait for it to finish, or use another out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_orphans(folder: str | Path) -> int:
    """Delete the temporary files of interrupted atomic writes (``.*.tmp``) under ``folder``
    (call it while holding the step's lock); returns how many were removed."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def process_group():
    """accelerate's ``PartialState`` when this process is one of several started by
    ``accelerate launch`` (or torchrun), else None: one process behaves exactly as without
    accelerate."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState
    # without CUDA, accelerate needs to be told that the processes are CPU processes (gloo)
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=cpu)
    return state if state.num_processes > 1 else None


def shard(items: list, state=None) -> list:
    """This process's share of ``items`` (all of them without a process group): contiguous
    shards as accelerate's ``split_between_processes`` cuts them."""
    state = state if state is not None else process_group()
    if state is None:
        return items
    with state.split_between_processes(list(items)) as mine:
        return list(mine)


@contextlib.contextmanager
def prepared_by_main_process(folder: str | Path, prepare: Callable[[], Any]):
    """Lock a step's ``folder`` for the whole run and call ``prepare()`` once; every process
    gets what it returned.

    One process: lock, ``prepare()``, yield its result. Under ``accelerate launch`` the main
    process alone locks and prepares, and tells the others its result or its error (they
    raise the same kind of error, "told by the main process"); on leaving, the frame waits
    for every process before the lock is released."""
    state = process_group()
    if state is None:
        with step_lock(folder):
            yield prepare()
        return
    from accelerate.utils import broadcast_object_list
    with contextlib.ExitStack() as stack:
        error: BaseException | None = None
        result = None
        if state.is_main_process:
            try:
                stack.enter_context(step_lock(folder))
                result = prepare()
            except Exception as e:  # noqa: BLE001 - told to every process, raised by all
                error = e
        told = ("ok", result) if error is None else ("error", type(error).__name__, str(error))
        message = broadcast_object_list([told])[0]
        if error is not None:
            raise error
        if message[0] == "error":
            kind = {"RunConfigError": RunConfigError, "RunLockedError": RunLockedError,
                    "OutputError": OutputError, "ValueError": ValueError,
                    "FileNotFoundError": FileNotFoundError}.get(message[1], RuntimeError)
            raise kind(f"{message[2]} (told by the main process)")
        yield message[1]
        state.wait_for_everyone()


@contextlib.contextmanager
def step_outputs(folder: str | Path, config: dict, overwrite: bool = False, also: tuple[str | Path, ...] = (),
                 out_dir: str | Path | None = None):
    """The frame of every dataset step: lock the step's folders, refuse or clear outputs of
    other settings (:func:`check_run_config`), remove leftovers of interrupted writes, and
    turn an output folder that cannot be written into one clear :class:`OutputError`.

    Under ``accelerate launch`` the main process does all of that, holding the lock for the
    whole run (:func:`prepared_by_main_process`); each process then writes its own shard
    (:func:`for_each_item`), and the frame waits for all of them before the lock is released."""
    def prepare():
        try:
            check_run_config(folder, config, overwrite=overwrite, also=also)
        except OSError as e:
            raise (fatal_output_error(e, out_dir or Path(folder).parent) or e) from e
        for f in (folder, *also):
            remove_orphans(f)

    with prepared_by_main_process(folder, prepare):
        yield


def gather_in_order(items: list) -> list:
    """Every process's ``items``, concatenated in process order (the list itself on one
    process): the inverse of :func:`shard` for lists of picklable objects."""
    state = process_group()
    if state is None:
        return list(items)
    from accelerate.utils import gather_object
    return list(gather_object(list(items)))


def is_complete(path: Path) -> bool:
    """True when a finished output is there and opens: a 0-byte or truncated .npz, .npy or
    .png (e.g. copied or restored half-way) counts as missing and is recomputed."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        suffix = path.suffix.lower()
        if suffix == ".npz":
            import zipfile
            with zipfile.ZipFile(path) as z:
                return z.testzip() is None
        if suffix == ".npy":
            import numpy as np
            np.load(path, mmap_mode="r")
            return True
        if suffix == ".png":
            from PIL import Image
            with Image.open(path) as im:
                im.verify()
            return True
        return True
    except Exception:
        return False


@dataclass
class StepReport:
    step: str
    done: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (rel, message): done, but worth a look

    def __str__(self) -> str:
        s = f"{self.step}: {len(self.done)} computed, {len(self.reused)} reused, {len(self.skipped)} skipped"
        for what, why in self.skipped:
            s += f"\n  skipped {what}: {why}"
        for what, why in self.notes:
            s += f"\n  note {what}: {why}"
        return s


def for_each_item(step: str, items: Iterable[Item], outputs: Callable[[Item], list[Path]],
                  work: Callable[[Item], None], out_dir: str | Path | None = None, overwrite: bool = False,
                  progress: bool = True, expected: tuple[type[BaseException], ...] = (DatasetError, OSError, ValueError)
                  ) -> StepReport:
    """Call ``work(item)`` for every item whose ``outputs(item)`` are not all present.

    Exceptions of the ``expected`` kinds skip the image with its message; anything else
    (a bug, out of memory) stops the run, since it would hit every image alike.
    """
    state = process_group()
    items = shard(list(items), state)
    report = StepReport(step)
    for item in progress_bar(items, desc=step, disable=not progress, leave=False):
        if not overwrite and all(is_complete(p) for p in outputs(item)):
            report.reused.append(item.key)
            continue
        try:
            work(item)
            report.done.append(item.key)
        except expected as e:
            _stop_if_fatal(e, out_dir)
            report.skipped.append((item.rel, f"{type(e).__name__}: {e}"))
        except OutputError:
            raise
        except Exception:
            print(f"{step}: unexpected error on {item.rel} (line {item.line}):\n{traceback.format_exc()}")
            raise
    report = _merged(report, state)
    _append_skipped(report, out_dir, state)
    return report


def _merged(report: StepReport, state) -> StepReport:
    """The reports of all processes as one (in process order); the report itself alone."""
    if state is None:
        return report
    parts = gather_in_order([report])
    out = StepReport(report.step)
    for r in parts:
        out.done += r.done
        out.reused += r.reused
        out.skipped += r.skipped
        out.notes += r.notes
    return out


def _stop_if_fatal(e: BaseException, out_dir) -> None:
    fatal = fatal_output_error(e, out_dir)
    if fatal is not None:
        raise fatal from e


def _append_skipped(report: StepReport, out_dir: str | Path | None, state=None) -> None:
    """Append the report's skipped images to ``<out_dir>/skipped.txt`` (step, image, why);
    with several processes, the main one writes the merged report."""
    if state is not None and not state.is_main_process:
        return
    if out_dir is not None and report.skipped:
        path = Path(out_dir) / "skipped.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                for what, why in report.skipped:
                    f.write(f"{report.step}\t{what}\t{why}\n")
        except OSError as e:
            _stop_if_fatal(e, out_dir)
            raise


def for_each_batch(step: str, items: Iterable[Item], outputs: Callable[[Item], list[Path]],
                   load: Callable[[Item], Any], work: Callable[[list[Any]], list[Any]],
                   finish: Callable[[Item, Any, Any], str | None], batch_size: int = 16,
                   out_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                   expected: tuple[type[BaseException], ...] = (DatasetError, OSError, ValueError)) -> StepReport:
    """:func:`for_each_item` for steps that run a model on batches of images.

    For every item whose ``outputs(item)`` are not all present (or all, with ``overwrite``):

    * ``load(item) -> data``: read the item's inputs; an expected error skips this item only;
    * ``work([data, ...]) -> [result, ...]``: the batched computation on up to ``batch_size``
      loaded items, one result per item; an expected error skips the items of this batch;
    * ``finish(item, data, result) -> note | None``: post-process and write the outputs; an
      expected error skips this item; a returned string is recorded in ``report.notes``.

    A batch is filled with loadable items only, so a bad image never makes a batch smaller
    than necessary. Same resume, skip and ``skipped.txt`` rules as :func:`for_each_item`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    state = process_group()
    items = shard(list(items), state)
    report = StepReport(step)
    bar = progress_bar(total=len(items), desc=step, disable=not progress, leave=False)

    def guarded(item: Item, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except expected as e:
            _stop_if_fatal(e, out_dir)
            report.skipped.append((item.rel, f"{type(e).__name__}: {e}"))
        except OutputError:
            raise
        except Exception:
            print(f"{step}: unexpected error on {item.rel} (line {item.line}):\n{traceback.format_exc()}")
            raise
        return False, None

    def flush(batch: list[tuple[Item, Any]]) -> None:
        try:
            results = work([data for _, data in batch])
        except expected as e:
            _stop_if_fatal(e, out_dir)
            report.skipped.extend((item.rel, f"{type(e).__name__}: {e}") for item, _ in batch)
            bar.update(len(batch))
            return
        except Exception:
            print(f"{step}: unexpected error in the batch of {', '.join(i.rel for i, _ in batch)}:\n"
                  f"{traceback.format_exc()}")
            raise
        for (item, data), result in zip(batch, results, strict=True):
            ok, note = guarded(item, lambda: finish(item, data, result))
            if ok:
                report.done.append(item.key)
                if note:
                    report.notes.append((item.rel, note))
            bar.update(1)

    batch: list[tuple[Item, Any]] = []
    for item in items:
        if not overwrite and all(is_complete(p) for p in outputs(item)):
            report.reused.append(item.key)
            bar.update(1)
            continue
        ok, data = guarded(item, lambda: load(item))
        if not ok:
            bar.update(1)
            continue
        batch.append((item, data))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    report = _merged(report, state)
    _append_skipped(report, out_dir, state)
    return report
