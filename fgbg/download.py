"""Download and unpack CUB-200-2011 in one command::

    python -m fgbg.data download cub DIR

fetches the official archives of the Caltech data record
https://data.caltech.edu/records/65de6-vp158 (the URLs below are that record's file
links), checks their MD5 sums as published there, and unpacks them into the official
layout that :func:`fgbg.data.load_dataset` reads::

    DIR/CUB_200_2011/images.txt, train_test_split.txt, images/<class>/<name>.jpg, ...
    DIR/segmentations/<class>/<name>.png           (beside CUB_200_2011)
    DIR/attributes.txt                             (as the CUB archive unpacks)

What can go wrong, and what happens then:

* **A broken download** (lost connection, time-out) is retried, and a rerun resumes it:
  bytes go to ``DIR/<archive>.part`` and the download continues with an HTTP Range request.
  A server that ignores the Range gets a clean restart (the ``.part`` is truncated).
* **A wrong checksum**: the file is kept aside as ``DIR/<archive>.bad``, nothing is
  unpacked, and the error names the file, the expected and the actual sum. An archive
  becomes ``DIR/<archive>`` only once its sum is right, and is not downloaded again.
* **Unpacking** is safe (no member may leave DIR: tarfile's ``filter="data"``) and atomic:
  an archive unpacks into a hidden temporary folder beside its destination, which is
  renamed into place only when complete; an interrupted unpacking leaves no
  ``CUB_200_2011`` or ``segmentations`` folder behind.
* Errors a user can cause (no network, disk full, bad checksum) end the command with one
  line and exit status 1, not a traceback.

URLs and checksums can be overridden (``base_url``/``checksums`` arguments, and
``--base-url``/``--checksum`` on the command line), e.g. for a mirror or for tests.
"""
from __future__ import annotations

import argparse
import errno
import gzip
import hashlib
import http.client
import os
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

CUB_RECORD = "https://data.caltech.edu/records/65de6-vp158"
"""The Caltech data record of CUB-200-2011 (images, annotations and segmentations)."""

CUB_BASE_URL = CUB_RECORD + "/files"


@dataclass(frozen=True)
class Archive:
    filename: str
    url: str
    checksum: str  # "<algorithm>:<hex digest>", as published
    folder: str    # the top-level folder the archive unpacks to
    what: str


CUB_ARCHIVES: tuple[Archive, ...] = (
    Archive("CUB_200_2011.tgz", f"{CUB_BASE_URL}/CUB_200_2011.tgz?download=1",
            "md5:97eceeb196236b17998738112f37df78", "CUB_200_2011",
            "images, labels and splits (1.1 GB)"),
    Archive("segmentations.tgz", f"{CUB_BASE_URL}/segmentations.tgz?download=1",
            "md5:4d47ba1228eae64f2fa547c47bc65255", "segmentations",
            "foreground masks (37 MB)"),
)

CHUNK = 1 << 20
UNPACK_PREFIX = ".fgbg-unpack-"


class DownloadError(RuntimeError):
    """A download or unpacking failed for a reason the user can act on; the message is
    one line that says which file, what went wrong and what to do."""


class _UnsafeMember(Exception):
    """An archive member that would land outside the folder, or a device (no filter="data")."""


class _Retryable(Exception):
    """A transient failure (connection cut, time-out, 5xx): try again, resuming."""


# --------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------

def parse_checksum(spec: str) -> tuple[str, str]:
    """``"md5:<hex>"``, ``"sha256:<hex>"`` or a bare hex digest (32 digits: md5, 64: sha256)
    as (algorithm, lower-case digest)."""
    algo, _, digest = spec.strip().rpartition(":")
    digest = digest.lower()
    if not algo:
        algo = {32: "md5", 40: "sha1", 64: "sha256"}.get(len(digest), "")
    algo = algo.lower()
    if algo not in ("md5", "sha1", "sha256") or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"checksum {spec!r}: expected md5:<hex>, sha256:<hex> or a hex digest")
    return algo, digest


