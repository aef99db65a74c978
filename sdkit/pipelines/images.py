"""Images in and out of the pipelines: PIL/array/tensor conversion, the user's image and mask inputs, padding.

Conventions: tensors are float [3, H, W] (or [B, 3, H, W]) in [-1, 1], channels first, as the CompVis models take
them; results are PIL images. A mask is single-channel, 1 (white) = repaint, 0 (black) = keep.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .. import checks


HIGH_DEPTH = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
# single-channel modes with more than 8 bits: the value that means white. "I" is how PIL opens 16-bit PNGs (and
# what image.convert("I") gives); "F" (float) images are taken as 0..1, as float arrays everywhere in the kit.


def high_depth_gray(image: Image.Image, what: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float single-channel image as float32 [H, W] in [0, 1] (white = 1), its
    range checked: PIL's ``convert("RGB")`` would clip these to white."""
    scale = HIGH_DEPTH[image.mode]
    arr = np.asarray(image, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} (a mode {image.mode} image) contains {int((~np.isfinite(arr)).sum())} NaN/inf "
                         "pixel(s)")
    low, high = float(arr.min()), float(arr.max())
    if low < 0 or high > scale:
        unit = "0..1 (float)" if image.mode == "F" else "0..65535 (16-bit)"
        raise ValueError(f"{what} is a mode {image.mode} image with values from {low:g} to {high:g}; they must lie "
                         f"in {unit}. Rescale it, or pass an 8-bit image (mode L or RGB)")
    return arr / scale


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL image as RGB; transparency is composited onto `background` (white), not dropped. 16-bit and float
    grayscale images are scaled to 8 bits by their range (16-bit: /257; float: 0..1), not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_DEPTH:
        gray = high_depth_gray(image, "the image")
        return Image.fromarray(np.round(gray * 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA") if image.mode != "La" else image.convert("LA").convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert a mode {image.mode} image to RGB ({e}); convert it first") from None


def to_tensor(image: Image.Image | np.ndarray, what: str = "image") -> torch.Tensor:
    """PIL image (any mode; 16-bit and float grayscale keep their precision) or uint8 HxWx3 array -> float
    tensor [3, H, W] in [-1, 1]."""
    if isinstance(image, Image.Image):
        if image.mode in HIGH_DEPTH:
            gray = torch.from_numpy(high_depth_gray(image, what))
            return (gray * 2 - 1)[None].expand(3, -1, -1).contiguous()
        image = np.asarray(to_rgb(image))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        hint = ""
        if image.dtype.kind == "f":
            hint = ("; for floats in [0, 1] pass (x * 255).round().astype(np.uint8), or a float tensor [3, H, W] "
                    "in [-1, 1]")
        elif image.dtype == np.uint16:
            hint = "; for 16-bit data pass Image.fromarray(x) of a single channel, or (x // 257).astype(np.uint8)"
        elif image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 4)):
            hint = "; pass Image.fromarray(x) (grayscale or RGBA images are converted)"
        raise ValueError(f"{what} as an array must be uint8 of shape (H, W, 3), got {image.dtype} "
                         f"{tuple(image.shape)}{hint}")
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


def open_image(path, what: str) -> Image.Image:
    """Read an image file, with errors that name the argument: no such file, a folder, not an image."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what}: {path!r} is a folder, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except UnidentifiedImageError:
        raise ValueError(f"{what}: {path!r} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{what}: {path!r} could not be read as an image ({e}); the file may be truncated") \
            from None


TENSOR_SLACK = 0.5   # values up to 0.5 outside [-1, 1] (a VAE decode overshoots a little) are clipped, not refused


def tensor_image(x: torch.Tensor, what: str) -> torch.Tensor:
    """A user's image tensor: float [3, H, W] or [1, 3, H, W] in [-1, 1], finite; [0, 255] refused, [0, 1] warned."""
    shape = tuple(x.shape)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[:2] != (1, 3) or not x.is_floating_point():
        raise ValueError(f"{what} as a tensor must be float [3, H, W] or [1, 3, H, W] in [-1, 1], "
                         f"got {x.dtype} {shape}")
    if x.numel() == 0:
        raise ValueError(f"{what} is an empty tensor {shape}")
    checks.finite(x, what, "; an image tensor must hold finite values in [-1, 1]")
    x = x.detach().float().cpu()
    low, high = float(x.min()), float(x.max())
    if low < -1 - TENSOR_SLACK or high > 1 + TENSOR_SLACK:
        hint = ("it looks like 0..255 values: pass x / 127.5 - 1" if low >= 0 and high <= 255
                else "rescale it to [-1, 1] (the CompVis convention)")
        raise ValueError(f"{what} tensor values range from {low:g} to {high:g}, but images are taken in [-1, 1]: "
                         f"{hint}")
    if low >= 0 and high > 0.5 and x.numel() > 3:   # a bright image or a [0, 1] one: say which is expected
        warnings.warn(f"{what}: every value of the tensor is ≥ 0 (range {low:g} to {high:g}); image tensors are "
                      "taken in [-1, 1], so a [0, 1] image comes out washed out: pass x * 2 - 1",
                      UserWarning, stacklevel=4)
    return x.clamp(-1, 1) if low < -1 or high > 1 else x   # no copy of an image already in range


