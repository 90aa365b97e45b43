"""EfficientNet-Lite0 in plain PyTorch, layer for layer timm's ``tf_efficientnet_lite0``.

The default extractor of every command. Building it through timm costs a one-query command
seconds of importing timm's whole model zoo (docs/PERFORMANCE.md); this module builds the same network (the same
parameter names in the same order, so the same fingerprint, and the same operations, so the same
vectors: the tests compare both) with nothing but torch. Other backbones still come from timm.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (blocks, kernel, stride of the first block, expansion, output channels) of each stage
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS = 32
NUM_FEATURES = 1280
BN_EPS = 1e-3  # TensorFlow's, which the ImageNet weights were trained with


class Conv2dSame(nn.Conv2d):
    """A strided convolution with TensorFlow's "SAME" padding: the padding depends on the input
    size, the odd pixel going to the bottom and right."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        padding = []
        for size, kernel, stride in zip(reversed(images.shape[-2:]), reversed(self.kernel_size),
                                        reversed(self.stride)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            padding += [total // 2, total - total // 2]
        return F.conv2d(F.pad(images, padding), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride > 1:
        return Conv2dSame(in_channels, out_channels, kernel, stride, groups=groups, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class BatchNormAct(nn.BatchNorm2d):
    """Batch normalisation, then ReLU6 where ``act``: timm's BatchNormAct2d, whose parameters it shares."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(images))


class DepthwiseSeparable(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv_dw = conv(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = BatchNormAct(in_channels)
        self.conv_pw = conv(in_channels, out_channels, 1)
        self.bn2 = BatchNormAct(out_channels, act=False)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.bn1(self.conv_dw(images))))
        return out + images if self.skip else out


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        middle = in_channels * expansion
        self.conv_pw = conv(in_channels, middle, 1)
        self.bn1 = BatchNormAct(middle)
        self.conv_dw = conv(middle, middle, kernel, stride, groups=middle)
        self.bn2 = BatchNormAct(middle)
        self.conv_pwl = conv(middle, out_channels, 1)
        self.bn3 = BatchNormAct(out_channels, act=False)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(images))))))
        return out + images if self.skip else out


class EfficientNetLite0(nn.Module):
    """Pooled 1280-d features of EfficientNet-Lite0 (no classifier), as timm's ``num_classes=0``."""

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.conv_stem = conv(3, STEM_CHANNELS, 3, stride=2)
        self.bn1 = BatchNormAct(STEM_CHANNELS)
        stages, channels = [], STEM_CHANNELS
        for number, (blocks, kernel, stride, expansion, out_channels) in enumerate(STAGES):
            stage = []
            for block in range(blocks):
                first_stride = stride if block == 0 else 1
                stage.append(DepthwiseSeparable(channels, out_channels, kernel, first_stride) if number == 0 else
                             InvertedResidual(channels, out_channels, kernel, first_stride, expansion))
                channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(channels, NUM_FEATURES, 1)
        self.bn2 = BatchNormAct(NUM_FEATURES)
        self._initialise()

    def _initialise(self) -> None:
        """The initialisation of timm (and of the TensorFlow original) for training from scratch."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling (as timm's ``forward_features``)."""
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(images)))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.forward_features(images), 1).flatten(1)
