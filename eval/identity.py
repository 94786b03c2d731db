"""Identity removal measured with a real face recognizer: dlib's ResNet face embedding.

Two figures per anonymization method, on photo pairs of the same people (LFW-style folder:
`Person_Name_0001.jpg`, `Person_Name_0002.jpg`, two photos per person):

- **TPR at FAR 1e-3** (the protocol of the video de-identification follow-up of DeepPrivacy, which
  reports 0.986 before and 0.038 after anonymization with FaceNet): the verification threshold is the
  distance at which 0.1% of different-person pairs of the *original* photos are accepted; the rate
  is the share of same-person pairs (first photo original, second anonymized) still accepted.
- **De-identification rate**: the share of faces whose embedding moved farther than the
  recognizer's own threshold (0.6 for dlib) between the original and the anonymized photo.

The subject of each photo is found by dlib's HOG detector on the original (the largest face), and
the anonymized face is embedded at that same place (5-point alignment, dlib's ResNet), so a method
is judged on what it did to the face, not on whether a detector still finds it. Whether one does is
reported too (`still_detected`): dlib's CNN face detector (MMOD), independent of the anonymizer's
RetinaFace, finds a face overlapping the subject's box (IoU >= 0.5) in the anonymized photo. A
generator should paint a face there, black-out should not. The photo is shrunk so that the subject
is about 130 px wide first (the detector's range, and 4x less work on LFW-sized faces); the same
check on the original photos is reported as `original.still_detected`, the ceiling.

The models ship in the PyPI packages `dlib-bin` and `face_recognition_models` (nothing is downloaded);
`--dlib_models` / `$FDF_DLIB_MODELS` point at another folder holding the same two files.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fdf_core.boxes import box_iou
from fdf_core.errors import ConfigError, InputError, MissingAssetError, MissingInputError
from fdf_core.tario import atomic_path, atomic_write_json
from eval.anonymizer import METHODS, Anonymizer, AnonymizerConfig, is_grayscale
from eval.images import read_image

DLIB_MODELS_ENV = "FDF_DLIB_MODELS"
DLIB_MODELS_FLAG = "--dlib_models"
EMBEDDING_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_FILE = "shape_predictor_5_face_landmarks.dat"
DLIB_THRESHOLD = 0.6  # dlib's verification threshold on Euclidean embedding distance
PAIR_NAME = re.compile(r"^(?P<person>.+)_(?P<index>\d{4})\.(jpg|jpeg|png)$", re.IGNORECASE)


def dlib_models_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder with dlib's embedding and 5-point shape models: the flag, `$FDF_DLIB_MODELS`, or the
    `face_recognition_models` package."""
    if path or os.environ.get(DLIB_MODELS_ENV):
        folder = Path(path or os.environ[DLIB_MODELS_ENV]).expanduser()
        origin = f"{DLIB_MODELS_FLAG} {path}" if path else f"${DLIB_MODELS_ENV}"
    else:
        try:
            import face_recognition_models
        except ImportError as e:
            raise MissingAssetError(f"dlib face models not found ({e}): `pip install face_recognition_models==0.3.0 "
                                    f"'setuptools<81'` (install.sh does), or give the folder with {DLIB_MODELS_FLAG} "
                                    f"or ${DLIB_MODELS_ENV}") from None
        folder, origin = Path(face_recognition_models.__file__).parent / "models", "face_recognition_models"
    missing = [f for f in (EMBEDDING_FILE, SHAPE_FILE) if not (folder / f).is_file()]
    if missing:
        raise MissingAssetError(f"{folder} ({origin}) lacks {', '.join(missing)}: give the folder holding dlib's "
                                f"models with {DLIB_MODELS_FLAG} or ${DLIB_MODELS_ENV}")
    return folder


