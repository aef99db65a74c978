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
from .image_to_image import noised
from .. import checks
from .images import image_tensor, mask_tensor, pad_to_multiple, round_up
from .memory import check_memory
from .plan import check_count, check_decode_tile, check_strength, count_images, prepare
from .result import PipelineResult, unchanged

MASK_RESIZE = ("nearest", "area", "max")


def is_inpainting_model(model) -> bool:
    """True for the 9-channel (hybrid, latent + mask + masked-image latent) inpainting UNet."""
    return model.is_inpainting


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


def check_mask_blur(mask_blur, size) -> float:
    """``mask_blur``: a Gaussian σ in pixels, ≥ 0, whose 3σ reach fits inside the image (reflect padding)."""
    limit = (min(size) - 1) / 3
    return checks.number(mask_blur, "mask_blur", low=0.0, high=max(0.0, limit),
                         hint=f" (a Gaussian σ in pixels; its 3σ reach must fit inside the {size[1]}×{size[0]} "
                              "image)")


def inpaint(model, image, mask, prompt: str | Sequence[str], *, strength: float = 1.0,
            negative_prompt: str | Sequence[str] = "", num_images: int | None = None, mask_blur: float = 0.0,
            mask_resize: str | None = None, use_inpainting_unet: bool | None = None, composite: bool = True,
            **options):
    """Repaint the white region of ``mask`` in ``image`` following ``prompt``.

    ``mask``: a single-channel image (mode "L"/"1" 0..255, 16-bit 0..65535, or "F" 0..1) or array/tensor [H, W]
    in [0, 1] (uint8: 0..255) of the image's size; white/1 = repaint. ``mask_blur`` (pixels, Gaussian σ) softens its edge for the blend and the composite.
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
    x = image_tensor(image, "image", min_side=model.vae_factor)
    m = mask_tensor(mask, tuple(x.shape[-2:]))
    mask_blur = check_mask_blur(mask_blur, x.shape[-2:])
    if mask_resize is not None and mask_resize not in MASK_RESIZE:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZE} (or None for the default), got {mask_resize!r}")
    f, multiple = model.vae_factor, model.vae_factor * model.unet_multiple
    canvas = tuple(round_up(side, multiple) for side in x.shape[-2:])
    plan = prepare(model, prompt, negative_prompt, num_images, canvas=canvas, encode=True,  # 1. check the request
                   verb="inpaint", **options)
    nine = model.is_inpainting if use_inpainting_unet is None else bool(use_inpainting_unet)
    if nine and not model.is_inpainting:
        raise ValueError("use_inpainting_unet=True needs the 9-channel inpainting model (sd-v1-inpainting config); "
                         f"this model's UNet takes {model.unet_in_channels} channels")
    if not nine and model.is_inpainting:
        raise ValueError("the 9-channel inpainting UNet always needs its mask and masked image; "
                         "leave use_inpainting_unet at None/True for this model")
    if mask_blur:
        m = gaussian_blur(m, mask_blur).clamp(0, 1)
    if strength == 0.0:
        return unchanged(x, plan.seeds)
    (x, (height, width)), (m, _) = pad_to_multiple(x, multiple), pad_to_multiple(m, multiple)   # 2. the canvas
    m_lat = latent_mask(m, f, mask_resize or ("nearest" if nine else "max")).to(model.device)
    start_step, alpha = plan.start_step(strength)
    shape = (int(model.channels), x.shape[-2] // f, x.shape[-1] // f)

    latents, inits, pixels = [], [], []
    for batch in plan.batches():                                                           # 3. per batch:
        eps = batch.noise(shape, model.device)
        z0 = plan.encode_image(x, batch)                                                   # encode the image,
        start = eps if strength == 1.0 else noised(z0, eps, alpha)
        if nine:                                                                           # the UNet sees the
            binary = (m >= 0.5).float()                                                    # mask and the masked
            masked = plan.encode_image(x * (binary < 0.5), batch)                          # image's latent
            hard = F.interpolate(binary, size=shape[1:], mode="nearest").to(model.device)
            concat = [hard.expand(len(batch), -1, -1, -1), masked]
            z = plan.sample(batch, start, start_step=start_step, concat=concat)
        else:                                                                              # or blend the known
            repaint = m_lat.expand(len(batch), -1, -1, -1)                                 # latent in each step
            z = plan.sample(batch, start, start_step=start_step, mask=repaint, known=z0)
            z = (1.0 - repaint) * z0 + repaint * z   # the kept region of the returned latent is the image's own
        latents.append(z)
        inits.append(z0)
        pixels.append(plan.decode(z))
    pixels = torch.cat(pixels)
    if composite:                                                                          # 4. paste into the
        soft = m.to(pixels.device)                                                         # original, finish
        pixels = x.to(pixels.device) * (1.0 - soft) + pixels.clamp(-1, 1) * soft
    h, w = height // f, width // f
    result = plan.result([pixels[..., :height, :width]], latents, inits, verb="inpaint", strength=strength,
                         mask_blur=mask_blur)
    result.latents, result.init_latents = result.latents[..., :h, :w], result.init_latents[..., :h, :w]
    return result


def outpaint(model, image, extend: tuple[int, int, int, int], prompt: str | Sequence[str], *, overlap: int = 0,
             fill: str = "edge", **inpaint_options) -> PipelineResult:
    """Extend the canvas by ``extend = (left, top, right, bottom)`` pixels and paint the new area by inpainting.

    The new border is first filled with ``fill``: "edge" (replicate the border pixels, a good start for
    strength < 1) or "gray" (mid-gray); ``overlap`` pixels of the original along each extended side are
    repainted too, to hide the seam. All other options go to :func:`inpaint`.
    """
    if isinstance(extend, (str, bytes)) or not hasattr(extend, "__len__") or len(extend) != 4 \
            or not all(checks.is_int(e) and e >= 0 for e in extend) or not any(extend):
        raise ValueError(f"extend must be 4 whole pixel counts (left, top, right, bottom), each ≥ 0 and not all 0; "
                         f"got {extend!r}")
    if fill not in ("edge", "gray"):
        raise ValueError(f"fill must be 'edge' or 'gray', got {fill!r}")
    x = image_tensor(image, "image")
    left, top, right, bottom = (int(e) for e in extend)
    h, w = x.shape[-2:]
    overlap = checks.integer(overlap, "overlap", low=0, high=max(0, (min(h, w) - 1) // 2),
                             hint=f" (pixels of the {w}×{h} original repainted along each extended side; some of "
                                  "the original must stay)")
    n = count_images(prompt, inpaint_options.get("num_images"))                # refuse a canvas too big for
    batch_size = check_count(n, inpaint_options.get("batch_size"))             # memory before making it
    multiple = model.vae_factor * model.unet_multiple
    check_memory(model, n, min(n, batch_size), round_up(h + top + bottom, multiple),
                 round_up(w + left + right, multiple), guided=inpaint_options.get("guidance_scale", 7.5) != 1.0,
                 decode_tile=check_decode_tile(inpaint_options.get("decode_tile")), encode=True, verb="outpaint")
    canvas = F.pad(x, (left, right, top, bottom), mode="replicate" if fill == "edge" else "constant", value=0.0)
    mask = torch.ones(canvas.shape[-2:])
    keep = (slice(top + (overlap if top else 0), top + h - (overlap if bottom else 0)),
            slice(left + (overlap if left else 0), left + w - (overlap if right else 0)))
    mask[keep] = 0.0
    return inpaint(model, canvas[0], mask, prompt, **inpaint_options)
