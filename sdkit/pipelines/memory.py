"""How much memory a request needs, estimated from the model's widths and the image size before anything is
allocated, so that a request too big for the machine is refused with the estimate and a smaller one that fits.

Measured (float32, CPU, one thread, peak resident memory above the loaded model, one part per process):

==============  ==================================  ==========================================================
part            measured                            estimate used here
==============  ==================================  ==========================================================
VAE decoder     SD v1: 3.7 KB per output pixel;     4 maps of the widest full-resolution feature (SD: 256 ch,
                tiny: 0.8 KB (1024² px: 781 MB)     4 KB; tiny: 64 ch, 1 KB)
VAE encoder     SD v1: 3.0 KB per input pixel;      6 maps of its widest full-resolution feature (SD: 128 ch,
                tiny: 0.6 KB (1024² px: 646 MB)     3 KB; tiny: 32 ch, 0.75 KB)
UNet            SD v1: 20 KB per latent pixel per   32 maps of the first level's width per latent pixel and
                item (marginal, 32² → 64²);         item, twice with guidance (SD: 40 KB; tiny: 8 KB)
                tiny: 7 KB (marginal, 128² → 256²)
outputs         —                                   per image: the float pixels, their copies while finishing
                                                    and the PIL image (51 B per pixel), and the latents
==============  ==================================  ==========================================================

So the estimate is of the order of the truth, up to 2× above it: what refusing needs. A request is refused only
when the estimate exceeds what the machine has available right now. Time is not estimated: self-attention at the
UNet's first level costs time quadratic in the latent pixels, so a request that fits can still take hours.
"""
from __future__ import annotations

import math

from ..checks import InsufficientMemoryError, available_memory, gigabytes
from .images import round_up

FLOAT = 4                 # bytes: the pipelines compute in float32
DECODER_MAPS = 4          # feature maps of the widest full-resolution width alive at the decoder's peak
ENCODER_MAPS = 6          # ... and at the encoder's (its widest map is narrower, more of them are alive)
UNET_MAPS = 32            # feature maps of the first level's width per latent pixel (with the skips kept)
OUTPUT_BYTES = 51         # per output pixel: float pixels 12, their cat 12, finish's temporaries 24, PIL 3


def _vae_channels_per_pixel(coder, decoder: bool) -> float:
    """The widest feature map of an Encoder/Decoder per pixel of its full resolution. Level i has 1/4^i of the
    pixels and holds its blocks' widths, and in a decoder also the next level's output, upsampled to it."""
    try:
        levels = coder.up if decoder else coder.down
        widths = [max(max(b.in_channels, b.out_channels) for b in level.block) for level in levels]
        outputs = [level.block[-1].out_channels for level in levels]
    except (AttributeError, TypeError, ValueError, IndexError):
        return 0.0
    if decoder:
        widths = [max([w, *outputs[i + 1:i + 2]]) for i, w in enumerate(widths)]
    return max(w / 4 ** i for i, w in enumerate(widths))


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
    decoder = _vae_channels_per_pixel(getattr(first, "decoder", None), decoder=True)
    decode_pixels = pixels if not decode_tile else min(pixels, (decode_tile * f) ** 2)
    parts = {
        "unet": batch_size * (2 if guided else 1) * UNET_MAPS * _unet_channels(model) * latent_pixels * FLOAT,
        "decode": batch_size * DECODER_MAPS * decoder * decode_pixels * FLOAT
        + (batch_size * pixels * (3 + 1) * FLOAT if decode_tile else 0),   # the tiles' sum and weights
        "encode": (ENCODER_MAPS * _vae_channels_per_pixel(getattr(first, "encoder", None), decoder=False) * pixels
                   * FLOAT
                   if encode else 0),
        "outputs": num_images * (OUTPUT_BYTES * pixels + int(model.channels) * latent_pixels * FLOAT),
    }
    return {k: int(v) for k, v in parts.items()}


def largest(low: int, high: int, ok) -> int:
    """The largest n in [low, high] with ok(n), for ok true up to some n and false above (ok(low) assumed)."""
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low


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
        """(bytes needed, bytes available where they are needed, on the accelerator?, the parts)."""
        parts = estimate(model, n, min(batch, n), h, w, guided=guided, decode_tile=tile, encode=encode)
        needed, on_device = _need(parts, on_cpu, have_device)
        return needed, (have_device if on_device else ram), on_device, parts

    def fits(**change) -> bool:
        needed, have, _, _ = need(**change)
        return have is None or needed <= have

    needed, have, on_device, parts = need()
    if have is None or needed <= have:
        return
    advice = []
    if not decode_tile and fits(tile=64):
        advice.append("decoding in tiles (decode_tile=64; sdkit upscale --tile 64)")
    if batch_size > 1 and fits(batch=1):
        advice.append("one image per batch (batch_size=1)")
    if num_images > 1 and fits(n=1, batch=1):    # the most images per call that fit, in batches of 1
        most = largest(1, num_images, lambda n: fits(n=n, batch=1))
        advice.append(f"at most about {most} image(s) per call"
                      + (f" (num_images={most}, batch_size=1)" if batch_size > 1 else f" (num_images={most})"))
    step = 64 if 64 % (model.vae_factor * model.unet_multiple) == 0 else model.vae_factor * model.unet_multiple
    long_side = max(height, width)
    shape = lambda k: (max(step, k * step * height // long_side // step * step),  # noqa: E731
                       max(step, k * step * width // long_side // step * step))
    k = largest(0, long_side // step, lambda k: k == 0 or fits(h=shape(k)[0], w=shape(k)[1]))
    if k:                                          # the largest size of the same shape that fits
        advice.append(f"a smaller image (at most about {shape(k)[1]}×{shape(k)[0]} pixels here)")
    detail = ", ".join(f"{name} {gigabytes(size)}" for name, size in (
        ("UNet", parts["unet"]), ("VAE decode", parts["decode"]), ("VAE encode", parts["encode"]),
        (f"outputs of {num_images} image(s)", parts["outputs"])) if size)
    where = f"on {device}" if on_device else "on the CPU"
    raise InsufficientMemoryError(
        f"{verb}: {num_images} image(s) of {width}×{height} pixels need about {gigabytes(needed)} of memory "
        f"({detail}), but about {gigabytes(have)} is available {where}. "
        + ("Try " + ", or ".join(advice) + "." if advice else "Use a machine with more memory."))
