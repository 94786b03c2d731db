"""`anonymize INPUT OUTPUT`: anonymize the faces of a photo, a video, or a folder of both.

    anonymize photo.jpg out.jpg --checkpoint runs/train/12m/checkpoints/final.ckpt
    anonymize clip.mp4 clip_anon.mp4 --batch_size 32 --device cuda
    anonymize photos/ anonymized/ --method pixelation_16x16

A folder is walked recursively and mirrored into OUTPUT (photos and videos by extension; other
files are ignored and counted). A photo in which no face is found is copied byte for byte; other
photos are written in the format of their extension (JPEG quality 95), without the source's
metadata. Videos keep their frame rate and audio (`eval.video`). The options of the run are saved
as `<OUTPUT>.options.json` beside a file output, or `<OUTPUT>/anonymize_options.json`, with the
model that painted resolved (`checkpoint`: its file, `model_name`: its card's name, `crop_rule`, the
latent scales of photos and videos).

One unreadable photo or video in a folder does not stop the others: it is skipped with its reason,
every good file is written, and the summary (JSON on stdout) lists the skipped files; the command
then exits with status 5 (fdf_core.errors). A folder with no photo or video is an error (exit 4)
unless `--allow_empty true`.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from fdf_core.tario import atomic_write_json
from eval.anonymizer import Anonymizer, AnonymizerConfig
from eval.images import IMAGE_EXTS, read_image, write_image
from eval.video import VideoOptions, anonymize_video, is_video
from fdf_core.errors import ConfigError, InputError, MissingInputError, NothingToDoError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AnonymizeConfig(AnonymizerConfig, VideoOptions):
    """A photo, a video or a folder to anonymize (see :class:`AnonymizerConfig`, :class:`VideoOptions`).

    Args:
        input: photo, video or folder
        output: file of the same kind, or a folder for a folder
        progress: show progress bars
        allow_empty: a folder without photos or videos is not an error
    """

    input: str
    output: str
    progress: bool = True
    allow_empty: bool = False


def _fields_of(cls, cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cls)}


def saved_options(cfg: AnonymizeConfig, anonymizer: Anonymizer) -> dict:
    """The options to save: the config with the model it left to defaults resolved, so the file says
    what painted the faces. `checkpoint` is the model file used (the shipped model or
    $FDF_GENERATOR_CHECKPOINT when --checkpoint was not given), `model_name` its card's name (None for
    a baseline), `crop_rule` the rule faces were cut by (the model's unless overridden) and
    `context_margins` the band of photo the generator was shown around each box (None: the whole crop),
    `latent_photos` / `latent_videos` the latent scales photos and videos were painted with."""
    options = {**asdict(cfg), "model_name": anonymizer.model_name}
    if anonymizer.generator is not None:
        options.update(checkpoint=str(anonymizer.checkpoint), crop_rule=anonymizer.crop_rule,
                       context_margins=anonymizer.context_margins,
                       latent_photos=cfg.latent_for(video=False), latent_videos=cfg.latent_for(video=True))
    return options


def video_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a video (None if its first frame decodes): checked before the
    video is started, so that a broken file is skipped like an unreadable photo."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return "cannot be opened as a video"
        ok, _ = cap.read()
        return None if ok else "no frame could be decoded"
    finally:
        cap.release()


def _readable(pairs: list[tuple[Path, Path]]) -> tuple[list, list, list[dict]]:
    """(pairs whose photo decodes, their pixels, the others as `skipped` entries: file and reason)."""
    good, loaded, skipped = [], [], []
    for src, dst in pairs:
        try:
            loaded.append(read_image(src))
        except InputError as err:
            log.warning("skipped %s", err)
            skipped.append({"file": str(src), "reason": str(err).removeprefix(f"{src}: ")})
            continue
        good.append((src, dst))
    return good, loaded, skipped


def _read_and_find(anonymizer: Anonymizer, pairs: list[tuple[Path, Path]]) -> tuple[list, list, list, list[dict]]:
    """The first half of a chunk's work, run ahead on a thread of its own: the readable photos, their
    pixels, their faces (detector and keypoint model) and the skipped ones."""
    good, loaded, skipped = _readable(pairs)
    faces = anonymizer.find_faces([rgb for rgb, _ in loaded]) if good else []
    return good, loaded, faces, skipped


def _write_or_copy(src: Path, dst: Path, out: np.ndarray | None, alpha) -> None:
    """`out` written to `dst` in its format, or, for a photo without faces (`out` None), `src` copied
    byte for byte."""
    if out is None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    else:
        write_image(dst, out, alpha)


class _Writes:
    """Writes finished photos on a thread of their own, at most `limit` of them waiting in memory.

    The first failed write is raised by the next `submit` or by `wait`, after the writes handed over
    before it are on disk."""

    def __init__(self, pool: ThreadPoolExecutor, limit: int) -> None:
        self.pool, self.limit, self.pending = pool, limit, deque()

    def submit(self, *job) -> None:
        self.pending.append(self.pool.submit(_write_or_copy, *job))
        while len(self.pending) > self.limit or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()

    def wait(self, errors: bool = True) -> None:
        """Until every write handed over is done; its first error raised (`errors`) or only logged."""
        while self.pending:
            job = self.pending.popleft()
            if errors:
                job.result()
            elif job.exception() is not None:
                log.error("a photo was not written: %s", job.exception())


def anonymize_images(anonymizer: Anonymizer, pairs: list[tuple[Path, Path]], progress: bool = True,
                     skipped: list[dict] | None = None) -> dict:
    """Photos `src → dst`, `batch_size` at a time through the detector; counts per outcome.

    A photo that cannot be read is skipped and appended to `skipped` (file, reason); the others are
    written whatever happens to it. Three stages overlap: the next chunk is read and its faces found
    (detector, keypoint model) on one thread while this chunk is painted (generator, paste-back), and
    the finished photos are written on another (:class:`_Writes`). Why: painting is partly
    single-threaded Python and numpy, and decoding and encoding run in C without the GIL, so in turn
    a 2-core machine stood a fifth idle (161 % CPU); overlapped, and with the detector's threads
    sleeping between calls (`OnnxNetwork`), the 62 corpus photos take 12.4 s where they took 14.3 s
    (start-up included, `benchmarks/anonymize.py --versus_release`). Outputs and counts are those of
    doing the chunks in turn. Memory: up to three chunks of photos at once (the one read ahead, the
    one painted, the writes waiting), against two before.
    """
    stats = {"images": 0, "images_with_faces": 0, "faces": 0, "faces_without_pose": 0, "small_faces": 0,
             "copied_unchanged": 0}
    skipped = [] if skipped is None else skipped
    step = anonymizer.cfg.batch_size
    chunks = [pairs[start:start + step] for start in range(0, len(pairs), step)]
    with ThreadPoolExecutor(1, thread_name_prefix="find") as finds, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as pool, \
            tqdm(total=len(pairs), unit="img", desc="photos", disable=not progress) as bar:
        writes = _Writes(pool, limit=step)
        try:
            ahead = finds.submit(_read_and_find, anonymizer, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                chunk, loaded, faces, bad = ahead.result()
                if k + 1 < len(chunks):
                    ahead = finds.submit(_read_and_find, anonymizer, chunks[k + 1])
                skipped.extend(bad)
                bar.update(len(bad))
                if chunk:
                    _paint_chunk(anonymizer, chunk, loaded, faces, writes, stats)
                    bar.update(len(chunk))
        except BaseException:
            writes.wait(errors=False)  # what was painted reaches disk; the first error is the one raised
            raise
        writes.wait()
    return stats


def _paint_chunk(anonymizer: Anonymizer, chunk: list[tuple[Path, Path]], loaded: list, faces: list,
                 writes: _Writes, stats: dict) -> None:
    """Paint the found faces of one chunk of read photos, hand each output to `writes`, count."""
    images = [rgb for rgb, _ in loaded]
    with_faces = [i for i, f in enumerate(faces) if len(f)]
    small_before = anonymizer.counts["small_faces"]  # not painted: small_face_method (counted there)
    outputs = dict(zip(with_faces, anonymizer.anonymize([images[i] for i in with_faces],
                                                        [faces[i] for i in with_faces])))
    stats["small_faces"] += anonymizer.counts["small_faces"] - small_before
    for i, (src, dst) in enumerate(chunk):
        writes.submit(src, dst, outputs.get(i), loaded[i][1])
    stats["images"] += len(chunk)
    stats["images_with_faces"] += len(with_faces)
    stats["faces"] += sum(len(f) for f in faces)
    unposed = [anonymizer.small(f.boxes, anonymizer.cfg.pose_min_size) if anonymizer.generator is not None
               else np.zeros(len(f), bool) for f in faces]
    stats["faces_without_pose"] += sum(k is None for f, s in zip(faces, unposed)  # pose sought, not found
                                       for k, tiny in zip(f.keypoints, s) if not tiny)
    stats["copied_unchanged"] += len(chunk) - len(with_faces)


def _folder_jobs(src: Path, dst: Path, allow_empty: bool) -> tuple[list, list, int]:
    """(photo pairs, video pairs, count of other files) of a folder mirrored into `dst`."""
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"input {src} is a folder: output {dst} must be a folder too")
    files = sorted(p for p in src.rglob("*") if p.is_file() and dst.resolve() not in p.resolve().parents)
    photos = [(p, dst / p.relative_to(src)) for p in files if p.suffix.lower() in IMAGE_EXTS]
    videos = [(p, dst / p.relative_to(src)) for p in files if is_video(p)]
    if not photos and not videos and not allow_empty:
        raise NothingToDoError(f"input {src}: no photo ({', '.join(IMAGE_EXTS)}) or video in the folder "
                               f"({len(files)} other files); check the path, or pass --allow_empty true")
    return photos, videos, len(files) - len(photos) - len(videos)


def _file_jobs(src: Path, dst: Path) -> tuple[list, list]:
    """The one photo or video pair; the input's kind is checked first, then the output's."""
    kind_in = is_video(src)
    if not kind_in and src.suffix.lower() not in IMAGE_EXTS:
        raise InputError(f"input {src}: not a photo ({', '.join(IMAGE_EXTS)}) or a video (.mp4, .mov, ...) "
                         "by its extension")
    if kind_in != is_video(dst) or (not kind_in and dst.suffix.lower() not in IMAGE_EXTS):
        raise ConfigError(f"output {dst} must be a {'video' if kind_in else 'photo'} file like the input "
                          f"{src.name} (photos: {', '.join(IMAGE_EXTS)})")
    if kind_in and (problem := video_problem(src)):
        raise InputError(f"{src}: {problem}")
    if not kind_in:
        read_image(src)  # an unreadable photo is an error before anything is written or loaded
    return ([], [(src, dst)]) if kind_in else ([(src, dst)], [])


def _readable_videos(videos: list[tuple[Path, Path]], skipped: list[dict]) -> list[tuple[Path, Path]]:
    good = []
    for v_src, v_dst in videos:
        if problem := video_problem(v_src):
            log.warning("skipped %s: %s", v_src, problem)
            skipped.append({"file": str(v_src), "reason": problem})
        else:
            good.append((v_src, v_dst))
    return good


def run(cfg: AnonymizeConfig) -> dict:
    """Anonymize `cfg.input` into `cfg.output`; returns a summary.

    The summary counts what was `written` and lists what was `skipped` (file and reason); a folder
    goes on past unreadable files, a single unreadable input is an :class:`InputError`.
    """
    start = time.perf_counter()
    src, dst = Path(cfg.input), Path(cfg.output)
    if not src.exists():
        raise MissingInputError(f"input {src} does not exist")
    if src.resolve() == dst.resolve():
        raise ConfigError(f"output {dst} would overwrite the input")
    skipped: list[dict] = []
    if src.is_dir():
        photos, videos, ignored = _folder_jobs(src, dst, cfg.allow_empty)
        videos = _readable_videos(videos, skipped)
        options_file = dst / "anonymize_options.json"
    else:
        (photos, videos), ignored = _file_jobs(src, dst), 0
        options_file = dst.with_name(dst.name + ".options.json")
    anonymizer = Anonymizer(cfg)
    atomic_write_json(options_file, saved_options(cfg, anonymizer))
    summary = {"method": cfg.method, **({"generator": anonymizer.generator_name} if anonymizer.generator_name else {}),
               **anonymize_images(anonymizer, photos, cfg.progress, skipped), "videos": []}
    video_opts = VideoOptions(**_fields_of(VideoOptions, cfg))
    for v_src, v_dst in videos:
        summary["videos"].append({"file": str(v_src), **anonymize_video(anonymizer, v_src, v_dst, video_opts,
                                                                        cfg.progress)})
    summary.update(written=summary["images"] + len(summary["videos"]), skipped=skipped, ignored_files=ignored,
                   seconds=round(time.perf_counter() - start, 3))
    return summary

