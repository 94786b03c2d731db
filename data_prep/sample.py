"""A YFCC-style corpus on this machine: photos served over loopback HTTP, and metadata lines for them.

The demo (`fdf-pipeline`) and the tests use it instead of Flickr: `CorpusServer` serves a folder on
127.0.0.1 plus fault routes that reproduce what a crawl meets (404, 500, flaky 503, slow and
truncated responses, non-images, oversized bodies, decompression bombs, redirects to file://), and
`write_yfcc_metadata` writes official 23/25-column lines pointing at it. Attribution comes from the
corpus manifest (source repository, path, license).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import os
import struct
import threading
import time
import zlib
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Literal
from urllib.parse import parse_qs, urlsplit

from data_prep import licenses
from data_prep.yfcc import YfccRecord, format_line
from fdf_core.errors import InputError, MissingInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def sample_corpus_dir() -> Path:
    """The demo corpus embedded in the repo: `manifest.tsv` + `photos/`."""
    return Path(__file__).resolve().parent / "sample"


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A few hundred bytes of valid PNG header claiming `width`×`height` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class _Handler(SimpleHTTPRequestHandler):
    """Static files, plus `/fault/...` routes (see :class:`CorpusServer`)."""

    server: "_Server"

    def log_message(self, format, *args):  # quiet: tests and the demo print their own summaries
        pass

    def do_GET(self):
        path = urlsplit(self.path).path
        with self.server.lock:
            self.server.hits[path] += 1
            hits = self.server.hits[path]
        if not path.startswith("/fault/"):
            return super().do_GET()
        parts = path.split("/")[2:]  # after "/fault/"
        try:
            self._fault(parts[0], parts[1:], hits)
        except FileNotFoundError:
            self.send_error(404)

    def _fault(self, kind: str, args: list[str], hits: int):
        if kind == "status":
            self.send_error(int(args[0]))
        elif kind == "slow":
            time.sleep(float(args[0]))
            self._send(self._file("/".join(args[1:])))
        elif kind == "flaky":
            if hits <= int(args[0]):
                self.send_error(503)
            else:
                self._send(self._file("/".join(args[1:])))
        elif kind == "truncated":  # Content-Length says more than the connection delivers
            data = self._file("/".join(args))
            self._send(data[: len(data) // 2], length=len(data))
        elif kind == "cut":  # honest headers, but the file itself ends half-way
            data = self._file("/".join(args))
            self._send(data[: len(data) // 2])
        elif kind == "not_image":
            self._send(b"<html><body>This photo is no longer available</body></html>", "text/html")
        elif kind in ("large", "large_unsized"):
            self._stream_zeros(int(args[0]), sized=kind == "large")
        elif kind == "bomb.png":
            self._send(bomb_png(), "image/png")
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(urlsplit(self.path).query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def _file(self, rel: str) -> bytes:
        path = Path(self.translate_path("/" + rel))  # translate_path keeps it inside the folder
        return path.read_bytes()

    def _send(self, data: bytes, content_type: str = "image/jpeg", length: int | None = None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        self.wfile.write(data)

    def _stream_zeros(self, n: int, sized: bool):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if sized:
            self.send_header("Content-Length", str(n))
        self.end_headers()
        block = b"\0" * (1 << 16)
        for start in range(0, n, len(block)):
            self.wfile.write(block[: n - start])


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.hits: Counter = Counter()
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):  # clients that gave up (timeouts, size caps)
        pass


class CorpusServer:
    """Serve `directory` on http://127.0.0.1:<port>; `with CorpusServer(d) as base_url: ...`.

    Fault routes, relative to the base URL (`<file>` is a path inside the folder):
    `/fault/status/<code>`, `/fault/slow/<seconds>/<file>`, `/fault/flaky/<n>/<file>` (503 for
    the first n requests, then the file), `/fault/truncated/<file>` (Content-Length larger than
    the body), `/fault/cut/<file>` (half the file, honest headers), `/fault/not_image`,
    `/fault/large/<bytes>`, `/fault/large_unsized/<bytes>` (no Content-Length),
    `/fault/bomb.png` (30000×30000 PNG header), `/fault/redirect?to=<url>`.
    `hits` counts requests per path (to check retries).
    """

    def __init__(self, directory: str | os.PathLike, port: int = 0):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise MissingInputError(f"corpus folder not found: {self.directory}")
        self._server = _Server(("127.0.0.1", port), partial(_Handler, directory=str(self.directory)))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def hits(self) -> Counter:
        return self._server.hits

    def __enter__(self) -> str:
        self._thread = threading.Thread(target=self._server.serve_forever, name="corpus-server",
                                        daemon=True)
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def read_manifest(corpus_dir: str | os.PathLike) -> list[dict]:
    """Rows of `<corpus>/manifest.tsv` (file, repo, path, git_blob, bytes, sha256, license)."""
    path = Path(corpus_dir) / "manifest.tsv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for i, row in enumerate(rows, start=2):
        if not row.get("file") or not row.get("license"):
            raise InputError(f"{path}: line {i}: needs 'file' and 'license' columns")
    return rows


def corpus_records(base_url: str, corpus_dir: str | os.PathLike | None = None) -> list[YfccRecord]:
    """One YFCC-style photo record per image of the corpus, served under `base_url`.

    Author = the source repository's owner, page = the file on GitHub, license = the repository's
    (from the manifest); photo ids and NSIDs are stable numbers derived from the file's hash.
    """
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else sample_corpus_dir()
    records = []
    for row in read_manifest(corpus_dir):
        if not row["file"].lower().endswith(IMAGE_SUFFIXES):
            continue
        lic = licenses.LICENSES.get(row["license"].lower())
        if lic is None:
            raise InputError(f"{corpus_dir / 'manifest.tsv'}: {row['file']}: license "
                             f"{row['license']!r} is not in data_prep.licenses.LICENSES")
        owner = row["repo"].split("/")[0]
        digest = row.get("sha256") or hashlib.sha256(row["file"].encode()).hexdigest()
        records.append(YfccRecord(
            photo_id=str(int(digest[:12], 16) % 10**11),
            url=f"{base_url.rstrip('/')}/{row['file']}",
            license_name=lic.name, license_url=lic.url,
            user_nsid=f"{int(hashlib.sha1(owner.encode()).hexdigest()[:8], 16) % 10**8}@N00",
            author=owner, title=Path(row["path"]).stem,
            page_url=f"https://github.com/{row['repo']}/blob/HEAD/{row['path']}"))
    return records


def write_yfcc_metadata(path: str | os.PathLike, records: Iterable[YfccRecord],
                        columns: Literal[23, 25] = 25, first_line: int = 0) -> Path:
    """Write official YFCC100M lines (gzip when `path` ends with .gz; byte-stable either way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [format_line(rec, columns, line_number=first_line + i,
                         photo_hash=hashlib.md5(rec.photo_id.encode()).hexdigest())
             for i, rec in enumerate(records)]
    data = "".join(line + "\n" for line in lines).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
