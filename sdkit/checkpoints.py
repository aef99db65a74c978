"""Stable Diffusion checkpoints in and out: CompVis ``.ckpt`` / ``.safetensors`` files and diffusers folders.

    model = load_model("sd-v1-inference", "v1-5-pruned-emaonly.safetensors")   # or a .ckpt, or a diffusers folder
    save_compvis(model, "mine.safetensors")
    save_diffusers(model, "mine-diffusers/")

Reading never runs code from a file unless asked: pickles load with ``torch.load(weights_only=True)``. Loading
checks that the weights fit the config before touching the model and explains mismatches in words (an SD 2.x
file, an inpainting file, a missing autoencoder, ...). Writing is atomic: a crash leaves the old file intact.
The CompVis <-> diffusers key maps live in :mod:`sdkit.checkpoint_keys`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import checkpoint_keys as keys
from .checkpoint_keys import UNET_PREFIX, VAE_PREFIX

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
PARTS = {UNET_PREFIX: "the UNet", VAE_PREFIX: "the autoencoder (VAE)", "cond_stage_model.": "the text encoder"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model; the message says what to do."""


# ================================================================================================ reading


def read_checkpoint(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> tuple[dict, dict]:
    """Read weights as a CompVis-keyed state dict, plus ``meta`` (format, global_step, epoch, file metadata).

    ``path`` is a ``.ckpt``/``.pt``/``.pth`` pickle (Lightning checkpoints: their ``state_dict`` is taken), a
    ``.safetensors`` file, or a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``), converted to CompVis
    keys. Pickles load with ``weights_only=True``; ``unsafe_pickle=True`` allows full unpickling, which can
    run arbitrary code from the file: use it only for files you trust.
    """
    path = Path(path)
    if path.is_dir():
        return _read_diffusers_folder(path)
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # looks like a Hugging Face id, e.g. "org/model"
            raise FileNotFoundError(
                f"checkpoint {str(path)!r} is not a file or folder here. If it is a Hugging Face model id: sdkit "
                "never downloads; fetch it where there is network (huggingface-cli download ...) and pass the "
                "local folder or file.")
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): the download or copy did not finish. "
                              "Download it again.")
    kind = _sniff(path)
    if kind == "safetensors":
        state, metadata = _read_safetensors(path)
        return state, {"format": "safetensors", "path": str(path), "metadata": metadata}
    return _read_pickle(path, kind, unsafe_pickle)


def _sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch >= 1.6 pickle) or 'pickle' (legacy torch format), from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle PROTO opcode: the legacy torch.save format
        return "pickle"
    if path.suffix == ".safetensors":
        return "safetensors"
    raise CheckpointError(f"{str(path)!r} is neither a safetensors file nor a PyTorch checkpoint (its first bytes "
                          f"are {head!r}). If it should be one, it is corrupt: download it again.")


