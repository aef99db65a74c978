"""How much memory a request needs, estimated from the model's widths and the image size before anything is
allocated, so that a request too big for the machine is refused with the estimate and a smaller one that fits.

Measured on SD v1 (random weights, float32, CPU, peak resident memory above the loaded model):

==================  ===========================  =====================================================
part                measured                     estimate used here
==================  ===========================  =====================================================
VAE decoder         3.7 KB per output pixel      4 maps of the widest full-resolution feature (256 ch)
VAE encoder         3.0 KB per input pixel       the same formula (4 KB per pixel)
UNet                20 KB per latent pixel       16 maps of the first level's width (320 ch), per item
                    per item (batch 2 = 2×)      of the batch, twice with guidance
outputs             —                            per image: the float pixels, their copies while
                                                 finishing and the PIL image (51 B per pixel), latents
==================  ===========================  =====================================================

The estimate is of the same order as the truth (within about 1.5× above it), which is what refusing needs: a
request is refused only when the estimate exceeds what the machine has available right now.
"""
from __future__ import annotations

import math

from ..checks import InsufficientMemoryError, available_memory, gigabytes
from .images import round_up

FLOAT = 4                 # bytes: the pipelines compute in float32
VAE_MAPS = 4              # feature maps of the widest full-resolution width alive at the decoder's peak
UNET_MAPS = 16            # feature maps of the first level's width per latent pixel (with the skips kept)
OUTPUT_BYTES = 51         # per output pixel: float pixels 12, their cat 12, finish's temporaries 24, PIL 3


def _vae_channels_per_pixel(coder, levels: str) -> float:
    """The widest feature map of an Encoder/Decoder per pixel of its full resolution: level i (of area 1/4^i)
    counts its blocks' widths and the next level's (the resampled input)."""
    try:
        widths = [max(max(b.in_channels, b.out_channels) for b in level.block) for level in getattr(coder, levels)]
    except (AttributeError, TypeError, ValueError):
        return 0.0
    return max(max(widths[i:i + 2]) / 4 ** i for i in range(len(widths)))


def _unet_channels(model) -> int:
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    try:
        return int(unet.model_channels) * int(unet.channel_mult[0])
    except (AttributeError, TypeError, IndexError):
        return 0


def estimate(model, num_images: int, batch_size: int, height: int, width: int, *, guided: bool,
             decode_tile: int | None = None, encode: bool = False) -> dict:
    """Bytes needed, by part, to make ``num_images`` images of ``height``×``width`` pixels in batches of
    ``batch_size``: {"unet", "decode", "encode" (per batch, the device's working memory), "outputs" (all images,
    kept in RAM)}."""
    f = model.vae_factor
    pixels = height * width
    latent_pixels = round_up(-(-height // f), model.unet_multiple) * round_up(-(-width // f), model.unet_multiple)
    first = model.first_stage_model
    decoder = _vae_channels_per_pixel(getattr(first, "decoder", None), "up")
    decode_pixels = pixels if not decode_tile else min(pixels, (decode_tile * f) ** 2)
    parts = {
        "unet": batch_size * (2 if guided else 1) * UNET_MAPS * _unet_channels(model) * latent_pixels * FLOAT,
        "decode": batch_size * VAE_MAPS * decoder * decode_pixels * FLOAT
        + (batch_size * pixels * (3 + 1) * FLOAT if decode_tile else 0),   # the tiles' sum and weights
        "encode": (VAE_MAPS * _vae_channels_per_pixel(getattr(first, "encoder", None), "down") * pixels * FLOAT
                   if encode else 0),
        "outputs": num_images * (OUTPUT_BYTES * pixels + int(model.channels) * latent_pixels * FLOAT),
    }
    return {k: int(v) for k, v in parts.items()}


def _need(parts: dict, on_cpu: bool, have_device: int | None) -> tuple[int, bool]:
    """(bytes needed where it is scarcest, whether that is the accelerator)."""
    work = max(parts["unet"], parts["decode"], parts["encode"])  # the phases run one after the other
    if on_cpu:
        return work + parts["outputs"], False
    if have_device is not None and work > have_device:    # the working memory is on the accelerator,
        return work, True                                 # the outputs in RAM
    return parts["outputs"], False


def check_memory(model, num_images: int, batch_size: int, height: int, width: int, *, guided: bool,
                 decode_tile: int | None = None, encode: bool = False, verb: str = "this request") -> None:
    """Refuse, before any allocation, a request whose estimated memory exceeds what is available; the message
    gives the estimate by part and what would fit (``decode_tile``, ``batch_size``, fewer images, a smaller size).
    """
    device = getattr(model, "device", "cpu")
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    ram, have_device = available_memory("cpu"), None if on_cpu else available_memory(device)

    def need(n=num_images, batch=batch_size, h=height, w=width, tile=decode_tile):
        parts = estimate(model, n, min(batch, n), h, w, guided=guided, decode_tile=tile, encode=encode)
        needed, on_device = _need(parts, on_cpu, have_device)
        return needed, (have_device if on_device else ram), parts

    needed, have, parts = need()
    if have is None or needed <= have:
        return
    fits = lambda **change: need(**change)[0] <= need(**change)[1]  # noqa: E731
    advice = []
    if not decode_tile and fits(tile=64):
        advice.append("decoding in tiles (decode_tile=64; sdkit upscale --tile 64)")
    if batch_size > 1 and fits(batch=1):
        advice.append("one image per batch (batch_size=1)")
    if num_images > 1 and fits(n=1, batch=1):
        low, high = 1, num_images                  # the most images per call that fit, with the same batch size
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(n=mid) or fits(n=mid, batch=1) else (low, mid - 1)
        advice.append(f"at most about {low} image(s) per call (num_images; --n)")
    step = 64 if 64 % (model.vae_factor * model.unet_multiple) == 0 else model.vae_factor * model.unet_multiple
    scale = lambda k: (max(step, k * step * height // max(height, width) // step * step),  # noqa: E731
                       max(step, k * step * width // max(height, width) // step * step))
    low, high = 0, max(height, width) // step
    while low < high:                              # the largest size of the same shape that fits
        mid = (low + high + 1) // 2
        h, w = scale(mid)
        low, high = (mid, high) if fits(h=h, w=w) else (low, mid - 1)
    if low:
        h, w = scale(low)
        advice.append(f"a smaller image (at most about {w}×{h} pixels here)")
    detail = ", ".join(f"{name} {gigabytes(size)}" for name, size in (
        ("UNet", parts["unet"]), ("VAE decode", parts["decode"]), ("VAE encode", parts["encode"]),
        (f"outputs of {num_images} image(s)", parts["outputs"])) if size)
    where = "on the CPU" if have is ram else f"on {device}"
    raise InsufficientMemoryError(
        f"{verb}: {num_images} image(s) of {width}×{height} pixels need about {gigabytes(needed)} of memory "
        f"({detail}), but about {gigabytes(have)} is available {where}. "
        + ("Try " + ", or ".join(advice) + "." if advice else "Use a machine with more memory."))
