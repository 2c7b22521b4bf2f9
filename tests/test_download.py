"""download_coco against a local HTTP server that serves small zips and honours Range requests."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minis.data.download import COCO_2017, download_coco


class ArchiveServer(BaseHTTPRequestHandler):
    """Serves ``files`` (URL path -> bytes); records each request's path and Range header."""

    files: dict[str, bytes] = {}
    requests: list[tuple[str, str | None]] = []
    honour_range = True
    cut_next_response_at: int | None = None  # simulate a dropped connection once

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        self.requests.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        requested = self.headers.get("Range")
        if requested and self.honour_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body)
        if ArchiveServer.cut_next_response_at is not None:
            end, ArchiveServer.cut_next_response_at = ArchiveServer.cut_next_response_at, None
            self.close_connection = True
        self.wfile.write(body[start:end])

    def log_message(self, *args):  # keep the test output quiet
        pass


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


IMAGES = {f"val2017/{i:012d}.jpg": os.urandom(40_000 + i) for i in range(1, 4)}
ANNOTATIONS = {"annotations/instances_val2017.json": json.dumps({"images": [], "annotations": []}).encode()}
VAL_ZIP = make_zip(IMAGES)
ANN_ZIP = make_zip(ANNOTATIONS)
CHECKSUMS = {
    "val2017.zip": hashlib.md5(VAL_ZIP).hexdigest(),
    "annotations_trainval2017.zip": hashlib.md5(ANN_ZIP).hexdigest(),
}


@pytest.fixture()
def server():
    ArchiveServer.files = {"/zips/val2017.zip": VAL_ZIP, "/annotations/annotations_trainval2017.zip": ANN_ZIP}
    ArchiveServer.requests = []
    ArchiveServer.honour_range = True
    ArchiveServer.cut_next_response_at = None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ArchiveServer)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def assert_unpacked(root):
    for name, data in {**IMAGES, **ANNOTATIONS}.items():
        assert (root / name).read_bytes() == data


def test_official_table_has_the_published_md5s():
    assert COCO_2017["val2017.zip"].md5 == "442b8da7639aecaf257c1dceb8ba8c80"
    assert COCO_2017["train2017.zip"].md5 == "cced6f7f71b7629ddf16f17bbcfab6b2"
    assert COCO_2017["annotations_trainval2017.zip"].md5 == "f4bbac642086de4f52a3fdda2de5fa2c"


def test_full_download_checks_unpacks_and_then_skips(server, tmp_path):
    paths = download_coco(tmp_path, base_url=server, progress=True, checksums=CHECKSUMS)
    assert paths == {"val2017": {"image_dir": tmp_path / "val2017",
                                 "ann_file": tmp_path / "annotations" / "instances_val2017.json"}}
    assert_unpacked(tmp_path)
    assert ArchiveServer.requests == [
        ("/zips/val2017.zip", None),
        ("/annotations/annotations_trainval2017.zip", None),
    ]
    assert (tmp_path / "val2017.zip.unpacked").exists() and not (tmp_path / "val2017.zip").exists()
    assert not list(tmp_path.glob("*.part"))

    download_coco(tmp_path, base_url=server, progress=False, checksums=CHECKSUMS)
    assert len(ArchiveServer.requests) == 2  # everything was already done: no new request


def test_partial_download_is_resumed_with_a_range_request(server, tmp_path):
    half = len(VAL_ZIP) // 2
    (tmp_path / "val2017.zip.part").write_bytes(VAL_ZIP[:half])
    download_coco(tmp_path, base_url=server, progress=False, checksums=CHECKSUMS, keep_archives=True)
    assert ("/zips/val2017.zip", f"bytes={half}-") in ArchiveServer.requests
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP
    assert not (tmp_path / "val2017.zip.part").exists()
    assert_unpacked(tmp_path)


def test_dropped_connection_keeps_the_part_file_and_the_next_call_resumes(server, tmp_path):
    cut = len(VAL_ZIP) // 3
    ArchiveServer.cut_next_response_at = cut
    expected = rf"connection lost after {cut} of {len(VAL_ZIP)} bytes.*run again to resume"
    with pytest.raises(RuntimeError, match=expected):
        download_coco(tmp_path, base_url=server, progress=False, checksums=CHECKSUMS)
    assert (tmp_path / "val2017.zip.part").read_bytes() == VAL_ZIP[:cut]
    assert not (tmp_path / "val2017").exists()

    download_coco(tmp_path, base_url=server, progress=False, checksums=CHECKSUMS)
    assert ArchiveServer.requests[1] == ("/zips/val2017.zip", f"bytes={cut}-")
    assert_unpacked(tmp_path)


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    ArchiveServer.honour_range = False
    (tmp_path / "val2017.zip.part").write_bytes(VAL_ZIP[:1000])
    download_coco(tmp_path, base_url=server, progress=False, checksums=CHECKSUMS, keep_archives=True)
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP
    assert_unpacked(tmp_path)


@pytest.mark.parametrize("kind", ["wrong md5", "not a zip"])
def test_corrupted_archive_is_refused_and_not_unpacked(server, tmp_path, kind):
    if kind == "wrong md5":
        broken = bytearray(VAL_ZIP)
        broken[len(broken) // 2] ^= 0xFF  # one flipped byte inside an image
        served, checksums = bytes(broken), CHECKSUMS
    else:
        served = b"this is an HTML error page, not a zip" * 100
        checksums = {**CHECKSUMS, "val2017.zip": hashlib.md5(served).hexdigest()}
    ArchiveServer.files["/zips/val2017.zip"] = served

    expected_message = "MD5 is" if kind == "wrong md5" else "not a readable zip"
    expected = rf"val2017\.zip: corrupted download, {expected_message}.*Nothing was unpacked"
    with pytest.raises(ValueError, match=expected):
        download_coco(tmp_path, base_url=server, progress=False, checksums=checksums)
    assert not (tmp_path / "val2017").exists()
    assert not (tmp_path / "val2017.zip.unpacked").exists()
    assert not (tmp_path / "val2017.zip").exists()
    assert (tmp_path / "val2017.zip.corrupt").read_bytes() == served

    # Once the server is fixed, running again downloads afresh and succeeds.
    ArchiveServer.files["/zips/val2017.zip"] = VAL_ZIP
    download_coco(tmp_path, base_url=server, progress=False, checksums=CHECKSUMS)
    assert_unpacked(tmp_path)


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown COCO split"):
        download_coco(tmp_path, splits=("val2018",))
