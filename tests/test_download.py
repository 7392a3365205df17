"""geoswc.data.download against a real HTTP server on 127.0.0.1: whole files, resumed files, checksums."""

import hashlib
import http.server
import re
import threading

import pytest

from geoswc.data.download import download, is_url

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and 4 bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file.bin, honouring Range unless the server says not to; records the ranges asked."""

    def do_GET(self):
        server = self.server
        if self.path != "/file.bin":
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        server.ranges.append(requested)
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        if match and server.honour_ranges:
            start = int(match.group(1))
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.end_headers()
                return
            body = PAYLOAD[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            body = PAYLOAD
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.ranges, httpd.honour_ranges = [], True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_whole_download_with_checksum(tmp_path, server):
    httpd, base = server
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    out = download(f"{base}/file.bin", tmp_path / "file.bin", sha256=digest, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "file.bin.part").exists()
    assert httpd.ranges == [None]
    # a second call keeps the complete file: no request
    download(f"{base}/file.bin", tmp_path / "file.bin", sha256=digest, progress=False)
    assert httpd.ranges == [None]


def test_resume_from_a_partial_file(tmp_path, server):
    httpd, base = server
    cut = 300_001
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:cut])
    out = download(
        f"{base}/file.bin", tmp_path / "file.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False
    )
    assert out.read_bytes() == PAYLOAD
    assert httpd.ranges == [f"bytes={cut}-"]


def test_partial_file_already_complete(tmp_path, server):
    httpd, base = server
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)
    out = download(f"{base}/file.bin", tmp_path / "file.bin", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert httpd.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_server_without_ranges_starts_over(tmp_path, server):
    httpd, base = server
    httpd.honour_ranges = False
    (tmp_path / "file.bin.part").write_bytes(b"garbage that is not the start")
    out = download(f"{base}/file.bin", tmp_path / "file.bin", progress=False)
    assert out.read_bytes() == PAYLOAD


def test_checksum_mismatch_is_refused(tmp_path, server):
    _, base = server
    wrong = "0" * 64
    with pytest.raises(ValueError, match=wrong):
        download(f"{base}/file.bin", tmp_path / "file.bin", sha256=wrong, progress=False)
    assert not (tmp_path / "file.bin").exists() and not (tmp_path / "file.bin.part").exists()


def test_http_error_and_bad_address(tmp_path, server):
    _, base = server
    with pytest.raises(ValueError, match="404"):
        download(f"{base}/missing.bin", tmp_path / "m.bin", progress=False)
    with pytest.raises(ValueError, match="not an http"):
        download("ftp://example.org/x", tmp_path / "x", progress=False)
    assert is_url("HTTPS://mever.iti.gr/visloc/mvmf_head.pt") and not is_url("mvmf_head.pt")
