"""Training the last stages of a backbone from cached activations of its frozen first stages.

On a CPU most of a whole-network epoch is spent in the early, high-resolution stages, which a
small medical set cannot retrain anyway. Here the frozen stages run once per image and *view*
(the plain image, then ``views - 1`` augmented copies), their activations are kept in memory
(float16), and every epoch trains only the last ``blocks`` stages, the 1x1 head convolution and
the embedding head on them: an epoch costs a fraction of the whole network's (docs/QUALITY.md).
Each training sample draws one of its views at random, so the augmentation still varies from
epoch to epoch.

Backbones built as EfficientNets (``conv_stem``, ``bn1``, ``blocks`` of stages, ``conv_head``,
``bn2``: Lite0-2, timm's EfficientNets) can be split so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cbir.errors import CbirError
from cbir.models.extractor import Extractor

SPLIT_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


def stage_count(backbone: nn.Module) -> int | None:
    """How many stages ``backbone`` has to split between, or None where it cannot be split."""
    if not all(hasattr(backbone, part) for part in SPLIT_PARTS) or not isinstance(backbone.blocks, nn.Sequential):
        return None
    return len(backbone.blocks)


def check_splittable(extractor: Extractor, blocks: int) -> None:
    stages = stage_count(extractor.backbone)
    if stages is None:
        raise CbirError(f"--train-blocks: {extractor.spec.architecture} is not built as an EfficientNet (stem, "
                        "stages, head convolution), so it cannot be split; use an efficientnet_* model or leave "
                        "--train-blocks out")
    if not 1 <= blocks <= stages:
        raise CbirError(f"--train-blocks {blocks}: {extractor.spec.architecture} has {stages} stages; give 1 to {stages}")


@dataclass
class SplitBackbone:
    """The frozen first stages (``trunk``) and the trained rest (``top``) of an extractor's backbone;
    ``top`` shares its modules with the backbone, so training it trains the extractor."""

    extractor: Extractor
    blocks: int

    def __post_init__(self) -> None:
        check_splittable(self.extractor, self.blocks)
        backbone = self.extractor.backbone
        cut = len(backbone.blocks) - self.blocks
        self.frozen = nn.ModuleList([backbone.conv_stem, backbone.bn1, *backbone.blocks[:cut]])
        self.top = nn.ModuleList([*backbone.blocks[cut:], backbone.conv_head, backbone.bn2])
        for parameter in self.frozen.parameters():
            parameter.requires_grad_(False)

    @torch.inference_mode()
    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        self.frozen.eval()
        activations = self.extractor.normalise(images.to(self.extractor.device))
        for module in self.frozen:
            activations = module(activations.contiguous(memory_format=torch.channels_last))
        return activations

    def features(self, activations: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of cached activations (average pooling, as the backbone's own)."""
        activations = activations.to(self.extractor.device).float()
        for module in self.top:
            activations = module(activations)
        return F.adaptive_avg_pool2d(activations, 1).flatten(1)

    def __call__(self, activations: torch.Tensor) -> torch.Tensor:
        """Embeddings of cached activations, as the extractor gives of the images."""
        return self.extractor.project(self.features(activations))

    def cache(self, loader: DataLoader, description: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(float16 activations, labels) of every image of ``loader``, in order."""
        activations, labels = [], []
        for images, classes, _ in tqdm(loader, desc=description, unit="batch", disable=not progress):
            activations.append(self.trunk(images).half().cpu())
            labels.append(classes)
        return torch.cat(activations), torch.cat(labels)


class CachedViews(Dataset):
    """Training samples from cached activations: (one of its views at random, class, position)."""

    def __init__(self, views: Sequence[torch.Tensor], labels: torch.Tensor):
        self.views, self.labels = list(views), labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int):
        view = int(torch.randint(len(self.views), ()))
        return self.views[view][position], self.labels[position], position


class Cached(Dataset):
    """(activations, class, position) of one cached set: references and validation images."""

    def __init__(self, activations: torch.Tensor, labels: torch.Tensor):
        self.activations, self.labels = activations, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int):
        return self.activations[position], self.labels[position], position


def cached_loaders(split: SplitBackbone, augmented: Dataset, reference: DataLoader, validation: DataLoader, views: int,
                   batch_size: int, sampler, workers: int, progress: bool) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(training, reference, validation) loaders over cached activations: the training images' plain
    view (``reference``'s images), ``views - 1`` augmented ones and the validation images, each run
    through the frozen trunk once."""
    plain, labels = split.cache(reference, "caching the frozen stages: training images", progress)
    copies = [plain]
    augmented_loader = DataLoader(augmented, batch_size=reference.batch_size, num_workers=workers)
    for view in range(1, views):
        copies.append(split.cache(augmented_loader, f"caching the frozen stages: augmented view {view}/{views - 1}",
                                  progress)[0])
    validation_cache = split.cache(validation, "caching the frozen stages: validation images", progress)
    return (DataLoader(CachedViews(copies, labels), batch_size=batch_size, sampler=sampler, drop_last=True),
            DataLoader(Cached(plain, labels), batch_size=256),
            DataLoader(Cached(*validation_cache), batch_size=256))
