"""fgbg.io: atomic writes give files the mode of an ordinary write (0o666 & ~umask)."""
import os
import stat

import numpy as np

from fgbg import io


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_follow_the_umask(tmp_path):
    writers = {
        "a.txt": lambda p: io.atomic_write_text(p, "x"),
        "b.bin": lambda p: io.atomic_write_bytes(p, b"x"),
        "c.png": lambda p: io.save_png(p, np.zeros((2, 2), np.uint8)),
        "d.npy": lambda p: io.save_npy(p, np.zeros(2)),
    }
    old = os.umask(0o022)
    try:
        for umask in (0o022, 0o077):
            os.umask(umask)
            for name, write in writers.items():
                path = tmp_path / f"{umask:o}" / name
                write(path)
                plain = tmp_path / f"{umask:o}" / f"plain-{name}"
                plain.write_bytes(b"x")  # what open() gives under this umask
                assert _mode(path) == 0o666 & ~umask == _mode(plain), (oct(umask), name, oct(_mode(path)))
    finally:
        os.umask(old)
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind
