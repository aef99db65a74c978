"""Inpainting and outpainting, both ways SD v1 can do it.

- **Latent blending, any model** (CompVis' DDIM ``mask``/``x0`` option, for every sampler): before each step the
  known region of the sample is replaced by the image latent noised to that step's level, so the model only
  invents the masked region, in context.
- **The 9-channel inpainting UNet** (runwayml sd-v1-5-inpainting, ``LatentInpaintDiffusion``): the UNet input is
  [noisy latent 4, mask 1, masked-image latent 4] (``c_concat`` of a ``hybrid`` model), with
  masked_image = image · (mask < 0.5) encoded by the VAE (× scale factor) and the mask resized to latent size
  (nearest); the unconditional branch of guidance gets the same ``c_concat`` and the empty/negative prompt.

Masks: white (1) = the region to repaint, black (0) = keep. Both ways end with a composite in pixel space,
``image · (1 − mask) + generated · mask``, so with a hard mask every kept pixel equals the input exactly.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.transforms import gaussian_blur
from .common import (DEFAULT_SAMPLER, DEFAULT_STEPS, PipelineResult, as_prompt_list, batches, check_count,
                     count_images,
                     check_sampling_args, check_strength, decode, encode_image, finish, generators, geometry,
                     grid_levels, guided_eps_fn, image_tensor, mask_tensor, noise_like, noised, pad_to_multiple,
                     resolve_seeds, run_sampler, sampler_kwargs, steps_for_strength, text_conditioning)

MASK_RESIZE = ("nearest", "area", "max")


def is_inpainting_model(model) -> bool:
    """True for the 9-channel (hybrid, latent + mask + masked-image latent) inpainting UNet."""
    unet = model.model.diffusion_model
    return (model.model.conditioning_key == "hybrid"
            and getattr(unet, "in_channels", None) == 2 * int(model.channels) + 1)


def latent_mask(mask: torch.Tensor, factor: int, how: str) -> torch.Tensor:
    """Pixel mask [B, 1, H, W] -> latent size. "nearest" (runway's way), "area" (fractional at edges: a soft
    blend), "max" (a latent pixel is repainted when any of its pixels is: nothing masked is left out)."""
    if how not in MASK_RESIZE:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZE}, got {how!r}")
    size = (mask.shape[-2] // factor, mask.shape[-1] // factor)
    if how == "max":
        return F.max_pool2d(mask, factor)
    if how == "area":
        return F.interpolate(mask, size=size, mode="area")
    return F.interpolate(mask, size=size, mode="nearest")


def inpaint(model, image, mask, prompt: str | Sequence[str], *, strength: float = 1.0,
            negative_prompt: str | Sequence[str] = "", num_images: int | None = None, steps: int = DEFAULT_STEPS,
            sampler: str = DEFAULT_SAMPLER, guidance_scale: float = 7.5, eta: float = 0.0,
            seed: int | Sequence[int] | None = None, mask_blur: float = 0.0, mask_resize: str | None = None,
            use_inpainting_unet: bool | None = None, composite: bool = True, batch_size: int | None = None,
            callback=None, safety_checker=None, watermark: str | None = None, spacing: str = "compvis",
            karras: bool = False, progress: bool = True, decode_tile: int | None = None,
            **sampler_options) -> PipelineResult:
    """Repaint the white region of ``mask`` in ``image`` following ``prompt``.

    ``mask``: a single-channel image (mode "L"/"1") or array/tensor [H, W] in [0, 1] of the image's size;
    white/1 = repaint. ``mask_blur`` (pixels, Gaussian σ) softens its edge for the blend and the composite.
    ``mask_resize``: how the mask reaches latent size, "nearest", "area" or "max" (default "max" for blending,
    so every masked pixel lies in a repainted latent pixel; "nearest" for the 9-channel UNet, as it was trained).
    ``use_inpainting_unet``: default: the 9-channel path when the model has that UNet, blending otherwise.

    ``strength`` (default 1): 1 starts the masked region from pure noise (as runway's script and diffusers do);
    below 1 it starts from the image noised to the level of the first step run (as img2img).
    ``composite`` (default True): paste the result into the original in pixel space, so kept pixels are exactly
    the input's (hard mask). Sizes: any; image and mask are padded (reflection) to the next multiple of 64 for
    SD v1 and cropped back. Other arguments as :func:`txt2img`.
    """
    strength = check_strength(strength)
    check_sampling_args(sampler, steps, guidance_scale)
    options = sampler_kwargs(sampler, spacing, karras, eta, **sampler_options)
    num_images = count_images(prompt, num_images)
    batch_size = check_count(num_images, batch_size)
    nine = is_inpainting_model(model) if use_inpainting_unet is None else bool(use_inpainting_unet)
    if nine and not is_inpainting_model(model):
        raise ValueError("use_inpainting_unet=True needs the 9-channel inpainting model (sd-v1-inpainting config); "
                         "this model's UNet takes "
                         f"{getattr(model.model.diffusion_model, 'in_channels', '?')} channels")
    if not nine and is_inpainting_model(model):
        raise ValueError("the 9-channel inpainting UNet always needs its mask and masked image; "
                         "leave use_inpainting_unet at None/True for this model")
    x = image_tensor(image)
    m = mask_tensor(mask, tuple(x.shape[-2:]))
    if mask_blur:
        m = gaussian_blur(m, float(mask_blur)).clamp(0, 1)
    seeds = resolve_seeds(seed, num_images)
    if strength == 0.0:
        return _unchanged(x, num_images, seeds)

    geo = geometry(model)
    (x, (height, width)), (m, _) = pad_to_multiple(x, geo.pixel_multiple), pad_to_multiple(m, geo.pixel_multiple)
    m_lat = latent_mask(m, geo.factor, mask_resize or ("nearest" if nine else "max"))
    levels = grid_levels(model, sampler, steps, options)
    start_step = len(levels) - steps_for_strength(strength, len(levels))
    shape = (geo.channels, x.shape[-2] // geo.factor, x.shape[-1] // geo.factor)
    prompts = as_prompt_list(prompt, num_images)
    negatives = as_prompt_list(negative_prompt, num_images, "negative_prompt")
    cond, uncond = text_conditioning(model, prompts, negatives, guidance_scale)
    device = model.device
    m_lat = m_lat.to(device)

    latents, inits, pixels = [], [], []
    for part in batches(num_images, batch_size):
        gens = generators(seeds[part])
        eps = noise_like(shape, gens, device)
        z0 = encode_image(model, x, gens)
        start = eps if strength == 1.0 else noised(z0, eps, float(levels[start_step]))
        n = len(gens)
        c, uc = cond[part], None if uncond is None else uncond[part]
        blend = {}
        if nine:
            binary = (m >= 0.5).float()
            masked = encode_image(model, x * (binary < 0.5), gens)
            concat = [F.interpolate(binary, size=shape[1:], mode="nearest").to(device).expand(n, -1, -1, -1), masked]
            c = {"c_concat": concat, "c_crossattn": [c]}
            uc = None if uc is None else {"c_concat": concat, "c_crossattn": [uc]}
        else:
            blend = {"mask": (1.0 - m_lat).expand(n, -1, -1, -1), "x0": z0}
        eps_fn = guided_eps_fn(model, c, uc, guidance_scale)
        z = run_sampler(eps_fn, start, model, sampler=sampler, steps=steps, options=options, start_step=start_step,
                        gens=gens, callback=callback, progress=progress, **blend)
        if not nine:  # the known region of the returned latent is the image's own
            z = blend["mask"] * z0 + (1.0 - blend["mask"]) * z
        latents.append(z)
        inits.append(z0)
        pixels.append(decode(model, z, decode_tile))
    pixels = torch.cat(pixels)
    if composite:
        soft = m.to(pixels.device)
        pixels = x.to(pixels.device) * (1.0 - soft) + pixels.clamp(-1, 1) * soft
    images, nsfw, safety = finish(pixels[..., :height, :width], safety_checker, watermark)
    h, w = height // geo.factor, width // geo.factor
    return PipelineResult(images, torch.cat(latents)[..., :h, :w], seeds, nsfw, torch.cat(inits)[..., :h, :w],
                          safety)


def outpaint(model, image, extend: tuple[int, int, int, int], prompt: str | Sequence[str], *, overlap: int = 0,
             fill: str = "edge", **inpaint_options) -> PipelineResult:
    """Extend the canvas by ``extend = (left, top, right, bottom)`` pixels and paint the new area by inpainting.

    The new border is first filled with ``fill``: "edge" (replicate the border pixels, a good start for
    strength < 1) or "gray" (mid-gray); ``overlap`` pixels of the original along each extended side are
    repainted too, to hide the seam. All other options go to :func:`inpaint`.
    """
    extend = tuple(int(e) for e in extend)
    if len(extend) != 4 or min(extend) < 0 or not any(extend):
        raise ValueError(f"extend must be (left, top, right, bottom) pixel counts ≥ 0, not all 0; got {extend!r}")
    if fill not in ("edge", "gray"):
        raise ValueError(f"fill must be 'edge' or 'gray', got {fill!r}")
    x = image_tensor(image)
    left, top, right, bottom = extend
    canvas = F.pad(x, (left, right, top, bottom), mode="replicate" if fill == "edge" else "constant", value=0.0)
    mask = torch.ones(canvas.shape[-2:])
    h, w = x.shape[-2:]
    keep = (slice(top + (overlap if top else 0), top + h - (overlap if bottom else 0)),
            slice(left + (overlap if left else 0), left + w - (overlap if right else 0)))
    mask[keep] = 0.0
    return inpaint(model, canvas[0], mask, prompt, **inpaint_options)


def _unchanged(x: torch.Tensor, n: int, seeds: list[int]) -> PipelineResult:
    from ..data.transforms import to_pil
    return PipelineResult([to_pil(x[0]) for _ in range(n)], None, seeds, [False] * n)
