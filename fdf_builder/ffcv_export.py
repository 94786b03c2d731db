"""Optional FFCV copy of an FDF split (`pip install fdf[ffcv]`; needs libturbojpeg and OpenCV).

The image field holds the shards' JPEG bytes unchanged (FFCV's own RGBImageField would decode and
re-encode them, a second lossy generation: pixels up to 29 levels off the tar's), so training from
the `.beton` sees the same faces as training from the tars (FORMAT.md §2).

ffcv 1.0.2's writer hangs instead of failing when a worker raises, so every sample is decoded and
checked in this process first; the workers then only read bytes we know to be good.
"""
from __future__ import annotations

import copy
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
        """(JPEG bytes as a uint8 array, bbox (4,), keypoints (K,3), provenance dict)."""
        path, jo, js, mo, ms = self.items[i]
        meta = json.loads(self._read(path, mo, ms))
        return (np.frombuffer(self._read(path, jo, js), np.uint8), np.asarray(meta["bbox"], np.float32),
                np.asarray(meta["keypoints"], np.float32), meta)


def _check_samples(index: _TarIndex) -> tuple[int, tuple[int, ...]]:
    """(crop size, keypoints shape) shared by every sample; raises naming the first bad one."""
    resolution = kps_shape = None
    for i in range(len(index)):  # validate before the writer's workers see anything
        jpg, bbox, kps, _ = index[i]
        path = index.items[i][0]
        try:
            image = Image.open(io.BytesIO(jpg.tobytes()))
            image.load()
        except OSError as e:
            raise ValueError(f"{path}: sample {i}: unreadable JPEG ({e})") from None
        resolution, kps_shape = resolution or image.size[0], kps_shape or kps.shape
        if (image.format != "JPEG" or image.mode != "RGB" or image.size != (resolution, resolution)
                or bbox.shape != (4,) or kps.shape != kps_shape or kps.shape[1] != 3):
            raise ValueError(f"{path}: sample {i} is a {image.format} {image.mode} {image.size} image, box "
                             f"{bbox.shape}, keypoints {kps.shape}; expected an RGB JPEG of {resolution}x"
                             f"{resolution}, (4,) and {kps_shape or '(K, 3)'}")
    return resolution, kps_shape


def _jpeg_field(resolution: int):
    """An RGBImageField that stores the JPEG bytes it is given as they are (mode jpg, no re-encode).

    The file still declares a plain RGBImageField (`_Writer`), so any FFCV reader decodes it.
    """
    from ffcv.fields import RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES

    class StoredJpegField(RGBImageField):
        def encode(self, destination, jpg, malloc):
            destination["mode"] = IMAGE_MODES["jpg"]
            destination["height"] = destination["width"] = resolution
            destination["data_ptr"], storage = malloc(jpg.nbytes)
            storage[:] = jpg

    return StoredJpegField(write_mode="jpg", max_resolution=resolution)


def _writer(path: str, fields: dict, num_workers: int):
    """ffcv's DatasetWriter, whose header declares our field subclasses as their FFCV base type
    (it looks up `type(field)` exactly and would write an unknown-type id)."""
    from ffcv.fields import RGBImageField
    from ffcv.writer import DatasetWriter

    class Writer(DatasetWriter):
        def prepare(self):
            encoding = self.fields
            declared = {}
            for name, field in encoding.items():
                declared[name] = copy.copy(field)
                if isinstance(field, RGBImageField):
                    declared[name].__class__ = RGBImageField
            self.fields = declared
            try:
                super().prepare()
            finally:
                self.fields = encoding  # the workers (forked later) encode with ours

    return Writer(path, fields, num_workers=num_workers)


def export_ffcv(fdf_dir: str | Path, split: str, num_workers: int = 2) -> Path | None:
    """Write `<fdf_dir>/<split>.beton` with fields image, bbox, keypoints, meta (provenance)."""
    try:
        from ffcv.fields import JSONField, NDArrayField
    except ImportError as e:
        raise ImportError(f"--ffcv needs the ffcv package (pip install 'fdf[ffcv]'): {e}") from e
    fdf_dir = Path(fdf_dir)
    tars = sorted((fdf_dir / split).glob("*.tar"))
    index = _TarIndex(tars)
    if len(index) == 0:
        log.info("no %s faces, no FFCV file written", split)
        return None
    resolution, kps_shape = _check_samples(index)
    out = fdf_dir / f"{split}.beton"
    fields = {"image": _jpeg_field(resolution),
              "bbox": NDArrayField(np.dtype("float32"), (4,)),
              "keypoints": NDArrayField(np.dtype("float32"), tuple(kps_shape)),
              "meta": JSONField()}
    with atomic_path(out) as tmp:
        _writer(str(tmp), fields, num_workers).from_indexed_dataset(index)
    log.info("wrote %d %s samples to %s", len(index), split, out)
    return out
