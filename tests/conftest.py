"""Shared fixtures: the real asset folder, a loopback corpus server, YFCC-style metadata for it."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest_plugins = ["slurm_fixture", "fdf_shards", "tiny_run"]  # session fixtures shared by every module

from data_prep import licenses
from data_prep.assets import assets_dir
from data_prep.sample import CorpusServer, corpus_records, read_manifest, write_yfcc_metadata
from data_prep.yfcc import YfccRecord


@pytest.fixture(scope="session")
def assets() -> Path:
    """`/work/shared/assets` (or `$FDF_ASSETS`): real weights, corpus photos, WIDER ground truth."""
    root = assets_dir()
    if not (root / "corpus" / "manifest.tsv").is_file():
        pytest.skip(f"shared assets not found at {root} (set FDF_ASSETS to the folder holding "
                    "weights/, corpus/ and wider/)")
    return root


@pytest.fixture(scope="session")
def corpus_server(assets) -> CorpusServer:
    """The shared corpus photos + fault routes on http://127.0.0.1:<free port> (`.url`, `.hits`)."""
    server = CorpusServer(assets / "corpus")
    with server:
        yield server


@dataclass
class YfccMetadata:
    paths: list[str]  # a 25-column .gz file (photos + filtered records) and a 23-column .tsv (faults)
    expected: dict[str, str]  # url → "ok" or the error reason it must end with
    sha256: dict[str, str]  # url → sha256 of the file served there (photos that must arrive intact)
    filtered: set[str] = field(default_factory=set)  # photo ids the plan must drop


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def yfcc_metadata(tmp_path_factory, assets, corpus_server) -> YfccMetadata:
    """20 corpus photos under their repositories' licenses, 3 records the filters must drop, and
    one record per failure a crawl meets, all pointing at `corpus_server`."""
    url = corpus_server.url
    corpus = assets / "corpus"
    manifest = {row["file"]: row for row in read_manifest(corpus)}
    served = lambda rec: manifest[rec.url[len(url) + 1:]]  # noqa: E731
    photos = sorted(corpus_records(url, corpus), key=lambda r: int(served(r)["bytes"]))[:20]
    sha = {r.url: served(r)["sha256"] for r in photos}
    expected = dict.fromkeys(sha, "ok")
    small = "photos/dlib__examples_faces_2008_001009.jpg"

    def record(i: int, u: str, code: str = "by", marker: int = 0, by_url_only: bool = False) -> YfccRecord:
        lic = licenses.LICENSES[code]
        return YfccRecord(photo_id=str(7_000_000_000 + i), url=u, marker=marker,
                          license_name="" if by_url_only else lic.name, license_url=lic.url,
                          user_nsid="12345678@N00", author="fault maker", title=f"fault {i}",
                          page_url=f"https://www.flickr.com/photos/12345678@N00/{7_000_000_000 + i}/")

    dropped = [record(0, f"{url}/{small}", "by-nd"), record(1, f"{url}/{small}", "arr"),
               record(2, f"{url}/{small}", "by", marker=1)]
    faults = {
        f"{url}/fault/status/404": "http_404",
        f"{url}/fault/status/500": "http_500",
        f"{url}/fault/slow/3/{small}": "timeout",
        f"{url}/fault/truncated/{small}": "truncated",
        f"{url}/fault/cut/{small}": "truncated",
        f"{url}/fault/not_image": "not_image",
        f"{url}/fault/large/50000000": "too_large",
        f"{url}/fault/large_unsized/50000000": "too_large",
        f"{url}/fault/bomb.png": "decompression_bomb",
        f"{url}/fault/redirect?to=file:///etc/passwd": "bad_scheme",
        "ftp://127.0.0.1/photos/x.jpg": "bad_scheme",
        f"http://127.0.0.1:{_closed_port()}/{small}": "connection",
        f"{url}/fault/flaky/2/{small}": "ok",  # two 503s, then the photo: retries recover it
    }
    sha[f"{url}/fault/flaky/2/{small}"] = manifest[small]["sha256"]
    expected.update(faults)
    codes = ["by", "by-sa", "by-nc", "by-nc-sa", "cc0", "pdm", "nkcr"]
    fault_records = [record(10 + i, u, codes[i % len(codes)], by_url_only=i % 3 == 0)
                     for i, u in enumerate(faults)]

    root = tmp_path_factory.mktemp("yfcc")
    photos_file = write_yfcc_metadata(root / "yfcc100m_photos.tsv.gz",
                                      photos[:10] + dropped + photos[10:], 25)
    faults_file = write_yfcc_metadata(root / "yfcc100m_faults.tsv", fault_records, 23)
    return YfccMetadata([str(photos_file), str(faults_file)], expected, sha,
                        {r.photo_id for r in dropped})
