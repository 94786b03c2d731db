"""Face anonymization of whole photos: detect → keypoints → FDF crop → EMA generator → paste back.

Every face becomes what the generator was trained on: the FDF crop of its box (`fdf_builder.crop`,
the builder's rule), stored as an FDF sample (JPEG q95 crop + box and keypoints in crop coordinates,
FORMAT.md §2) and read back by training's own `decode_sample` and `prepare`, so inference inputs are
built by the training code path itself (same keypoint conversion, same box blanking). A face whose
keypoints the backend cannot match is still anonymized, with every keypoint missing (no pose):
leaving it untouched was a flaw of the 2019 evaluation (docs/reference.md, "Flaws of the 2019 evaluation").

The generated crop is resized back and pasted by `eval.paste`: weight 1 on the face box (every
pixel the box touches), a band of `feather` × the face side outside it blending back to the photo,
and by default a gradient-domain (Poisson) solve so that the painted face meets the photo without a
colour step; on a photo, the photo's detail fades in over a band of 0.12 × the face side around
each box (`--soften`), so the soft painted face does not meet sharp hair along a straight line.
Nothing outside the face boxes grown by those bands changes.

`method` may also name a baseline of :mod:`eval.baselines` (black-out, pixelation, blur): those
rewrite exactly the face boxes, as in the paper's table.
"""
from __future__ import annotations

import io
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from fdf_core import precision as inference_precision
from fdf_core.assets import resolve_file
from fdf_core.tario import json_bytes
from eval.baselines import BASELINES, SMALL_FACE_METHODS, anonymize_boxes
from eval.face_memory import TrackFaces
from eval.paste import BLENDS, SOFT_SIGMA, Composite, feather_width, pixel_extent
from fdf_core.checkpoints import read_checkpoint
from fdf_core.errors import ConfigError, InputError
from fdf_core.fid import to_uint8
from fdf_core.keypoints import KEYPOINT_NAMES
from fdf_builder import crop as fdfcrop
from fdf_builder.face_models import FaceModelsConfig, load_detector, load_keypoint_model
from training.conditioning import prepare
from training.samples import decode_sample
from training.networks import GeneratorAt, generator_from, load_generator

log = logging.getLogger(__name__)
METHODS = ("generator", *BASELINES)
CHECKPOINT_ENV = "FDF_GENERATOR_CHECKPOINT"
CHECKPOINT_FLAG = "--checkpoint"
SHIPPED_MODEL = Path(__file__).resolve().parent / "weights" / "fdf_utkface64_ema.pt"  # see eval/weights/README.md
CONTEXTS = ("auto", "full")
JPEG_QUALITY = 95  # the quality FDF crops are stored with, so the generator sees its training inputs


# The default latent scale (`AnonymizerConfig.latent`) differs between photos and videos, each chosen
# on the shipped 64x64 model. Photos: a face drawn per photo (z ~ N(0, 1)) is a stranger more often
# than the z = 0 face, which is a function of the photo alone: on the 900 LFW pairs dlib's
# de-identification rate is 0.991 against 0.975, TPR at FAR 1e-3 0.000 against 0.002, and dlib's CNN
# still finds 0.929 of the painted faces against 0.900; FID 16.65 against 16.07 (floor 8.68).
# Videos: z = 0. On the full clips (benchmarks/video.py) a latent drawn per track leaked more
# face-frames of 24 px and more (9 against 6) and kept fewer tracks one identity (120 against 124 of
# 129), at the same flicker (docs/video.md).
PHOTO_LATENT = 1.0
VIDEO_LATENT = 0.0
# A model file that carries finished lower-resolution generators (`lower`, FORMAT.md §3: a 128x128
# model grown from a finished 64x64 run carries that run's generator) paints each photo face at the lowest of
# them at which the face's crop is upscaled at most this many times, and every video face at the
# lowest: a 64x64 crop costs 2.6x less than a 128x128 one, and only a face big enough to be blown up
# by more than half shows what the higher resolution adds (`AnonymizerConfig.paint_resolution`).
MAX_UPSCALE = 1.5


