"""Raw image shards → FDF webdataset shards, one output shard set per input shard.

Resumable by shard (img2dataset-style): an input shard is done when `stats/<shard>.json` exists;
its tar files are written atomically before that file, so a killed build redoes at most the shards
it was in the middle of, and a rerun writes byte-identical shards (batches never cross shards, so
the detector sees the same batches). Formats: FORMAT.md §2.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from fdf_core.tario import AtomicTarWriter, atomic_write_json, iter_samples, json_bytes, remove_partial
from fdf_builder import crop as fdfcrop
from fdf_builder.face_models import FaceModels, FaceModelsConfig, load_face_models
from fdf_builder.shards import selected_raw_shards, split_of
from fdf_core.errors import ConfigError, NothingToDoError
from fdf_core.keypoints import KEYPOINT_NAMES
from fdf_core.shards import parse_shards

SPLITS = ("train", "val")
log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(kw_only=True)
class BuildConfig(FaceModelsConfig):
    """Options of one build; saved as options.json beside the shards.

    Args:
        input_dir: data_prep output (raw shards)
        output_dir: FDF shards, stats/, sizes.json, index.json
        shards: raw shards to build: N, A:B, A:, :B or a comma list (README); default all
        resolution: side of the stored crops
        min_crop_size: FDF drops crops narrower than this (face side >~ 75 px)
        crop_rule: fdf: FDF's crop (capped at the photo border); pad: always 1.7x, zero-padded (tight
            face crops)
        val_fraction: FDF: 50k of 1.47M faces, split by photo here
        processes: shards built in parallel, each in its own single-threaded process
        jpeg_quality: of the stored crops
        ffcv: also write <output_dir>/<split>.beton (needs the `ffcv` extra)
        progress: tqdm bar with img/s and faces/s
        allow_empty: no raw shard in --input_dir (or in --shards) is not an error (exit 4 otherwise)
    """
    input_dir: str
    output_dir: str
    shards: str | None = None
    resolution: int = 128
    min_crop_size: int = 128
    crop_rule: str = "fdf"
    val_fraction: float = 0.034
    processes: int = 1
    jpeg_quality: int = 95
    ffcv: bool = False
    progress: bool = True
    allow_empty: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_rule not in fdfcrop.CROP_RULES:
            raise ConfigError(f"--crop_rule must be one of {', '.join(fdfcrop.CROP_RULES)}, not {self.crop_rule!r}")
        parse_shards(self.shards)


@dataclass
class ShardStats:
    shard: str
    photos: int = 0
    photos_with_faces: int = 0
    faces_detected: int = 0
    faces: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    model_seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["dropped"] = dict(sorted(self.dropped.items()))
        d["faces_kept"] = sum(self.faces.values())
        d["photos_per_s"] = self.photos / self.seconds if self.seconds else 0.0
        d["faces_per_s"] = d["faces_kept"] / self.seconds if self.seconds else 0.0
        return d


def options_hash(cfg: BuildConfig) -> str:
    """Hash of the options that change shard content (not paths, ranges or UI)."""
    skip = {"input_dir", "output_dir", "shards", "progress", "ffcv", "batch_size", "processes", "device",
            "detector_runtime", "allow_download", "allow_empty"}
    content = {k: v for k, v in sorted(asdict(cfg).items()) if k not in skip}
    if content.get("crop_rule") == "fdf":  # the rule before the option existed: old builds keep their hash
        del content["crop_rule"]
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def _decode(sample: tuple[str, dict[str, bytes]]) -> tuple[str, dict, np.ndarray | None, str | None]:
    key, files = sample
    meta = json.loads(files["json"]) if "json" in files else {"key": key}
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return key, meta, None, "no_image_member"
    try:
        with Image.open(io.BytesIO(files[ext])) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            return key, meta, np.array(im), None  # writable: torch.from_numpy needs it
    except Exception:  # the raw stage verified decoding; a failure here means a damaged shard
        return key, meta, None, "decode_error"


def _prefetch(items: Iterable, fn, depth: int = 8) -> Iterator:
    """Map `fn` over `items` in a background thread pool, in order, at most `depth` ahead."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _batches(it: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def faces_of_photo(image: np.ndarray, meta: dict, det, cfg: BuildConfig, models: FaceModels,
                   stats: ShardStats) -> list[tuple[str, dict[str, bytes]]]:
    """Filter, annotate with keypoints, crop and describe every face of one photo (FORMAT.md §2).

    The size filter runs before the keypoint model: in crowds most faces are too small for FDF,
    and the keypoint model would be the slowest step for nothing.
    """
    height, width = image.shape[:2]
    crops = [fdfcrop.crop_box(box, (height, width), rule=cfg.crop_rule) for box in det.boxes]
    large = [i for i, c in enumerate(crops) if c.side >= cfg.min_crop_size]
    stats.dropped["too_small"] += len(crops) - len(large)
    if not large:
        return []
    t0 = time.perf_counter()
    kps = models.keypoints.keypoints_for_faces(image, det.boxes[large], det.scores[large])
    stats.model_seconds += time.perf_counter() - t0
    out = []
    for face_index, kp in zip(large, kps):
        if kp is None:
            stats.dropped["no_keypoints"] += 1
            continue
        box, crop = det.boxes[face_index], crops[face_index]
        pixels = fdfcrop.resize(fdfcrop.cut(image, crop.box), cfg.resolution)
        face_key = f"{meta['key']}_{face_index:02d}"
        record = {
            "key": face_key, "photo_key": meta["key"], "photo_id": meta.get("photo_id"),
            "line_index": meta.get("line_index"), "face_index": face_index,
            "resolution": cfg.resolution,
            "bbox": _rounded(fdfcrop.to_crop_coords(np.asarray(box).reshape(2, 2), crop).reshape(4)),
            "keypoints": _rounded(fdfcrop.to_crop_coords(kp, crop)),
            "keypoint_names": list(KEYPOINT_NAMES), "keypoint_backend": models.keypoints.name,
            "detector": models.detector.name, "detector_score": round(float(det.scores[face_index]), 5),
            "orig_bbox": _rounded(box, 2), "orig_keypoints": _rounded(kp, 2),
            "crop_box": list(crop.box), "crop_padded": crop.padded,
            "license_name": meta.get("license_name"), "license_url": meta.get("license_url"),
            "author": meta.get("author"), "user_nsid": meta.get("user_nsid"),
            "photo_url": meta.get("url"), "page_url": meta.get("page_url"),
        }
        out.append((face_key, {"jpg": _encode_jpeg(pixels, cfg.jpeg_quality), "json": json_bytes(record)}))
    return out


