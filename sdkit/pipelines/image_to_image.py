"""Image to image (SDEdit): noise the encoded image part-way and denoise it with the prompt.

Fixes CompVis ``scripts/img2img.py``: the latent is noised to exactly the level where the first denoising step
starts (CompVis noised it one DDIM step higher), strength 1.0 works (CompVis indexed past the end), any sampler
works (CompVis: DDIM only), and any image size works (CompVis crashed unless the sides were multiples of 64).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .images import image_tensor, pad_to_multiple, round_up
from .plan import check_strength, fixed_noise, prepare
from .result import unchanged


def noised(z0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """z0 noised to exactly the level ᾱ where the first denoising step starts: √ᾱ z0 + √(1−ᾱ) ε."""
    return math.sqrt(alpha_cumprod) * z0 + math.sqrt(1.0 - alpha_cumprod) * noise


def img2img(model, init_image, prompt: str | Sequence[str], *, strength: float = 0.75,
            negative_prompt: str | Sequence[str] = "", num_images: int | None = None,
            noise: torch.Tensor | None = None, **options):
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
    x = image_tensor(init_image, "init_image", min_side=model.vae_factor)
    f, multiple = model.vae_factor, model.vae_factor * model.unet_multiple
    canvas = tuple(round_up(side, multiple) for side in x.shape[-2:])
    plan = prepare(model, prompt, negative_prompt, num_images, canvas=canvas, encode=True,  # 1. check the request
                   verb="img2img", **options)
    if strength == 0.0:
        return unchanged(x, plan.seeds)
    x, (height, width) = pad_to_multiple(x, multiple)                                      # 2. the canvas
    shape = (int(model.channels), x.shape[-2] // f, x.shape[-1] // f)
    noise = fixed_noise(noise, plan.num_images, shape, "noise", "the padded latent size")
    start_step, alpha = plan.start_step(strength)                                          #    where to start

    latents, inits, pixels = [], [], []
    for batch in plan.batches():                                                           # 3. per batch:
        eps = batch.noise(shape, model.device) if noise is None else noise[batch.part].to(model.device)
        z0 = plan.encode_image(x, batch)                                                   # encode the image,
        z = plan.sample(batch, noised(z0, eps, alpha), start_step=start_step)              # noise, denoise,
        latents.append(z)
        inits.append(z0)
        pixels.append(plan.decode(z)[..., :height, :width])                                # decode, crop
    h, w = height // f, width // f
    result = plan.result(pixels, latents, inits, verb="img2img", strength=strength)      # 4. finish
    result.latents, result.init_latents = result.latents[..., :h, :w], result.init_latents[..., :h, :w]
    return result
