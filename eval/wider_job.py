"""`fdf-wider`: DeepPrivacy's WIDER FACE table — how well a face detector still finds anonymized faces.

Every face of each validation image is anonymized from its ground-truth box (docs/reference.md,
"The paper's table") by each method: none (the original), black-out, pixelation 16x16 and 8x8, 9x9
Gaussian blur σ=3, heavy blur, and the generator. The generator gets keypoints from the data
builder's keypoint backend; a face the backend cannot match is anonymized without pose (all
keypoints missing) instead of being left untouched as in the 2019 evaluation. A detector then runs on
each result and the official protocol (`eval.wider`) gives AP easy/medium/hard.

The paper used DSFD; here the detector is RetinaFace (MobileNet-0.25 by default, the weights
available offline; `retinaface_r50` when its weights are given), so absolute APs differ from the
paper's: the comparable number is the share of the original AP each method keeps (`retained`).

Only the ground-truth images present under `--images` are evaluated, with ground truth restricted
to them; the job states how many that were. Outputs in `--output_dir`: `wider_table.json`,
`detections/<method>/` in the kit's text layout, `options.json`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fdf_core.tario import atomic_write_json
from eval.images import read_image
from eval.anonymizer import Anonymizer, AnonymizerConfig
from eval.baselines import BASELINES, PAPER_AP, anonymize_boxes
from eval.wider import DIFFICULTIES, WiderGT, evaluate, load_wider_gt, write_detections
from fdf_builder.face_models import FaceModelsConfig, face_model_options, load_detector
from fdf_core.errors import ConfigError, MissingInputError

ROWS = ("original", *BASELINES, "generator")
DESCRIPTIONS = {"original": "no anonymization", "generator": "DeepPrivacy generator (EMA, z = 0)",
                **{name: b.description for name, b in BASELINES.items()}}
PAPER_ROW = {"generator": "deepprivacy"}  # our row name → PAPER_AP key
TABLE = "wider_table.json"  # in --output_dir


@dataclass(kw_only=True)
class WiderJobConfig(FaceModelsConfig):
    """Anonymize WIDER FACE val faces from the ground truth and score a detector on the results.

    Args:
        images: the `WIDER_val/images` folder (`<event>/<file>.jpg`)
        checkpoint: generator checkpoint for the "generator" row (or $FDF_GENERATOR_CHECKPOINT)
        output_dir: where the table, detections and options go
        gt_dir: the kit's .mat files (default `$FDF_ASSETS/wider`)
        methods: rows of the table, from original, the baselines and generator
        detector: the detector that is scored (retinaface_mnet025 or retinaface_r50)
        confidence: score threshold of the detector that is scored (low: the whole PR curve)
        keypoints: pose for the generator (movenet, keypoint-rcnn or none)
        keypoint_threshold: keypoints scoring below it count as missing (the generator row)
        feather: blend band of the generator row (see anonymize --feather)
        batch_size: faces per generator call
        limit: evaluate only the first N images found (quick runs)
        progress: show progress bars
    """

    allow_no_keypoints: ClassVar[bool] = True

    images: str
    checkpoint: str | None = None
    output_dir: str = "runs/wider"
    gt_dir: str | None = None
    methods: list[str] = field(default_factory=lambda: list(ROWS))
    confidence: float = 0.02
    detect_max_size: int = 2048
    keypoint_threshold: float = 0.0
    feather: float = 0.1
    batch_size: int = 16
    limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in ROWS]
        if unknown or not self.methods:
            raise ConfigError(f"--methods {unknown or self.methods}: choose from {', '.join(ROWS)}")


def subset(gt: WiderGT, indices: list[int]) -> WiderGT:
    """The ground truth of some images only (the recall denominator counts only their faces)."""
    return WiderGT([gt.names[i] for i in indices], [gt.boxes[i] for i in indices],
                   [gt.labels[i] for i in indices], {d: [gt.keep[d][i] for i in indices] for d in gt.keep})


def _table(aps: dict[str, dict[str, float]]) -> list[dict]:
    rows = []
    base = aps.get("original")
    for method, ap in aps.items():
        paper = PAPER_AP.get(PAPER_ROW.get(method, method))
        row = {"method": method, "description": DESCRIPTIONS[method],
               "ap": {d: round(100 * ap[d], 2) for d in DIFFICULTIES},
               "paper_ap": dict(zip(DIFFICULTIES, paper)) if paper else None}
        if base is not None:
            row["retained"] = {d: round(100 * ap[d] / base[d], 1) if base[d] else None for d in DIFFICULTIES}
            row["paper_retained"] = ({d: round(100 * p / o, 1) for d, p, o in zip(DIFFICULTIES, paper, PAPER_AP["original"])}
                                     if paper else None)
        rows.append(row)
    return rows


def format_table(result: dict) -> str:
    """The table as text: our AP beside the paper's, and the share of the original AP kept."""
    head = (f"{'method':<18} {'AP easy/medium/hard (ours)':>27} {'paper (DSFD)':>20} "
            f"{'retained % (ours)':>20} {'retained % (paper)':>20}")
    fmt = lambda v: "/".join("  -  " if x is None else f"{x:5.1f}" for x in v.values()) if v else "-"  # noqa: E731
    lines = [f"WIDER FACE val, {result['images']} images, {result['faces']} faces; detector {result['detector']} "
             f"(paper: DSFD)", head]
    for r in result["rows"]:
        lines.append(f"{r['method']:<18} {fmt(r['ap']):>27} {fmt(r['paper_ap']):>20} "
                     f"{fmt(r.get('retained')):>20} {fmt(r.get('paper_retained')):>20}")
    return "\n".join(lines)


