"""Reading checkpoints: CompVis ``.ckpt`` / ``.safetensors`` files and diffusers folders, as CompVis-keyed state dicts.

The format is told from the first bytes, not the file name. Reading never runs code from a file unless asked:
pickles load with ``torch.load(weights_only=True)``. A truncated or damaged file is reported as such, with what
to do, instead of the loader's own error.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import keys

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model; the message says what to do."""


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


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)")


def _read_pickle(path: Path, kind: str, unsafe: bool) -> tuple[dict, dict]:
    if kind == "zip":
        try:  # the zip directory sits at the end of the file: a cheap check for truncation
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise _corrupt(path, f"broken zip archive: {e}") from e
    try:
        if path.suffix == ".safetensors":  # a pickle under a safetensors name: torch.load would go by the name
            warnings.warn(f"{str(path)!r} is a PyTorch pickle, not a safetensors file, despite its name; reading "
                          "it as a pickle (rename it .ckpt)", stacklevel=3)
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=not unsafe)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        needed = _GLOBAL_RE.search(str(e))
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        detail = detail.group(1).strip() if detail else _first_line(e)
        if not unsafe and needed is None and "Unsupported" in detail:
            raise CheckpointError(
                f"{str(path)!r} is a pickle that weights-only unpickling cannot read ({detail}): not a plain "
                "PyTorch checkpoint, or one written with another pickle protocol. sdkit loads pickles with "
                "torch.load(weights_only=True) because full unpickling can run arbitrary code from the file; if you "
                "trust where it comes from, load it with unsafe_pickle=True, or use a .safetensors version.") from e
        if unsafe or needed is None:
            raise _corrupt(path, "unpickling failed: " + detail) from e
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
        params = _from_config(keys.unet_params_from_diffusers, config, folder / "unet" / "config.json")
        unet = keys.unet_from_diffusers(_read_weights(folder / "unet", _WEIGHT_NAMES["unet"]), params)
        meta["unet_config"] = config
    if "vae" in subfolders:
        config = _read_json(folder / "vae" / "config.json")
        ddconfig, _, scale = _from_config(keys.ddconfig_from_diffusers, config, folder / "vae" / "config.json")
        vae = keys.vae_from_diffusers(_read_weights(folder / "vae", _WEIGHT_NAMES["vae"]), ddconfig)
        meta["vae_config"], meta["scale_factor"] = config, scale
    if "text_encoder" in subfolders:
        text = keys.text_from_transformers(_read_weights(folder / "text_encoder", _WEIGHT_NAMES["text_encoder"]))
        meta["text_config"] = _read_json(folder / "text_encoder" / "config.json")
    return keys.join_compvis(unet, vae, text), meta


def _from_config(convert, config: dict, path: Path):
    """A diffusers config.json read by ``convert``; a missing key or a wrong kind of value is named."""
    try:
        return convert(config)
    except KeyError as e:
        raise CheckpointError(f"{str(path)!r} lacks the key {e.args[0]!r} that the architecture needs; the folder "
                              "is damaged or was written by another tool: compare it with the original") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{str(path)!r} has a value sdkit cannot use ({e})") from None


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} is missing; a diffusers model folder needs a config.json next to "
                              "the weights to know the architecture.")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); the folder looks damaged.") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(config).__name__}, not an object of settings")
    return config


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
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{str(index)!r} has no 'weight_map' of shards; the folder looks damaged")
            shards = sorted(set(weight_map.values()))
            state = {}
            for shard in shards:
                state.update(read_checkpoint(sub / shard)[0])
            return state
    raise CheckpointError(f"no weights in {str(sub)!r}: expected one of {candidates[:4]} (or an .index.json)")
