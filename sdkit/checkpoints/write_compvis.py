"""Writing a CompVis single-file checkpoint (``.safetensors`` or a ``.ckpt`` pickle), atomically."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from torch import nn

from .. import checks
from ..atomic import atomic_file, check_space, check_writable

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
    if path.suffix not in COMPVIS_SUFFIXES:
        raise ValueError(f"save_compvis writes .safetensors, .ckpt, .pt or .pth files, got {str(path)!r}")
    check_writable(path)
    if dtype is not None:
        dtype = checks.dtype(dtype)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    state = tensors_for_saving(state, dtype)
    size = sum(t.numel() * t.element_size() for t in state.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    check_space(path.parent, size, str(path))
    try:
        if path.suffix == ".safetensors":
            save_safetensors(state, path)
        else:
            with atomic_file(path) as tmp:
                torch.save({"state_dict": state}, tmp)
    except RuntimeError as e:  # torch.save reports a full disk as "unexpected pos ..." from its zip writer
        if not any(w in str(e) for w in ("unexpected pos", "PytorchStreamWriter", "write")):
            raise
        check_space(path.parent, size, str(path))
        raise OSError(errno.EIO, f"writing {str(path)!r} failed ({' '.join(str(e).split())[:200]}); nothing was "
                                 "replaced") from e
    return path
