"""Image to image (SDEdit): noise the encoded image part-way and denoise it with the prompt.

Fixes CompVis ``scripts/img2img.py``: the latent is noised to exactly the level where the first denoising step
starts (CompVis noised it one DDIM step higher), strength 1.0 works (CompVis indexed past the end), any sampler
works (CompVis: DDIM only), and any image size works (CompVis crashed unless the sides were multiples of 64).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .common import (DEFAULT_SAMPLER, DEFAULT_STEPS, PipelineResult, as_prompt_list, batches, check_count,
                     count_images,
                     check_sampling_args, check_strength, decode, encode_image, finish, generators, geometry,
                     grid_levels, guided_eps_fn, image_tensor, noise_like, noised, pad_to_multiple, resolve_seeds,
                     run_sampler, sampler_kwargs, steps_for_strength, text_conditioning)


def img2img(model, init_image, prompt: str | Sequence[str], *, strength: float = 0.75,
            negative_prompt: str | Sequence[str] = "", num_images: int | None = None, steps: int = DEFAULT_STEPS,
            sampler: str = DEFAULT_SAMPLER, guidance_scale: float = 7.5, eta: float = 0.0,
            seed: int | Sequence[int] | None = None, noise: torch.Tensor | None = None,
            batch_size: int | None = None, callback=None, safety_checker=None, watermark: str | None = None,
            spacing: str = "compvis", karras: bool = False, progress: bool = True, decode_tile: int | None = None,
            **sampler_options) -> PipelineResult:
    """Repaint ``init_image`` towards ``prompt``; ``strength`` in [0, 1] says how much.

    The sampler's grid for ``steps`` steps has n steps (n = steps, or one more for CompVis spacing when steps
    does not divide 1000); img2img runs its last ``max(1, int(strength · n))`` steps. The image latent z₀ is
    noised to exactly the level ᾱ_k where the first of those steps starts: x = √ᾱ_k z₀ + √(1−ᾱ_k) ε. So:

    - ``strength=0`` returns the input image unchanged (no VAE round trip, nothing sampled, ``latents`` is None;
      no safety check or watermark, since nothing was generated);
    - ``strength=1`` runs the whole grid from the image noised to the first level (√ᾱ ≈ 0.068 of the image
      remains for SD v1), i.e. exactly txt2img started from ``x_T = √ᾱ₀ z₀ + √(1−ᾱ₀) ε``.

    Sizes: any. The image is padded by reflection on the right and bottom to the next multiple of
    (autoencoder factor × 2**(UNet levels − 1)) — 64 for SD v1 — and the result is cropped back to the input size.
    ``noise``: fixed ε [num_images or 1, C, h, w] at the padded latent size instead of seeded noise.
    Other arguments as :func:`txt2img`.
    """
    strength = check_strength(strength)
    check_sampling_args(sampler, steps, guidance_scale)
    options = sampler_kwargs(sampler, spacing, karras, eta, **sampler_options)
    num_images = count_images(prompt, num_images)
    batch_size = check_count(num_images, batch_size)
    x = image_tensor(init_image, "init_image")
    seeds = resolve_seeds(seed, num_images)
    if strength == 0.0:
        from ..data.transforms import to_pil
        images = [to_pil(x[0]) for _ in range(num_images)]
        return PipelineResult(images, None, seeds, [False] * num_images)

    geo = geometry(model)
    x, (height, width) = pad_to_multiple(x, geo.pixel_multiple)
    levels = grid_levels(model, sampler, steps, options)
    start_step = len(levels) - steps_for_strength(strength, len(levels))
    alpha = float(levels[start_step])
    shape = (geo.channels, x.shape[-2] // geo.factor, x.shape[-1] // geo.factor)
    noise = _check_noise(noise, num_images, shape)
    prompts = as_prompt_list(prompt, num_images)
    negatives = as_prompt_list(negative_prompt, num_images, "negative_prompt")
    cond, uncond = text_conditioning(model, prompts, negatives, guidance_scale)
    h, w = height // geo.factor, width // geo.factor

    latents, inits, pixels = [], [], []
    for part in batches(num_images, batch_size):
        gens = generators(seeds[part])
        eps = noise_like(shape, gens, model.device) if noise is None else noise[part].to(model.device)
        z0 = encode_image(model, x, gens)
        eps_fn = guided_eps_fn(model, cond[part], None if uncond is None else uncond[part], guidance_scale)
        z = run_sampler(eps_fn, noised(z0, eps, alpha), model, sampler=sampler, steps=steps, options=options,
                        start_step=start_step, gens=gens, callback=callback, progress=progress)
        latents.append(z)
        inits.append(z0)
        pixels.append(decode(model, z, decode_tile)[..., :height, :width])
    images, nsfw, safety = finish(torch.cat(pixels), safety_checker, watermark)
    return PipelineResult(images, torch.cat(latents)[..., :h, :w], seeds, nsfw, torch.cat(inits)[..., :h, :w],
                          safety)


def _check_noise(noise, n: int, shape: tuple) -> torch.Tensor | None:
    if noise is None:
        return None
    if noise.ndim == 3:
        noise = noise[None]
    if tuple(noise.shape[1:]) != tuple(shape) or noise.shape[0] not in (1, n):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; it must be [{n}{' (or 1)' if n > 1 else ''}, "
                         f"{', '.join(map(str, shape))}] (the padded latent size)")
    return noise.expand(n, *shape).float()
