"""The 7 FDF keypoints for detected faces, from MoveNet (top-down) or Keypoint R-CNN (whole image).

Both backends give, for every face box, either a (7, 3) array of x, y, score in photo pixels (COCO
keypoints 0-6, DeepPrivacy's order) or None when no person passes FDF's matching rule
(`fdf_builder.matching`), in which case the face is dropped.

MoveNet SinglePose sees one person, so it runs once per face on a square region around the face
that reaches down to the shoulders; its person counts as found when the nose and both eyes score at
least the matching threshold and lie in the face box. Keypoint R-CNN (FDF's choice) sees every
person of the photo at once, and the boxes are matched to them.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from fdf_core.assets import MissingAssetError, resolve_file
from fdf_builder.face_models import KEYPOINT_BACKENDS, unknown_choice
from fdf_core.errors import InputError
from fdf_core.keypoints import KEYPOINT_NAMES
from fdf_builder.detector import load_state_dict
from fdf_builder.matching import FACE_KEYPOINTS, SCORE_THRESHOLD, face_in_box, match_faces

WEIGHTS_FLAG = "--keypoint_weights"
MOVENET_ASSET = "weights/movenet/movenet_singlepose_lightning_int8_4.tflite"
MOVENET_INPUT = 192
# MoveNet region: a square of REGION_SCALE face sides, its centre REGION_SHIFT face sides below the
# face centre, so it spans from the top of the face box to two faces below it (the shoulders).
# On the 128 faces wider than 75 px of the shared corpus, 2.5-3.5 sides with shifts 0.5-1 matched
# 102-111 faces (3.0/1.0 the most); 4 or 5 sides put more people in view and matched 82-94.
REGION_SCALE = 3.0
REGION_SHIFT = 1.0


class KeypointModel:
    """Interface of the backends: `name` and `keypoints_for_faces`."""
    name: str

    def keypoints_for_faces(self, image: np.ndarray, boxes: np.ndarray,
                            scores: np.ndarray) -> list[np.ndarray | None]:
        """Per face box (x0, y0, x1, y1 px, with its detector score): (7, 3) x, y, score or None."""
        raise NotImplementedError


def build_keypoint_model(name: str = "movenet", weights: str | None = None, device: str = "cpu",
                         allow_download: bool = False) -> KeypointModel:
    """Load a keypoint backend by name; weights from `weights`, an env var or the shared assets.

    movenet: `weights` / $FDF_MOVENET_WEIGHTS / $FDF_ASSETS/<MOVENET_ASSET> (runs on CPU whatever
    `device` says). keypoint-rcnn: `weights` / $FDF_KEYPOINT_RCNN_WEIGHTS (torchvision's COCO
    state dict), else downloaded into torch's hub cache only when `allow_download`.
    """
    if name == "movenet":
        path = resolve_file(weights, "FDF_MOVENET_WEIGHTS", MOVENET_ASSET,
                            "MoveNet SinglePose Lightning int8 weights (.tflite)", WEIGHTS_FLAG)
        # torch's thread count, as the detector's runtime: the data build loads its models under one
        # thread per process, `anonymize` under all cores (int8 results are the same to the bit;
        # 2.6 -> 2.2 ms a face on 2 cores)
        return MoveNetKeypoints(str(path), num_threads=torch.get_num_threads())
    if name == "keypoint-rcnn":
        return KeypointRCNNKeypoints(_keypoint_rcnn_state(weights, allow_download), device)
    raise unknown_choice("--keypoints", "keypoint backend", name, KEYPOINT_BACKENDS)


def _check(image: np.ndarray, boxes: np.ndarray,
           scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        raise ValueError("image must be an HxWx3 uint8 RGB array")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    return boxes, scores


def movenet_region(box: np.ndarray) -> tuple[int, int, int, int]:
    """The square (x0, y0, x1, y1 px, may pass the border) MoveNet sees for one face box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    face = max(x1 - x0, y1 - y0, 1.0)
    side = max(int(math.ceil(face * REGION_SCALE)), 1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + REGION_SHIFT * face
    rx0, ry0 = math.floor(cx - side / 2 + 0.5), math.floor(cy - side / 2 + 0.5)
    return rx0, ry0, rx0 + side, ry0 + side


def _cut(image: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels of `region`, zeros where it passes the border of the photo."""
    x0, y0, x1, y1 = region
    h, w = image.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
    return out


class MoveNetKeypoints(KeypointModel):
    """MoveNet SinglePose Lightning (int8 TFLite) on CPU, one call per face, on `num_threads`
    interpreter threads (`build_keypoint_model`: torch's)."""
    name = "movenet"

    def __init__(self, model_path: str, num_threads: int = 1,
                 threshold: float = SCORE_THRESHOLD) -> None:
        from ai_edge_litert.interpreter import Interpreter
        try:
            self.interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"{model_path}: not a loadable TFLite model ({exc})") from exc
        inp = self.interpreter.get_input_details()[0]
        out = self.interpreter.get_output_details()[0]
        if tuple(inp["shape"]) != (1, MOVENET_INPUT, MOVENET_INPUT, 3) or inp["dtype"] != np.uint8 \
                or tuple(out["shape"]) != (1, 1, 17, 3):
            raise InputError(f"{model_path}: expected MoveNet SinglePose Lightning int8 (uint8 "
                             f"input 1x{MOVENET_INPUT}x{MOVENET_INPUT}x3, output 1x1x17x3), got "
                             f"input {inp['shape'].tolist()} {inp['dtype'].__name__}, output "
                             f"{out['shape'].tolist()}")
        self._input, self._output = inp["index"], out["index"]
        self.threshold = threshold

    def person(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """MoveNet's person in the region of one face box: (7, 3) x, y, score in photo pixels."""
        region = movenet_region(box)
        crop = _cut(image, region)
        side = region[2] - region[0]
        interp = cv2.INTER_AREA if side > MOVENET_INPUT else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (MOVENET_INPUT, MOVENET_INPUT), interpolation=interp)
        self.interpreter.set_tensor(self._input, crop[None])
        self.interpreter.invoke()
        yxs = self.interpreter.get_tensor(self._output)[0, 0, :len(KEYPOINT_NAMES)]
        kp = np.empty((len(KEYPOINT_NAMES), 3), dtype=np.float32)
        kp[:, 0] = region[0] + yxs[:, 1] * side
        kp[:, 1] = region[1] + yxs[:, 0] * side
        kp[:, 2] = yxs[:, 2]
        return kp

    def keypoints_for_faces(self, image: np.ndarray, boxes: np.ndarray,
                            scores: np.ndarray) -> list[np.ndarray | None]:
        boxes, _ = _check(image, boxes, scores)
        out: list[np.ndarray | None] = []
        for box in boxes:
            kp = self.person(image, box)
            found = kp[list(FACE_KEYPOINTS), 2].min() >= self.threshold and face_in_box(box, kp)
            out.append(kp if found else None)
        return out


def _keypoint_rcnn_state(weights: str | None, allow_download: bool) -> dict[str, torch.Tensor]:
    try:
        path = resolve_file(weights, "FDF_KEYPOINT_RCNN_WEIGHTS", None,
                            "Keypoint R-CNN R50-FPN COCO weights (torchvision "
                            "keypointrcnn_resnet50_fpn_coco state dict, .pth)", WEIGHTS_FLAG)
    except MissingAssetError as exc:
        if weights or not allow_download:
            raise MissingAssetError(f"{exc}. Or pass --allow_download true to fetch it (needs "
                                    "internet).") from None
        from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights
        return KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.get_state_dict(
            progress=False, map_location="cpu", weights_only=True)
    return load_state_dict(path)


class KeypointRCNNKeypoints(KeypointModel):
    """torchvision Keypoint R-CNN R50-FPN on the whole photo, then FDF's matching.

    torchvision's keypoint scores are heatmap logits; they are stored as sigmoid(logit) so that
    every backend's scores lie in [0, 1]. Persons are candidates when their detection score reaches
    the matching threshold (as in DeepPrivacy).
    """
    name = "keypoint-rcnn"

    def __init__(self, state_dict: dict[str, torch.Tensor], device: str = "cpu",
                 threshold: float = SCORE_THRESHOLD) -> None:
        from torchvision.models.detection import keypointrcnn_resnet50_fpn
        net = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        try:
            net.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise InputError(f"weights do not fit keypointrcnn_resnet50_fpn: {exc}") from exc
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.threshold = threshold

    @torch.inference_mode()
    def persons(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All persons of a photo: (P, 7, 3) x, y, score in pixels and (P,) person scores."""
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        x = x.permute(2, 0, 1).float() / 255
        out = self.net([x])[0]
        n = len(KEYPOINT_NAMES)
        kp = torch.cat([out["keypoints"][:, :n, :2],
                        out["keypoints_scores"][:, :n, None].sigmoid()], dim=2)
        return kp.cpu().numpy().astype(np.float32), out["scores"].cpu().numpy().astype(np.float32)

    def keypoints_for_faces(self, image: np.ndarray, boxes: np.ndarray,
                            scores: np.ndarray) -> list[np.ndarray | None]:
        boxes, scores = _check(image, boxes, scores)
        if len(boxes) == 0:
            return []
        kps, person_scores = self.persons(image)
        matches = match_faces(boxes, scores, kps, person_scores, self.threshold)
        return [None if p is None else kps[p] for p in matches]
