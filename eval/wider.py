"""WIDER FACE validation ground truth and the official detection AP protocol.

The numbers must be comparable with the literature (docs/reference.md, "Evaluation on WIDER
FACE"), so this follows the official kit (Yang et al. 2016, MATLAB `eval_tools`; its Python port)
rule for rule:

- scores are normalized over the whole detection set with the kit's min/max (min starts at 1,
  max at 0), detections of an image are taken in descending score order (stable for ties);
- each detection goes to the ground-truth face of highest IoU (first on ties), boxes compared with
  the kit's inclusive-pixel IoU (`+1` on widths and heights); IoU ≥ 0.5 is a hit;
- a hit on a face outside the difficulty's `gt_list` is ignored: neither true nor false positive;
  a hit on a face already found is a false positive (no fall back to the next best face);
- images without detections (or without ground truth) add their `gt_list` faces to the recall
  denominator and nothing else;
- precision and recall at the thresholds `1 - t/1000`, t = 1..1000; AP is the area under the
  interpolated (monotone envelope) precision–recall curve, VOC style.

The kit loops over images and thresholds; here everything after the per-image matching is one
vectorized count, so the full validation set is scored in well under a second.

Boxes: ground truth is kept as in the kit, `x, y, w, h` in pixels. Detections given to
:func:`evaluate` are `(N, 5)` arrays `x0, y0, x1, y1, score` (the detector's xyxy) unless
`box_format="xywh"`. The kit's text layout (:func:`write_detections`, :func:`read_detections`)
stores `x y w h score`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.io

from fdf_core.assets import MissingAssetError, assets_dir
from fdf_core.tario import atomic_write_bytes, atomic_write_json
from fdf_core.errors import InputError, MissingInputError, NothingToDoError

log = logging.getLogger(__name__)

DIFFICULTIES = ("easy", "medium", "hard")
LABEL_NAMES = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")
GT_MAT = "wider_face_val.mat"
GT_TXT = "wider_face_val_bbx_gt.txt"
NUM_THRESHOLDS = 1000


class UnknownImageError(InputError, KeyError):
    """A detection for an image that is not in the validation set (a KeyError for old callers)."""


@dataclass(frozen=True)
class WiderGT:
    """The validation ground truth in the kit's image order.

    `names[i]` is the image path relative to `WIDER_val/images` (`0--Parade/0_Parade_….jpg`);
    `boxes[i]` `(N, 4)` int `x, y, w, h`; `labels[i]` `(N, 6)` int, columns :data:`LABEL_NAMES`;
    `keep[difficulty][i]` `(N,)` bool, the faces that count for that difficulty.
    Images without a face hold one all-zero box, as in the official .mat file.
    """

    names: list[str]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    keep: dict[str, list[np.ndarray]]
    _stems: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_stems", {Path(n).stem: i for i, n in enumerate(self.names)})

    @property
    def num_faces(self) -> int:
        return sum(len(b) for b in self.boxes)

    def index(self, name: str) -> int:
        """Index of an image given as `event/file.jpg`, `file.jpg` or `file` (stems are unique)."""
        stem = Path(name).stem
        if stem not in self._stems:
            raise UnknownImageError(f"{name!r} is not a WIDER FACE validation image")
        return self._stems[stem]

    def boxes_xyxy(self, i: int) -> np.ndarray:
        """Face boxes of image `i` as float `x0, y0, x1, y1` (pixel edges: `x1 = x + w`)."""
        b = self.boxes[i].astype(np.float64)
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:4]], axis=1)


def _cells(mat: dict, key: str, path: Path) -> list:
    """MATLAB `{61×1 cell}` of `{n×1 cell}` → nested Python lists."""
    if key not in mat:
        have = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no variable {key!r} (has {have})")
    return [list(event.reshape(-1)) for event in mat[key].reshape(-1)]


def load_wider_gt(root: str | os.PathLike | None = None) -> WiderGT:
    """Read `wider_face_val.mat` and the three `wider_<difficulty>_val.mat` of the official kit.

    `root` defaults to `$FDF_ASSETS/wider`.
    """
    root = Path(root) if root is not None else assets_dir() / "wider"
    paths = {name: root / name for name in [GT_MAT] + [f"wider_{d}_val.mat" for d in DIFFICULTIES]}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise MissingAssetError(f"WIDER FACE ground truth missing: {', '.join(missing)} (the official "
                                "kit's ground_truth/ folder)")
    path = paths[GT_MAT]
    mat = scipy.io.loadmat(path)
    events = [str(e.reshape(-1)[0]) for e in mat["event_list"].reshape(-1)]
    files = _cells(mat, "file_list", path)
    face_boxes = _cells(mat, "face_bbx_list", path)
    label_cells = [_cells(mat, f"{n}_label_list", path) for n in LABEL_NAMES]
    names, boxes, labels = [], [], []
    for e, event in enumerate(events):
        for j, file in enumerate(files[e]):
            names.append(f"{event}/{str(file[0])}.jpg")
            b = np.asarray(face_boxes[e][j], np.int64).reshape(-1, 4)
            boxes.append(b)
            lab = [np.asarray(cells[e][j], np.int64).reshape(-1) for cells in label_cells]
            labels.append(np.stack(lab, axis=1) if len(b) else np.zeros((0, 6), np.int64))
    keep = {}
    for d in DIFFICULTIES:
        dpath = paths[f"wider_{d}_val.mat"]
        lists = [idx for event in _cells(scipy.io.loadmat(dpath), "gt_list", dpath) for idx in event]
        if len(lists) != len(names):
            raise ValueError(f"{dpath}: gt_list has {len(lists)} images, {path} has {len(names)}")
        masks = []
        for i, idx in enumerate(lists):
            idx = np.asarray(idx, np.int64).reshape(-1)
            if idx.size and (idx.min() < 1 or idx.max() > len(boxes[i])):
                raise ValueError(f"{dpath}: gt_list of {names[i]} has index outside 1..{len(boxes[i])}")
            m = np.zeros(len(boxes[i]), bool)
            m[idx - 1] = True  # MATLAB indices are 1-based
            masks.append(m)
        keep[d] = masks
    return WiderGT(names, boxes, labels, keep)


def read_gt_txt(path: str | os.PathLike) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Read `wider_face_val_bbx_gt.txt`: `(names, boxes (N,4) x y w h, labels (N,6))`.

    Layout per image: the image path, the face count, then one `x y w h blur expression
    illumination invalid occlusion pose` line per face. The original release writes a count of 0
    followed by one all-zero line for an image without faces; that is read as the .mat file stores
    it, one all-zero box.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    names, boxes, labels = [], [], []
    n = 0
    while n < len(lines):
        name = lines[n].strip()
        if not name:
            n += 1
            continue
        try:
            count = int(lines[n + 1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{n + 2}: expected the face count of {name}") from None
        rows = []
        for k in range(max(count, 1)):
            try:
                vals = [int(v) for v in lines[n + 2 + k].split()]
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{n + 3 + k}: expected face {k + 1} of {count} of {name} "
                                 "as 10 integers") from None
            if len(vals) != 10:
                raise ValueError(f"{path}:{n + 3 + k}: {len(vals)} values, expected 10")
            rows.append(vals)
        arr = np.asarray(rows, np.int64).reshape(-1, 10)
        names.append(name)
        boxes.append(arr[:, :4])
        labels.append(arr[:, 4:])
        n += 2 + max(count, 1)
    return names, boxes, labels


def _as_kit_boxes(dets: np.ndarray, box_format: str, where: str) -> np.ndarray:
    """`(N, 5)` float `x0, y0, x1, y1, score` with `x1 = x + w`, as the kit compares boxes."""
    dets = np.asarray(dets, np.float64)
    if dets.size == 0:
        return np.zeros((0, 5))
    if dets.ndim != 2 or dets.shape[1] < 5:
        raise ValueError(f"detections of {where}: expected (N, 5) boxes + score, got shape {dets.shape}")
    if not np.isfinite(dets[:, :5]).all():
        raise ValueError(f"detections of {where}: non-finite values")
    dets = dets[:, :5].copy()
    if box_format == "xywh":
        dets[:, 2:4] += dets[:, 0:2]
    elif box_format != "xyxy":
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', not {box_format!r}")
    return dets


def _kit_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of `(P, 4)` against `(G, 4)` corner boxes with the kit's inclusive pixels (`+1`)."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    valid = (iw > 0) & (ih > 0)
    inter = np.where(valid, iw * ih, 0.0)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(valid, inter / union, 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope; undefined precision (no detection kept) counts as 0."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], np.nan_to_num(precision, nan=0.0), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def pr_curves(detections: dict[str, np.ndarray], gt: WiderGT, box_format: str = "xyxy",
              iou_threshold: float = 0.5, num_thresholds: int = NUM_THRESHOLDS
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per difficulty `(precision, recall)` at the kit's thresholds, highest threshold first.

    `detections` maps image names (any form :meth:`WiderGT.index` accepts) to `(N, 5)` arrays;
    images that are absent have no detections.
    """
    per_image: dict[int, np.ndarray] = {}
    for name, dets in detections.items():
        i = gt.index(name)
        if i in per_image:
            raise ValueError(f"detections given twice for {gt.names[i]} (as {name!r})")
        per_image[i] = _as_kit_boxes(dets, box_format, name)
    all_scores = [d[:, 4] for d in per_image.values() if len(d)]
    lo, hi = 1.0, 0.0  # the kit's starting values
    if all_scores:
        lo = min(lo, min(float(s.min()) for s in all_scores))
        hi = max(hi, max(float(s.max()) for s in all_scores))

    offsets = np.cumsum([0] + [len(b) for b in gt.boxes])
    scores, face, hit = [], [], []
    for i in sorted(per_image):
        dets, boxes = per_image[i], gt.boxes[i]
        if len(dets) == 0 or len(boxes) == 0:
            continue
        dets = dets[np.argsort(-dets[:, 4], kind="stable")]
        gt_corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:4]], 1).astype(np.float64)
        iou = _kit_iou(dets[:, :4], gt_corners)
        best = iou.argmax(axis=1)
        scores.append((dets[:, 4] - lo) / (hi - lo) if hi > lo else np.ones(len(dets)))
        face.append(offsets[i] + best)
        hit.append(iou[np.arange(len(dets)), best] >= iou_threshold)
    scores = np.concatenate(scores) if scores else np.zeros(0)
    face = np.concatenate(face) if face else np.zeros(0, np.int64)
    hit = np.concatenate(hit) if hit else np.zeros(0, bool)
    thresholds = 1 - np.arange(1, num_thresholds + 1) / num_thresholds

    def count_at_or_above(selected: np.ndarray) -> np.ndarray:
        s = np.sort(scores[selected])
        return len(s) - np.searchsorted(s, thresholds, side="left")

    curves = {}
    for d in DIFFICULTIES:
        keep = np.concatenate(gt.keep[d]) if gt.keep[d] else np.zeros(0, bool)
        num_faces = int(keep.sum())
        if num_faces == 0:
            raise ValueError(f"no ground-truth face counts for difficulty {d!r}")
        counted = keep[face] if len(face) else np.zeros(0, bool)
        proposal = ~(hit & ~counted)
        true_hit = np.flatnonzero(hit & counted)
        # a face is found by its first (highest-scored) hit; the kit's per-image order is kept
        _, first = np.unique(face[true_hit], return_index=True)
        found = np.zeros(len(face), bool)
        found[true_hit[first]] = True
        tp = count_at_or_above(found).astype(np.float64)
        proposals = count_at_or_above(proposal)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / proposals
        curves[d] = (precision, tp / num_faces)
    return curves


