"""``--lora FILE[:SCALE]`` on the command line (``sdkit generate / img2img / inpaint``; repeatable)."""
from __future__ import annotations

import argparse
import math
import os


def lora_argument(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (file, scale); the scale defaults to 1. A colon followed by something that is
    not a number belongs to the file name."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path, scale = text, 1.0
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"--lora {text!r}: the scale must be a finite number")
    return path, scale


def check_lora_files(specs: list[tuple[str, float]] | None) -> None:
    """Refuse a --lora file that does not exist, before the model is built."""
    for path, _ in specs or []:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--lora {path!r}: no such file (give FILE or FILE:SCALE, e.g. "
                                    f"style.safetensors:0.8)")


def apply_lora_arguments(model, specs: list[tuple[str, float]] | None) -> list:
    """Apply each (file, scale) to ``model``, in order; returns the LoRA handles."""
    from .apply import load_lora

    loras = []
    for path, scale in specs or []:
        loras.append(load_lora(model, path, scale))
        print(f"LoRA {path} at scale {scale:g}: {len(loras[-1].targets)} layers", flush=True)
    return loras
