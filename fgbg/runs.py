"""Running a step over a whole dataset without losing work.

Every per-image result is written atomically; a rerun skips images whose outputs
exist; an image that fails (unreadable file, wrong mask size, ...) is reported and
skipped, never fatal to the rest of the run. The skipped images are listed at the end
and appended to ``<out_dir>/skipped.txt``.
"""
from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DatasetError, Item


PROGRESS_ENV = "FGBG_PROGRESS"
"""Set to "0" to turn fgbg's progress bars off (the Makefile's nbval run and
``python -m fgbg.course run`` do, for the kernels they start)."""


def progress_bar(iterable=None, **kwargs):
    """fgbg's progress bar: ``tqdm.auto`` updated at most once a second, off when the
    environment has ``FGBG_PROGRESS=0``.

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
    kwargs.setdefault("mininterval", 1.0)
    if os.environ.get(PROGRESS_ENV) == "0":
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


class RunConfigError(ValueError):
    """Outputs in a folder were made with other settings than this run's."""


RUN_CONFIG = "run_config.json"


def read_run_config(folder: str | Path) -> dict | None:
    """The settings recorded by :func:`check_run_config` in ``folder``, or None."""
    import json
    path = Path(folder) / RUN_CONFIG
    return json.loads(path.read_text()) if path.exists() else None


def check_run_config(folder: str | Path, config: dict, overwrite: bool = False) -> None:
    """Refuse to mix outputs of different settings in one folder.

    The first run writes ``<folder>/run_config.json``; a later run with a different
    ``config`` (another model, prompt, seed, ...) raises :class:`RunConfigError` naming the
    differences, because skipping "finished" images would silently reuse the other
    run's results. ``overwrite=True`` recomputes everything and records the new config.
    """
    import json

    from .io import atomic_write_text
    path = Path(folder) / RUN_CONFIG
    config = json.loads(json.dumps(config))  # tuples -> lists, as they come back from the file
    old = None if overwrite else read_run_config(folder)
    if old is not None:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise RunConfigError(
                f"{path}: these outputs were made with other settings ("
                + "; ".join(f"{k}: {old.get(k)!r} then, {config.get(k)!r} now" for k in diff)
                + "). Use a new out_dir, delete the folder, or pass overwrite=True.")
        return
    atomic_write_text(path, json.dumps(config, indent=1))


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
    items = list(items)
    report = StepReport(step)
    for item in progress_bar(items, desc=step, disable=not progress, leave=False):
        if not overwrite and all(p.exists() for p in outputs(item)):
            report.reused.append(item.key)
            continue
        try:
            work(item)
            report.done.append(item.key)
        except expected as e:
            report.skipped.append((item.rel, f"{type(e).__name__}: {e}"))
        except Exception:
            print(f"{step}: unexpected error on {item.rel} (line {item.line}):\n{traceback.format_exc()}")
            raise
    _append_skipped(report, out_dir)
    return report


def _append_skipped(report: StepReport, out_dir: str | Path | None) -> None:
    """Append the report's skipped images to ``<out_dir>/skipped.txt`` (step, image, why)."""
    if out_dir is not None and report.skipped:
        path = Path(out_dir) / "skipped.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for what, why in report.skipped:
                f.write(f"{report.step}\t{what}\t{why}\n")


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
    items = list(items)
    report = StepReport(step)
    bar = progress_bar(total=len(items), desc=step, disable=not progress, leave=False)

    def guarded(item: Item, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except expected as e:
            report.skipped.append((item.rel, f"{type(e).__name__}: {e}"))
        except Exception:
            print(f"{step}: unexpected error on {item.rel} (line {item.line}):\n{traceback.format_exc()}")
            raise
        return False, None

    def flush(batch: list[tuple[Item, Any]]) -> None:
        try:
            results = work([data for _, data in batch])
        except expected as e:
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
        if not overwrite and all(p.exists() for p in outputs(item)):
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
    _append_skipped(report, out_dir)
    return report
