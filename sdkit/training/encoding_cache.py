"""The latent and text-embedding caches of a diffusion run, kept in the run folder across restarts.

With ``cache_latents``/``cache_text`` every training image and caption is encoded once, the first time it comes
up. Kept only in memory, the caches start empty again after each resume, and the first epoch after it is slow
again (on the laptop t2i run: 2.7–3.7 s per step instead of 1.2–1.7 s, for a whole epoch). ``sdkit train`` gives
the module ``<run>/cache/``: the caches are written there next to each checkpoint, when they grew since the last
write, and a resumed run reads them back.

A cached value is exactly what the encoder gives (float32 latents, text states in the run's cache_dtype), so a
resumed run computes the same numbers with or without the file. The file records a fingerprint of what the
values depend on (the data config, the frozen autoencoder's and text encoder's weights, the cache dtype); a file
with another fingerprint is ignored with a message, never mixed in.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

FORMAT = 1


def module_digest(module: nn.Module | None) -> str:
    """sha1 of a module's parameters and buffers (names, shapes and bytes)."""
    h = hashlib.sha1()
    if module is not None:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(data_config: str, first_stage: nn.Module, text_encoder: nn.Module | None, cache_dtype) -> str:
    h = hashlib.sha1(f"format {FORMAT}\n{data_config}\n{cache_dtype}\n".encode())
    h.update(module_digest(first_stage).encode())
    h.update(module_digest(text_encoder).encode())
    return h.hexdigest()


def _stack(cache: dict) -> tuple[list, torch.Tensor | None]:
    keys = list(cache)
    return keys, (torch.stack([cache[k] for k in keys]) if keys else None)


def save(path: Path, fingerprint_: str, latents: dict, texts: dict) -> None:
    """Write both caches as two stacked tensors (fast to save and load) atomically: a crash keeps the old file."""
    from ..atomic import atomic_file

    latent_keys, latent_values = _stack(latents)
    text_keys, text_values = _stack(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save({"format": FORMAT, "fingerprint": fingerprint_, "latent_keys": latent_keys,
                    "latents": latent_values, "text_keys": text_keys, "texts": text_values}, tmp)


def load(path: Path, fingerprint_: str) -> tuple[dict, dict] | None:
    """(latents, texts) from a cache file, or None when there is none or it belongs to other data or encoders."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged cache only costs time: encode again
        print(f"encoding cache {path}: unreadable ({error}); encoding the data again")
        return None
    if stored.get("format") != FORMAT or stored.get("fingerprint") != fingerprint_:
        print(f"encoding cache {path}: made for other data or encoders (fingerprint differs); encoding the data "
              f"again and replacing it at the next checkpoint")
        return None
    latents = dict(zip(map(tuple, stored["latent_keys"]), stored["latents"])) if stored["latent_keys"] else {}
    texts = dict(zip(stored["text_keys"], stored["texts"])) if stored["text_keys"] else {}
    return latents, texts
