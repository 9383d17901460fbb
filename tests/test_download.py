"""fgbg.download: CUB-200-2011 fetched, verified, resumed and unpacked, end to end.

Tiny archives with the layout of the official ones are served from a local HTTP server
(127.0.0.1, a thread) that honours Range requests and can cut a response after N bytes.
"""
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgbg import download as dl
from fgbg.data import load_dataset, read_mask

TIMEOUT = 10  # seconds, every request
IMAGES = [("001.Black_footed_Albatross", "Black_Footed_Albatross_0001", 1),
          ("001.Black_footed_Albatross", "Black_Footed_Albatross_0002", 0),
          ("002.Laysan_Albatross", "Laysan_Albatross_0001", 1),
          ("002.Laysan_Albatross", "Laysan_Albatross_0002", 0)]


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _tgz(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries:
            _add(tar, name, data)
    return buf.getvalue()


def _cub_archives() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    cub = [("attributes.txt", b"1 has_bill_shape::curved\n"),
           ("CUB_200_2011/images.txt", "".join(f"{i + 1} {c}/{n}.jpg\n" for i, (c, n, _) in enumerate(IMAGES)).encode()),
           ("CUB_200_2011/train_test_split.txt", "".join(f"{i + 1} {s}\n" for i, (_, _, s) in enumerate(IMAGES)).encode())]
    seg = []
    for c, n, _ in IMAGES:
        buf = io.BytesIO()  # noisy pixels: the archive must be large enough to be cut in the middle
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        cub.append((f"CUB_200_2011/images/{c}/{n}.jpg", buf.getvalue()))
        mask = np.zeros((24, 32), np.uint8)
        mask[6:18, 8:24] = 255
        seg.append((f"segmentations/{c}/{n}.png", _png(mask)))
    return {"CUB_200_2011.tgz": _tgz(cub), "segmentations.tgz": _tgz(seg)}


class _State:
    def __init__(self, files):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.cut_after: dict[str, int] = {}  # file name -> cut its next response after N bytes
        self.ignore_range = False


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            rng = self.headers.get("Range")
            state.requests.append((name, rng))
            data = state.files.get(name)
            if data is None:
                self.send_error(404)
                return
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and not state.ignore_range:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                body = data
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            cut = state.cut_after.pop(name, None)
            self.wfile.write(body if cut is None else body[:cut])
            self.close_connection = True  # a cut response: the client sees EOF before Content-Length

    return Handler


@pytest.fixture()
def server():
    state = _State(_cub_archives())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/records/x/files"
    state.md5 = {k: "md5:" + hashlib.md5(v).hexdigest() for k, v in state.files.items()}
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _get(server, dest, **kw):
    kw.setdefault("checksums", server.md5)
    return dl.download_cub(dest, base_url=server.url, timeout=TIMEOUT, progress=False, log=lambda m: None, **kw)


def _check_dataset(base: Path):
    ds = load_dataset(base, splits=("train", "test"))
    assert ds.layout == "cub" and len(ds) == len(IMAGES) and not ds.skipped
    assert [item.split for item in ds] == [s for _, _, s in IMAGES]
    for item in ds:
        assert item.gt_path is not None and item.gt_path.parent.parent == base.parent / "segmentations"
        assert read_mask(item.gt_path).sum() == 12 * 16


def _no_leftovers(dest: Path):
    assert not list(dest.glob(f"{dl.UNPACK_PREFIX}*")) and not list(dest.glob("*.part"))


def test_full_download_unpacks_the_official_layout(server, tmp_path):
    dest = tmp_path / "data"
    base = _get(server, dest)
    assert base == dest.resolve() / "CUB_200_2011"
    _check_dataset(base)
    assert (dest / "attributes.txt").is_file()  # the CUB archive's other top-level entry
    assert sorted(server.requests) == [("CUB_200_2011.tgz", None), ("segmentations.tgz", None)]
    _no_leftovers(dest)

    _get(server, dest)  # everything there: no request
    assert len(server.requests) == 2
    shutil.rmtree(dest / "segmentations")
    _get(server, dest)  # the archive is kept and verified: unpacked again, not downloaded
    assert len(server.requests) == 2
    _check_dataset(base)


def test_broken_download_resumes_on_the_next_run(server, tmp_path):
    dest = tmp_path / "data"
    size = len(server.files["CUB_200_2011.tgz"])
    cut = size // 2
    assert cut > 1000
    server.cut_after["CUB_200_2011.tgz"] = cut
    with pytest.raises(dl.DownloadError, match="CUB_200_2011.tgz: download failed.*run the same command again"):
        _get(server, dest, retries=0)
    assert (dest / "CUB_200_2011.tgz.part").stat().st_size == cut
    assert not (dest / "CUB_200_2011").exists() and not (dest / "segmentations").exists()

    _check_dataset(_get(server, dest, retries=0))
    cub_requests = [r for n, r in server.requests if n == "CUB_200_2011.tgz"]
    assert cub_requests == [None, f"bytes={cut}-"]
    assert (dest / "CUB_200_2011.tgz").read_bytes() == server.files["CUB_200_2011.tgz"]
    _no_leftovers(dest)


def test_connection_cut_is_retried_with_a_range(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    cut = len(server.files["segmentations.tgz"]) // 2
    assert cut > 100
    server.cut_after["segmentations.tgz"] = cut
    _check_dataset(_get(server, tmp_path, retries=1))
    assert [r for n, r in server.requests if n == "segmentations.tgz"] == [None, f"bytes={cut}-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "segmentations.tgz.part").write_bytes(b"\0" * 200)  # stale bytes that must not stay
    _check_dataset(_get(server, tmp_path))
    assert ("segmentations.tgz", "bytes=200-") in server.requests
    assert (tmp_path / "segmentations.tgz").read_bytes() == server.files["segmentations.tgz"]


def test_wrong_checksum_is_one_clear_error_and_unpacks_nothing(server, tmp_path):
    wrong = "0" * 32
    got = hashlib.md5(server.files["segmentations.tgz"]).hexdigest()
    with pytest.raises(dl.DownloadError) as err:
        _get(server, tmp_path, checksums={**server.md5, "segmentations.tgz": wrong})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("segmentations.tgz: checksum mismatch")
    assert f"expected md5 {wrong}" in msg and f"got {got}" in msg and "run again" in msg
    assert (tmp_path / "segmentations.tgz.bad").is_file() and not (tmp_path / "segmentations.tgz").exists()
    assert not (tmp_path / "CUB_200_2011").exists() and not (tmp_path / "segmentations").exists()
    _no_leftovers(tmp_path)

    n = len(server.requests)
    _check_dataset(_get(server, tmp_path))  # the right checksum: works, CUB is not fetched again
    assert [name for name, _ in server.requests[n:]] == ["segmentations.tgz"]


def test_member_escaping_the_folder_is_refused(tmp_path):
    archive = tmp_path / "segmentations.tgz"
    archive.write_bytes(_tgz([("segmentations/a/b.png", b"x"), ("../evil.txt", b"owned")]))
    dest = tmp_path / "data"
    dest.mkdir()
    with pytest.raises(dl.DownloadError, match="segmentations.tgz: unsafe archive"):
        dl.unpack(archive, dest, "segmentations")
    assert not (tmp_path / "evil.txt").exists() and not (dest / "segmentations").exists()
    _no_leftovers(dest)


def test_cli_errors_are_one_line(server, tmp_path, capsys):
    args = ["download", "cub", str(tmp_path), "--base-url", server.url, "--timeout", str(TIMEOUT),
            "--checksum", f"CUB_200_2011.tgz={server.md5['CUB_200_2011.tgz']}", "--checksum",
            "segmentations.tgz=md5:" + "f" * 32]
    assert dl.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: segmentations.tgz: checksum mismatch: expected md5 ffff")

    # no network: nothing listens on the port any more
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as s:
        dead = f"http://127.0.0.1:{s.server_address[1]}"
    assert dl.main(["download", "cub", str(tmp_path / "x"), "--base-url", dead, "--retries", "0",
                    "--timeout", str(TIMEOUT)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.match(r"error: CUB_200_2011.tgz: download failed \(cannot reach .*\); check your network",
                    err.splitlines()[-1])


def test_python_m_fgbg_data_download(server, tmp_path):
    dest = tmp_path / "data"
    cmd = [sys.executable, "-m", "fgbg.data", "download", "cub", str(dest), "--base-url", server.url,
           "--timeout", str(TIMEOUT)]
    for name, checksum in server.md5.items():
        cmd += ["--checksum", f"{name}={checksum}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "FGBG_PROGRESS": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"-p base_dir {dest.resolve() / 'CUB_200_2011'}\n"
    assert "4 images (2 train, 2 test), 4 with ground-truth masks" in r.stderr
    _check_dataset(dest / "CUB_200_2011")


def test_damaged_archive_leaves_no_half_unpacked_folder(tmp_path):
    """Members come out before the archive breaks, but none of them shows up in DIR."""
    data = _cub_archives()["CUB_200_2011.tgz"]
    archive = tmp_path / "CUB_200_2011.tgz"
    archive.write_bytes(data[: len(data) * 3 // 4])
    dest = tmp_path / "data"
    dest.mkdir()
    with pytest.raises(dl.DownloadError, match="CUB_200_2011.tgz: the archive is damaged.*delete"):
        dl.unpack(archive, dest, "CUB_200_2011")
    assert list(dest.iterdir()) == []