class DlibFaces:
    """dlib's HOG face detector and ResNet embedding (128-d, L2 distance, same person below 0.6)."""

    def __init__(self, models: str | os.PathLike | None = None):
        import dlib
        folder = dlib_models_dir(models)
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(str(folder / SHAPE_FILE))
        self.embedder = dlib.face_recognition_model_v1(str(folder / EMBEDDING_FILE))

    def detect(self, image: np.ndarray) -> np.ndarray:
        """(N, 4) x0, y0, x1, y1 boxes, largest first (upsampled once if none at full size)."""
        rects = self.detector(image, 0) or self.detector(image, 1)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float64).reshape(-1, 4)
        return boxes[np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")]

    @cached_property
    def cnn(self):
        import face_recognition_models
        return self._dlib.cnn_face_detection_model_v1(face_recognition_models.cnn_face_detector_model_location())

    def finds_face_at(self, image: np.ndarray, box: np.ndarray, face_px: int = 130) -> bool:
        """Whether the CNN detector finds a face with IoU >= 0.5 with `box`, on the photo shrunk so
        the box is about `face_px` wide (never enlarged)."""
        scale = max(1, int((box[2] - box[0]) // face_px))
        small = np.asarray(Image.fromarray(image).resize((image.shape[1] // scale, image.shape[0] // scale),
                                                         Image.BILINEAR)) if scale > 1 else image
        found = [np.array([d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()], np.float64) * scale
                 for d in self.cnn(np.ascontiguousarray(small), 0)]
        return bool(len(found)) and bool((box_iou(box, np.asarray(found)) >= 0.5).any())

    def embed(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The 128-d embedding of the face in `box`, aligned by the 5-point shape model."""
        rect = self._dlib.rectangle(*(int(round(v)) for v in box))
        image = np.ascontiguousarray(image)
        return np.asarray(self.embedder.compute_face_descriptor(image, self.shape(image, rect)), np.float64)


def photo_pairs(folder: Path, limit: int | None = None) -> list[tuple[Path, Path]]:
    """(first, second) photo of every person with at least two, in name order."""
    if not folder.is_dir():
        raise MissingInputError(f"--pairs_dir {folder}: no such folder")
    people: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if m := PAIR_NAME.match(path.name):
            people[m.group("person")].append(path)
    pairs = [(photos[0], photos[1]) for _, photos in sorted(people.items()) if len(photos) >= 2]
    if not pairs:
        raise InputError(f"--pairs_dir {folder}: no photo pairs named Person_Name_0001.jpg / _0002.jpg")
    return pairs[:limit]


def threshold_at_far(genuine_free: np.ndarray, far: float) -> float:
    """The distance below which a share `far` of different-person pairs is accepted."""
    return float(np.quantile(genuine_free, far))


def impostor_distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Distances of every different-person pair (first photo of i, second photo of j, i != j)."""
    d = np.linalg.norm(first[:, None, :] - second[None, :, :], axis=-1)
    return d[~np.eye(len(first), dtype=bool)]


@dataclass(kw_only=True)
class IdentityConfig(AnonymizerConfig):
    """Identity removal per anonymization method on same-person photo pairs (see module doc).

    Args:
        pairs_dir: folder of Person_Name_0001.jpg / Person_Name_0002.jpg photos (e.g. LFW)
        methods: anonymization methods to score (generator needs a checkpoint or the shipped model)
        num_pairs: use the first that many people (None: all)
        far: false accept rate that sets the verification threshold (the protocol: 1e-3)
        threshold: the recognizer's own same-person threshold for the de-identification rate
        dlib_models: folder with dlib's models (default: the face_recognition_models package)
        output: result JSON (options saved beside it)
        progress: show progress bars
    """

    pairs_dir: str
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    num_pairs: int | None = None
    far: float = 1e-3
    threshold: float = DLIB_THRESHOLD
    dlib_models: str | None = None
    output: str = "identity.json"
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")


def _read(path: Path) -> np.ndarray:
    return read_image(path)[0]


def subjects(faces: DlibFaces, pairs: list[tuple[Path, Path]], progress: bool) -> tuple[list, np.ndarray, np.ndarray,
                                                                                       int, float]:
    """Pairs whose two photos both show a face to dlib: (kept pairs with the second photo's subject
    box, first embeddings, second embeddings, number skipped, share of second photos in which the CNN
    detector finds the subject)."""
    kept, first, second, detected = [], [], [], 0
    for a, b in tqdm(pairs, unit="pair", desc="originals", disable=not progress):
        ia, ib = _read(a), _read(b)
        ba, bb = faces.detect(ia), faces.detect(ib)
        if not len(ba) or not len(bb):
            continue
        kept.append((a, b, bb[0]))
        first.append(faces.embed(ia, ba[0]))
        second.append(faces.embed(ib, bb[0]))
        detected += faces.finds_face_at(ib, bb[0])
    return kept, np.array(first), np.array(second), len(pairs) - len(kept), detected / max(len(kept), 1)


def score_method(faces: DlibFaces, anonymizer: Anonymizer, kept: list, first: np.ndarray, second: np.ndarray,
                 threshold: float, recognizer_threshold: float, progress: bool) -> dict:
    """TPR at the threshold, de-identification rate and still-detected rate of one method."""
    after, detected, gray_kept, gray = [], 0, 0, 0
    for _, path, box in tqdm(kept, unit="pair", desc=anonymizer.cfg.method, disable=not progress):
        image = _read(path)
        (anonymized,) = anonymizer.anonymize([image])
        after.append(faces.embed(anonymized, box))
        detected += faces.finds_face_at(anonymized, box)
        if is_grayscale(image):
            gray += 1
            gray_kept += is_grayscale(anonymized)
    after = np.array(after)
    genuine = np.linalg.norm(first - after, axis=1)
    moved = np.linalg.norm(second - after, axis=1)
    return {"tpr_at_far": float((genuine < threshold).mean()),
            "deidentification_rate": float((moved > recognizer_threshold).mean()),
            "still_detected": detected / len(kept), "distance_moved_median": float(np.median(moved)),
            "grayscale_kept": f"{gray_kept}/{gray}"}


def run(cfg: IdentityConfig) -> dict:
    start = time.perf_counter()
    pairs = photo_pairs(Path(cfg.pairs_dir), cfg.num_pairs)
    faces = DlibFaces(cfg.dlib_models)
    options = {f.name: getattr(cfg, f.name) for f in fields(AnonymizerConfig)}
    anonymizers = {m: Anonymizer(AnonymizerConfig(**{**options, "method": m})) for m in cfg.methods}  # load all first
    out = Path(cfg.output)
    kept, first, second, skipped, detected = cached_subjects(faces, pairs, cfg.progress,
                                                             out.with_name(out.stem + "_originals.npz"))
    if len(kept) < 2:
        raise InputError(f"{cfg.pairs_dir}: dlib found a face in both photos of only {len(kept)} pair(s)")
    impostors = impostor_distances(first, second)
    threshold = threshold_at_far(impostors, cfg.far)
    genuine = np.linalg.norm(first - second, axis=1)
    result = {"pairs": len(kept), "pairs_skipped_no_face": skipped, "far": cfg.far,
              "impostor_pairs": int(impostors.size), "threshold_at_far": threshold,
              "recognizer": "dlib_face_recognition_resnet_model_v1", "recognizer_threshold": cfg.threshold,
              "original": {"tpr_at_far": float((genuine < threshold).mean()), "still_detected": detected,
                           "same_person_distance_median": float(np.median(genuine)),
                           "different_person_distance_median": float(np.median(impostors))},
              "methods": {}}
    earlier = _reusable_baselines(out, result)
    for method, anonymizer in anonymizers.items():
        if method in earlier:
            result["methods"][method] = earlier[method]
            continue
        result["methods"][method] = score_method(faces, anonymizer, kept, first, second, threshold, cfg.threshold,
                                                 cfg.progress)
        if method == "generator":  # the photo default latent unless --latent is given
            result["generator"], result["latent"] = anonymizer.generator_name, cfg.latent_for(video=False)
        atomic_write_json(out, result)  # per method: a rerun after a stop keeps the baselines done
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out.with_name(out.stem + "_options.json"), asdict(cfg))
    atomic_write_json(out, result)
    return result


def _reusable_baselines(out: Path, result: dict) -> dict:
    """Baseline results of an earlier run on the same pairs and threshold (they depend on nothing
    else; the generator is always scored again: its model may have changed)."""
    if not out.is_file():
        return {}
    try:
        earlier = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    same = all(earlier.get(k) == result[k] for k in ("pairs", "far", "threshold_at_far", "recognizer_threshold"))
    return {m: v for m, v in earlier.get("methods", {}).items() if same and m != "generator"}


def cached_subjects(faces: DlibFaces, pairs: list[tuple[Path, Path]], progress: bool, cache: Path):
    """`subjects`, kept in `cache` (an .npz beside the output) for the same list of pairs: the
    originals' detection and embeddings are most of a run's time and do not depend on the method."""
    names = np.array([f"{a.name}|{b.name}" for a, b in pairs])
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["pairs"], names):
                kept = [(Path(a), Path(b), box) for a, b, box in zip(z["kept_first"], z["kept_second"], z["boxes"])]
                return kept, z["first"], z["second"], int(z["skipped"]), float(z["detected"])
    kept, first, second, skipped, detected = subjects(faces, pairs, progress)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, pairs=names, kept_first=np.array([str(a) for a, _, _ in kept]),
                     kept_second=np.array([str(b) for _, b, _ in kept]),
                     boxes=np.array([box for _, _, box in kept]).reshape(-1, 4), first=first, second=second,
                     skipped=skipped, detected=detected)
    return kept, first, second, skipped, detected