def evaluate(detections: dict[str, np.ndarray], gt: WiderGT, box_format: str = "xyxy",
             iou_threshold: float = 0.5, num_thresholds: int = NUM_THRESHOLDS) -> dict[str, float]:
    """WIDER FACE AP per difficulty: `{"easy": ap, "medium": ap, "hard": ap}`."""
    curves = pr_curves(detections, gt, box_format, iou_threshold, num_thresholds)
    return {d: voc_ap(recall, precision) for d, (precision, recall) in curves.items()}


def write_detections(out_dir: str | os.PathLike, detections: dict[str, np.ndarray],
                     box_format: str = "xyxy") -> int:
    """Write the kit's layout: `<out_dir>/<event>/<file stem>.txt` per image, holding the stem,
    the count, then `x y w h score` lines. Keys are `event/file.jpg`. Returns the files written."""
    out_dir = Path(out_dir)
    for name, dets in detections.items():
        event, _, file = name.replace("\\", "/").rpartition("/")
        if not event or "/" in event or event in (".", ".."):
            raise ValueError(f"detection key {name!r}: expected '<event>/<file>.jpg'")
        d = _as_kit_boxes(dets, box_format, name)
        d[:, 2:4] -= d[:, 0:2]
        lines = [Path(file).stem, str(len(d))] + [" ".join(repr(float(v)) for v in row) for row in d]
        atomic_write_bytes(out_dir / event / f"{Path(file).stem}.txt", ("\n".join(lines) + "\n").encode())
    return len(detections)


