"""Images to model inputs: the resize the pretrained weights expect, as uint8 tensors."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageChops


@dataclass
class Preprocess:
    """PIL RGB or L (grey) image -> uint8 CHW tensor of the model's input size; picklable for
    DataLoader workers.

    Resized by Pillow (``reducing_gap=3.0``): the pixels the pretrained weights were used with.
    Normalisation happens inside :class:`Extractor` on whole batches: cheaper than per image,
    and training's decoding processes send a quarter of the bytes.
    """

    input_size: int
    interpolation: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        grey = image if image.mode == "L" else _grey_band(image)
        if grey is not None:
            # Resampling works band by band, so one band gives the same pixels as three, for a
            # third of the resize.
            return torch.from_numpy(np.array(self._resized(grey))).expand(3, -1, -1)
        return torch.from_numpy(np.array(self._resized(image))).permute(2, 0, 1)

    def _resized(self, image: Image.Image) -> Image.Image:
        # A checkpoint names one of the two; any other name has always meant bilinear here.
        method = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
        return image.resize((self.input_size, self.input_size), method, reducing_gap=3.0)


def _grey_band(image: Image.Image) -> Image.Image | None:
    """One band of an RGB image whose three bands are equal (most medical images are grey saved
    as RGB), else None."""
    red, green, blue = image.split()
    # Compared in Pillow: half the time of copying the pixels out to numpy and comparing there.
    if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(green, blue).getbbox() is None:
        return red
    return None