@dataclass(kw_only=True)
class AnonymizerConfig(FaceModelsConfig):
    """How faces are found (fdf_builder.face_models) and replaced.

    Args:
        method: "generator" (DeepPrivacy) or a baseline: blackout, pixelation_16x16, pixelation_8x8,
            gaussian_9x9, heavy_blur
        checkpoint: training checkpoint or exported model whose EMA generator is used (else
            $FDF_GENERATOR_CHECKPOINT, else the model shipped in eval/weights/)
        keypoints: movenet | keypoint-rcnn | none (every face without pose)
        keypoint_threshold: keypoints scoring below it count as missing, as training's
            `data.keypoint_threshold`
        batch_size: faces per generator call and images per detector call
        feather: width of the blend band outside each face box, as a fraction of the face side
        blend: poisson (the painted face's gradients, solved against the photo around it: no colour
            step at the box edge) or feather (plain alpha blend over the band); see eval.paste
        soften: photos, poisson blend: the photo's detail in a band of `eval.paste.SOFT_BAND` × the
            face side around each box fades in from a blur of `soften` × the face's upscale (photo
            pixels per painted pixel), so that the soft painted face meets the sharp photo in a slope
            and not along a rectangle (eval.paste.soften_around). 0: the photo untouched outside the
            boxes, as before. Videos are pasted without it (their flicker was measured without)
        crop_rule: how a face is cut for the generator (fdf_builder.crop: fdf or pad); default: the rule
            of the generator's training faces (recorded in exported models; fdf for training checkpoints)
        context: how much photo around the box the generator sees: auto (the band its training crops
            showed, which an exported model records as `context_margins`; the whole crop if it records
            none) or full (the whole crop). A model trained on tight crops paints a featureless patch
            when shown a whole photo (fdf_builder.crop)
        small_face_size: faces whose box is smaller than this many pixels (longer side) are not painted
            but replaced by `small_face_method`: at that size a painted face shows no feature a viewer
            could see, while a crowd of them costs most of the generator's and the keypoint model's
            time (the quick crowd clip: about 500 faces a frame). 0: paint every face
        pose_min_size: faces smaller than this many pixels are painted without pose (no keypoint
            model call, every keypoint missing): the keypoint model runs once per face on a region
            around it, most of a crowd's time, and the shipped generator hardly uses pose (96 corpus
            faces of 20-300 px: 2.6-3.0 of 255 grey levels mean difference in the box with and
            without keypoints). 0: pose for every painted face
        small_face_method: what those faces get, one of eval.baselines.SMALL_FACE_METHODS (soft_blur:
            a Gaussian blur that follows the box to a fraction of a pixel, so a slowly moving crowd
            face does not shimmer in a video as heavy_blur's whole-pixel kernel and edges make it;
            quick crowd clip flicker 1.34 with heavy_blur, 1.27 with soft_blur, both with a track
            keeping its method between paintings, eval.face_memory)
        rescan_below: an image in which the detector finds a face narrower than this many pixels (a
            face cut by the image's left or right edge: lower) is detected again `rescan_scale` times
            finer, and the faces only that pass finds are added
            (FaceDetector.rescan_small): a crowd's 10-16 px faces are below RetinaFace's smallest
            anchor. Costs one larger detector call on such images only. 0: off
        rescan_scale: how much finer the second look is (1: off)
        precision: number format of the generator: auto (bf16 on a GPU or a CPU with AVX512-BF16/AMX
            units, else fp32), bf16 or fp32 (fdf_core.precision)
        latent: the generator's latent code z = latent × N(0, 1) per face, drawn from `latent_seed`
            and the face (its index in its photo; in a video its track, so that one person keeps one
            latent from the first frame to the last, as DeepPrivacy2's --track does). 0: z = 0, the
            paper's evaluation setting: the face is a function of its surroundings and pose alone.
            Default (None): `PHOTO_LATENT` for photos, `VIDEO_LATENT` for videos (why: see them)
        latent_seed: the seed of those draws (the same photo and seed paint the same faces)
        paint_resolution: the resolution every face is painted at, one the model file paints at (its
            own; a model grown from a finished lower-resolution run also that run's, `lower`).
            Default (None): photos per face, the lowest at which its crop is upscaled at most
            `MAX_UPSCALE` times, else the highest; videos the lowest (why: `MAX_UPSCALE`)
    """

    allow_no_keypoints: ClassVar[bool] = True

    method: str = "generator"
    checkpoint: str | None = None
    keypoint_threshold: float = 0.0
    batch_size: int = 16
    feather: float = 0.1
    blend: str = "poisson"
    soften: float = SOFT_SIGMA
    crop_rule: str | None = None
    context: str = "auto"
    small_face_size: int = 20
    pose_min_size: int = 40
    small_face_method: str = "soft_blur"
    rescan_below: int = 20
    rescan_scale: float = 2.0
    precision: str = "auto"
    latent: float | None = None
    latent_seed: int = 0
    paint_resolution: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent is not None and not 0.0 <= self.latent <= 2.0:
            raise ConfigError(f"--latent {self.latent}: need 0 (z = 0) to 2 (twice the training draws' spread)")
        inference_precision.resolve(self.precision, "cpu")  # a misspelt --precision fails before any work
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: unknown; choose from {', '.join(METHODS)}")
        if self.feather < 0:
            raise ConfigError(f"--feather ({self.feather}) must be >= 0")
        if not 0.0 <= self.soften <= 2.0:
            raise ConfigError(f"--soften {self.soften}: need 0 (off) to 2 (a blur of twice a painted pixel)")
        if self.blend not in BLENDS:
            raise ConfigError(f"--blend {self.blend!r}: choose from {', '.join(BLENDS)}")
        if self.crop_rule is not None and self.crop_rule not in fdfcrop.CROP_RULES:
            raise ConfigError(f"--crop_rule must be one of {', '.join(fdfcrop.CROP_RULES)}, not {self.crop_rule!r}")
        if self.small_face_size < 0 or self.pose_min_size < 0:
            raise ConfigError(f"--small_face_size ({self.small_face_size}) and --pose_min_size "
                              f"({self.pose_min_size}) must be >= 0")
        if self.small_face_method not in SMALL_FACE_METHODS:
            raise ConfigError(f"--small_face_method {self.small_face_method!r}: choose from "
                              f"{', '.join(SMALL_FACE_METHODS)}")
        if self.rescan_scale < 1 or self.rescan_below < 0:
            raise ConfigError(f"--rescan_scale ({self.rescan_scale}) must be >= 1 and --rescan_below "
                              f"({self.rescan_below}) >= 0")
        if self.context not in CONTEXTS:
            raise ConfigError(f"--context must be one of {', '.join(CONTEXTS)}, not {self.context!r}")

    def latent_for(self, video: bool) -> float:
        """The latent scale a photo (`video` False) or a video's tracks are painted with."""
        if self.latent is not None:
            return self.latent
        return VIDEO_LATENT if video else PHOTO_LATENT