def image_tensor(image, what: str = "image", min_side: int = 1) -> torch.Tensor:
    """Any accepted image -> float [1, 3, H, W] in [-1, 1]; sides of at least ``min_side`` pixels."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, what)
    if isinstance(image, Image.Image):
        x = to_tensor(image, what)[None]
    elif isinstance(image, np.ndarray):
        x = to_tensor(image, what)[None]
    elif isinstance(image, torch.Tensor):
        x = tensor_image(image, what)
    else:
        raise TypeError(f"{what} must be a PIL image, a file path, a uint8 array [H, W, 3] or a float tensor "
                        f"[3, H, W] in [-1, 1]; got {type(image).__name__}")
    h, w = x.shape[-2:]
    if min(h, w) < min_side:
        raise ValueError(f"{what} is {w}×{h} pixels; it must be at least {min_side}×{min_side} (the autoencoder "
                         f"turns {min_side}×{min_side} pixels into one latent pixel): resize it")
    return x


MASK_MODES = ("L", "1", *HIGH_DEPTH)


def mask_tensor(mask, size: tuple[int, int], what: str = "mask") -> torch.Tensor:
    """A mask -> float [1, 1, H, W] in [0, 1] (1 = white = repaint), checked against the image size (H, W).

    PIL masks: mode L/1 (0..255), 16-bit (0..65535) or F (float 0..1); arrays and tensors: uint8 0..255, bool, or
    numbers in [0, 1]. Values out of range and NaN are refused."""
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image(mask, what)
    if isinstance(mask, Image.Image):
        if mask.mode not in MASK_MODES:
            raise ValueError(f"the {what} must be single-channel (a grayscale image: white = repaint, black = keep), "
                             f"got a {mask.mode} image; convert it with mask.convert('L')")
        if mask.mode in HIGH_DEPTH:
            m = torch.from_numpy(high_depth_gray(mask, f"the {what}").copy())
        else:
            m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        if isinstance(mask, np.ndarray) and mask.dtype.kind not in "biuf":
            raise TypeError(f"the {what} array must hold numbers, got dtype {mask.dtype}")
        m = torch.as_tensor(mask).detach().cpu()
        if m.ndim == 4 and m.shape[0] == 1:
            m = m[0]
        if m.ndim == 3:
            if m.shape[0] != 1:
                raise ValueError(f"the {what} must be single-channel [H, W] or [1, H, W] (1 = repaint), got shape "
                                 f"{tuple(m.shape)}; for an RGB mask use mask.mean(0, keepdim=True) "
                                 "(or mask[..., 0] for an [H, W, 3] array)")
            m = m[0]
        if m.ndim != 2:
            raise ValueError(f"the {what} must be single-channel [H, W] or [1, H, W], got shape {tuple(m.shape)}")
        m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
        checks.finite(m, f"the {what}", "; a mask holds values in [0, 1] (1 = repaint)")
        if m.numel() and (m.min() < 0 or m.max() > 1):
            raise ValueError(f"{what} values must be in [0, 1] (or uint8 0..255): 1 = repaint, 0 = keep; got "
                             f"values from {float(m.min()):g} to {float(m.max()):g}")
    else:
        raise TypeError(f"{what} must be a grayscale PIL image, a file path, or an array/tensor [H, W]; "
                        f"got {type(mask).__name__}")
    if tuple(m.shape) != tuple(size):
        raise ValueError(f"the {what} is {m.shape[1]}x{m.shape[0]} (width x height) but the image is "
                         f"{size[1]}x{size[0]}: they must be the same size; resize the mask with "
                         f"mask.resize(image.size, Image.NEAREST)")
    return m[None, None]
