"""What a pipeline returns, and the last step every verb shares: safety check, then watermark, then PIL images."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from ..atomic import atomic_file
from .images import to_pil


@dataclasses.dataclass
class PipelineResult:
    """What a pipeline returns.

    images: the final PIL images (flagged ones replaced by the safety checker's placeholder).
    latents: the final scaled latents [B, C, h, w] (None when nothing was sampled, e.g. img2img strength 0).
    seeds: the seed of each image. nsfw: the safety checker's flag per image (all False when it is off).
    init_latents: the encoded input image(s) [B, C, h, w] the sampler started from (img2img, inpainting).
    safety: the checker's full ``SafetyResult`` (None when it is off).
    parameters: per image, what made it (prompt, negative prompt, sampler, steps, guidance, seed, size, model);
    :meth:`save` writes it into each PNG (``sdkit.pipelines.metadata``).
    """

    images: list[Image.Image]
    latents: torch.Tensor | None
    seeds: list[int]
    nsfw: list[bool]
    init_latents: torch.Tensor | None = None
    safety: Any = None
    parameters: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def save(self, folder: str | os.PathLike, name: str = "{index:05d}-{seed}.png") -> list[Path]:
        """Write every image as a PNG into ``folder`` (atomically: a temporary file, then a rename), with the
        A1111 "parameters" chunk, sdkit's record and the watermark record. ``name`` is formatted with ``index``
        and ``seed``; an existing file is never overwritten (FileExistsError, before anything is written)."""
        from .metadata import png_text

        folder = Path(folder)
        paths = [folder / name.format(index=i, seed=seed) for i, seed in enumerate(self.seeds)]
        taken = [str(p) for p in paths if p.exists()]
        if taken or len(set(paths)) < len(paths):
            raise FileExistsError(f"would overwrite {taken or 'its own files'}: choose another folder or a name "
                                  "pattern with {index} (e.g. 'img-{index:03d}.png')")
        for i, (image, path) in enumerate(zip(self.images, paths)):
            info = PngImagePlugin.PngInfo()
            texts = dict(png_text(self.parameters[i])) if self.parameters else {}
            texts.update({k: v for k, v in image.info.items() if isinstance(v, str)})   # e.g. the watermark record
            for key, value in texts.items():
                info.add_text(key, value)
            with atomic_file(path) as tmp:
                image.save(tmp, format="PNG", pnginfo=info)
        return paths


def finish(pixels: torch.Tensor, safety_checker=None, watermark: str | None = None):
    """Pixels in [-1, 1] -> (PIL images, nsfw flags, safety result): the safety check, then the watermark."""
    images01 = ((pixels.detach().float().cpu() + 1) / 2).clamp(0, 1)
    safety = None
    nsfw = [False] * len(images01)
    if safety_checker is not None:
        from ..safety import run_safety_checker
        safety = run_safety_checker(safety_checker, images01)
        images01, nsfw = safety.images, list(safety.nsfw)
    images = [to_pil(x * 2 - 1) for x in images01]
    if watermark:
        from ..watermark import apply_watermark
        images = apply_watermark(images, watermark)
    return images, nsfw, safety


def unchanged(x: torch.Tensor, seeds: list[int]) -> PipelineResult:
    """The input image, once per seed: what img2img and inpainting return at strength 0 (nothing generated, so
    no safety check or watermark)."""
    return PipelineResult([to_pil(x[0]) for _ in seeds], None, seeds, [False] * len(seeds))
