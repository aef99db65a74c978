"""Loading: build a model from its config, then read, pick EMA or raw weights, check they fit, and load them.
Also where the kit's shipped weights live.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .ema_copies import EMA_COUNTERS, EMA_PREFIX, drop_ema, ema_key, extract_ema
from .fit import check_finite_weights, check_fits
from .read import read_checkpoint


def _config_name(config: Any) -> str:
    return f"config {config!r}" if isinstance(config, (str, os.PathLike)) else "the given config"


def load_weights(model: nn.Module, ckpt: str | os.PathLike | dict, *, use_ema: bool = True, strict: bool = True,
                 unsafe_pickle: bool = False, config_name: str = "the config") -> dict:
    """Read (unless given a state dict), pick EMA or raw UNet weights, check and load into ``model``.

    Returns the checkpoint ``meta``. With ``use_ema`` the checkpoint's EMA copies (if any) become the UNet
    weights. A model with its own ``model_ema`` gets the checkpoint's EMA when it is kept (``use_ema=False``),
    otherwise a copy of the loaded UNet weights, so ``ema_scope()`` never swaps in random weights.
    """
    if isinstance(ckpt, dict):
        state, meta = dict(ckpt), {"format": "state_dict"}
    else:
        state, meta = read_checkpoint(ckpt, unsafe_pickle=unsafe_pickle)
    model_state = model.state_dict()
    model_has_ema = any(k.startswith(EMA_PREFIX) and k not in EMA_COUNTERS for k in model_state)
    if use_ema or not model_has_ema:
        state = extract_ema(state) if use_ema else drop_ema(state)
    if model_has_ema:  # fill the model's EMA buffers the checkpoint did not (or no longer does) provide
        for k in model_state:
            if k.startswith("model.") and ema_key(k) in model_state and ema_key(k) not in state and k in state:
                state[ema_key(k)] = state[k]
    to_load = check_fits(state, model_state, config_name, strict=strict)
    check_finite_weights(to_load, meta.get("path", "the state dict"))
    model.load_state_dict(to_load, strict=False)
    _warn_scale_factor(model, meta)
    return meta


def _warn_scale_factor(model: nn.Module, meta: dict) -> None:
    file_scale = meta.get("scale_factor")
    model_scale = float(getattr(model, "scale_factor", file_scale or 0))
    if file_scale is not None and abs(float(file_scale) - model_scale) > 1e-6:
        warnings.warn(f"the diffusers VAE says scaling_factor={file_scale}, the config says scale_factor="
                      f"{model_scale}; sdkit uses the config's value", stacklevel=3)


def data_dir() -> Path:
    """Where the kit's shipped weights live: $SDKIT_DATA, else the repository's ``data/`` folder (a clone or an
    editable install), else ``<environment>/share/sdkit/data`` (where ``pip install .`` puts them)."""
    if os.environ.get("SDKIT_DATA"):
        return Path(os.environ["SDKIT_DATA"])
    repository = Path(__file__).resolve().parents[2] / "data"
    installed = Path(sys.prefix) / "share" / "sdkit" / "data"
    return repository if repository.is_dir() or not installed.is_dir() else installed


def shipped_weights(name: str) -> Path:
    """The path of a shipped weights file named by a bundled config's ``weights:`` key."""
    path = data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"the shipped weights {name!r} are not at {path}. They come with the sdkit repository (data/); "
            "install sdkit from a clone with `pip install -e .`, or set SDKIT_DATA to the folder that holds them.")
    return path


def load_model(config: Any, ckpt: str | os.PathLike | dict | None = None, *, use_ema: bool = True,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None, unsafe_pickle: bool = False,
               strict: bool = True) -> nn.Module:
    """Build the model described by ``config`` (a bundled name such as "sd-v1-inference", a YAML path or a
    dict) and, if given, load ``ckpt`` (a .ckpt/.safetensors file, a diffusers folder, or a state dict).
    Without ``ckpt``, a config with a top-level ``weights:`` key (the shipped "tiny") loads that file from
    :func:`data_dir`; other configs stay random.

    EMA weights are used when the checkpoint has them, unless ``use_ema=False``. ``dtype`` casts the networks
    (the noise-schedule buffers stay float32). Returns the model in eval mode.
    """
    from .. import checks
    from ..config import instantiate_from_config, load_config, model_section

    dtype, device = checks.dtype(dtype), checks.device(device)   # refused before the (slow) build, as are
    cfg = load_config(config)                                    # a config that is not one and a missing ckpt
    section = model_section(cfg, _config_name(config))
    if ckpt is None and cfg.get("weights"):
        ckpt = shipped_weights(cfg.weights)
    if isinstance(ckpt, (str, os.PathLike)) and not os.path.exists(ckpt):
        read_checkpoint(ckpt)                                    # raises FileNotFoundError, with a hint for Hub ids
    elif ckpt is not None and not isinstance(ckpt, (str, os.PathLike, dict)):
        raise TypeError(f"ckpt must be a file or folder path or a state dict, got {type(ckpt).__name__}")
    model = instantiate_from_config(section)
    if ckpt is not None:
        meta = load_weights(model, ckpt, use_ema=use_ema, strict=strict, unsafe_pickle=unsafe_pickle,
                            config_name=_config_name(config))
        model.checkpoint_meta = meta
        if isinstance(ckpt, (str, os.PathLike)):
            model.checkpoint_path = str(ckpt)     # named and hashed in the PNGs' parameters (pipelines.metadata)
    if cfg.get("delta"):   # a low-rank delta over the weights (e.g. the distilled few-step "tiny-lcm")
        _merge_shipped_delta(model, cfg)
    model.config_name = Path(config).stem if isinstance(config, (str, os.PathLike)) else None
    model.eval()
    model.to(device)
    if dtype is not None:
        for part in ("model", "first_stage_model", "cond_stage_model"):
            if isinstance(getattr(model, part, None), nn.Module):
                getattr(model, part).to(dtype)
    return model


def _merge_shipped_delta(model: nn.Module, cfg) -> None:
    """Merge the config's ``delta:`` file (from :func:`data_dir`) into the loaded UNet; the file's base digest
    must match the weights just loaded (sdkit.nn.lowrank)."""
    from ..nn.lowrank import merge_delta_file

    path = data_dir() / cfg.delta
    if not path.is_file():
        made_by = f" It is made by `{cfg.made_by}`." if cfg.get("made_by") else ""
        raise FileNotFoundError(f"the low-rank delta {cfg.delta!r} this config merges into its weights is not at "
                                f"{path}.{made_by} Set SDKIT_DATA to the folder that holds it.")
    merge_delta_file(model, path)
