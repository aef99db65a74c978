"""The plain PyTorch speed switches, as context managers over a loaded model: channels-last memory layout,
bfloat16 autocast on the CPU, and ``torch.compile``. Each leaves the model as it found it (weights, keys, layout).

    with channels_last(model), bf16_autocast(), compiled(model):
        txt2img(model, "a red circle")

What each costs and gains on this kit's models is measured by ``benchmarks/speed_switches.py`` (the README's table).
"""
from __future__ import annotations

import contextlib

import torch


def _unet(model):
    return getattr(model, "unet", model)


@contextlib.contextmanager
def channels_last(model):
    """The UNet's 4-D weights (and so its convolutions' outputs) in channels-last (NHWC) layout inside the block.
    Values are unchanged; only the memory order and so the kernels PyTorch picks differ."""
    unet = _unet(model)
    unet.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        unet.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def bf16_autocast(device_type: str = "cpu"):
    """Matrix products and convolutions in bfloat16 (8 bits of mantissa: about 3 significant digits) with float32
    accumulation, everything else in float32: ``torch.autocast`` on ``device_type``."""
    with torch.autocast(device_type, dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def compiled(model, **compile_options):
    """The UNet compiled with ``torch.compile`` (TorchInductor; on the CPU it needs a C++ compiler) inside the
    block. ``nn.Module.compile`` compiles in place, so the state-dict keys stay the CompVis ones. The first call
    of each new input shape compiles (tens of seconds); later calls reuse it."""
    unet = _unet(model)
    unet.compile(**compile_options)
    try:
        yield model
    finally:
        unet._compiled_call_impl = None   # what nn.Module.compile set; None = the plain call again
