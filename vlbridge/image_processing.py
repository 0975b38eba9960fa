"""Image transforms with Pillow + torch only: resize (squash or pad-to-square) and normalise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class ImageProcessor:
    """PIL image -> normalised float tensor [3, size, size]."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"
    resample: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.resize == "pad":
            image = pad_to_square(image, tuple(int(255 * m) for m in self.mean))
        if self.resize == "crop":
            image = shortest_edge_crop(image, self.size, _RESAMPLE[self.resample])
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), _RESAMPLE[self.resample])
        return to_tensor(image, self.mean, self.std)


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centre the image on a square canvas of its longer side (LLaVA's `pad` aspect mode)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def shortest_edge_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """The shorter side resized to `size` (the longer one in proportion, truncated), then the centre
    `size` x `size` square: CLIP's image processor, so imported LLaVA checkpoints see their own pixels."""
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if new != image.size:
        image = image.resize(new, resample)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    """uint8 HWC -> normalised float32 CHW."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