def file_digest(path: str | Path, algo: str) -> str:
    h = hashlib.new(algo, usedforsecurity=False) if algo == "md5" else hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _matches(path: Path, checksum: str) -> tuple[bool, str, str]:
    algo, expected = parse_checksum(checksum)
    got = file_digest(path, algo)
    return got == expected, f"{algo} {expected}", got


# --------------------------------------------------------------------------------------
# downloading
# --------------------------------------------------------------------------------------

def _os_error(path: Path, e: OSError) -> DownloadError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(f"{path}: disk full ({e.strerror}); free some space and run again to resume")
    return DownloadError(f"{path}: {e.strerror or e}; fix this and run again")


def _check_space(folder: Path, needed: int, name: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DownloadError(f"{name}: not enough disk space in {folder}: {needed / 2**20:.0f} MiB still to "
                            f"download, {free / 2**20:.0f} MiB free; free some space and run again")


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/200" or "bytes */200"
    if value and "/" in value:
        total = value.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return None


def _fetch_once(url: str, part: Path, name: str, timeout: float, progress: bool) -> None:
    """One request: resume ``part`` from its current size (Range), or start it afresh when
    the server ignores the Range. Returns when the body is complete; raises _Retryable on
    a transient failure, DownloadError on a permanent one."""
    from .runs import progress_bar

    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "fgbg-download", "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part may be complete already
            total = _total_from_content_range(e.headers.get("Content-Range"))
            e.close()
            if total == have:
                return
            part.unlink()  # longer than the file, or unknown: start again
            raise _Retryable(f"HTTP 416 for a {have}-byte .part") from None
        e.close()
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{name}: HTTP {e.code} {e.reason} from {url}; check the URL "
                            f"(--base-url) or try again later") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _Retryable(f"cannot reach {url}: {reason}") from None

    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            cr = resp.headers.get("Content-Range", "")
            start = cr.split()[1].split("-")[0] if cr.startswith("bytes ") else ""
            if start != str(have):  # a range we did not ask for: start again
                part.unlink(missing_ok=True)
                raise _Retryable(f"unexpected Content-Range {cr!r}")
            mode, total = "ab", _total_from_content_range(cr)
        else:  # 200: the whole file (a server that ignores Range included)
            mode, have, total = "wb", 0, length
        if total is not None:
            _check_space(part.parent, total - have, name)
        bar = progress_bar(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=name, disable=not progress or None)
        got = 0
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (http.client.HTTPException, OSError) as e:  # IncompleteRead, reset, time-out
                        raise _Retryable(f"connection lost after {have + got} bytes: {type(e).__name__}") from None
                    if not block:
                        break
                    try:
                        f.write(block)
                    except OSError as e:
                        raise _os_error(part, e) from None
                    got += len(block)
                    bar.update(len(block))
        except OSError as e:  # opening or closing the .part
            raise _os_error(part, e) from None
        finally:
            bar.close()
        expected = (total - have) if total is not None else length
        if expected is not None and got < expected:
            raise _Retryable(f"connection closed after {have + got} of {have + expected} bytes")


def download(url: str, dest: str | Path, checksum: str, *, timeout: float = 60.0, retries: int = 5,
             progress: bool = True, log=print) -> Path:
    """Download ``url`` to ``dest``, verified against ``checksum`` (see :func:`parse_checksum`).

    An existing ``dest`` with the right checksum is kept (no request). Bytes go to
    ``dest.part`` first, and a broken download is resumed with a Range request, up to
    ``retries`` times here, and again by the next call. With a wrong checksum the file is
    kept aside as ``dest.bad`` and :class:`DownloadError` says so. ``timeout`` (seconds)
    bounds every connect and read.
    """
    dest = Path(dest)
    name = dest.name
    parse_checksum(checksum)  # a malformed override fails before any request
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(dest.parent, e) from None
    if dest.exists():
        ok, expected, got = _matches(dest, checksum)
        if ok:
            log(f"{name}: already downloaded, checksum ok")
            return dest
        bad = dest.with_name(name + ".bad")
        os.replace(dest, bad)
        log(f"{name}: the file there has the wrong checksum ({got}, expected {expected}); "
            f"moved it to {bad} and downloading again")
    part = dest.with_name(name + ".part")
    if part.exists():
        log(f"{name}: resuming after {part.stat().st_size} bytes")
    last = ""
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, name, timeout, progress)
            break
        except _Retryable as e:
            last = str(e)
            if attempt < retries:
                log(f"{name}: {last}; retrying ({attempt + 1}/{retries})")
                time.sleep(min(2.0 ** attempt, 30.0) * 0.5)
    else:
        raise DownloadError(f"{name}: download failed ({last}); check your network and run the same "
                            f"command again to resume")
    ok, expected, got = _matches(part, checksum)
    if not ok:
        bad = dest.with_name(name + ".bad")
        os.replace(part, bad)
        raise DownloadError(f"{name}: checksum mismatch: expected {expected}, got {got}; the download was "
                            f"kept as {bad}: delete it and run again (if it fails again, the source "
                            f"{url} serves another file)")
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------
# unpacking
# --------------------------------------------------------------------------------------