def run(cfg: WiderJobConfig) -> dict:
    start = time.perf_counter()
    gt = load_wider_gt(cfg.gt_dir)
    root = Path(cfg.images)
    indices = [i for i, name in enumerate(gt.names) if (root / name).is_file()][:cfg.limit]
    if not indices:
        raise MissingInputError(f"none of the {len(gt.names)} WIDER FACE val images is under {root} "
                                f"(expected <event>/<file>.jpg, e.g. {root / gt.names[0]})")
    out = Path(cfg.output_dir)
    atomic_write_json(out / "options.json", asdict(cfg))
    generator = None
    if "generator" in cfg.methods:
        generator = Anonymizer(AnonymizerConfig(
            **face_model_options(cfg), method="generator", checkpoint=cfg.checkpoint,
            keypoint_threshold=cfg.keypoint_threshold, feather=cfg.feather))
    detector = load_detector(cfg, batch_size=len(cfg.methods))  # one call per image: its anonymized versions
    methods = [m for m in ROWS if m in cfg.methods]
    detections: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    faces = without_pose = 0
    for i in tqdm(indices, unit="img", desc="wider", disable=not cfg.progress):
        name = gt.names[i]
        image, _ = read_image(root / name)
        boxes = gt.boxes_xyxy(i)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]  # no-face images: one empty box
        faces += len(boxes)
        results = []
        for m in methods:
            if m == "original":
                results.append(image)
            elif m == "generator":
                found = generator.add_keypoints(image, generator.faces_from_boxes(boxes))
                without_pose += found.num_without_pose
                results.append(generator.anonymize([image], [found])[0])
            else:
                results.append(anonymize_boxes(image, boxes, m))
        for m, det in zip(methods, detector.detect(results)):
            detections[m][name] = np.concatenate([det.boxes, det.scores[:, None]], axis=1)
    evaluated = subset(gt, indices)
    aps = {m: evaluate(detections[m], evaluated) for m in methods}
    for m in methods:
        write_detections(out / "detections" / m, detections[m])
    result = {"images": len(indices), "images_in_gt": len(gt.names), "faces": faces,
              "faces_without_pose": without_pose if generator else None, "detector": cfg.detector,
              "paper_detector": "DSFD", "rows": _table(aps), "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(out / TABLE, result)
    return result

