"""Writing a CompVis single-file checkpoint (``.safetensors`` or a ``.ckpt`` pickle), atomically."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_file

COMPVIS_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def tensors_for_saving(state: dict, dtype: torch.dtype | None = None) -> dict:
    """Detached, contiguous CPU tensors with no shared storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for k, t in state.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and "." in k:  # top-level schedule buffers stay exact
            t = t.to(dtype)
        t = t.contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def save_safetensors(state: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})


def save_compvis(model_or_state_dict: nn.Module | dict, path: str | os.PathLike, *,
                 dtype: torch.dtype | None = None) -> Path:
    """Write a CompVis single-file checkpoint: ``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` as
    ``torch.save({"state_dict": ...})``. ``dtype`` (e.g. torch.float16) casts the networks' floating-point
    tensors; the top-level buffers (noise schedule, scale_factor) keep their precision.

    The file is written next to ``path`` under a temporary name and moved into place when complete.
    """
    path = Path(path)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    state = tensors_for_saving(state, dtype)
    if path.suffix == ".safetensors":
        save_safetensors(state, path)
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        with atomic_file(path) as tmp:
            torch.save({"state_dict": state}, tmp)
    else:
        raise ValueError(f"save_compvis writes .safetensors, .ckpt, .pt or .pth files, got {str(path)!r}")
    return path
