"""`anonymize INPUT OUTPUT`: anonymize the faces of a photo, a video, or a folder of both.

    anonymize photo.jpg out.jpg --checkpoint runs/train/12m/checkpoints/final.ckpt
    anonymize clip.mp4 clip_anon.mp4 --batch_size 32 --device cuda
    anonymize photos/ anonymized/ --method pixelation_16x16

A folder is walked recursively and mirrored into OUTPUT (photos and videos by extension; other
files are skipped and counted). A photo in which no face is found is copied byte for byte; other
photos are written in the format of their extension (JPEG quality 95), without the source's
metadata. Videos keep their frame rate and audio (`eval.video`). The options of the run are saved
as `<OUTPUT>.options.json` beside a file output, or `<OUTPUT>/anonymize_options.json`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from data_prep.tario import atomic_write_json
from eval.anonymizer import Anonymizer, AnonymizerConfig
from eval.video import VideoOptions, anonymize_video, is_video

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
JPEG_QUALITY = 95


@dataclass(kw_only=True)
class AnonymizeConfig(AnonymizerConfig, VideoOptions):
    """A photo, a video or a folder to anonymize (see :class:`AnonymizerConfig`, :class:`VideoOptions`).

    input: photo, video or folder
    output: file of the same kind, or a folder for a folder
    progress: show progress bars
    """

    input: str
    output: str
    progress: bool = True


def _fields_of(cls, cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cls)}


def read_image(path: Path) -> tuple[np.ndarray, Image.Image | None]:
    """RGB uint8 pixels upright (EXIF orientation applied) and the alpha channel, if any."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            alpha = im.convert("RGBA").getchannel("A") if has_alpha else None
            return np.array(im.convert("RGB")), alpha
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def write_image(path: Path, rgb: np.ndarray, alpha: Image.Image | None) -> None:
    """Write atomically in the format of the extension; alpha kept where the format has it."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}")
    im = Image.fromarray(rgb)
    if alpha is not None and fmt != "JPEG":
        im.putalpha(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        im.save(tmp, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def anonymize_images(anonymizer: Anonymizer, pairs: list[tuple[Path, Path]], progress: bool = True) -> dict:
    """Photos `src → dst`, `batch_size` at a time through the detector; counts per outcome."""
    stats = {"images": 0, "images_with_faces": 0, "faces": 0, "faces_without_pose": 0, "copied_unchanged": 0}
    step = anonymizer.cfg.batch_size
    with tqdm(total=len(pairs), unit="img", desc="photos", disable=not progress) as bar:
        for start in range(0, len(pairs), step):
            chunk = pairs[start:start + step]
            loaded = [read_image(src) for src, _ in chunk]
            images = [rgb for rgb, _ in loaded]
            faces = anonymizer.find_faces(images)
            with_faces = [i for i, f in enumerate(faces) if len(f)]
            outputs = anonymizer.anonymize([images[i] for i in with_faces], [faces[i] for i in with_faces])
            for i, out in zip(with_faces, outputs):
                write_image(chunk[i][1], out, loaded[i][1])
            for i, (src, dst) in enumerate(chunk):
                if not len(faces[i]):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
            stats["images"] += len(chunk)
            stats["images_with_faces"] += len(with_faces)
            stats["faces"] += sum(len(f) for f in faces)
            stats["faces_without_pose"] += sum(f.num_without_pose for f in faces)
            stats["copied_unchanged"] += len(chunk) - len(with_faces)
            bar.update(len(chunk))
    return stats


def run(cfg: AnonymizeConfig) -> dict:
    """Anonymize `cfg.input` into `cfg.output`; returns (and prints) a summary."""
    start = time.perf_counter()
    src, dst = Path(cfg.input), Path(cfg.output)
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    if src.resolve() == dst.resolve():
        raise ValueError(f"output {dst} would overwrite the input")
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"input {src} is a folder: output {dst} must be a folder too")
        files = sorted(p for p in src.rglob("*") if p.is_file() and dst.resolve() not in p.resolve().parents)
        photos = [(p, dst / p.relative_to(src)) for p in files if p.suffix.lower() in IMAGE_EXTS]
        videos = [(p, dst / p.relative_to(src)) for p in files if is_video(p)]
        skipped = len(files) - len(photos) - len(videos)
        options_file = dst / "anonymize_options.json"
    else:
        kind_in, kind_out = is_video(src), is_video(dst)
        if kind_in != kind_out or (not kind_in and dst.suffix.lower() not in IMAGE_EXTS):
            raise ValueError(f"output {dst} must be a {'video' if kind_in else 'photo'} file like the input "
                             f"(photos: {', '.join(IMAGE_EXTS)})")
        if not kind_in and src.suffix.lower() not in IMAGE_EXTS:
            raise ValueError(f"input {src}: not a photo ({', '.join(IMAGE_EXTS)}) or a video")
        photos, videos = ([], [(src, dst)]) if kind_in else ([(src, dst)], [])
        skipped = 0
        options_file = dst.with_name(dst.name + ".options.json")
    atomic_write_json(options_file, asdict(cfg))
    anonymizer = Anonymizer(cfg)
    summary = {"method": cfg.method, **anonymize_images(anonymizer, photos, cfg.progress), "videos": []}
    video_opts = VideoOptions(**_fields_of(VideoOptions, cfg))
    for v_src, v_dst in videos:
        summary["videos"].append({"file": str(v_src), **anonymize_video(anonymizer, v_src, v_dst, video_opts,
                                                                        cfg.progress)})
    summary.update(skipped_files=skipped, seconds=round(time.perf_counter() - start, 3))
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    from jsonargparse import ActionConfigFile, ArgumentParser
    parser = ArgumentParser(prog="anonymize", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=str, help="photo, video or folder")
    parser.add_argument("output", type=str, help="file of the same kind, or a folder")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options")
    parser.add_class_arguments(AnonymizeConfig, as_group=False, skip={"input", "output"})
    ns = parser.parse_args(argv).as_dict()
    ns.pop("config", None)
    return run(AnonymizeConfig(**ns))


if __name__ == "__main__":
    main()
