"""Resizing and cropping, blur and JPEG, and the degradation pipeline for upscaler training.

Image <-> tensor conversion lives with the pipelines (``sdkit.pipelines.images``) and is re-exported here.

Tensors are float [3, H, W] (or [B, 3, H, W]) in [-1, 1], channels first, as the CompVis models take them.
Every random choice takes a `torch.Generator`, so a degradation is reproducible from its seed.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..pipelines.images import to_pil, to_rgb, to_tensor  # noqa: F401  (re-exported)


def resize_center_crop(image: Image.Image, size: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Scale so the shorter side is `size`, then cut the central `size` x `size` square."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_crop(image: Image.Image, size: int, generator: torch.Generator | None = None) -> Image.Image:
    """A `size` x `size` crop at a random place (the image must be at least that large)."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop {size}x{size}; resize it first")
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    return image.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------ degradation
def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with reflect padding (sigma in pixels; 0 returns x)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    h, w = x.shape[-2:]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    # Sums of shifted copies, not conv2d: on small images a depthwise conv2d is dominated by thread-pool
    # overhead (tens of ms on a busy 2-core machine); this is ~1 ms and gives the same numbers.
    x = sum(k[i] * x[..., :, i:i + w] for i in range(2 * radius + 1))
    return sum(k[i] * x[..., i:i + h, :] for i in range(2 * radius + 1))


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip [B, 3, H, W] in [-1, 1] through JPEG at `quality` (1-95) with Pillow."""
    out = []
    for img in x:
        buf = io.BytesIO()
        to_pil(img).save(buf, format="JPEG", quality=int(quality))
        out.append(to_tensor(Image.open(io.BytesIO(buf.getvalue()))))
    return torch.stack(out).to(x.device, x.dtype)


def _as_generator(generator):
    return torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator


def _uniform(lo_hi, generator) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


@dataclass
class Degradation:
    """Turns a high-resolution image into a plausible low-resolution one: blur, downscale, noise, JPEG.

    Each step is applied with its probability and a parameter drawn uniformly from its range, all from the
    generator passed to `__call__`, so the same generator state gives the same low-resolution image.
    Input and output: float [3, H, W] or [B, 3, H, W] in [-1, 1]; the output is H/scale x W/scale.
    (One set of parameters is drawn per call; batch items share it.)
    """
    scale: int = 4
    blur_prob: float = 0.7
    blur_sigma: tuple[float, float] = (0.2, 1.5)        # in high-resolution pixels
    downscale_modes: tuple[str, ...] = ("bicubic", "bilinear", "area")
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.04)        # in units of the [0, 1] intensity range
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (40, 95)

    def sample_params(self, generator: torch.Generator | int | None = None) -> dict:
        """Draw the parameters of one degradation (0 / None where a step is skipped)."""
        g = _as_generator(generator)
        p = {"blur_sigma": 0.0, "mode": None, "noise_std": 0.0, "jpeg_quality": None}
        if float(torch.rand((), generator=g)) < self.blur_prob:
            p["blur_sigma"] = _uniform(self.blur_sigma, g)
        p["mode"] = self.downscale_modes[int(torch.randint(len(self.downscale_modes), (), generator=g))]
        if float(torch.rand((), generator=g)) < self.noise_prob:
            p["noise_std"] = _uniform(self.noise_std, g)
        if float(torch.rand((), generator=g)) < self.jpeg_prob:
            lo, hi = self.jpeg_quality
            p["jpeg_quality"] = int(torch.randint(lo, hi + 1, (), generator=g))
        return p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | int | None = None,
                 return_params: bool = False):
        """Degrade x; `generator` may be a torch.Generator, an int seed, or None (torch's global RNG)."""
        generator = _as_generator(generator)
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image tensor [3, H, W] or [B, 3, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"image size {h}x{w} is not divisible by the scale {self.scale}; crop it first")
        p = self.sample_params(generator)
        y = gaussian_blur(x.float(), p["blur_sigma"])
        size = (h // self.scale, w // self.scale)
        if p["mode"] == "area":
            y = F.interpolate(y, size=size, mode="area")
        else:
            y = F.interpolate(y, size=size, mode=p["mode"], align_corners=False, antialias=True)
        if p["noise_std"] > 0:
            noise = torch.randn(y.shape, generator=generator, dtype=y.dtype)
            y = y + noise.to(y.device) * (2 * p["noise_std"])   # x2: [-1, 1] spans twice the [0, 1] range
        y = y.clamp(-1, 1)
        if p["jpeg_quality"] is not None:
            y = jpeg(y, p["jpeg_quality"])
        y = y.to(x.dtype)
        y = y[0] if single else y
        return (y, p) if return_params else y


class DegradedPairs(torch.utils.data.Dataset):
    """Wraps an image-caption dataset into upscaler training pairs, deterministic by (seed, index).

    Item: the base item plus "lr_image" (the degraded image, size / scale), with the degradation's
    parameters in meta["degradation"]. "image" stays the high-resolution target.
    """

    def __init__(self, base, degradation: Degradation | None = None, seed: int = 0):
        self.base, self.degradation, self.seed = base, degradation or Degradation(), seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        item["lr_image"], params = self.degradation(item["image"], generator=g, return_params=True)
        item["meta"] = {**item.get("meta", {}), "degradation": params}
        return item
