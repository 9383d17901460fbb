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

from .data import DatasetError, Item


@dataclass
class StepReport:
    step: str
    done: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{self.step}: {len(self.done)} computed, {len(self.reused)} reused, {len(self.skipped)} skipped"
        for what, why in self.skipped:
            s += f"\n  skipped {what}: {why}"
        return s


def for_each_item(step: str, items: Iterable[Item], outputs: Callable[[Item], list[Path]],
                  work: Callable[[Item], None], out_dir: str | Path | None = None, overwrite: bool = False,
                  progress: bool = True, expected: tuple[type[BaseException], ...] = (DatasetError, OSError, ValueError)
                  ) -> StepReport:
    """Call ``work(item)`` for every item whose ``outputs(item)`` are not all present.

    Exceptions of the ``expected`` kinds skip the image with its message; anything else
    (a bug, out of memory) stops the run, since it would hit every image alike.
    """
    from tqdm.auto import tqdm
    items = list(items)
    report = StepReport(step)
    for item in tqdm(items, desc=step, disable=not progress, leave=False):
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
    if out_dir is not None and report.skipped:
        path = Path(out_dir) / "skipped.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for what, why in report.skipped:
                f.write(f"{step}\t{what}\t{why}\n")
    return report
