"""Textual-inversion embedding files, in the layouts the SD v1 world exchanges.

- A1111 ``.pt`` (also what rinongal/textual_inversion wrote): a pickled dict ``{"string_to_token": {"*": 265},
  "string_to_param": {"*": tensor [N, width]}, "name": str, "step": int, "sd_checkpoint": str | None,
  "sd_checkpoint_name": str | None}``. Read with ``torch.load(weights_only=True)``: no code in the file runs.
- A1111 ``.safetensors``: ``{"emb_params": tensor [N, width]}``.
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{token: tensor [width] or [N, width]}``, read too.

The word a prompt uses is A1111's rule, the file's name without its extension (``hexagon-style.pt`` →
"hexagon-style"), except in the diffusers layout, whose one key is the token. ``name=`` overrides either.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_file

A1111_STAR_TOKEN = 265   # the CLIP id of "*", which A1111 writes as string_to_token (informational only)
SUFFIXES = (".pt", ".bin", ".safetensors")


class EmbeddingError(ValueError):
    """An embedding file that cannot be read, or does not fit the text encoder it is loaded into."""


@dataclass
class Embedding:
    """A textual-inversion embedding: the prompt word ``name`` stands for ``vectors`` [N, width]."""
    name: str
    vectors: torch.Tensor
    step: int | None = None
    checkpoint_name: str | None = None   # the model it was trained on, as A1111's sd_checkpoint_name

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


# --------------------------------------------------------------------------------------------------- reading
def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read an A1111 ``.pt``/``.safetensors`` or a diffusers ``.bin``/``.safetensors`` embedding (see the module
    docstring); ``name`` replaces the word the file would be used by."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embedding file at {str(path)!r}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix.lower() == ".safetensors":
        data = _read_safetensors(path)
    elif path.suffix.lower() in (".pt", ".bin"):
        data = _read_pickle(path)
    else:
        raise EmbeddingError(f"{path.name}: embedding files end in {', '.join(SUFFIXES)}; got {path.suffix!r}")
    step, checkpoint = None, None
    if isinstance(data, dict) and "string_to_param" in data:            # A1111 / rinongal .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)   # files pickled with a ParameterDict
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path.name}: string_to_param should hold one tensor, it holds "
                                 f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        vectors = next(iter(params.values()))
        word = path.stem
        step = data.get("step") if isinstance(data.get("step"), int) else None
        checkpoint = data.get("sd_checkpoint_name") if isinstance(data.get("sd_checkpoint_name"), str) else None
    elif isinstance(data, dict) and "clip_l" in data and "clip_g" in data:
        raise EmbeddingError(f"{path.name} is an SDXL embedding (clip_l + clip_g vectors for two text encoders); "
                             "sdkit's models have one text encoder (SD v1's CLIP ViT-L/14 or the small models' "
                             "MiniLM): use an SD v1 embedding")
    elif isinstance(data, dict) and "emb_params" in data:              # A1111 .safetensors
        vectors, word = data["emb_params"], path.stem
    elif isinstance(data, dict) and len(data) == 1:                     # diffusers: {token: vectors}
        word, vectors = next(iter(data.items()))
    elif isinstance(data, torch.Tensor):                                # a bare tensor (diffusers reads these too)
        vectors, word = data, path.stem
    else:
        keys = sorted(map(str, data))[:8] if isinstance(data, dict) else type(data).__name__
        raise EmbeddingError(
            f"{path.name} is not a textual-inversion embedding: expected string_to_param (A1111 .pt), emb_params "
            f"(A1111 .safetensors) or one token -> tensor (diffusers), found {keys}")
    return Embedding(str(name if name is not None else word), _checked_vectors(vectors, path.name), step, checkpoint)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise EmbeddingError(f"{path.name} is not a readable .safetensors file ({err}); is it complete?") from None


def _read_pickle(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise EmbeddingError(
            f"{path.name} holds objects that weights-only unpickling refuses ({str(err).splitlines()[0][:200]}); "
            "sdkit does not run code from embedding files. If you trust the file, convert it where it was made "
            "to a .safetensors embedding") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise EmbeddingError(f"{path.name} is not a readable PyTorch file ({str(err).splitlines()[0][:200]}); "
                             "is it complete?") from None


def _checked_vectors(vectors, where: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise EmbeddingError(f"{where}: the embedding should be a float tensor [vectors, width], got "
                             f"{getattr(vectors, 'dtype', type(vectors).__name__)}")
    vectors = vectors.detach()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise EmbeddingError(f"{where}: the embedding should be [vectors, width], got shape {tuple(vectors.shape)}")
    if not bool(torch.isfinite(vectors).all()):
        raise EmbeddingError(f"{where}: the embedding holds NaN or infinite values; the file is damaged")
    return vectors


# --------------------------------------------------------------------------------------------------- writing
def write_embedding(embedding: Embedding, path: str | Path) -> Path:
    """Write ``embedding`` atomically in A1111's layout: ``.pt`` (string_to_param, read back with weights-only
    unpickling) or ``.safetensors`` (emb_params). Both are also what diffusers' ``load_textual_inversion`` reads.
    A1111 uses the file's name as the prompt word, so name the file after ``embedding.name``."""
    path = Path(path)
    vectors = _checked_vectors(embedding.vectors, path.name).to("cpu").contiguous().clone()
    with atomic_file(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            metadata = {"name": embedding.name, "step": str(embedding.step if embedding.step is not None else 0)}
            save_file({"emb_params": vectors}, str(tmp), metadata=metadata)
        elif path.suffix.lower() in (".pt", ".bin"):
            torch.save({"string_to_token": {"*": A1111_STAR_TOKEN}, "string_to_param": {"*": vectors},
                        "name": embedding.name, "step": int(embedding.step or 0),
                        "sd_checkpoint": None, "sd_checkpoint_name": embedding.checkpoint_name}, tmp)
        else:
            raise EmbeddingError(f"{path.name}: write embeddings as .pt or .safetensors (A1111's layouts)")
    return path


def describe_width(width: int) -> str:
    """What an embedding of this width was made for (the error message names it)."""
    known = {768: "SD v1's CLIP ViT-L/14", 1024: "SD 2.x's OpenCLIP ViT-H/14", 384: "sdkit's small models' MiniLM",
             1280: "SDXL's OpenCLIP ViT-bigG"}
    return known.get(width, "an unknown text encoder")

