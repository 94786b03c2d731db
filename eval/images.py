"""Photos in and out of the anonymization jobs: read upright as RGB (with any alpha), write atomically.

Shared by `anonymize`, the WIDER job and the identity job, so every job sees a photo the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fdf_core.errors import InputError
from fdf_core.tario import atomic_path

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
JPEG_QUALITY = 95


def read_image(path: Path) -> tuple[np.ndarray, Image.Image | None]:
    """RGB uint8 pixels upright (EXIF orientation applied) and the alpha channel, if any."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            alpha = im.convert("RGBA").getchannel("A") if has_alpha else None
            return np.array(im.convert("RGB")), alpha
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None


def write_image(path: Path, rgb: np.ndarray, alpha: Image.Image | None) -> None:
    """Write atomically in the format of the extension; alpha kept where the format has it."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}")
    im = Image.fromarray(rgb)
    if alpha is not None and fmt != "JPEG":
        im.putalpha(alpha)
    with atomic_path(path) as tmp:
        im.save(tmp, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