def _corrupt(path: Path, detail: str) -> CheckpointError:
    size_mb = path.stat().st_size / 2**20
    return CheckpointError(f"checkpoint {str(path)!r} ({size_mb:.1f} MB) looks truncated or corrupt ({detail}). "
                           "The download or copy probably stopped early: download it again and compare its size "
                           "or checksum with the source.")


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state = load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise _corrupt(path, f"safetensors: {e}") from e
    return state, metadata


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def _read_pickle(path: Path, kind: str, unsafe: bool) -> tuple[dict, dict]:
    if kind == "zip":
        try:  # the zip directory sits at the end of the file: a cheap check for truncation
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise _corrupt(path, f"broken zip archive: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        needed = _GLOBAL_RE.search(str(e))
        if unsafe or needed is None:
            detail = re.search(r"WeightsUnpickler error: *([^\n]*)", str(e))
            raise _corrupt(path, "unpickling failed: " + (detail.group(1) if detail else _first_line(e))) from e
        raise CheckpointError(
            f"checkpoint {str(path)!r} contains pickled Python objects besides tensors (first one: "
            f"{needed.group(1)}), e.g. Lightning callbacks or optimizer "
            "state in a full training checkpoint. sdkit loads pickles with torch.load(weights_only=True) because "
            "full unpickling can run arbitrary code from the file. If you trust where this file comes from, "
            "load it with unsafe_pickle=True (load_model(..., unsafe_pickle=True)), then save a safe copy with "
            "save_compvis(model, 'model.safetensors'). Otherwise use a .safetensors version of the weights."
        ) from e
    except (ModuleNotFoundError, AttributeError) as e:  # unsafe_pickle: a class from a package not installed
        raise CheckpointError(f"checkpoint {str(path)!r} pickles objects of a Python package that is not available "
                              f"here ({e}). Install that package (for Lightning checkpoints: lightning), or use "
                              "a .safetensors version of the weights.") from e
    except (EOFError, RuntimeError, OSError, zipfile.BadZipFile) as e:
        raise _corrupt(path, f"{type(e).__name__}: {_first_line(e) or 'unexpected end of file'}") from e
    return _unwrap_pickle(obj, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _unwrap_pickle(obj: Any, path: Path) -> tuple[dict, dict]:
    meta = {"format": "ckpt", "path": str(path)}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict or a Lightning "
                              "checkpoint dict; save weights with torch.save(model.state_dict(), ...)")
    for field in ("global_step", "epoch"):
        if field in obj and isinstance(obj[field], int):
            meta[field] = obj[field]
    state = obj.get("state_dict", obj)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{str(path)!r} contains no tensors (top-level keys: {sorted(obj)[:10]})")
    return tensors, meta


# --- diffusers folders

_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def _read_diffusers_folder(folder: Path) -> tuple[dict, dict]:
    subfolders = [name for name in _WEIGHT_NAMES if (folder / name).is_dir()]
    if not subfolders:
        raise CheckpointError(f"{str(folder)!r} is a folder but not a diffusers model folder: it has none of the "
                              "subfolders unet/, vae/, text_encoder/.")
    meta: dict[str, Any] = {"format": "diffusers", "path": str(folder)}
    unet = vae = text = {}
    if "unet" in subfolders:
        config = _read_json(folder / "unet" / "config.json")
        params = keys.unet_params_from_diffusers(config)
        unet = keys.unet_from_diffusers(_read_weights(folder / "unet", _WEIGHT_NAMES["unet"]), params)
        meta["unet_config"] = config
    if "vae" in subfolders:
        config = _read_json(folder / "vae" / "config.json")
        ddconfig, _, scale = keys.ddconfig_from_diffusers(config)
        vae = keys.vae_from_diffusers(_read_weights(folder / "vae", _WEIGHT_NAMES["vae"]), ddconfig)
        meta["vae_config"], meta["scale_factor"] = config, scale
    if "text_encoder" in subfolders:
        text = keys.text_from_transformers(_read_weights(folder / "text_encoder", _WEIGHT_NAMES["text_encoder"]))
        meta["text_config"] = _read_json(folder / "text_encoder" / "config.json")
    return keys.join_compvis(unet, vae, text), meta


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} is missing; a diffusers model folder needs a config.json next to "
                              "the weights to know the architecture.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); the folder looks damaged.") from e


def _read_weights(sub: Path, stem: str) -> dict:
    """One diffusers/transformers weight set: safetensors or .bin, plain, fp16 variant or sharded."""
    other_stem = "pytorch_model" if stem == "model" else stem
    candidates = [f"{s}{v}{ext}" for s in dict.fromkeys([stem, other_stem]) for v in ("", ".fp16")
                  for ext in (".safetensors", ".bin")]
    for name in candidates:
        if (sub / name).exists():
            return read_checkpoint(sub / name)[0]
    for name in candidates:
        index = sub / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(read_checkpoint(sub / shard)[0])
            return state
    raise CheckpointError(f"no weights in {str(sub)!r}: expected one of {candidates[:4]} (or an .index.json)")


# ================================================================================================ EMA


def has_ema(state_dict: dict) -> bool:
    """True when the state dict carries LitEma copies of the UNet (``model_ema.<flattened name>``)."""
    return any(k.startswith(EMA_PREFIX) and k not in EMA_COUNTERS for k in state_dict)


