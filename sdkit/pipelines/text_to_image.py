"""Text to image: CompVis ``scripts/txt2img.py`` as a function, with one seed per image and negative prompts."""
from __future__ import annotations

from typing import Sequence

import torch

from .common import (DEFAULT_SAMPLER, DEFAULT_STEPS, PipelineResult, as_prompt_list, batches, check_count,
                     count_images,
                     check_sampling_args, decode, finish, generators, geometry, guided_eps_fn, noise_like,
                     resolve_seeds, round_up, run_sampler, sampler_kwargs, text_conditioning)


def txt2img(model, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
            num_images: int | None = None,
            height: int | None = None, width: int | None = None, steps: int = DEFAULT_STEPS,
            sampler: str = DEFAULT_SAMPLER, guidance_scale: float = 7.5, eta: float = 0.0,
            seed: int | Sequence[int] | None = None, x_T: torch.Tensor | None = None, batch_size: int | None = None,
            callback=None, safety_checker=None, watermark: str | None = None, spacing: str = "compvis",
            karras: bool = False, progress: bool = True, decode_tile: int | None = None,
            **sampler_options) -> PipelineResult:
    """Generate ``num_images`` images for ``prompt`` (a string, or one string per image; with a list,
    ``num_images`` defaults to its length).

    Defaults: DPM-Solver++(2M) (``sampler="dpmpp_2m"``) for 20 steps at guidance 7.5; CompVis' own default was
    DDIM/PLMS for 50 steps (``sampler="ddim", steps=50`` or ``"plms"``). Any sampler of ``sdkit.samplers.SAMPLERS``
    works; ``eta`` is for ddim, euler_a and dpmpp_2m_sde, other options pass through (``sampler_options``).

    - ``height``/``width``: default ``model.image_size ×`` the autoencoder factor (512 for SD v1). They must be
      multiples of the autoencoder factor (8 for SD v1). The UNet needs latent sides divisible by
      2**(levels − 1) (pixel sides by 64 for SD v1); for other sizes the latent is sampled at the next size that
      works, and its top-left part of the asked size is decoded (so 520x520 samples a 576x576 canvas).
    - ``seed``: None, an int (image i gets seed + i) or one seed per image; image i's starting noise comes from
      its own generator, so it is the same image alone or in a batch. ``x_T`` fixes the starting noise instead:
      [num_images or 1, C, h, w] unit-variance noise at the sampling size (``result.latents``' size rounded up).
    - ``negative_prompt`` replaces the empty prompt of the unconditional branch; ``guidance_scale=1`` skips
      that branch entirely (one UNet pass per step).
    - ``callback(step, total, x0)`` after each step with the current x̂₀ latent (see ``latent_preview``).
    - ``safety_checker``: a ``sdkit.safety.SafetyChecker`` or None (off); ``watermark``: a payload string
      (e.g. "StableDiffusionV1") or None. ``decode_tile``: decode the latents in tiles of this many latent pixels.
    """
    check_sampling_args(sampler, steps, guidance_scale)
    options = sampler_kwargs(sampler, spacing, karras, eta, **sampler_options)
    num_images = count_images(prompt, num_images)
    batch_size = check_count(num_images, batch_size)
    geo = geometry(model)
    height = geo.default_size if height is None else height
    width = geo.default_size if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < geo.factor or value % geo.factor:
            raise ValueError(
                f"{name}={value!r} does not fit this model: image sides must be positive multiples of "
                f"{geo.factor} (the autoencoder factor), and multiples of {geo.pixel_multiple} run without "
                f"padding (e.g. {geo.default_size}, {geo.default_size + geo.pixel_multiple})")
    h, w = height // geo.factor, width // geo.factor
    shape = (geo.channels, round_up(h, geo.unet_multiple), round_up(w, geo.unet_multiple))
    if x_T is not None:
        if x_T.ndim == 3:
            x_T = x_T[None]
        if tuple(x_T.shape[1:]) != shape or x_T.shape[0] not in (1, num_images):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}; for {num_images} image(s) of {width}x{height} it "
                             f"must be [{num_images}{' (or 1)' if num_images > 1 else ''}, "
                             f"{', '.join(map(str, shape))}] (the latent size rounded up to what the UNet takes)")
        x_T = x_T.expand(num_images, *shape)

    prompts = as_prompt_list(prompt, num_images)
    negatives = as_prompt_list(negative_prompt, num_images, "negative_prompt")
    seeds = resolve_seeds(seed, num_images)
    cond, uncond = text_conditioning(model, prompts, negatives, guidance_scale)
    device = model.device

    latents, pixels = [], []
    for part in batches(num_images, batch_size):
        gens = generators(seeds[part])
        start = noise_like(shape, gens, device) if x_T is None else x_T[part].to(device, torch.float32)
        eps_fn = guided_eps_fn(model, cond[part], None if uncond is None else uncond[part], guidance_scale)
        z = run_sampler(eps_fn, start, model, sampler=sampler, steps=steps, options=options, gens=gens,
                        callback=callback, progress=progress)
        z = z[..., :h, :w]
        latents.append(z)
        pixels.append(decode(model, z, decode_tile))
    images, nsfw, safety = finish(torch.cat(pixels), safety_checker, watermark)
    return PipelineResult(images, torch.cat(latents), seeds, nsfw, safety=safety)
