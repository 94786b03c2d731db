"""The RetinaFace networks, as torch modules: imported only to build or export one.

Kept apart from `fdf_builder.detector` because `retinaface.network` imports torchvision, and
torchvision imports `torch._dynamo`: 1.7 s of a one-photo `anonymize` run on 2 cores. With the
network's ONNX export cached on disk (`fdf_builder.detector.OnnxNetwork`), the CPU path runs the
detector without importing this module.
"""
from __future__ import annotations

import warnings

from retinaface.net import FPN, SSH, conv_bn, conv_dw
from retinaface.network import RetinaFace
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter


class MobileNetV1(nn.Module):
    """MobileNetV1 ×0.25 body with the key layout of Pytorch_Retinaface (`stage1..3`)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky=0.1), conv_dw(8, 16, 1), conv_dw(16, 32, 2),
            conv_dw(32, 32, 1), conv_dw(32, 64, 2), conv_dw(64, 64, 1))
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))


class RetinaFaceMobileNet(RetinaFace):
    """RetinaFace of the package with a MobileNet-0.25 body (the package only builds ResNet-50).

    `RetinaFace.__init__` is skipped because it would construct (and then discard) a ResNet-50;
    the modules are the same as the package's, with the MobileNet widths, and `forward` is reused.
    """

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.body = IntermediateLayerGetter(MobileNetV1(), {"stage1": 1, "stage2": 2, "stage3": 3})
        out_channels = 64
        self.fpn = FPN([64, 128, 256], out_channels)
        self.ssh1 = SSH(out_channels, out_channels)
        self.ssh2 = SSH(out_channels, out_channels)
        self.ssh3 = SSH(out_channels, out_channels)
        self.ClassHead = self._make_class_head(fpn_num=3, in_channels=out_channels)
        self.BboxHead = self._make_bbox_head(fpn_num=3, in_channels=out_channels)
        self.LandmarkHead = self._make_landmark_head(fpn_num=3, in_channels=out_channels)


def retinaface_r50() -> RetinaFace:
    """The network of `retinaface.predict_single.Model`, without its torchvision download flag."""
    with warnings.catch_warnings():  # the package still passes torchvision's old `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        return RetinaFace(name="Resnet50", pretrained=False,
                          return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
                          in_channels=256, out_channels=256)


NETWORKS = {"retinaface_mnet025": RetinaFaceMobileNet, "retinaface_r50": retinaface_r50}
