"""Images in and out of the pipelines: PIL/array/tensor conversion, the user's image and mask inputs, padding.

Conventions: tensors are float [3, H, W] (or [B, 3, H, W]) in [-1, 1], channels first, as the CompVis models take
them; results are PIL images. A mask is single-channel, 1 (white) = repaint, 0 (black) = keep.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL image as RGB; transparency is composited onto `background` (white), not dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image (any mode) or uint8 HxWx3 array -> float tensor [3, H, W] in [-1, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor [3, H, W] in [-1, 1] -> RGB PIL image (values outside [-1, 1] are clipped)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected one image tensor of shape [3, H, W], got {tuple(x.shape)}")
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad [B, C, H, W] on the right and bottom to the next multiple, mirroring the image (reflection; edge
    replication where the image is too small to mirror). Returns the padded tensor and the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = round_up(h, multiple) - h, round_up(w, multiple) - w
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def image_tensor(image, what: str = "image") -> torch.Tensor:
    """Any accepted image -> float [1, 3, H, W] in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{what}: no such file {str(image)!r}")
        with Image.open(image) as im:
            image = im.copy()
    if isinstance(image, Image.Image):
        return to_tensor(image)[None]
    if isinstance(image, np.ndarray):
        return to_tensor(image)[None]
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[:2] != (1, 3) or not x.is_floating_point():
            raise ValueError(f"{what} as a tensor must be float [3, H, W] or [1, 3, H, W] in [-1, 1], "
                             f"got {x.dtype} {tuple(image.shape)}")
        return x.float().clamp(-1, 1)
    raise TypeError(f"{what} must be a PIL image, a file path, a uint8 array [H, W, 3] or a float tensor "
                    f"[3, H, W] in [-1, 1]; got {type(image).__name__}")


def mask_tensor(mask, size: tuple[int, int]) -> torch.Tensor:
    """A mask -> float [1, 1, H, W] in [0, 1] (1 = white = repaint), checked against the image size (H, W)."""
    if isinstance(mask, (str, os.PathLike)):
        with Image.open(mask) as im:
            mask = im.copy()
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1", "I", "F", "I;16"):
            raise ValueError(f"the mask must be single-channel (a grayscale image: white = repaint, black = keep), "
                             f"got a {mask.mode} image; convert it with mask.convert('L')")
        m = torch.from_numpy(np.asarray(mask.convert("F"), dtype=np.float32).copy())
        m = m / 255.0
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        m = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask)
        if m.ndim == 4 and m.shape[0] == 1:
            m = m[0]
        if m.ndim == 3:
            if m.shape[0] != 1:
                raise ValueError(f"the mask must be single-channel [H, W] or [1, H, W] (1 = repaint), got shape "
                                 f"{tuple(m.shape)}; for an RGB mask use mask.mean(0, keepdim=True) "
                                 "(or mask[..., 0] for an [H, W, 3] array)")
            m = m[0]
        if m.ndim != 2:
            raise ValueError(f"the mask must be single-channel [H, W] or [1, H, W], got shape {tuple(m.shape)}")
        m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
        if m.min() < 0 or m.max() > 1:
            raise ValueError("mask values must be in [0, 1] (or uint8 0..255): 1 = repaint, 0 = keep")
    else:
        raise TypeError(f"mask must be a grayscale PIL image, a file path, or an array/tensor [H, W]; "
                        f"got {type(mask).__name__}")
    if tuple(m.shape) != tuple(size):
        raise ValueError(f"the mask is {m.shape[1]}x{m.shape[0]} (width x height) but the image is "
                         f"{size[1]}x{size[0]}: they must be the same size; resize the mask with "
                         f"mask.resize(image.size, Image.NEAREST)")
    return m[None, None]