@dataclass
class Faces:
    """The faces of one image: boxes x0, y0, x1, y1 in pixels, scores, and per face (7, 3)
    keypoints x, y, score in pixels or None (no pose)."""

    boxes: np.ndarray
    scores: np.ndarray
    keypoints: list[np.ndarray | None] = field(default_factory=list)
    # video (eval.video, eval.face_memory): each face's track, and whether it is painted afresh in
    # this frame (else its track's last painting is carried); None = paint every face
    tracks: list[int] | None = None
    paint: list[bool] | None = None
    # which faces take `small_face_method` instead of the generator; None = those under `small_face_size`
    # (the video path decides it per track, eval.face_memory.TrackFaces.small)
    small: list[bool] | None = None
    # per face painted afresh: (image, box, keypoints) of another frame of its track to paint it from,
    # or None = this frame (the video path: a sharper frame where this one is motion-blurred)
    views: list[tuple[np.ndarray, np.ndarray, np.ndarray | None] | None] | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def num_without_pose(self) -> int:
        return sum(k is None for k in self.keypoints)


def load_generator_at(checkpoint: str | Path, device: str | torch.device = "cpu") -> GeneratorAt:
    """The EMA generator of a training checkpoint (or an exported model) at the resolution and
    fade-in it had reached.

    It carries what its file says about it, so that whoever is handed the generator (an
    `Anonymizer`, the benchmarks) uses it as it was trained: `.checkpoint` (the file), `.card` (an
    export's model card, FORMAT.md §3; {} for a training checkpoint), `.crop_rule` (the crop
    rule of its training faces, which exports and training checkpoints record; "fdf" for a file
    that records none, made before they did) and `.context_margins` (the band of photo its
    training crops showed around the box; None: whole crops).
    """
    saved = read_checkpoint(checkpoint)
    progress = saved.get("progress")
    generator = load_generator(str(checkpoint), ema=True, map_location=device)
    if progress is None:
        g = GeneratorAt(generator, generator.max_resolution, 1.0)
    else:
        g = GeneratorAt(generator, int(progress["resolution"]), float(progress["alpha"]))
    g.checkpoint, g.card = Path(checkpoint), dict(saved.get("card") or {})
    g.crop_rule = _crop_rule_of(checkpoint, saved)
    g.context_margins = _context_margins_of(checkpoint, saved)
    g.lower = _lower_generators(checkpoint, saved, g, device)
    return g