def read_detections(pred_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a folder in the kit's layout into `{"event/file.jpg": (N, 5) x0 y0 x1 y1 score}`."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise MissingInputError(f"detection folder {pred_dir} does not exist")
    out = {}
    for path in sorted(pred_dir.glob("*/*.txt")):
        lines = path.read_text().splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) < 2:
            raise InputError(f"{path}: expected the image name and the detection count")
        if Path(lines[0].strip().replace("\\", "/")).stem != path.stem:
            raise InputError(f"{path}:1: image name {lines[0].strip()!r} does not match the file name")
        try:
            count = int(lines[1])
        except ValueError:
            raise InputError(f"{path}:2: expected the detection count, got {lines[1]!r}") from None
        if len(lines) - 2 != count:
            raise InputError(f"{path}: count says {count} detections, found {len(lines) - 2} lines")
        rows = []
        for k, line in enumerate(lines[2:], start=3):
            try:
                vals = [float(v) for v in line.split()]
            except ValueError:
                raise InputError(f"{path}:{k}: expected 'x y w h score', got {line!r}") from None
            if len(vals) != 5:
                raise InputError(f"{path}:{k}: {len(vals)} values, expected 'x y w h score'")
            rows.append(vals)
        d = np.asarray(rows, np.float64).reshape(-1, 5)
        d[:, 2:4] += d[:, 0:2]
        out[f"{path.parent.name}/{path.stem}.jpg"] = d
    return out


