"""`fdf-ingest`: a local folder of photos → raw image shards (FORMAT.md §1), no URLs needed.

Users with photos of their own (or a research face set such as UTKFace) get the same raw shards
as `fdf-download` writes, so `fdf-build` and everything after it work unchanged: the same plan
(stable keys from the sorted relative paths, fixed once), the same per-shard tar + status parquet
+ stats JSON written last, the same verification of every image (decodable, a format the builder
reads, no decompression bomb), the same resume by shard.

Every photo needs a license and an attribution, because every face cut from it carries them
(FORMAT.md §2): give them for the whole folder (`--license_name`, `--license_url`, `--author`,
`--page_url`) and/or per file in a TSV (`--attribution`, header `file` plus any of those columns,
`file` relative to the folder); the TSV wins where it has a value. A photo with no license name
is an error before anything is written.

In the plan and in the shards, `photo_id` and `url` hold the path relative to the folder (the
train/val split hashes `photo_id`, so it is stable), and `source` the folder itself.
"""
from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from data_prep import plan
from data_prep.download import FetchError, Result, verify_image, write_shards
from fdf_core.tario import atomic_write_json
from fdf_core.errors import ConfigError, InputError, MissingInputError, NothingToDoError
from fdf_core.shards import parse_shards

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ATTRIBUTION_COLUMNS = ("license_name", "license_url", "author", "page_url")
FOLDER_PLAN_VERSION = 1


@dataclass
class IngestConfig:
    """Options of one ingest run; saved as options.json beside the shards.

    Args:
        image_dir: folder of photos (searched recursively; jpg, jpeg, png, webp, bmp, gif, tif)
        output_dir: raw shards, as fdf-download writes them
        license_name: license of every photo of the folder (e.g. "CC BY 2.0")
        license_url: URL of that license
        author: author of every photo of the folder
        page_url: page of the photos
        attribution: TSV with a `file` column (path relative to image_dir) and any of license_name,
            license_url, author, page_url: per-photo values, which win over the folder-wide ones
        shard_size: photos per shard (at most 10000: 4-digit index in keys)
        shards: shards to write: N, A:B, A:, :B or a comma list (fdf_core.shards); default all
        threads: files read and verified in parallel per shard
        max_bytes: larger files are refused (too_large)
        max_pixels: photos with more pixels are refused (decompression_bomb)
        progress: show progress bars
    """

    image_dir: str
    output_dir: str
    license_name: str | None = None
    license_url: str | None = None
    author: str | None = None
    page_url: str | None = None
    attribution: str | None = None
    shard_size: int = 10000
    shards: str | None = None
    threads: int = 4
    max_bytes: int = 30 * 1024 * 1024
    max_pixels: int = Image.MAX_IMAGE_PIXELS
    progress: bool = True

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        parse_shards(self.shards)


def list_photos(image_dir: Path) -> list[str]:
    """Relative POSIX paths of the photos under `image_dir`, sorted (the plan's order)."""
    if not image_dir.is_dir():
        raise MissingInputError(f"--image_dir {image_dir}: no such folder")
    return sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def read_attribution(path: Path) -> dict[str, dict[str, str]]:
    """`{file: {column: value}}` of the attribution TSV (empty cells are left out)."""
    if not path.is_file():
        raise MissingInputError(f"--attribution {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if "file" not in (reader.fieldnames or []):
            raise InputError(f"{path}: line 1 must be a header with a `file` column (and any of "
                             f"{', '.join(ATTRIBUTION_COLUMNS)})")
        unknown = set(reader.fieldnames) - {"file", *ATTRIBUTION_COLUMNS}
        if unknown:
            raise InputError(f"{path}: line 1: unknown column(s) {sorted(unknown)}")
        return {row["file"]: {k: v for k, v in row.items() if k != "file" and v} for row in reader}


def _options(cfg: IngestConfig, files: list[str], attribution: dict[str, dict[str, str]]) -> dict:
    """What decides the plan's content: the folder, its file list, the attribution, shard size."""
    digest = hashlib.sha1("\n".join(files).encode()).hexdigest()[:16]
    blob = repr(sorted((k, sorted(v.items())) for k, v in attribution.items())).encode()
    return {"image_dir": str(Path(cfg.image_dir).expanduser().resolve()), "files": len(files),
            "files_sha1": digest, "attribution_sha1": hashlib.sha1(blob).hexdigest()[:16],
            **{k: getattr(cfg, k) for k in ATTRIBUTION_COLUMNS}, "shard_size": cfg.shard_size,
            "version": FOLDER_PLAN_VERSION}


def plan_rows(cfg: IngestConfig, files: list[str], attribution: dict[str, dict[str, str]]) -> list[dict]:
    """One plan row per photo, with its attribution; an error names the first photo without a license."""
    source = str(Path(cfg.image_dir).expanduser().resolve())
    rows = []
    for i, rel in enumerate(files):
        values = {k: getattr(cfg, k) or "" for k in ATTRIBUTION_COLUMNS} | attribution.get(rel, {})
        if not values["license_name"]:
            raise ConfigError(f"{Path(cfg.image_dir) / rel}: no license: give --license_name for the "
                             "folder or a license_name column in --attribution")
        rows.append({"photo_id": rel, "line_index": i, "source": source, "user_nsid": "",
                     "author": values["author"], "title": Path(rel).stem, "page_url": values["page_url"],
                     "url": rel, "license_name": values["license_name"],
                     "license_url": values["license_url"], "license": ""})
    return rows


def read_photo(image_dir: Path, rel: str, max_bytes: int, max_pixels: int) -> Result:
    """A planned photo's bytes, verified like a download (same error reasons)."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:  # plans list paths inside the folder only
        return Result("error", "bad_url")
    path = image_dir / rel
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return Result("error", "too_large")
        data = path.read_bytes()
    except FileNotFoundError:
        return Result("error", "missing")
    except OSError:
        return Result("error", "unreadable")
    try:
        fmt, width, height = verify_image(data, max_pixels)
    except FetchError as e:
        return Result("error", e.reason)
    return Result("ok", None, None, data, 0.0, fmt, width, height)


def run(cfg: IngestConfig) -> dict:
    """Plan the folder (once), then write every raw shard of `cfg.shards` that is not done."""
    image_dir = Path(cfg.image_dir).expanduser()
    out = Path(cfg.output_dir)
    files = list_photos(image_dir)
    if not files:
        raise NothingToDoError(f"--image_dir {image_dir}: no photos ({', '.join(PHOTO_SUFFIXES)}) in it")
    attribution = read_attribution(Path(cfg.attribution)) if cfg.attribution else {}
    options = _options(cfg, files, attribution)
    the_plan = plan.load_plan(out, options)
    if the_plan is None:
        rows = plan_rows(cfg, files, attribution)  # before writing: a missing license stops here
        out.mkdir(parents=True, exist_ok=True)
        the_plan = plan.write_plan(out, options, rows, cfg.shard_size, Counter(lines=len(rows), kept=len(rows)))
    atomic_write_json(out / "options.json", asdict(cfg))
    resolved = image_dir.resolve()
    return write_shards(out, the_plan, cfg.shards,
                        lambda rec: read_photo(resolved, rec["url"], cfg.max_bytes, cfg.max_pixels),
                        cfg.threads, cfg.progress)

