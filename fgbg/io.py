"""Atomic, skip-aware file output: a crash never leaves a half-written result behind.

Written files get the mode an ordinary ``open(path, "w")`` would give them, 0o666 less
the process's umask (``tempfile.mkstemp``, which makes the temporary file, would leave
0o600: outputs nobody else could read, whatever the umask says).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _read_umask() -> int:
    """The process's umask, read without changing it where Linux tells it
    (/proc/self/status, race-free), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


_UMASK_FROM_PROC = os.path.exists("/proc/self/status")
_UMASK = _read_umask()  # read once, at import, where /proc cannot tell it later


def file_mode() -> int:
    """The mode of a newly written file: 0o666 & ~umask (the umask read now where the
    system tells it without changing it, else the one read at import)."""
    return 0o666 & ~(_read_umask() if _UMASK_FROM_PROC else _UMASK)


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX (Windows has no modes to speak of)
                os.fchmod(f.fileno(), file_mode())
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array (H, W) or (H, W, 3) as PNG, atomically."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"save_png({path}): expected uint8, got {a.dtype}")
    return _atomic(path, lambda f: Image.fromarray(a).save(f, format="PNG"))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    return _atomic(path, lambda f: np.save(f, np.asarray(array)))
