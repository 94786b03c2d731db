"""fdf_builder end to end on real photos served over loopback HTTP, with real detector weights."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.download import DownloadConfig
from data_prep.download import run as download
from data_prep.sample import corpus_records, write_yfcc_metadata
from fdf_core.tario import AtomicTarWriter, atomic_write_json, iter_samples, json_bytes, temporary_path
from fdf_builder.build import BuildConfig, run as build
from fdf_builder.shards import split_of
from fdf_pipeline.pipeline import PipelineConfig, run as pipeline

REPO = Path(__file__).resolve().parent.parent
N_PHOTOS = 12
PORTRAITS = ("face_recognition__examples_two_people.jpg", "facenet_pytorch__data_multiface.jpg")


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, assets, corpus_server) -> str:
    """YFCC lines for the 12 smallest corpus photos plus two group photos (many faces)."""
    records = sorted(corpus_records(corpus_server.url, assets / "corpus"),
                     key=lambda r: (assets / "corpus" / r.url.split("/", 3)[3]).stat().st_size)
    chosen = records[:N_PHOTOS] + [r for r in records if r.url.endswith(PORTRAITS)]
    path = tmp_path_factory.mktemp("meta") / "yfcc.tsv"
    write_yfcc_metadata(path, chosen)
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, metadata) -> Path:
    """An uninterrupted pipeline run: raw shards of 3 photos, then FDF shards."""
    work = tmp_path_factory.mktemp("reference")
    pipeline(PipelineConfig(workdir=str(work), metadata=[metadata], shard_size=3, progress=False,
                            stages=["download", "build"]))
    return work


def _samples(work: Path) -> dict[str, dict]:
    out = {}
    for tar in sorted((work / "fdf").glob("*/*.tar")):
        for key, files in iter_samples(tar):
            out[key] = {"split": tar.parent.name, "tar": tar.name, **files}
    return out


def test_shards_hold_fdf_faces_with_provenance(reference):
    samples = _samples(reference)
    assert len(samples) >= 10, "the corpus photos hold far more than 10 usable faces"
    sizes = json.loads((reference / "fdf" / "sizes.json").read_text())
    index = json.loads((reference / "fdf" / "index.json").read_text())
    assert sum(sizes.values()) == len(samples) == sum(index["splits"].values())
    photo_split = {}
    for key, s in samples.items():
        meta = json.loads(s["json"])
        assert meta["key"] == key and meta["photo_key"] == key.split("_")[0]
        image = Image.open(io.BytesIO(s["jpg"]))
        assert image.size == (128, 128) and image.mode == "RGB"
        bbox = np.array(meta["bbox"])
        assert (bbox >= -1e-6).all() and (bbox <= 1 + 1e-6).all() and bbox[2] > bbox[0] and bbox[3] > bbox[1]
        kps = np.array(meta["keypoints"])
        assert kps.shape == (7, 3)
        assert meta["keypoint_names"][:3] == ["nose", "left_eye", "right_eye"]
        x0, y0, x1, y1 = bbox  # the matching rule: nose and both eyes inside the face box
        assert ((kps[:3, 0] >= x0) & (kps[:3, 0] <= x1) & (kps[:3, 1] >= y0) & (kps[:3, 1] <= y1)).all()
        for field in ("license_name", "license_url", "author", "photo_url", "page_url", "photo_id"):
            assert meta[field], f"{key}: {field} missing"
        crop = meta["crop_box"]
        assert crop[2] - crop[0] == crop[3] - crop[1] >= 128  # square, FDF minimum size
        # photo-level split: every face of a photo on the side its photo id hashes to
        assert s["split"] == split_of(meta["photo_id"], 0.2)
        assert photo_split.setdefault(meta["photo_id"], s["split"]) == s["split"]
    stats = [json.loads(p.read_text()) for p in (reference / "fdf" / "stats").glob("*.json")]
    assert sum(st["photos"] for st in stats) == N_PHOTOS + len(PORTRAITS)
    assert sum(st["dropped"].get("too_small", 0) for st in stats) > 0  # group photos: small faces


def test_rerun_is_a_no_op(reference, metadata):
    before = {p: p.stat().st_mtime_ns for p in (reference / "fdf").glob("*/*.tar")}
    index = build(BuildConfig(input_dir=str(reference / "raw"), output_dir=str(reference / "fdf"),
                              val_fraction=0.2, progress=False))
    assert {p: p.stat().st_mtime_ns for p in (reference / "fdf").glob("*/*.tar")} == before
    assert sum(index["splits"].values()) == len(_samples(reference))


def _tree(work: Path) -> dict[str, bytes]:
    """Every shard and index file whose bytes must not depend on interruptions."""
    files = list(work.glob("raw/*.tar")) + list(work.glob("fdf/*/*.tar"))
    files += [work / "fdf" / "sizes.json"]
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(files)}


def _state(work: Path) -> tuple[int, int, bool]:
    """(raw shards done, FDF shards done, an FDF shard is being written)."""
    return (len(list(work.glob("raw/*_stats.json"))), len(list(work.glob("fdf/stats/*.json"))),
            any(work.glob("fdf/*/*.tar.tmp-*")))


# Kill points, each a condition on (state at this run's start, state now): during start-up,
# mid-download, in the middle of writing an FDF shard, right after an FDF shard finished, mid-shard again.
KILL_POINTS = {
    "startup": lambda t0, s0, s: time.monotonic() - t0 > 0.5,
    "download": lambda t0, s0, s: s[0] > s0[0] or s[1] > 0 or s[2],
    "mid-shard": lambda t0, s0, s: s[2],
    "shard-done": lambda t0, s0, s: s[1] > s0[1],
    "mid-shard-again": lambda t0, s0, s: s[2],
}


@pytest.mark.slow  # a kill-and-rerun loop
def test_sigkill_anywhere_then_rerun_gives_identical_shards(tmp_path, reference, metadata):
    """SIGKILL the pipeline (download + build) at points of every kind; the rerun must converge."""
    work = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fdf_pipeline.cli", "--workdir", str(work), "--metadata", f"[{metadata}]",
           "--shard_size", "3", "--progress", "false", "--stages", "[download, build]"]
    total = len(list(reference.glob("fdf/stats/*.json")))
    killed = []  # (kill point, state after the kill)
    for name, due in KILL_POINTS.items():
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0, s0 = time.monotonic(), _state(work)
        while proc.poll() is None and not due(t0, s0, _state(work)):
            time.sleep(0.01)
        if proc.poll() is not None:
            break  # finished before this point: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed.append((name, _state(work)))
    assert len(killed) >= 4, f"too few interruptions: {killed}"
    assert any(name.startswith("mid-shard") and 0 <= s[1] < total for name, s in killed), killed
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = _tree(work), _tree(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{name} differs after kill + rerun"
    leftovers = [p for p in work.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers


def test_atomic_write_clears_only_dead_writers_leftovers(tmp_path):
    """A rerun's write of a file every task writes (options.json, plan.json) removes what a killed
    process of this host left for it, never the temporary file of a live writer or another node."""
    target = tmp_path / "options.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    host = temporary_path(target).name.split(".tmp-")[1].rsplit(".", 1)[0]
    left = {"dead": tmp_path / f"options.json.tmp-{host}.{dead}",
            "live": tmp_path / f"options.json.tmp-{host}.{os.getppid()}",  # a running process
            "other node": tmp_path / f"options.json.tmp-{host}x.{dead}",
            "other target": tmp_path / f"plan.json.tmp-{host}.{dead}"}
    for path in left.values():
        path.write_text("partial")
    atomic_write_json(target, {"ok": 1})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert {name: path.exists() for name, path in left.items()} == {
        "dead": False, "live": True, "other node": True, "other target": True}


def test_writing_many_files_into_one_folder_lists_it_once(tmp_path, monkeypatch):
    """Each write removes its own target's dead leftovers, yet the folder is listed once per process:
    listing it at every write made n writes O(n^2) (57 ms a write among 50,000 files)."""
    from fdf_core import tario
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = temporary_path(tmp_path / "x").name.split(".tmp-")[1].rsplit(".", 1)[0]
    for i in (3, 7):
        (tmp_path / f"f{i}.json.tmp-{host}.{dead}").write_text("partial")
    listings = []
    real_scandir = tario.os.scandir
    monkeypatch.setattr(tario.os, "scandir", lambda p: listings.append(p) or real_scandir(p))
    for i in range(10):
        atomic_write_json(tmp_path / f"f{i}.json", {"i": i})
    assert len(listings) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"f{i}.json" for i in range(10))


def test_damaged_raw_shard_is_reported_not_fatal(tmp_path, assets):
    raw = tmp_path / "raw"
    good = (assets / "corpus" / "photos" / "dlib__examples_faces_2008_001009.jpg").read_bytes()
    with AtomicTarWriter(raw / "00000.tar") as tar:
        tar.add_sample("000000000", {"jpg": good[: len(good) // 3], "json": json_bytes(
            {"key": "000000000", "photo_id": "1"})})
        tar.add_sample("000000001", {"jpg": good, "json": json_bytes({"key": "000000001", "photo_id": "2"})})
    (raw / "00000_stats.json").write_text(json.dumps({"ok": 2}))
    build(BuildConfig(input_dir=str(raw), output_dir=str(tmp_path / "fdf"), min_crop_size=64, progress=False))
    stats = json.loads((tmp_path / "fdf" / "stats" / "00000.json").read_text())
    assert stats["photos"] == 2 and stats["dropped"]["decode_error"] == 1
    assert stats["faces_detected"] >= 2  # the intact photo (two people) was still processed


def test_console_script_exits_zero_after_printing_its_summary(reference):
    """setuptools' wrapper does sys.exit(entry()): a returned summary would mean exit status 1."""
    code = ("import sys; from fdf_builder.cli import fdf_build; sys.argv = ['fdf-build', *sys.argv[1:]]; "
            "sys.exit(fdf_build())")
    done = subprocess.run([sys.executable, "-c", code, "--input_dir", str(reference / "raw"),
                           "--output_dir", str(reference / "fdf"), "--val_fraction", "0.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fdf-build: " in done.stderr and "shards already done" in done.stderr  # progress: a log record
    assert json.loads(done.stdout.splitlines()[-1])["photos"] > 0  # the summary: one JSON line on stdout


def test_other_options_into_same_folder_are_refused(reference):
    with pytest.raises(ValueError, match="other options"):
        build(BuildConfig(input_dir=str(reference / "raw"), output_dir=str(reference / "fdf"),
                          resolution=64, progress=False))


@pytest.mark.slow  # FFCV
def test_ffcv_export_matches_shards(tmp_path, reference, ffcv_extra):
    """train.beton holds the train faces in shard order: their JPEG bytes as stored (no re-encode),
    boxes and keypoints."""
    from ffcv.reader import Reader
    from fdf_builder.ffcv_export import export_ffcv
    import shutil
    fdf = tmp_path / "fdf"
    shutil.copytree(reference / "fdf", fdf)
    out = export_ffcv(fdf, "train", num_workers=1)
    train = [s for s in _samples(reference).values() if s["split"] == "train"]
    reader = Reader(str(out))
    assert reader.num_samples == len(train)
    assert list(reader.handlers) == ["image", "bbox", "keypoints", "meta"]
    image, bbox = reader.metadata["f0"], reader.metadata["f1"]
    data = out.read_bytes()
    for i, s in enumerate(train):
        ptr = int(image[i]["data_ptr"])
        assert data[ptr:ptr + len(s["jpg"])] == s["jpg"], f"sample {i}: the JPEG was re-encoded"
        stored = np.frombuffer(data, np.float32, 4, offset=int(bbox[i]))  # an NDArrayField holds a pointer
        assert stored.tolist() == pytest.approx(json.loads(s["json"])["bbox"], abs=1e-6)


def test_unknown_shard_range_is_a_clear_error(reference):
    with pytest.raises(ValueError, match="--shards 'zero-to-four'"):
        build(BuildConfig(input_dir=str(reference / "raw"), output_dir=str(reference / "fdf"),
                          shards="zero-to-four", val_fraction=0.2, progress=False))
