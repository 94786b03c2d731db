"""data_prep: YFCC100M metadata → plan → download over a real loopback HTTP server → raw shards."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from data_prep import licenses, plan
from fdf_core.assets import REPO_ROOT
from data_prep.cli import download_main as main
from data_prep.download import DownloadConfig, FetchError, run, verify_image
from data_prep.sample import (CorpusServer, bomb_png, corpus_records, read_manifest,
                              sample_corpus_dir, write_yfcc_metadata)
from fdf_core.tario import iter_samples
from data_prep.yfcc import COLUMNS_23, COLUMNS_25, MetadataError, YfccRecord, iter_records


def _statuses(out: Path) -> dict[str, dict]:
    rows = {}
    for p in sorted(out.glob("[0-9]" * 5 + ".parquet")):
        rows.update({r["url"]: r for r in pq.read_table(p).to_pylist()})
    return rows


def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.mark.parametrize("name,url,code", [
    ("Attribution-NonCommercial-ShareAlike License", "http://creativecommons.org/licenses/by-nc-sa/2.0/",
     "by-nc-sa"),
    ("Attribution License", "", "by"),
    ("", "https://creativecommons.org/licenses/by-sa/4.0/legalcode", "by-sa"),
    ("CC BY-NC 4.0", "", "by-nc"),
    ("Public Domain Mark", "https://creativecommons.org/publicdomain/mark/1.0/", "pdm"),
    ("No known copyright restrictions", "https://www.flickr.com/commons/usage/", "nkcr"),
    ("Attribution-NoDerivs License", "http://creativecommons.org/licenses/by-nd/2.0/", "by-nd"),
    ("Attribution License", "http://creativecommons.org/licenses/by-nd/2.0/", None),  # disagree
    ("Some Other License", "", None),
])
def test_license_matching(name, url, code):
    assert licenses.license_code(name, url) == code


def test_allowed_licenses_default_and_unknown():
    allowed = licenses.allowed_codes(licenses.DEFAULT_ALLOWED)
    assert {"by", "by-sa", "by-nc", "by-nc-sa", "cc0", "pdm", "nkcr"} <= allowed
    assert not allowed & {"by-nd", "by-nc-nd", "arr"}
    assert licenses.allowed_codes(["Attribution-ShareAlike License", "CC0"]) == {"by-sa", "cc0"}
    with pytest.raises(ValueError, match="unknown license 'by-foo'"):
        licenses.allowed_codes(["by-foo"])


def test_both_layouts_plain_and_gzip(tmp_path):
    recs = corpus_records("http://127.0.0.1:9", sample_corpus_dir())
    recs.append(YfccRecord("42", "http://127.0.0.1:9/x.jpg", "Attribution License",
                           "http://creativecommons.org/licenses/by/2.0/", "1@N00",
                           "Jürgen Müller & co", "a+b c/d", "https://flickr.com/p/42"))
    p23 = write_yfcc_metadata(tmp_path / "m23.tsv", recs, 23)
    p25 = write_yfcc_metadata(tmp_path / "m25.tsv.gz", recs, 25, first_line=1000)
    assert p25.read_bytes()[:2] == b"\x1f\x8b"
    raw25 = gzip.decompress(p25.read_bytes()).decode().splitlines()
    assert len(raw25[-1].split("\t")) == len(COLUMNS_25) == 25
    assert len(p23.read_text().splitlines()[0].split("\t")) == len(COLUMNS_23) == 23
    assert "J%C3%BCrgen+M%C3%BCller+%26+co" in raw25[-1]  # official files URL-encode free text
    got23, got25 = list(iter_records(p23)), list(iter_records(p25))
    assert [r.line_index for r in got23] == list(range(len(recs)))
    assert [r.line_index for r in got25] == [1000 + i for i in range(len(recs))]
    for want, a, b in zip(recs, got23, got25):
        for r in (a, b):
            assert (r.photo_id, r.url, r.author, r.title, r.user_nsid, r.page_url, r.license_name,
                    r.license_url, r.is_video) == (want.photo_id, want.url, want.author, want.title,
                                                   want.user_nsid, want.page_url, want.license_name,
                                                   want.license_url, False)


def test_bad_line_names_file_and_line(tmp_path):
    recs = corpus_records("http://h", sample_corpus_dir())[:3]
    good = write_yfcc_metadata(tmp_path / "good.tsv", recs, 23)
    lines = good.read_text().splitlines()
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines[:2] + ["only\tfive\tcolumns\there\t!"] + lines[2:]) + "\n")
    with pytest.raises(MetadataError, match=re.escape(f"{bad}: line 3: expected 23 or 25") + ".*got 5"):
        list(iter_records(bad))
    with pytest.raises(MetadataError, match=re.escape(f"{bad}: line 3")):
        plan.make_plan(tmp_path / "out1", [str(bad)], 10, licenses.DEFAULT_ALLOWED)
    assert not (tmp_path / "out1" / "plan.json").exists()
    marker = tmp_path / "marker.tsv"
    marker.write_text(lines[0][:-1] + "x\n")
    with pytest.raises(MetadataError, match=re.escape(f"{marker}: line 1: photo/video marker")):
        list(iter_records(marker))
    p = plan.make_plan(tmp_path / "out2", [str(bad)], 10, licenses.DEFAULT_ALLOWED, on_bad_line="skip")
    assert p["records"] == 3 and p["stats"]["bad_lines"] == 1 and "line 3" in p["bad_lines"][0]


def test_plan_filters_and_keeps_keys_stable(tmp_path, yfcc_metadata):
    out = tmp_path / "a"
    p = plan.make_plan(out, yfcc_metadata.paths, 8, licenses.DEFAULT_ALLOWED)
    rows = [r for s in plan.shard_range(None, p["num_shards"]) for r in plan.read_shard(out, s)]
    assert {r["url"] for r in rows} == set(yfcc_metadata.expected)  # every photo, no dropped one
    assert not {r["photo_id"] for r in rows} & yfcc_metadata.filtered
    assert p["stats"]["videos"] == 1
    assert p["stats"]["license_rejected:by-nd"] == p["stats"]["license_rejected:arr"] == 1
    assert p["num_shards"] == -(-len(rows) // 8)
    for i, r in enumerate(rows):
        assert r["key"] == f"{i // 8:05d}{i % 8:04d}"
        assert r["author"] and r["license"] in licenses.DEFAULT_ALLOWED
    first = out / "plan" / "00000.parquet"
    mtime = first.stat().st_mtime_ns
    assert plan.make_plan(out, yfcc_metadata.paths, 8, licenses.DEFAULT_ALLOWED) == p  # reused
    assert first.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="planned with other options.*shard_size"):
        plan.make_plan(out, yfcc_metadata.paths, 16, licenses.DEFAULT_ALLOWED)
    again = plan.make_plan(tmp_path / "b", yfcc_metadata.paths, 8, licenses.DEFAULT_ALLOWED)
    assert again["num_shards"] == p["num_shards"]
    for s in plan.shard_range(None, p["num_shards"]):
        name = f"plan/{s}.parquet"
        assert (tmp_path / "b" / name).read_bytes() == (out / name).read_bytes()
    assert plan.shard_range("1:3", 5) == ["00001", "00002"]
    assert plan.shard_range("3:", 5) == ["00003", "00004"]


def test_verify_image_reasons(assets):
    data = (assets / "corpus" / "photos" / "dlib__examples_faces_2008_001009.jpg").read_bytes()
    assert verify_image(data, Image.MAX_IMAGE_PIXELS) == ("JPEG", 360, 480)
    cases = [(data[: len(data) // 2], Image.MAX_IMAGE_PIXELS, "truncated"),
             (data, 360 * 480 - 1, "decompression_bomb"),  # configurable limit
             (bomb_png(), Image.MAX_IMAGE_PIXELS, "decompression_bomb"),  # PIL's own limit
             (b"<html>gone</html>", Image.MAX_IMAGE_PIXELS, "not_image")]
    for payload, max_pixels, reason in cases:
        with pytest.raises(FetchError) as e:
            verify_image(payload, max_pixels)
        assert e.value.reason == reason


def test_download_end_to_end_and_rerun(tmp_path, corpus_server, yfcc_metadata, caplog):
    out = tmp_path / "raw"
    cfg = DownloadConfig(metadata=yfcc_metadata.paths, output_dir=str(out), shard_size=8, threads=6,
                         timeout=1.0, retries=2, backoff=0.05, max_bytes=4 << 20, progress=False)
    caplog.set_level(logging.INFO, logger="data_prep")
    summary = run(cfg)
    printed = caplog.text  # library progress is logged, not printed
    assert "img/s" in printed and "http_404=1" in printed

    statuses = _statuses(out)
    assert {u: r["error"] or r["status"] for u, r in statuses.items()} == yfcc_metadata.expected
    assert statuses[f"{corpus_server.url}/fault/status/404"]["http_status"] == 404
    hits = corpus_server.hits
    assert hits["/fault/status/404"] == 1  # not retried
    assert hits["/fault/status/500"] == cfg.retries + 1
    assert hits["/fault/flaky/2/photos/dlib__examples_faces_2008_001009.jpg"] >= 3

    n_ok = sum(v == "ok" for v in yfcc_metadata.expected.values())
    assert (summary["records"], summary["ok"]) == (len(yfcc_metadata.expected), n_ok)
    assert summary["errors"]["too_large"] == 2 and summary["errors"]["bad_scheme"] == 2
    planned = {r["key"]: r for s in plan.shard_range(None, summary["shards"])
               for r in plan.read_shard(out, s)}
    fields = ("photo_id", "url", "author", "user_nsid", "license_name", "line_index")
    seen = 0
    for tar in sorted(out.glob("*.tar")):
        keys = []
        for key, files in iter_samples(tar):
            meta = json.loads(files["json"])
            data = files[{"JPEG": "jpg", "PNG": "png"}[meta["format"]]]
            assert meta["sha256"] == hashlib.sha256(data).hexdigest() == yfcc_metadata.sha256[meta["url"]]
            assert meta["bytes"] == len(data)
            assert Image.open(io.BytesIO(data)).size == (meta["width"], meta["height"])
            assert {k: meta[k] for k in fields} == {k: planned[key][k] for k in fields}
            keys.append(key)
        assert keys == sorted(keys) and all(k.startswith(tar.stem) for k in keys)
        stats = json.loads((out / f"{tar.stem}_stats.json").read_text())
        assert stats["ok"] == len(keys) and stats["count"] == stats["ok"] + stats["error"]
        seen += len(keys)
    assert seen == n_ok
    assert json.loads((out / "options.json").read_text())["shard_size"] == 8

    before = _tar_bytes(out)
    stats_mtime = (out / "00001_stats.json").stat().st_mtime_ns
    again = run(cfg)  # everything done: no request, no rewrite
    assert again["shards_done_before"] == again["shards"] and again["run_records"] == 0
    assert (out / "00001_stats.json").stat().st_mtime_ns == stats_mtime
    for shard in ("00000", "00001"):  # redo two shards from scratch: the same bytes
        (out / f"{shard}_stats.json").unlink()
        (out / f"{shard}.tar").unlink()
    redo = run(cfg)
    assert redo["shards_done_before"] == redo["shards"] - 2 and redo["run_records"] == 16
    assert _tar_bytes(out) == before


def test_killed_run_resumes_identically(tmp_path, corpus_server, assets):
    url = corpus_server.url
    photos = corpus_records(url, assets / "corpus")[:11]
    slow = photos[6].url.replace(f"{url}/", f"{url}/fault/slow/1.5/")
    photos[6] = YfccRecord(photos[6].photo_id, slow, photos[6].license_name, photos[6].license_url,
                           photos[6].user_nsid, photos[6].author, photos[6].title, photos[6].page_url)
    meta = write_yfcc_metadata(tmp_path / "meta.tsv.gz", photos)
    args = ["--metadata", f"[{meta}]", "--shard_size", "4", "--threads", "2", "--timeout", "10",
            "--progress", "false"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", "fdf-download", *args, "--output_dir", str(killed)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not [p for p in killed.glob("00001.tar.tmp-*") if p.stat().st_size > 0]:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "shard 1 never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # shard 1 waits on the slow photo: mid-shard
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "00000_stats.json").exists()
    assert not (killed / "00001.tar").exists() and not (killed / "00001_stats.json").exists()
    assert list(killed.glob("00001.tar.tmp-*"))

    summary = main([*args, "--output_dir", str(killed)])
    assert summary["shards_done_before"] == 1 and summary["ok"] == 11
    assert not list(killed.glob("*.tmp-*"))
    reference = tmp_path / "reference"
    main([*args, "--output_dir", str(reference)])
    assert _tar_bytes(killed) == _tar_bytes(reference) and len(_tar_bytes(reference)) == 3
    for s in ("00000", "00001", "00002"):  # same keys
        name = f"plan/{s}.parquet"
        assert (killed / name).read_bytes() == (reference / name).read_bytes()


def test_sample_corpus_demo_with_yaml_config_and_shard_range(tmp_path):
    corpus = sample_corpus_dir()
    rows = read_manifest(corpus)
    assert 6 <= len(rows) <= 8
    assert sum((corpus / r["file"]).stat().st_size for r in rows) < 2_000_000
    for r in rows:
        assert hashlib.sha256((corpus / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    with CorpusServer(corpus) as url:
        assert url.startswith("http://127.0.0.1:")
        meta = write_yfcc_metadata(tmp_path / "yfcc100m_sample.tsv", corpus_records(url, corpus))
        config = tmp_path / "download.yaml"
        config.write_text(yaml.safe_dump({"metadata": [str(meta)], "output_dir": str(tmp_path / "raw"),
                                          "shard_size": 3, "threads": 4, "progress": False}))
        first = main(["--config", str(config), "--shards", "1:2"])
        assert first["shards"] == 1 and first["ok"] == 3
        assert sorted(p.name for p in (tmp_path / "raw").glob("*_stats.json")) == ["00001_stats.json"]
        everything = main(["--config", str(config)])
    assert everything["shards"] == 3 and everything["shards_done_before"] == 1
    assert everything["ok"] == len(rows) and everything["error"] == 0
    options = json.loads((tmp_path / "raw" / "options.json").read_text())
    assert options["shard_size"] == 3 and options["shards"] is None and options["metadata"] == [str(meta)]
