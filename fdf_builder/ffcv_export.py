"""Optional FFCV copy of an FDF split (`pip install fdf[ffcv]`; needs libturbojpeg and OpenCV).

ffcv 1.0.2's writer hangs instead of failing when a worker raises, so every sample is decoded and
checked in this process first; the workers then only read bytes we know to be good.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from fdf_core.tario import atomic_path, check_member_name

log = logging.getLogger(__name__)


class _TarIndex:
    """Random access to the samples of webdataset shards through tar member offsets (picklable)."""

    def __init__(self, tars: list[Path]):
        self.items: list[tuple[str, int, int, int, int]] = []  # tar, jpg off/size, json off/size
        for tar_path in tars:
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    check_member_name(tar_path, m.name)
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = m
            for key, files in members.items():
                if "jpg" not in files or "json" not in files:
                    raise ValueError(f"{tar_path}: sample {key!r} lacks a .jpg or .json member")
                j, m = files["jpg"], files["json"]
                self.items.append((str(tar_path), j.offset_data, j.size, m.offset_data, m.size))

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _read(path: str, offset: int, size: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def __getitem__(self, i: int):
        path, jo, js, mo, ms = self.items[i]
        image = np.asarray(Image.open(io.BytesIO(self._read(path, jo, js))).convert("RGB"))
        meta = json.loads(self._read(path, mo, ms))
        return (image, np.asarray(meta["bbox"], np.float32),
                np.asarray(meta["keypoints"], np.float32), meta)


def export_ffcv(fdf_dir: str | Path, split: str, num_workers: int = 2,
                write_mode: str = "jpg", jpeg_quality: int = 95) -> Path | None:
    """Write `<fdf_dir>/<split>.beton` with fields image, bbox, keypoints, meta (provenance)."""
    try:
        from ffcv.fields import JSONField, NDArrayField, RGBImageField
        from ffcv.writer import DatasetWriter
    except ImportError as e:
        raise ImportError(f"--ffcv needs the ffcv package (pip install 'fdf[ffcv]'): {e}") from e
    fdf_dir = Path(fdf_dir)
    tars = sorted((fdf_dir / split).glob("*.tar"))
    index = _TarIndex(tars)
    if len(index) == 0:
        log.info("no %s faces, no FFCV file written", split)
        return None
    resolution = None
    for i in range(len(index)):  # validate before the writer's workers see anything
        image, bbox, kps, _ = index[i]
        resolution = resolution or image.shape[0]
        if image.shape != (resolution, resolution, 3) or bbox.shape != (4,) or kps.shape[1] != 3:
            path = index.items[i][0]
            raise ValueError(f"{path}: sample {i} has shapes {image.shape}, {bbox.shape}, {kps.shape}")
    out = fdf_dir / f"{split}.beton"
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=resolution,
                                     jpeg_quality=jpeg_quality),
              "bbox": NDArrayField(np.dtype("float32"), (4,)),
              "keypoints": NDArrayField(np.dtype("float32"), tuple(kps.shape)),
              "meta": JSONField()}
    with atomic_path(out) as tmp:
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(index)
    log.info("wrote %d %s samples to %s", len(index), split, out)
    return out