def _lower_generators(checkpoint: str | Path, saved: dict, generator: GeneratorAt,
                      device: str | torch.device) -> dict[int, GeneratorAt]:
    """The finished lower-resolution generators a model file carries (`lower`, FORMAT.md §3), by
    resolution, each at alpha 1; checked: below the file's own resolution, one per resolution."""
    lower: dict[int, GeneratorAt] = {}
    for i, entry in enumerate(saved.get("lower") or []):
        try:
            resolution = int(entry["progress"]["resolution"])
            net = generator_from(entry, f"{checkpoint} lower[{i}]", map_location=device)
        except (KeyError, TypeError, RuntimeError) as e:
            raise InputError(f"{checkpoint}: lower[{i}] is not a generator export ({type(e).__name__}: {e})") from e
        if resolution >= generator.resolution or resolution in lower:
            raise InputError(f"{checkpoint}: lower[{i}] paints at {resolution}x{resolution}; each must be below "
                             f"{generator.resolution}x{generator.resolution} and at a resolution of its own")
        lower[resolution] = GeneratorAt(net, resolution, 1.0, generator.precision)
    return dict(sorted(lower.items()))


def painters_of(generator: GeneratorAt) -> dict[int, GeneratorAt]:
    """The generator at each resolution its model file paints at: its own, and the lower ones it
    carries (`.lower`, from `load_generator_at`; a generator built in code paints at its own alone)."""
    painters = {**getattr(generator, "lower", {}), generator.resolution: generator}
    for g in painters.values():
        g.precision = generator.precision
    return dict(sorted(painters.items()))


def _context_margins_of(checkpoint: str | Path, saved: dict) -> list[float] | None:
    """The `context_margins` a model file records (None when it has none), checked: four fractions
    of the box side, each >= 0."""
    margins = saved.get("context_margins")
    if margins is None:
        return None
    if (not isinstance(margins, (list, tuple)) or len(margins) != 4
            or not all(isinstance(v, (int, float)) and 0 <= v < 10 for v in margins)):
        raise InputError(f"{checkpoint}: context_margins {margins!r} must be four fractions of the box side >= 0")
    return [float(v) for v in margins]


def _crop_rule_of(checkpoint: str | Path, saved: dict) -> str:
    """The `crop_rule` a model file records ("fdf" when it has none); an unknown one is an error
    naming the file, not a silently different cut."""
    rule = saved.get("crop_rule", "fdf")
    if rule not in fdfcrop.CROP_RULES:
        raise InputError(f"{checkpoint}: crop_rule {rule!r} is not one of {', '.join(fdfcrop.CROP_RULES)}")
    return rule


def resolve_checkpoint(path: str | None) -> Path:
    """The generator to use: `--checkpoint`, else `$FDF_GENERATOR_CHECKPOINT`, else the model shipped
    with fdf (`eval/weights/`, see its README)."""
    if path or os.environ.get(CHECKPOINT_ENV) or not SHIPPED_MODEL.is_file():
        return resolve_file(path, CHECKPOINT_ENV, None,
                            "generator checkpoint (a training checkpoint, e.g. <run_dir>/checkpoints/final.ckpt, "
                            "or an exported model)", CHECKPOINT_FLAG)
    return SHIPPED_MODEL


def generator_info(generator: GeneratorAt) -> tuple[str | None, str]:
    """(the model's name: its card's name, else its file; one line naming it and the resolution it
    paints at) of a generator from `load_generator_at`. A generator built in code has no file and
    no name."""
    size = f"{generator.resolution}x{generator.resolution}"
    path = getattr(generator, "checkpoint", None)
    if path is None:
        return None, f"given generator: {size}"
    name = getattr(generator, "card", {}).get("name") or str(path)
    shipped = " (shipped with fdf; give --checkpoint for another)" if path == SHIPPED_MODEL else ""
    return name, f"{name}{shipped}: {size} faces, alpha {generator.alpha:g}"


