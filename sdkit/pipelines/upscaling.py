"""Super-resolution with the LDM design; large outputs are decoded in tiles (``tiling.decode_tiled``).

LDM-SR (``models/ldm/bsr_sr``): a LatentDiffusion with ``conditioning_key: concat`` whose UNet input is the noisy
latent with the low-resolution image (in [-1, 1], at latent resolution) concatenated to it; the autoencoder's
factor is the upscaling factor (4 for the VQ-f4 BSR model). It was sampled with DDIM at eta 1.0.
"""
from __future__ import annotations

import torch

from .tiling import decode_tiled
from .common import (PipelineResult, batches, check_count, check_sampling_args, decode, encode_prompts, finish,
                     generators, geometry, guided_eps_fn, image_tensor, noise_like, pad_to_multiple, resolve_seeds,
                     run_sampler, sampler_kwargs)

AUTO_TILE = 64  # latent pixels: decode in tiles above this size (512 px of SD output; memory grows with area)


def is_superresolution_model(model) -> bool:
    unet = model.model.diffusion_model
    return (model.model.conditioning_key in ("concat", "hybrid")
            and getattr(unet, "in_channels", None) == int(model.channels) + 3)


def upscale(model, low_res_image, prompt: str | None = None, *, num_images: int = 1, steps: int = 50,
            sampler: str = "ddim", eta: float = 1.0, guidance_scale: float = 1.0, negative_prompt: str = "",
            seed=None, batch_size: int | None = None, decode_tile: int | None = None, tile_overlap: int = 16,
            callback=None, safety_checker=None, watermark: str | None = None, spacing: str = "compvis",
            karras: bool = False, progress: bool = True, **sampler_options) -> PipelineResult:
    """Upscale ``low_res_image`` by the autoencoder factor with an LDM super-resolution model.

    The model must be a ``concat`` LatentDiffusion whose UNet takes latent + 3 image channels (a ``hybrid`` one
    also takes ``prompt`` by cross-attention, with guidance). Default: DDIM, 50 steps, eta 1.0 (as LDM's SR
    notebook). Sizes: any; the low-resolution image is padded (reflection) to a multiple of 2**(UNet levels − 1)
    and the output is cropped to factor × its size. ``decode_tile``: latent tile size for :func:`decode_tiled`;
    default: tiled above 64×64 latent pixels, 0 = never. For upscaling with SD v1 itself, use img2img on a
    resized image. Other arguments as :func:`txt2img`.
    """
    if not is_superresolution_model(model):
        unet = model.model.diffusion_model
        raise ValueError(
            f"this is not a super-resolution model: upscale needs conditioning_key 'concat' (or 'hybrid') and a "
            f"UNet taking {model.channels} latent + 3 image channels; this one has conditioning_key="
            f"{model.model.conditioning_key!r} and in_channels={getattr(unet, 'in_channels', '?')}. "
            "Load an upscaler config (e.g. tiny-upscaler-test), or use img2img on a resized image with SD.")
    hybrid = model.model.conditioning_key == "hybrid"
    if prompt is not None and not hybrid:
        raise ValueError("this upscaler has no text conditioning (conditioning_key 'concat'); pass prompt=None")
    check_sampling_args(sampler, steps, guidance_scale)
    options = sampler_kwargs(sampler, spacing, karras, eta, **sampler_options)
    batch_size = check_count(num_images, batch_size)
    geo = geometry(model)
    lr, (height, width) = pad_to_multiple(image_tensor(low_res_image, "low_res_image"), geo.unet_multiple)
    lr = lr.to(model.device)
    shape = (geo.channels, *lr.shape[-2:])
    seeds = resolve_seeds(seed, num_images)
    text = uncond_text = None
    if hybrid:
        text = encode_prompts(model, [prompt or ""] * num_images)
        uncond_text = encode_prompts(model, [negative_prompt] * num_images) if guidance_scale != 1.0 else None
    tile = (AUTO_TILE if max(shape[1:]) > AUTO_TILE else None) if decode_tile is None else decode_tile

    latents, pixels = [], []
    for part in batches(num_images, batch_size):
        gens = generators(seeds[part])
        concat = [lr.expand(len(gens), -1, -1, -1)]
        if hybrid:
            cond = {"c_concat": concat, "c_crossattn": [text[part]]}
            uncond = None if uncond_text is None else {"c_concat": concat, "c_crossattn": [uncond_text[part]]}
        else:
            cond, uncond = {"c_concat": concat}, None
        eps_fn = guided_eps_fn(model, cond, uncond, guidance_scale if hybrid else 1.0)
        z = run_sampler(eps_fn, noise_like(shape, gens, model.device), model, sampler=sampler, steps=steps,
                        options=options, gens=gens, callback=callback, progress=progress)
        z = z[..., :height, :width]
        latents.append(z)
        pixels.append(decode(model, z, tile, tile_overlap if tile and tile_overlap < tile else 0))
    images, nsfw, safety = finish(torch.cat(pixels), safety_checker, watermark)
    return PipelineResult(images, torch.cat(latents), seeds, nsfw, safety=safety)
