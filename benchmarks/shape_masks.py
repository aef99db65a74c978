"""Ground-truth masks of generated shape images, for the attention-map and prompt-to-prompt benchmarks.

- a group's mask: the pixels of the group's exact dataset colour (within RGB distance 50, as the grounding loss
  finds them: ``sdkit.training.grounding.colour_mask``; the palette colours are at least 97 apart, and two groups of
  a scene never share a colour);
- the object mask: every pixel that is an object rather than background, by the checker's rule
  (``sdkit.data.shapes_checker``): background = median of the border pixels, and a pixel is foreground when it is
  at least half-way from the background to its nearest palette colour.
"""
from __future__ import annotations

import numpy as np
import torch

from sdkit.data.shapes_checker import PALETTE
from sdkit.data.transforms import to_tensor
from sdkit.training.grounding import colour_mask


def group_mask(image, colour: str) -> torch.Tensor:
    """[H, W] bool: the pixels of ``image`` (PIL) in the dataset colour ``colour``."""
    return colour_mask(to_tensor(image), colour).bool()


def object_mask(image) -> torch.Tensor:
    """[H, W] bool: the object (foreground) pixels of ``image`` (PIL)."""
    img = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    d_bg = np.linalg.norm(img - bg, axis=-1)
    nearest = np.linalg.norm(img[:, :, None, :] - PALETTE, axis=-1).argmin(-1)
    return torch.from_numpy(d_bg > 0.5 * np.linalg.norm(PALETTE - bg, axis=-1)[nearest])


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two bool masks (1 when both are empty)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
