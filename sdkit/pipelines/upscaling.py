"""Super-resolution with the LDM design; large outputs are decoded in tiles (``decoding.decode_tiled``).

LDM-SR (``models/ldm/bsr_sr``): a LatentDiffusion with ``conditioning_key: concat`` whose UNet input is the noisy
latent with the low-resolution image (in [-1, 1], at latent resolution) concatenated to it; the autoencoder's
factor is the upscaling factor (4 for the VQ-f4 BSR model). It was sampled with DDIM at eta 1.0.
"""
from __future__ import annotations

from .. import checks
from .images import image_tensor, pad_to_multiple, round_up
from .plan import prepare

AUTO_TILE = 64  # latent pixels: decode in tiles above this size (512 px of SD output; memory grows with area)
DEFAULTS = {"steps": 50, "sampler": "ddim", "eta": 1.0, "guidance_scale": 1.0}   # as LDM's SR notebook


def is_superresolution_model(model) -> bool:
    return model.is_superresolution


def upscale(model, low_res_image, prompt: str | None = None, *, num_images: int = 1, negative_prompt: str = "",
            tile_overlap: int = 16, **options):
    """Upscale ``low_res_image`` by the autoencoder factor with an LDM super-resolution model.

    The model must be a ``concat`` LatentDiffusion whose UNet takes latent + 3 image channels (a ``hybrid`` one
    also takes ``prompt`` by cross-attention, with guidance). Defaults: DDIM, 50 steps, eta 1.0, guidance 1 (as
    LDM's SR notebook). Sizes: any; the low-resolution image is padded (reflection) to a multiple of
    2**(UNet levels − 1) and the output is cropped to factor × its size. ``decode_tile``: latent tile size for
    :func:`decode_tiled`; default: tiled above 64×64 latent pixels, 0 = never. For upscaling with SD v1 itself,
    use img2img on a resized image. Other options as :func:`txt2img`.
    """
    if not model.is_superresolution:
        raise ValueError(
            f"this is not a super-resolution model: upscale needs conditioning_key 'concat' (or 'hybrid') and a "
            f"UNet taking {model.channels} latent + 3 image channels; this one has conditioning_key="
            f"{model.model.conditioning_key!r} and in_channels={model.unet_in_channels}. "
            "Load an upscaler config (e.g. tiny-upscaler-test), or use img2img on a resized image with SD.")
    hybrid = model.model.conditioning_key == "hybrid"
    if prompt is not None and not hybrid:
        raise ValueError("this upscaler has no text conditioning (conditioning_key 'concat'): give no prompt "
                         "(prompt=None; on the command line, leave out --prompt)")
    tile_overlap = checks.integer(tile_overlap, "tile_overlap", low=0, hint=" (latent pixels)")
    lr = image_tensor(low_res_image, "low_res_image")
    f = model.vae_factor
    canvas = tuple(round_up(side, model.unet_multiple) * f for side in lr.shape[-2:])
    options = {**DEFAULTS, **options}
    if options.get("decode_tile") is None and max(canvas) > AUTO_TILE * f:
        options["decode_tile"] = AUTO_TILE
    plan = prepare(model, "" if prompt is None and hybrid else prompt, negative_prompt,   # 1. check the request
                   num_images, text=hybrid, canvas=canvas, verb="upscale", **options)
    lr, (height, width) = pad_to_multiple(lr, model.unet_multiple)
    lr = lr.to(model.device)                                                               # 2. the canvas
    shape = (int(model.channels), *lr.shape[-2:])
    overlap = tile_overlap if plan.decode_tile and tile_overlap < plan.decode_tile else 0

    latents, pixels = [], []
    for batch in plan.batches():                                                           # 3. per batch:
        concat = [lr.expand(len(batch), -1, -1, -1)]                                       # the low-res image
        z = plan.sample(batch, batch.noise(shape, model.device), concat=concat)            # beside the latent
        z = z[..., :height, :width]
        latents.append(z)
        pixels.append(plan.decode(z, overlap))                                             # decode (tiled)
    return plan.result(pixels, latents, verb="upscale")                                    # 4. finish
