"""Training images as tensors: light augmentation, labels as class indices."""
from __future__ import annotations

from typing import Sequence

from torch.utils.data import Dataset

from cbir.errors import CbirError, ImageError
from cbir.images.sources import ImageItem


class Augment:
    """Training augmentations for medical images: crops, flips, small rotations, mild colour jitter."""

    def __init__(self, input_size: int):
        from torchvision.transforms import v2

        self.transform = v2.Compose([
            v2.RandomResizedCrop(input_size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05, hue=0.02),  # stain variation
            v2.PILToTensor(),
        ])

    def __call__(self, image):
        return self.transform(image)


class LabelledImages(Dataset):
    def __init__(self, items: Sequence[ImageItem], class_index: dict[str, int], transform):
        self.items, self.class_index, self.transform = list(items), class_index, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        item = self.items[position]
        try:
            image, _ = item.read()
        except ImageError as exc:
            raise CbirError(f"training image unreadable: {exc}") from exc
        return self.transform(image), self.class_index[item.label], position