class Anonymizer:
    """Anonymizes every face of RGB uint8 images; models are loaded on first use.

    `generator` (a `GeneratorAt`), `detector` and `keypoint_model` may be given ready-made (tests,
    benchmarks); otherwise they come from the config. `timings` accumulates seconds per stage:
    detection, keypoints, generation (network calls), crop_paste (everything else per face);
    `counts` the faces the generator replaced (painted or carried) and the small faces it left to `small_face_method`.
    """

    def __init__(self, cfg: AnonymizerConfig, generator: GeneratorAt | None = None,
                 detector=None, keypoint_model=None):
        """`checkpoint` and `model_name` say which model file paints (None for a generator built in
        code, or a baseline). Faces are cut by the crop rule of the generator's training faces,
        whoever loaded it (`load_generator_at` records it; "fdf" for a generator built in code),
        unless `cfg.crop_rule` overrides it; likewise the band of photo around the box it is shown
        (`context_margins`, unless `cfg.context` is full)."""
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)  # generated_faces, small_faces (the generator's cases)
        if detector is not None:
            self.detector = detector
        if keypoint_model is not None:
            self.keypoint_model = keypoint_model
        self.generator, self.generator_name, self.checkpoint, self.model_name = None, None, None, None
        self.painters: dict[int, GeneratorAt] = {}  # resolution -> the generator painting at it
        trained_rule, trained_context = "fdf", None
        if cfg.method == "generator":
            if generator is None:
                generator = load_generator_at(resolve_checkpoint(cfg.checkpoint), self.device)
            trained_rule = getattr(generator, "crop_rule", "fdf")  # the model's, also when handed in ready-made
            trained_context = getattr(generator, "context_margins", None)
            self.checkpoint = getattr(generator, "checkpoint", None)
            self.model_name, self.generator_name = generator_info(generator)
            log.info("generator: %s", self.generator_name)
            self.generator = generator.to(self.device).eval().requires_grad_(False)
            self.generator.precision = cfg.precision
            self.painters = {r: g.to(self.device).eval() for r, g in painters_of(self.generator).items()}
            if cfg.paint_resolution is not None and cfg.paint_resolution not in self.painters:
                raise ConfigError(f"--paint_resolution {cfg.paint_resolution}: {self.model_name or 'the generator'} "
                                  f"paints at {', '.join(map(str, self.painters))}")
        self.crop_rule = cfg.crop_rule or trained_rule
        self.context_margins = trained_context if cfg.context == "auto" else None

    @cached_property
    def detector(self):
        return load_detector(self.cfg)

    @cached_property
    def keypoint_model(self):
        return load_keypoint_model(self.cfg)

    # ------------------------------------------------------------------ faces
    def detect(self, images: list[np.ndarray], max_size: int | None = None) -> list[Faces]:
        """Detector boxes and scores of each image (no keypoints yet); `max_size` overrides
        `detect_max_size` (video frames are detected at their own size, see eval.video)."""
        t0 = time.perf_counter()
        dets = self.detector.detect(images, max_size)
        dets = self.detector.rescan_small(images, dets, self.cfg.rescan_below, self.cfg.rescan_scale, max_size)
        self.timings["detection"] += time.perf_counter() - t0
        return [Faces(d.boxes.astype(np.float64), d.scores.astype(np.float64)) for d in dets]

    def add_keypoints(self, image: np.ndarray, faces: Faces) -> Faces:
        """Fill `faces.keypoints`; only the generator uses pose, so baselines skip the model."""
        if self.cfg.method != "generator" or len(faces.keypoints) == len(faces):
            return faces
        if self.keypoint_model is None or len(faces) == 0:
            faces.keypoints = [None] * len(faces)
            return faces
        t0 = time.perf_counter()
        wanted = np.ones(len(faces), bool) if faces.paint is None else np.asarray(faces.paint, bool)
        wanted &= ~self.small(faces.boxes, self.cfg.pose_min_size)  # not painted, or too small for pose to show
        wanted &= ~self.small_faces(faces, image.shape)
        if faces.views is not None:  # painted from another frame, posed there
            wanted &= np.array([v is None for v in faces.views], bool)
        found = iter(self.keypoint_model.keypoints_for_faces(image, faces.boxes[wanted], faces.scores[wanted])
                     if wanted.any() else [])
        faces.keypoints = [next(found) if w else None for w in wanted]  # a carried face needs no pose
        self.timings["keypoints"] += time.perf_counter() - t0
        return faces

    def small(self, boxes: np.ndarray, size: int | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Which boxes (N, 4) are below `size` px (longer side; default `small_face_size`: the faces
        that take `small_face_method`, not the generator). With the image's `shape` (H, W, ...) a box
        cut by the image edge is measured by its part in view, as the side of a square of that
        part's area: a video track carries a face cut by the frame edge at its whole size
        (eval.video), but only the part in view shows, and a sliver 11 px wide and 28 high shows
        no more than a 17-px face, yet was painted with a face's features (the full crowd clip's
        right edge; docs/video.md)."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        if shape is not None:
            height, width = shape[:2]
            seen = np.clip(boxes, 0, [width, height, width, height])
            cut = (seen != boxes).any(axis=1)
            seen_side = np.sqrt((seen[:, 2] - seen[:, 0]) * (seen[:, 3] - seen[:, 1]))
            side = np.where(cut, np.minimum(side, seen_side), side)
        limit = self.cfg.small_face_size if size is None else size
        return side < limit

    def small_faces(self, faces: Faces, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Which of the faces take `small_face_method`: as `faces.small` says where it is set, else
        those under `small_face_size` (in view, given the image's `shape`)."""
        if faces.small is not None:
            return np.asarray(faces.small, bool).reshape(-1)
        return self.small(faces.boxes, shape=shape)

    def find_faces(self, images: list[np.ndarray]) -> list[Faces]:
        return [self.add_keypoints(im, f) for im, f in zip(images, self.detect(images))]

    @staticmethod
    def faces_from_boxes(boxes: np.ndarray, scores: np.ndarray | None = None) -> Faces:
        """Faces from given boxes (bring your own boxes, e.g. WIDER ground truth): score 1 if none."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if not np.isfinite(boxes).all():
            raise ValueError("face boxes contain non-finite values")
        scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, np.float64).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
        return Faces(boxes, scores)

    # ------------------------------------------------------------------ anonymization
    def __call__(self, image: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """One image; faces are detected unless `boxes` (N, 4) are given."""
        faces = None if boxes is None else [self.faces_from_boxes(boxes)]
        return self.anonymize([image], faces)[0]

    def anonymize(self, images: list[np.ndarray], faces: list[Faces] | None = None,
                  memory: TrackFaces | None = None) -> list[np.ndarray]:
        """Copies of the images with every face replaced; faces detected unless given.

        `memory` (video, with `Faces.tracks` and `Faces.paint` set, images in frame order): faces
        planned for painting are painted and blended into their track's memory, the others carry
        their track's last painting (eval.face_memory)."""
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
                raise ValueError(f"image {i}: expected an HxWx3 uint8 RGB array, got {desc}")
        if faces is None:
            faces = self.detect(images)
        if len(faces) != len(images):
            raise ValueError(f"{len(images)} images but faces for {len(faces)}")
        if self.cfg.method != "generator":  # a grayscale photo stays grayscale (OpenCV's filters can round apart)
            return [_as_source(anonymize_boxes(im, f.boxes, self.cfg.method), im) for im, f in zip(images, faces)]
        faces = [self.add_keypoints(im, f) for im, f in zip(images, faces)]
        t0 = time.perf_counter()
        small = [self.small_faces(f, im.shape) for im, f in zip(images, faces)]
        self.counts["small_faces"] += int(sum(s.sum() for s in small))
        # small faces first, so that a painted face's seam meets them replaced, never the original
        images = [anonymize_boxes(im, f.boxes[s], self.cfg.small_face_method) if s.any() else im
                  for im, f, s in zip(images, faces, small)]
        jobs = []  # (image index, face index, pixel extent, crop, painted afresh, box painted)
        samples, latent_keys = [], []  # a face's latent is drawn by its key: its track, else its index
        for i, (im, f) in enumerate(zip(images, faces)):
            for j, box in enumerate(f.boxes):
                if small[i][j]:
                    continue
                extent = pixel_extent(box, *im.shape[:2])
                if extent is None:
                    continue  # an empty box covers no pixel
                self.counts["generated_faces"] += 1
                painted_box, crop = self._crop(box, extent, im.shape)
                fresh = memory is None or f.paint is None or f.paint[j]
                jobs.append((i, j, extent, crop, fresh, painted_box))
                if fresh:
                    res = self.resolution_for(crop, video=memory is not None)
                    samples.append(self._sample_view(f.views[j], res) if f.views is not None and f.views[j] is not None
                                   else self._sample(im, painted_box, f.keypoints[j], crop, res))
                    latent_keys.append(j if memory is None or f.tracks is None else f.tracks[j])
        self.timings["crop_paste"] += time.perf_counter() - t0
        generated = iter(self._generate(samples, latent_keys, video=memory is not None))
        t0 = time.perf_counter()
        painted = []
        for i, j, extent, crop, fresh, painted_box in jobs:  # frame order: a carried face is its track's latest painting
            face = next(generated) if fresh else None
            if memory is not None:
                track = faces[i].tracks[j]
                face = memory.painted(track, face) if fresh else memory.carried(track)
                if face is None:  # its planned painting had an empty box: paint it now
                    face = memory.painted(track, self._generate([self._sample(
                        images[i], painted_box, faces[i].keypoints[j], crop, self.resolution_for(crop, video=True))],
                        [track], video=True)[0])
            painted.append(face)
        gray = {i for i, im in enumerate(images) if is_grayscale(im)}
        painted = [_to_gray(face) if i in gray else face for (i, *_), face in zip(jobs, painted)]
        seams = None if memory is None else memory.seams
        outputs = [Composite(im, self.cfg.blend, seams, self.cfg.soften) for im in images]
        for (i, j, extent, crop, _, painted_box), face in zip(jobs, painted):  # frame order: seams blend over time
            box, track = faces[i].boxes[j], None if memory is None else faces[i].tracks[j]
            outputs[i].add(face, extent, crop, feather_width(box, self.cfg.feather), self._place(box, crop), track,
                           whole=painted_box)
        # a grayscale photo stays grayscale to the last bit: the paste's float arithmetic per channel
        # (and the small-face blur's) can round one channel of a pixel apart from the others
        result = [_to_gray(o.result()) if i in gray else o.result() for i, o in enumerate(outputs)]
        self.timings["crop_paste"] += time.perf_counter() - t0
        return result

    def resolution_for(self, crop: fdfcrop.Crop, video: bool = False) -> int:
        """The resolution a face with this crop is painted at (`AnonymizerConfig.paint_resolution`)."""
        if self.cfg.paint_resolution is not None:
            return self.cfg.paint_resolution
        sizes = list(self.painters)
        if video:
            return sizes[0]
        return next((r for r in sizes if crop.side <= r * MAX_UPSCALE), sizes[-1])

    def _place(self, box: np.ndarray, crop: fdfcrop.Crop) -> tuple[float, float, float] | None:
        """Where the painted crop lies to a fraction of a pixel: the padded square of the box as the
        pixels it touches see it (half a pixel wider on every side, as `pixel_extent` on average),
        without rounding; None (the rounded crop) for an FDF-rule crop shifted inside the photo."""
        if self.crop_rule != "pad" and not crop.padded:
            return None
        return fdfcrop.exact_square(np.asarray(box, np.float64) + [-0.5, -0.5, 0.5, 0.5])

    def _sample_view(self, view: tuple[np.ndarray, np.ndarray, np.ndarray | None], resolution: int):
        """`_sample` of a face seen in another frame (`Faces.views`): its box and crop there."""
        image, box, keypoints = view
        painted_box, crop = self._crop(box, pixel_extent(box, *image.shape[:2]), image.shape)
        return self._sample(image, painted_box, keypoints, crop, resolution)

    def _crop(self, box: np.ndarray, extent: tuple[int, int, int, int], shape: tuple[int, ...]
              ) -> tuple[tuple[int, int, int, int], fdfcrop.Crop]:
        """The box the generator paints a face into and its crop. The crop is taken around every
        pixel the box touches, so none escapes the mask. With the "pad" rule that is the box's whole
        pixel extent, also where it reaches past the photo's edge (a video face coming into view:
        eval.video.FaceTracker gives its whole size), so the face is painted whole and its part
        inside the photo pasted; else the pixels inside the photo (`extent`)."""
        if self.crop_rule == "pad":
            extent = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
        return extent, fdfcrop.crop_box(np.asarray(extent, np.float64), shape[:2], rule=self.crop_rule)

    def _sample(self, image: np.ndarray, box: tuple[int, int, int, int], keypoints: np.ndarray | None,
                crop: fdfcrop.Crop, resolution: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray | None]:
        """The face as an FDF sample (FORMAT.md §2), decoded by training's `decode_sample`, cut back to
        the band of photo the generator was trained with; and the whole crop at the generator's
        resolution when it was cut back (None otherwise), which the painted crop keeps around the box.
        Where the crop passes the image border, the border pixels are repeated, not zeros: shown
        black beside a face entering a video frame, the shipped model painted it ~40 grey levels
        darker than once the face was inside, and the change showed as flicker (full-length pan
        clip: flicker ratio 1.77 with zeros, 1.46 with the border repeated). `resolution`: one the
        model paints at (default: the photo rule, `resolution_for`)."""
        resolution = resolution or self.resolution_for(crop)
        x0, y0 = crop.box[:2]
        whole = fdfcrop.cut(image, crop.box, edge=True)
        limited = fdfcrop.limit_context(whole, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0),
                                        self.context_margins)
        pixels = fdfcrop.resize(limited, resolution)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
        if keypoints is None:
            points = [[-1.0, -1.0, 0.0]] * len(KEYPOINT_NAMES)
        else:
            points = fdfcrop.to_crop_coords(keypoints, crop).tolist()
        meta = {"bbox": fdfcrop.to_crop_coords(np.asarray(box, np.float64).reshape(2, 2), crop).reshape(4).tolist(),
                "keypoints": points, "keypoint_names": list(KEYPOINT_NAMES)}
        sample = decode_sample("anonymizer", "face", {"jpg": buf.getvalue(), "json": json_bytes(meta)},
                               self.cfg.keypoint_threshold)
        around = None if limited is whole else fdfcrop.resize(whole, resolution)
        return (*sample, around)

    def _latents(self, keys: list[int], video: bool = False) -> torch.Tensor | None:
        """z of the faces with these latent keys (`AnonymizerConfig.latent_for` a photo or a video),
        None for z = 0."""
        scale = self.cfg.latent_for(video)
        if scale == 0:
            return None
        shape = self.generator.generator.z_shape(1)[1:]
        draws = []
        for key in keys:
            seed = int(np.random.SeedSequence([self.cfg.latent_seed, int(key)]).generate_state(1)[0])
            draws.append(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        return scale * torch.stack(draws)

    @torch.inference_mode()
    def _generate(self, samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray | None]],
                  latent_keys: list[int] | None = None, video: bool = False) -> list[np.ndarray]:
        """EMA generator on the faces in batches (z by `_latents`; keys default to the faces' order;
        `video`: the faces are video tracks, painted with the video latent):
        (r, r, 3) uint8 crops, the photo around the box where the sample carries it (the generator
        only saw a band of it: the paste blends the painted box against the photo, not against the
        zeros beyond that band)."""
        keys = list(range(len(samples))) if latent_keys is None else latent_keys
        out: list[np.ndarray | None] = [None] * len(samples)
        by_resolution: dict[int, list[int]] = defaultdict(list)  # each batch at one resolution
        for i, sample in enumerate(samples):
            by_resolution[sample[0].shape[-1]].append(i)
        for resolution, order in sorted(by_resolution.items()):
            g = self.painters.get(resolution) or self.generator
            for start in range(0, len(order), self.cfg.batch_size):
                index = order[start:start + self.cfg.batch_size]
                chunk = [samples[i] for i in index]
                images, bbox, kps = (torch.stack([s[k] for s in chunk]).to(self.device) for k in range(3))
                p = prepare(images, bbox, kps, g.resolution, g.alpha)
                z = self._latents([keys[i] for i in index], video)
                t0 = time.perf_counter()
                fake = g(p.condition, p.mask, p.keypoints, None if z is None else z.to(self.device))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.timings["generation"] += time.perf_counter() - t0
                painted = to_uint8(fake).permute(0, 2, 3, 1).cpu().numpy()
                keep = p.mask[:, 0].bool().cpu().numpy()
                for i, face, kept, (*_, around) in zip(index, painted, keep, chunk):
                    if around is not None:
                        face[kept] = around[kept]
                    out[i] = face
        return out


def is_grayscale(image: np.ndarray) -> bool:
    """A grayscale photo stored as RGB: its anonymized faces must stay gray."""
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def _as_source(out: np.ndarray, source: np.ndarray) -> np.ndarray:
    """`out`, made gray again where the `source` photo was grayscale."""
    return _to_gray(out) if is_grayscale(source) else out


def _to_gray(face: np.ndarray) -> np.ndarray:
    luma = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    return np.repeat(luma[..., None], 3, axis=2)
