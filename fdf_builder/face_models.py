"""The face models of every job that finds faces: one config, one check, one way to load them.

fdf-build (`BuildConfig`), anonymize (`AnonymizerConfig`) and fdf-wider (`WiderJobConfig`) find faces
with the same RetinaFace detector and keypoint backends. Their configs inherit
:class:`FaceModelsConfig`, so the flags (`--detector`, `--keypoints`, `--confidence`, ...) are
spelled, documented and checked the same everywhere, before a job writes anything, and
:func:`load_detector` / :func:`load_keypoint_model` build the models from any of them.

A new detector or keypoint backend gets its name in :data:`DETECTORS` / :data:`KEYPOINT_BACKENDS`
and its loader in `fdf_builder.detector.build_detector` / `fdf_builder.keypoints.build_keypoint_model`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from fdf_core.errors import ConfigError

DETECTORS = ("retinaface_mnet025", "retinaface_r50")
DETECTOR_RUNTIMES = ("auto", "torch", "onnxruntime")  # auto: onnxruntime on a CPU, torch on a GPU
KEYPOINT_BACKENDS = ("movenet", "keypoint-rcnn")
NO_KEYPOINTS = "none"  # keypoint backend name where a job allows it: every face without pose
PAD_MULTIPLE = 32  # the detector's coarsest stride: inputs are padded to multiples of it


def unknown_choice(flag: str, what: str, name: str, choices: tuple[str, ...]) -> ConfigError:
    return ConfigError(f"{flag}: unknown {what} {name!r}; choose one of {', '.join(choices)}")


def check_detector_options(confidence: float, nms: float, max_size: int, batch_size: int) -> None:
    """The detector's thresholds and sizes (also checked by `FaceDetector` for direct callers)."""
    if not 0.0 <= confidence <= 1.0 or not 0.0 <= nms <= 1.0:
        raise ConfigError(f"--confidence ({confidence}) and --nms ({nms}) must be in [0, 1]")
    if max_size < PAD_MULTIPLE or batch_size < 1:
        raise ConfigError(f"--detect_max_size ({max_size}) must be >= {PAD_MULTIPLE} and --batch_size "
                          f"({batch_size}) >= 1")


@dataclass(kw_only=True)
class FaceModelsConfig:
    """The face detector and keypoint model of a job.

    Args:
        detector: retinaface_mnet025 or retinaface_r50 (FDF's; its weights must be given or downloaded)
        detector_weights: weight file (else $FDF_RETINAFACE_WEIGHTS / $FDF_RETINAFACE_R50_WEIGHTS)
        confidence: detector score threshold (FDF: 0.3); low values favour privacy, a missed face is
            not anonymized
        nms: IoU of the detector's non-maximum suppression
        detect_max_size: photos are shrunk to this longer side for detection
        keypoints: movenet or keypoint-rcnn (torchvision, as in the paper)
        keypoint_weights: weight file (else $FDF_MOVENET_WEIGHTS / $FDF_KEYPOINT_RCNN_WEIGHTS)
        allow_download: let RetinaFace R50 / Keypoint R-CNN fetch their weights (needs internet)
        device: cpu or cuda (MoveNet runs on the CPU whatever this says)
        detector_runtime: what runs the detector network: auto (ONNX Runtime on a CPU, the same
            weights exported in memory at load: about 1.6x faster than torch there, outputs equal to
            1e-4; torch on a GPU), torch or onnxruntime
        batch_size: photos per detector call
    """

    allow_no_keypoints: ClassVar[bool] = False  # whether `keypoints: none` is a choice of this job

    detector: str = "retinaface_mnet025"
    detector_weights: str | None = None
    confidence: float = 0.3
    nms: float = 0.3
    detect_max_size: int = 1024
    keypoints: str = "movenet"
    keypoint_weights: str | None = None
    allow_download: bool = False
    device: str = "cpu"
    detector_runtime: str = "auto"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise unknown_choice("--detector", "detector", self.detector, DETECTORS)
        backends = KEYPOINT_BACKENDS + ((NO_KEYPOINTS,) if self.allow_no_keypoints else ())
        if self.keypoints not in backends:
            raise unknown_choice("--keypoints", "keypoint backend", self.keypoints, backends)
        check_detector_options(self.confidence, self.nms, self.detect_max_size, self.batch_size)
        if self.detector_runtime not in DETECTOR_RUNTIMES:
            raise unknown_choice("--detector_runtime", "detector runtime", self.detector_runtime, DETECTOR_RUNTIMES)


def face_model_options(cfg: FaceModelsConfig) -> dict[str, Any]:
    """The face-model fields of any job's config, to build another job's config from."""
    return {f.name: getattr(cfg, f.name) for f in fields(FaceModelsConfig)}


def load_detector(cfg: FaceModelsConfig, batch_size: int | None = None):
    """The configured `FaceDetector` (`batch_size` overrides the config's images per call)."""
    from fdf_builder.detector import build_detector
    return build_detector(cfg.detector, weights=cfg.detector_weights, device=cfg.device, confidence=cfg.confidence,
                          nms=cfg.nms, max_size=cfg.detect_max_size, batch_size=batch_size or cfg.batch_size,
                          allow_download=cfg.allow_download, runtime=cfg.detector_runtime)


def load_keypoint_model(cfg: FaceModelsConfig):
    """The configured `KeypointModel`, or None for `keypoints: none`."""
    if cfg.keypoints == NO_KEYPOINTS:
        return None
    from fdf_builder.keypoints import build_keypoint_model
    return build_keypoint_model(cfg.keypoints, weights=cfg.keypoint_weights, device=cfg.device,
                                allow_download=cfg.allow_download)


@dataclass
class FaceModels:
    """Detector and keypoint model, loaded once per process (the builder's)."""

    detector: Any
    keypoints: Any


def load_face_models(cfg: FaceModelsConfig) -> FaceModels:
    return FaceModels(load_detector(cfg), load_keypoint_model(cfg))
