"""Shared fixtures: the real asset folder, a loopback corpus server, YFCC-style metadata for it."""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest_plugins = ["slurm_fixture", "fdf_shards", "tiny_run"]  # session fixtures shared by every module

from data_prep import licenses
from fdf_core.assets import assets_dir
from data_prep.sample import CorpusServer, corpus_records, read_manifest, write_yfcc_metadata
from data_prep.yfcc import YfccRecord


def pytest_sessionstart(session) -> None:
    """With FDF_REQUIRE_ASSETS set (CI, .ci/run) missing assets stop the session at once: skipping
    every test that needs them would let a run pass with nothing tested. FDF_REQUIRE_FFCV does the
    same for the ffcv extra. Derived files (the detector's ONNX export) go to a fresh folder under
    /tmp unless FDF_CACHE_DIR names one: a test run writes nothing to the user's ~/.cache."""
    os.environ.setdefault("FDF_CACHE_DIR", tempfile.mkdtemp(prefix="fdf-test-cache-"))
    if os.environ.get("FDF_REQUIRE_ASSETS") and not _assets_found():
        pytest.exit(f"FDF_REQUIRE_ASSETS is set but {_missing_assets()}", returncode=pytest.ExitCode.USAGE_ERROR)
    if os.environ.get("FDF_REQUIRE_FFCV") and _ffcv_missing():
        pytest.exit(f"FDF_REQUIRE_FFCV is set but {_ffcv_missing()}", returncode=pytest.ExitCode.USAGE_ERROR)


def _assets_found() -> bool:
    return (assets_dir() / "corpus" / "manifest.tsv").is_file()


def _missing_assets() -> str:
    return (f"the shared assets are not at {assets_dir()} (../shared/assets beside the checkout, or set "
            "FDF_ASSETS to the folder holding weights/, corpus/ and wider/)")


def _ffcv_missing() -> str:
    """Why ffcv cannot be imported ("" when it can)."""
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        return f"the ffcv extra does not import ({e}); install.sh installs it"
    return ""


@pytest.fixture(scope="session")
def ffcv_extra() -> None:
    """The ffcv extra: tests that need it skip without it, unless FDF_REQUIRE_FFCV is set (CI)."""
    if _ffcv_missing():
        pytest.skip(_ffcv_missing())


@pytest.fixture(scope="session")
def assets() -> Path:
    """`$FDF_ASSETS`, else `../shared/assets` beside the checkout: real weights, corpus photos, WIDER
    ground truth. Tests that need them skip without them, unless FDF_REQUIRE_ASSETS is set."""
    if not _assets_found():
        pytest.skip(_missing_assets())
    return assets_dir()


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