def ema_key(unet_key: str) -> str:
    """``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def extract_ema(state_dict: dict) -> dict:
    """The state dict with the UNet weights replaced by their EMA copies and every ``model_ema.*`` key dropped.

    CompVis stores the EMA under flattened names (dots removed); each real UNet parameter name is flattened the
    same way to find its copy. Without EMA copies the UNet weights are kept (and ``model_ema.*`` still dropped).
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    if not has_ema(state_dict):
        return out
    unet_keys = [k for k in out if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing:
        warnings.warn(f"the checkpoint's EMA covers {len(unet_keys) - len(missing)} of {len(unet_keys)} UNet "
                      f"weights; the others keep their raw values (first without EMA: {missing[0]})", stacklevel=2)
    for k in unet_keys:
        if ema_key(k) in state_dict:
            out[k] = state_dict[ema_key(k)]
    return out


def drop_ema(state_dict: dict) -> dict:
    """The state dict without ``model_ema.*`` keys (the raw training weights)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}


# ================================================================================================ checking


def _is_harmless_extra(key: str) -> bool:
    """Keys that checkpoints carry but sdkit models need not have (see sd_v1_facts §2)."""
    return (key.endswith("embeddings.position_ids") or key in EMA_COUNTERS or key.startswith(EMA_PREFIX)
            or key == "lvlb_weights" or key.startswith(VAE_PREFIX + "loss."))


def _summary(items: list[str], n: int = 3) -> str:
    shown = "; ".join(items[:n])
    return shown + (f"; ... ({len(items) - n} more)" if len(items) > n else "")


def _shape(state: dict, key: str):
    t = state.get(key)
    return tuple(t.shape) if t is not None else None


def check_fits(state_dict: dict, model_state_dict: dict, config_name: str = "the config", *,
               strict: bool = True) -> dict:
    """Check that CompVis-keyed weights fit a model, before ``load_state_dict``; return the keys to load.

    Raises :class:`CheckpointError` with an explanation for: an SD 2.x / SDXL checkpoint, an inpainting
    checkpoint into a text-to-image config (or the reverse), a file missing a whole part (UNet, VAE, text
    encoder), other shape mismatches (summarised), and, when ``strict``, missing keys. Known-harmless extra keys
    are dropped silently, other extra keys with a warning. Only shapes are read, so meta tensors work.
    """
    _check_model_family(state_dict, model_state_dict, config_name)
    _check_in_channels(state_dict, model_state_dict, config_name)
    absent_parts = _check_parts(state_dict, model_state_dict, config_name, strict)

    mismatched = [f"{k}: checkpoint {_shape(state_dict, k)} vs model {_shape(model_state_dict, k)}"
                  for k in model_state_dict if k in state_dict and _shape(state_dict, k) != _shape(model_state_dict, k)]
    if mismatched:
        raise CheckpointError(f"{len(mismatched)} weight(s) of the checkpoint have other shapes than the model "
                              f"built from {config_name}: {_summary(mismatched)}. The checkpoint was made for "
                              "a different configuration; use the config it was trained with.")

    # Schedule buffers are computed from the config; a file without them (a diffusers folder) is fine.
    missing = [k for k in model_state_dict if k not in state_dict and k not in SCHEDULE_BUFFERS
               and not k.startswith((EMA_PREFIX, *absent_parts)) and not k.endswith("embeddings.position_ids")]
    if missing:
        message = (f"{len(missing)} weight(s) of the model built from {config_name} are not in the checkpoint: "
                   f"{_summary(missing)}")
        if strict:
            raise CheckpointError(message + ". The checkpoint was made for a different configuration; use its "
                                  "config, or pass strict=False to keep those weights at their initial values.")
        warnings.warn(message + "; they keep their initial values (strict=False).", stacklevel=2)

    unexpected = [k for k in state_dict if k not in model_state_dict and not _is_harmless_extra(k)]
    if unexpected:
        warnings.warn(f"ignoring {len(unexpected)} checkpoint key(s) that {config_name} has no place for: "
                      f"{_summary(unexpected)}", stacklevel=2)
    return {k: v for k, v in state_dict.items() if k in model_state_dict}


def _check_model_family(sd: dict, model: dict, config_name: str) -> None:
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError("this is a Stable Diffusion XL checkpoint (its text encoders live under "
                              "conditioner.embedders.*); sdkit supports SD v1.x (e.g. v1-5-pruned-emaonly).")
    openclip = any(k.startswith("cond_stage_model.model.") for k in sd)
    sd_ctx = _context_dim(sd)
    model_ctx = _context_dim(model)
    if (openclip and not any(k.startswith("cond_stage_model.model.") for k in model)) or (
            sd_ctx == 1024 and model_ctx not in (None, 1024)):
        raise CheckpointError(
            "this is a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, 1024-wide cross-attention); "
            f"sdkit supports SD v1.x, whose {config_name} expects CLIP ViT-L/14 and "
            f"{model_ctx or 768}-wide cross-attention. Use an SD v1.x checkpoint (e.g. v1-5-pruned-emaonly).")


def _context_dim(state: dict) -> int | None:
    for k, t in state.items():
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            return int(t.shape[1])
    return None


def _check_in_channels(sd: dict, model: dict, config_name: str) -> None:
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    if key not in sd or key not in model:
        return
    have, want = int(sd[key].shape[1]), int(model[key].shape[1])
    if have == want:
        return
    if have == 9 and want == 4:
        raise CheckpointError(f"this is an inpainting checkpoint (its UNet takes 9 input channels: latent, mask, "
                              f"masked image), but {config_name} builds a 4-channel text-to-image UNet; use config "
                              "'sd-v1-inpainting'.")
    if have == 4 and want == 9:
        raise CheckpointError(f"this is a text-to-image checkpoint (4 UNet input channels), but {config_name} "
                              "builds the 9-channel inpainting UNet; use config 'sd-v1-inference', or an "
                              "inpainting checkpoint such as sd-v1-5-inpainting.")
    raise CheckpointError(f"the checkpoint's UNet takes {have} input channels but {config_name} builds one with "
                          f"{want}; use the config the checkpoint was made with.")


def _check_parts(sd: dict, model: dict, config_name: str, strict: bool) -> tuple[str, ...]:
    """Raise (strict) or warn when the checkpoint lacks a whole part; return the prefixes of absent parts."""
    absent = []
    for prefix, part in PARTS.items():
        if any(k.startswith(prefix) for k in model) and not any(k.startswith(prefix) for k in sd):
            hint = _standalone_hint(sd)
            message = f"the checkpoint has no weights for {part} ({prefix}* keys), which {config_name} needs"
            if strict:
                raise CheckpointError(message + (f". {hint}" if hint else ". It may hold only part of a model; "
                                                 "pass strict=False to keep that part at its initial values."))
            warnings.warn(message + "; that part keeps its initial values (strict=False).", stacklevel=3)
            absent.append(prefix)
    return tuple(absent)


def _standalone_hint(sd: dict) -> str:
    if any(k.startswith(("down_blocks.", "mid_block.", "text_model.", "encoder.down_blocks.")) for k in sd):
        return ("Its keys use diffusers names (down_blocks.*, text_model.*): pass the whole diffusers folder "
                "(with unet/, vae/, text_encoder/ and their config.json) instead of one of its files.")
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):
        return ("Its keys (encoder.*, decoder.*) are those of a standalone autoencoder file such as "
                "vae-ft-mse-840000-ema-pruned, not a full Stable Diffusion checkpoint.")
    return ""


# ================================================================================================ writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path`` in one step, else delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``folder`` by renames, else it is deleted."""
    if folder.exists() and any(folder.iterdir()) and not (folder / "model_index.json").exists():
        raise FileExistsError(f"{str(folder)!r} exists and is not a diffusers model folder; refusing to replace "
                              "it. Choose a new or empty folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        for d in [tmp, *[d for d in tmp.rglob("*") if d.is_dir()]]:
            os.chmod(d, 0o777 & ~_umask())
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tensors_for_saving(state: dict, dtype: torch.dtype | None = None) -> dict:
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


def _save_safetensors(state: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with _atomic_file(path) as tmp:
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
    state = _tensors_for_saving(state, dtype)
    if path.suffix == ".safetensors":
        _save_safetensors(state, path)
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        with _atomic_file(path) as tmp:
            torch.save({"state_dict": state}, tmp)
    else:
        raise ValueError(f"save_compvis writes .safetensors, .ckpt, .pt or .pth files, got {str(path)!r}")
    return path


def save_diffusers(model: nn.Module, folder: str | os.PathLike, *, config: Any = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a diffusers folder: unet/, vae/, text_encoder/ (safetensors + config.json),
    scheduler/, tokenizer/ and model_index.json, loadable by diffusers' ``from_pretrained``.

    The model's current weights are written; for EMA weights use ``with model.ema_scope(): save_diffusers(...)``.
    ``config`` (a bundled name, YAML path or dict) overrides the architecture read from the model.
    The folder is assembled under a temporary name and renamed into place when complete.
    """
    folder = Path(folder)
    unet_params, ddconfig, embed_dim = _architecture(model, config)
    parts = keys.split_compvis(_tensors_for_saving(model.state_dict(), dtype))
    latent_size = int(getattr(model, "image_size", unet_params.get("image_size", 64)))
    vae_size = latent_size * 2 ** (len(ddconfig["ch_mult"]) - 1)
    scale_factor = float(getattr(model, "scale_factor", 0.18215))
    unet_config = keys.unet_diffusers_config(unet_params, sample_size=latent_size)
    vae_config = keys.vae_diffusers_config(ddconfig, embed_dim, scale_factor, sample_size=vae_size)
    text_config = _text_encoder_config(model)

    with _atomic_folder(folder) as tmp:
        components = {}
        for name, state, cfg in (
            ("unet", keys.unet_to_diffusers(parts["unet"], unet_params), unet_config),
            ("vae", keys.vae_to_diffusers(parts["vae"], ddconfig), vae_config),
        ):
            (tmp / name).mkdir()
            _save_safetensors(state, tmp / name / "diffusion_pytorch_model.safetensors")
            _write_json(tmp / name / "config.json", cfg)
            components[name] = ["diffusers", cfg["_class_name"]]
        (tmp / "text_encoder").mkdir()
        _save_safetensors(keys.text_to_transformers(parts["text"]), tmp / "text_encoder" / "model.safetensors")
        _write_json(tmp / "text_encoder" / "config.json", text_config)
        components["text_encoder"] = ["transformers", "CLIPTextModel"]
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", keys.scheduler_diffusers_config(
            model.betas, model.linear_start, model.linear_end, getattr(model, "parameterization", "eps")))
        components["scheduler"] = ["diffusers", "PNDMScheduler"]
        if _write_tokenizer(model, tmp / "tokenizer"):
            components["tokenizer"] = ["transformers", "CLIPTokenizer"]
        inpainting = unet_params["in_channels"] == 9
        _write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
            "_diffusers_version": keys.DIFFUSERS_VERSION,
            **components,
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        })
    return folder


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _architecture(model: nn.Module, config: Any) -> tuple[dict, dict, int]:
    """(unet params, ddconfig, embed_dim): from ``config`` if given, else from the model (and its weights)."""
    if config is not None:
        from .config import load_config

        params = keys._as_plain(load_config(config))["model"]["params"]
        first = params["first_stage_config"]["params"]
        return params["unet_config"]["params"], first["ddconfig"], first.get("embed_dim")
    unet_config = keys._as_plain(getattr(model, "unet_config", None))
    if not unet_config:
        raise ValueError("the model does not record its unet_config; pass config= (the name or YAML it was built "
                         "from) to save_diffusers")
    vae_state = keys.split_compvis(model.state_dict())["vae"]
    ddconfig, embed_dim = keys.infer_ddconfig(vae_state)
    return unet_config.get("params", unet_config), ddconfig, embed_dim


def _text_encoder_config(model: nn.Module) -> dict:
    transformer = getattr(getattr(model, "cond_stage_model", None), "transformer", None)
    config = getattr(transformer, "config", None)
    if config is None:
        raise ValueError("save_diffusers needs a CLIP text encoder (cond_stage_model.transformer with a config); "
                         f"this model's cond stage is {type(getattr(model, 'cond_stage_model', None)).__name__}")
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config.to_dict())
    config.update(architectures=["CLIPTextModel"], model_type="clip_text_model", torch_dtype="float32")
    return config


def _write_tokenizer(model: nn.Module, folder: Path) -> bool:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, from sdkit's bundled CLIP BPE vocabulary."""
    tokenizer = getattr(getattr(model, "cond_stage_model", None), "tokenizer", None)
    encoder, ranks = getattr(tokenizer, "encoder", None), getattr(tokenizer, "bpe_ranks", None)
    if not encoder or not ranks:
        return False
    folder.mkdir()
    _write_json(folder / "vocab.json", encoder)
    merges = sorted(ranks, key=ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    max_length = int(getattr(tokenizer, "max_length", 77))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False,
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    })
    return True


# ================================================================================================ loading


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
    """Where the kit's shipped weights live: $SDKIT_DATA, else the repository's ``data/`` folder."""
    return Path(os.environ.get("SDKIT_DATA") or Path(__file__).resolve().parents[1] / "data")


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
    from .config import instantiate_from_config, load_config

    cfg = load_config(config)
    model = instantiate_from_config(cfg.model)
    if ckpt is None and cfg.get("weights"):
        ckpt = shipped_weights(cfg.weights)
    if ckpt is not None:
        meta = load_weights(model, ckpt, use_ema=use_ema, strict=strict, unsafe_pickle=unsafe_pickle,
                            config_name=_config_name(config))
        model.checkpoint_meta = meta
    model.eval()
    model.to(device)
    if dtype is not None:
        for part in ("model", "first_stage_model", "cond_stage_model"):
            if isinstance(getattr(model, part, None), nn.Module):
                getattr(model, part).to(dtype)
    return model