@dataclass
class WiderEvalConfig:
    """Score a folder of detections in the kit's text layout.

    Args:
        pred_dir: `<event>/<image>.txt` files (official layout)
        gt_dir: folder of the kit's .mat files (default `$FDF_ASSETS/wider`)
        output: JSON file for the APs (options are saved beside it)
        iou_threshold: IoU for a detection to match a face (the kit: 0.5)
        strict: an image without a detection file is an error instead of a warning
    """

    pred_dir: str
    gt_dir: str | None = None
    output: str = "wider_ap.json"
    iou_threshold: float = 0.5
    strict: bool = False


def images_without_detections(detections: dict[str, np.ndarray], gt: WiderGT) -> list[str]:
    """Validation images (kit order) that `detections` does not mention."""
    have = {gt.index(name) for name in detections}
    return [name for i, name in enumerate(gt.names) if i not in have]


def check_coverage(detections: dict[str, np.ndarray], gt: WiderGT, pred_dir: str | os.PathLike,
                   strict: bool = False) -> int:
    """Warn (or with `strict` fail) when images have no detection file: the protocol scores them as
    images without detections, so a truncated detection run gives a low AP without a word."""
    if not detections:
        raise NothingToDoError(f"--pred_dir {pred_dir}: no detection files (<event>/<image>.txt, the kit's "
                               "layout)")
    missing = images_without_detections(detections, gt)
    if missing:
        message = (f"{len(missing)} of {len(gt.names)} WIDER FACE val images have no detection file in "
                   f"{pred_dir} (first: {Path(missing[0]).with_suffix('.txt')}); they count as images "
                   "without detections, so a truncated run gives a low AP")
        if strict:
            raise InputError(message)
        log.warning("%s (--strict true makes this an error)", message)
    return len(missing)


def run(cfg: WiderEvalConfig) -> dict[str, float]:
    """AP per difficulty of `cfg.pred_dir` (written to `cfg.output`), with the count of images
    without a detection file and the seconds it took."""
    start = time.perf_counter()
    gt = load_wider_gt(cfg.gt_dir)
    detections = read_detections(cfg.pred_dir)
    missing = check_coverage(detections, gt, cfg.pred_dir, cfg.strict)
    aps = evaluate(detections, gt, iou_threshold=cfg.iou_threshold)
    out = Path(cfg.output)
    atomic_write_json(out.with_name(out.stem + "_options.json"), asdict(cfg))
    atomic_write_json(out, aps)
    return {**aps, "images_without_detections": missing, "seconds": round(time.perf_counter() - start, 2)}

