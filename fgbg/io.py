"""Atomic, skip-aware file output: a crash never leaves a half-written result behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
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
