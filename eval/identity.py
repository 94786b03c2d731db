"""Identity removal: does a face recognition model still match the anonymized face to the original?

For every detected face, a face-embedding network embeds the original face and the same box after
anonymization; the cosine distance between the two embeddings says how much identity is left. The
de-identification rate is the share of faces whose distance exceeds the model's verification
threshold, i.e. that the model would no longer accept as the same person (a related number reported
for video de-identification: TPR at FAR 0.001 on LFW 0.986 before, 0.038 after; docs/reference.md,
"Identity removal").

The embedder is any TorchScript module mapping a float `(B, 3, S, S)` RGB batch, normalized as
`(pixel - mean) / std`, to `(B, D)` embeddings, e.g. FaceNet (InceptionResnetV1, VGGFace2) traced
with `torch.jit.trace` and saved. None ships with this project: give the file with `--embedder` or
`$FDF_FACE_EMBEDDER`. The threshold belongs to the model (calibrate it, e.g. at FAR 0.001 on LFW).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from data_prep.assets import resolve_file
from data_prep.tario import atomic_write_json
from eval.anonymize import IMAGE_EXTS, read_image
from eval.anonymizer import Anonymizer, AnonymizerConfig
from fdf_builder import crop as fdfcrop
from fdf_core.errors import InputError, MissingInputError, NothingToDoError

EMBEDDER_ENV = "FDF_FACE_EMBEDDER"
EMBEDDER_FLAG = "--embedder"


def resolve_embedder(path: str | os.PathLike | None = None) -> Path:
    """The embedder file from `path` or `$FDF_FACE_EMBEDDER`; MissingAssetError naming both if neither."""
    return resolve_file(path, EMBEDDER_ENV, None,
                        "face embedding model (a TorchScript file: float (B,3,S,S) → (B,D) embeddings, "
                        "e.g. a traced FaceNet)", EMBEDDER_FLAG)


def load_embedder(path: str | os.PathLike | None = None, device: str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript face embedder (see :func:`resolve_embedder`), in eval mode."""
    file = resolve_embedder(path)
    try:
        return torch.jit.load(str(file), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{file}: not a loadable TorchScript module ({e})") from None


def face_crops(image: np.ndarray, boxes: np.ndarray, size: int, margin: float) -> np.ndarray:
    """(N, size, size, 3) squares around the boxes, grown by `margin` × side, zero-padded."""
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
        side = max(x1 - x0, y1 - y0) * (1 + margin)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        sq = [round(cx - side / 2), round(cy - side / 2)]
        s = max(1, round(side))
        crop = fdfcrop.cut(image, (sq[0], sq[1], sq[0] + s, sq[1] + s))
        interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
        out[i] = cv2.resize(crop, (size, size), interpolation=interp)
    return out


@torch.inference_mode()
def embed(embedder: torch.nn.Module, crops: np.ndarray, mean: float, std: float, batch_size: int = 64,
          device: str = "cpu") -> torch.Tensor:
    """L2-normalized `(N, D)` embeddings of uint8 `(N, S, S, 3)` crops."""
    out = []
    for start in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[start:start + batch_size]).to(device).permute(0, 3, 1, 2).float()
        e = embedder((x - mean) / std)
        if e.ndim != 2 or e.shape[0] != x.shape[0]:
            raise ValueError(f"the embedder returned shape {tuple(e.shape)} for a batch of {x.shape[0]}: "
                             "expected (B, D)")
        out.append(torch.nn.functional.normalize(e.float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def cosine_distances(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """1 - cos of paired rows of two L2-normalized embedding sets."""
    return (1 - (a * b).sum(dim=1)).numpy()


def deidentification_rate(distances: np.ndarray, threshold: float) -> float:
    """Share of faces whose anonymized version the model no longer verifies as the same person."""
    distances = np.asarray(distances)
    if distances.size == 0:
        raise ValueError("no faces to score")
    return float((distances > threshold).mean())


@dataclass(kw_only=True)
class IdentityConfig(AnonymizerConfig):
    """De-identification rate of an anonymizer on a folder of photos (see :class:`AnonymizerConfig`).

    images: a photo or a folder of photos
    threshold: the embedder's verification threshold on cosine distance (same person below it)
    embedder: TorchScript face embedder (or $FDF_FACE_EMBEDDER)
    input_size / mean / std / margin: the embedder's input: square face crops grown by margin × side
        (defaults: FaceNet's 160 px, (x - 127.5) / 128)
    output: result JSON (options saved beside it)
    """

    images: str
    threshold: float
    embedder: str | None = None
    input_size: int = 160
    mean: float = 127.5
    std: float = 128.0
    margin: float = 0.2
    output: str = "identity.json"
    progress: bool = True


def run(cfg: IdentityConfig) -> dict:
    start = time.perf_counter()
    embedder_file = resolve_embedder(cfg.embedder)  # first: fail before any model work
    embedder = load_embedder(embedder_file, cfg.device)
    src = Path(cfg.images)
    if not src.exists():
        raise MissingInputError(f"--images {src} does not exist")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTS) if src.is_dir() else [src]
    if not files or not files[0].is_file():
        raise NothingToDoError(f"--images {src}: no photos ({', '.join(IMAGE_EXTS)})")
    anonymizer = Anonymizer(cfg)
    distances = []
    for path in tqdm(files, unit="img", desc="identity", disable=not cfg.progress):
        image, _ = read_image(path)
        (faces,) = anonymizer.find_faces([image])
        if not len(faces):
            continue
        (anonymized,) = anonymizer.anonymize([image], [faces])
        before = embed(embedder, face_crops(image, faces.boxes, cfg.input_size, cfg.margin), cfg.mean, cfg.std,
                       device=cfg.device)
        after = embed(embedder, face_crops(anonymized, faces.boxes, cfg.input_size, cfg.margin), cfg.mean, cfg.std,
                      device=cfg.device)
        distances.append(cosine_distances(before, after))
    d = np.concatenate(distances) if distances else np.zeros(0)
    result = {"method": cfg.method, "images": len(files), "faces": int(d.size), "threshold": cfg.threshold,
              "deidentification_rate": deidentification_rate(d, cfg.threshold) if d.size else None,
              "distance_mean": float(d.mean()) if d.size else None,
              "distance_median": float(np.median(d)) if d.size else None,
              "embedder": str(embedder_file),
              "seconds": round(time.perf_counter() - start, 2)}
    out = Path(cfg.output)
    atomic_write_json(out.with_name(out.stem + "_options.json"), asdict(cfg))
    atomic_write_json(out, result)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    from data_prep.cli_util import parse_dataclass
    return run(parse_dataclass(IdentityConfig, argv, prog="fdf-identity",
                               description="De-identification rate: embedding distance original vs anonymized."))


if __name__ == "__main__":
    from fdf_core.console import run_main
    raise SystemExit(run_main(main, "fdf-identity"))