def _rounded(values, ndigits: int = 6) -> list:
    return np.round(np.asarray(values, dtype=np.float64), ndigits).tolist()


def build_shard(shard: str, cfg: BuildConfig, models: FaceModels,
                on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Annotate one raw shard and write its train/val FDF shards, then its stats file (last)."""
    out = Path(cfg.output_dir)
    stats = ShardStats(shard)
    start = time.perf_counter()
    for split in SPLITS:  # temporary files of a killed run
        remove_partial(out / split, f"{shard}.tar")
    remove_partial(out / "stats", f"{shard}.json")
    writers = {s: AtomicTarWriter(out / s / f"{shard}.tar") for s in SPLITS}
    try:
        samples = iter_samples(Path(cfg.input_dir) / f"{shard}.tar")
        for batch in _batches(_prefetch(samples, _decode), cfg.batch_size):
            stats.photos += len(batch)
            for _, _, image, err in batch:
                if err:
                    stats.dropped[err] += 1
            good = [(key, meta, image) for key, meta, image, err in batch if err is None]
            if not good:
                continue
            t0 = time.perf_counter()
            dets = models.detector.detect([image for _, _, image in good])
            stats.model_seconds += time.perf_counter() - t0
            for (key, meta, image), det in zip(good, dets):
                meta.setdefault("key", key)
                stats.faces_detected += len(det.boxes)
                if len(det.boxes) == 0:
                    stats.dropped["no_face_in_photo"] += 1
                faces = faces_of_photo(image, meta, det, cfg, models, stats)
                stats.photos_with_faces += bool(faces)
                split = split_of(meta.get("photo_id") or key, cfg.val_fraction)
                for face_key, files in faces:
                    writers[split].add_sample(face_key, files)
                    stats.faces[split] += 1
            if on_batch is not None:
                on_batch(len(batch), sum(stats.faces.values()))
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    stats.seconds = time.perf_counter() - start
    result = stats.to_json()
    atomic_write_json(out / "stats" / f"{shard}.json", result)  # last: marks the shard done
    return result


def write_index(cfg: BuildConfig, keypoint_names: list[str] | None = None) -> dict:
    """Rebuild sizes.json and index.json from every finished shard's stats file."""
    out = Path(cfg.output_dir)
    sizes, totals, dropped = {}, Counter(), Counter()
    for stats_file in sorted((out / "stats").glob("*.json")):
        st = json.loads(stats_file.read_text())
        for split in SPLITS:
            sizes[f"{split}/{st['shard']}.tar"] = st["faces"][split]
            totals[split] += st["faces"][split]
        dropped.update(st["dropped"])
        totals["photos"] += st["photos"]
    atomic_write_json(out / "sizes.json", sizes)
    index = {"splits": {s: totals[s] for s in SPLITS}, "photos": totals["photos"],
             "dropped": dict(sorted(dropped.items())), "resolution": cfg.resolution,
             "detector": cfg.detector, "keypoint_backend": cfg.keypoints,
             "keypoint_names": keypoint_names, "options_hash": options_hash(cfg),
             "shards": {s: sorted(k for k in sizes if k.startswith(s + "/")) for s in SPLITS}}
    atomic_write_json(out / "index.json", index)
    return index


@contextlib.contextmanager
def _one_torch_thread():
    """Models run single-threaded: float sums split over a different number of threads round
    differently, and shard bytes must not depend on the machine's core count. Parallelism comes
    from `processes` (one shard each) instead."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_WORKER: dict = {}


def _worker_init(cfg: BuildConfig) -> None:
    torch.set_num_threads(1)
    _WORKER["cfg"], _WORKER["models"] = cfg, load_face_models(cfg)


def _worker_build(shard: str) -> dict:
    return build_shard(shard, _WORKER["cfg"], _WORKER["models"])


def _build_all(cfg: BuildConfig, todo: list[str], bar: tqdm) -> Iterator[dict]:
    """Build the shards in this process, or in `cfg.processes` spawned workers (one shard each)."""
    start = time.perf_counter()
    faces_before = 0
    if cfg.processes <= 1:
        with _one_torch_thread():
            models = load_face_models(cfg)
            for shard in todo:
                def on_batch(n_photos: int, shard_faces: int) -> None:
                    bar.update(n_photos)
                    bar.set_postfix(faces=faces_before + shard_faces,
                                    faces_s=f"{(faces_before + shard_faces) / (time.perf_counter() - start):.2f}")
                st = build_shard(shard, cfg, models, on_batch)
                faces_before += st["faces_kept"]
                yield st
        return
    # Load the models here once first: a missing or wrong weight file is then one error, whereas a
    # Pool initializer that raises makes the pool start new workers for ever.
    load_face_models(cfg)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(cfg.processes, len(todo)), initializer=_worker_init, initargs=(cfg,)) as pool:
        for st in pool.imap_unordered(_worker_build, todo):
            faces_before += st["faces_kept"]
            bar.update(st["photos"])
            bar.set_postfix(faces=faces_before, faces_s=f"{faces_before / (time.perf_counter() - start):.2f}")
            yield st


def run(cfg: BuildConfig) -> dict:
    """Build every raw shard of `cfg.shards` that is not done yet; return the index."""
    out = Path(cfg.output_dir)
    available, todo_all = selected_raw_shards(cfg.shards, cfg.input_dir)
    if not todo_all and not cfg.allow_empty:
        where = f"--shards {cfg.shards} selects none of the {len(available)}" if available else "no"
        raise NothingToDoError(f"--input_dir {cfg.input_dir}: {where} finished raw shards (NNNNN.tar with "
                               "NNNNN_stats.json, written by fdf-download); check the folder, or pass "
                               "--allow_empty true")
    out.mkdir(parents=True, exist_ok=True)
    _check_options(cfg)
    todo = [s for s in todo_all if not (out / "stats" / f"{s}.json").exists()]
    log.info("%d of %d shards already done, %d to build → %s", len(todo_all) - len(todo), len(todo_all), len(todo), out)
    if todo:
        total_photos = sum(_count_photos(Path(cfg.input_dir), s) for s in todo)
        start = time.perf_counter()
        photos = faces = 0
        with tqdm(total=total_photos, unit="img", disable=not cfg.progress, dynamic_ncols=True) as bar:
            for st in _build_all(cfg, todo, bar):
                photos += st["photos"]
                faces += st["faces_kept"]
        secs = time.perf_counter() - start
        log.info("%d photos, %d faces in %.1fs (%.2f img/s, %.2f faces/s)", photos, faces, secs, photos / secs,
                 faces / secs)
    index = write_index(cfg, list(KEYPOINT_NAMES))
    log.info("faces per split %s | dropped: %s", index["splits"],
             ", ".join(f"{k}={v}" for k, v in index["dropped"].items()) or "none")
    if cfg.ffcv:
        from fdf_builder.ffcv_export import export_ffcv
        for split in SPLITS:
            export_ffcv(out, split)
    return index


def _check_options(cfg: BuildConfig) -> None:
    """Refuse to mix shards built with different content options in one output folder."""
    out = Path(cfg.output_dir)
    opts = {**asdict(cfg), "options_hash": options_hash(cfg)}
    path = out / "options.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("options_hash") != opts["options_hash"] and any((out / "stats").glob("*.json")):
            raise ConfigError(f"{path}: this output folder was built with other options "
                              f"(hash {old.get('options_hash')} != {opts['options_hash']}); "
                              "use a new --output_dir")
    atomic_write_json(path, opts)


def _count_photos(input_dir: Path, shard: str) -> int:
    stats = input_dir / f"{shard}_stats.json"
    try:
        return int(json.loads(stats.read_text()).get("ok", 0))
    except (OSError, ValueError):
        return 0