def _check_member(member: tarfile.TarInfo, root: Path) -> None:
    """Python without tarfile's filters: refuse what filter="data" would refuse."""
    target = (root / member.name).resolve()
    if not target.is_relative_to(root) or member.name.startswith(("/", "\\")):
        raise _UnsafeMember(f"member {member.name!r} would be written outside the folder")
    if member.issym() or member.islnk():
        link = (target.parent / member.linkname).resolve() if member.issym() else (root / member.linkname).resolve()
        if os.path.isabs(member.linkname) or not link.is_relative_to(root):
            raise _UnsafeMember(f"member {member.name!r} links outside the folder")
    if member.isdev() or member.ischr() or member.isblk() or member.isfifo():
        raise _UnsafeMember(f"member {member.name!r} is a device or pipe")


def _extract_all(tar: tarfile.TarFile, root: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(root, filter="data")
        return
    members = tar.getmembers()
    for m in members:
        _check_member(m, root)
        m.mode = (m.mode | 0o600) & 0o755 if m.isfile() else 0o755 if m.isdir() else m.mode
    tar.extractall(root, members=members)


def unpack(archive: str | Path, dest_dir: str | Path, folder: str) -> Path:
    """Unpack ``archive`` into ``dest_dir`` so that ``dest_dir/folder`` appears complete or
    not at all: everything goes into a hidden temporary folder in ``dest_dir`` first, and
    is renamed into place once the whole archive is out (``folder`` last). Other
    top-level entries (CUB's attributes.txt) replace existing ones. Returns
    ``dest_dir/folder``."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    final = dest_dir / folder
    for stale in dest_dir.glob(f"{UNPACK_PREFIX}{archive.name}-*"):  # from an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{UNPACK_PREFIX}{archive.name}-", dir=dest_dir)).resolve()
    except OSError as e:
        raise _os_error(dest_dir, e) from None
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                _extract_all(tar, tmp)
        except (getattr(tarfile, "FilterError", _UnsafeMember), _UnsafeMember) as e:
            raise DownloadError(f"{archive.name}: unsafe archive, not unpacked ({e})") from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DownloadError(f"{archive.name}: the archive is damaged ({type(e).__name__}: {e}); "
                                f"delete {archive} and run again") from None
        except OSError as e:
            raise _os_error(dest_dir, e) from None
        if not (tmp / folder).is_dir():
            raise DownloadError(f"{archive.name}: has no top-level folder {folder}/; is it the right archive?")
        entries = sorted(tmp.iterdir(), key=lambda p: p.name == folder)  # the folder last
        for entry in entries:
            target = dest_dir / entry.name
            if entry.name == folder:
                if target.exists():
                    raise DownloadError(f"{target} appeared while unpacking; remove it and run again")
            elif target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    except OSError as e:
        raise _os_error(dest_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------
# CUB
# --------------------------------------------------------------------------------------

def download_cub(dest_dir: str | Path, *, base_url: str | None = None, checksums: dict[str, str] | None = None,
                 timeout: float = 60.0, retries: int = 5, keep_archives: bool = True, progress: bool = True,
                 log=print) -> Path:
    """Download (or resume) and unpack CUB-200-2011 with its segmentations into
    ``dest_dir``; returns ``dest_dir/CUB_200_2011``, the ``base_dir`` to use.

    ``base_url``: fetch ``<base_url>/<archive name>`` instead of the Caltech record.
    ``checksums``: ``{archive name: checksum}`` replacing the published ones. An archive
    whose folder is already unpacked is skipped. Every archive is downloaded and verified
    before anything is unpacked, so a bad checksum leaves no new folder.
    ``keep_archives=False`` deletes each archive once it is unpacked.
    """
    dest_dir = Path(dest_dir).expanduser().resolve()
    checksums = dict(checksums or {})
    unknown = set(checksums) - {a.filename for a in CUB_ARCHIVES}
    if unknown:
        raise ValueError(f"checksums: unknown archive(s) {sorted(unknown)}; "
                         f"known: {[a.filename for a in CUB_ARCHIVES]}")
    todo = []
    for a in CUB_ARCHIVES:
        if (dest_dir / a.folder).is_dir():
            log(f"{a.filename}: {dest_dir / a.folder} is there already, skipped")
            continue
        url = f"{base_url.rstrip('/')}/{a.filename}" if base_url else a.url
        todo.append((a, url, checksums.get(a.filename, a.checksum)))
    paths = []
    for a, url, checksum in todo:
        log(f"{a.filename}: {a.what}, from {url}")
        paths.append(download(url, dest_dir / a.filename, checksum, timeout=timeout, retries=retries,
                              progress=progress, log=log))
    for (a, _, _), path in zip(todo, paths):
        log(f"{a.filename}: unpacking into {dest_dir / a.folder}")
        unpack(path, dest_dir, a.folder)
        if not keep_archives:
            path.unlink()
    return dest_dir / "CUB_200_2011"


def _parse_checksum_option(value: str) -> tuple[str, str]:
    name, sep, checksum = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected ARCHIVE=CHECKSUM, got {value!r}")
    try:
        parse_checksum(checksum)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, checksum


def main(argv: list[str] | None = None) -> int:
    """``python -m fgbg.data download cub DIR``: 0 when done, 1 on an error (one line)."""
    p = argparse.ArgumentParser(prog="python -m fgbg.data",
                                description="Download a dataset into the layout fgbg.data.load_dataset reads.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="download and unpack a dataset")
    d.add_argument("dataset", choices=["cub"], help="cub: CUB-200-2011 with its segmentations")
    d.add_argument("dir", type=Path, help="where to put CUB_200_2011/ and segmentations/")
    d.add_argument("--base-url", default=None,
                   help=f"fetch <BASE_URL>/<archive> instead of {CUB_BASE_URL}/<archive>?download=1")
    d.add_argument("--checksum", action="append", type=_parse_checksum_option, default=[],
                   metavar="ARCHIVE=CHECKSUM",
                   help="replace a published checksum, e.g. segmentations.tgz=md5:<hex> (repeatable)")
    d.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per connect and read (60)")
    d.add_argument("--retries", type=int, default=5, help="retries of a broken download before giving up (5)")
    d.add_argument("--delete-archives", action="store_true", help="delete each archive once it is unpacked")
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        base = download_cub(a.dir, base_url=a.base_url, checksums=dict(a.checksum), timeout=a.timeout,
                            retries=a.retries, keep_archives=not a.delete_archives, log=log)
        from .data import DatasetError, load_dataset
        try:
            ds = load_dataset(base, splits=("train", "test"))
        except DatasetError as e:
            raise DownloadError(f"unpacked, but not readable as a dataset: {e}") from None
        n_train = sum(item.split == 1 for item in ds)
        n_gt = sum(item.gt_path is not None for item in ds)
        log(f"CUB-200-2011 is ready in {base}: {len(ds)} images ({n_train} train, {len(ds) - n_train} test), "
            f"{n_gt} with ground-truth masks")
    except (DownloadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"-p base_dir {shlex.quote(str(base))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
