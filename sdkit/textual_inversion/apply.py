"""Loading, adding, saving and removing textual-inversion embeddings on a model or its text encoder.

    from sdkit.textual_inversion import load_embedding
    load_embedding(model, "hexagon-style.pt")               # model: sdkit.load_model(...); the word: the file name
    sdkit.txt2img(model, "a red hexagon-style at the top")

``model`` is a LatentDiffusion (its ``cond_stage_model`` is used) or a text encoder itself: sdkit's
``FrozenCLIPEmbedder`` (SD v1) or ``FrozenMiniLMEmbedder`` (the small models).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..nn.text import FrozenCLIPEmbedder, FrozenMiniLMEmbedder
from .files import (
    Embedding,
    EmbeddingError,
    describe_width,
    read_embedding,
    write_embedding,
)
from .tokens import AddedTokenEmbedding, AddedTokens, PlaceholderTokenizer, TokenLayout


def text_encoder(model) -> nn.Module:
    """The text encoder of a LatentDiffusion, or ``model`` itself when it is one; refuses any other."""
    encoder = getattr(model, "cond_stage_model", model)
    if not isinstance(encoder, (FrozenCLIPEmbedder, FrozenMiniLMEmbedder)):
        raise TypeError(f"textual inversion adds words to a CLIP (SD v1) or MiniLM (small models) text encoder; "
                        f"this model's text encoder is {type(encoder).__name__}")
    return encoder


def _slot(encoder) -> tuple[nn.Module, str]:
    """The module holding the token embedding, and its attribute name."""
    if isinstance(encoder, FrozenCLIPEmbedder):
        return encoder.transformer.text_model.embeddings, "token_embedding"
    return encoder.model.embeddings, "word_embeddings"


def _layout(encoder) -> TokenLayout:
    tokenizer = encoder.tokenizer
    if isinstance(encoder, FrozenCLIPEmbedder):
        return TokenLayout(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.encode,
                           token_type_ids=False, warns=True, specials_in_encode=False,
                           defaults={"max_length": tokenizer.max_length, "padding": "max_length", "truncation": True,
                                     "return_tensors": "pt"})
    return TokenLayout(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                       lambda text: tokenizer.encode(text, add_special_tokens=False),
                       token_type_ids=True, warns=False, specials_in_encode=True,
                       defaults={"max_length": None, "padding": False, "truncation": False, "return_tensors": None})


def _describe(encoder) -> str:
    kind = "CLIP" if isinstance(encoder, FrozenCLIPEmbedder) else "MiniLM"
    width = getattr(*_slot(encoder)).embedding_dim
    return f"this model's {kind} text encoder takes width {width} ({describe_width(width)})"


def added_tokens(model, create: bool = False) -> AddedTokens | None:
    """The encoder's :class:`AddedTokens` (None when nothing was added, unless ``create``)."""
    encoder = text_encoder(model)
    parent, attr = _slot(encoder)
    current = getattr(parent, attr)
    if isinstance(current, AddedTokenEmbedding):
        return current.added
    if not create:
        return None
    added = AddedTokens(current.num_embeddings, current.embedding_dim).to(current.weight.device)
    setattr(parent, attr, AddedTokenEmbedding(current, added))
    encoder.tokenizer = PlaceholderTokenizer(encoder.tokenizer, added, _layout(encoder))
    return added


def _check_name(encoder, name: str, added: AddedTokens | None) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise EmbeddingError(f"an embedding name is one word without spaces, e.g. '<hexagon>'; got {name!r}")
    if added is not None and name.lower() in (n.lower() for n in added.names):
        raise EmbeddingError(f"an embedding named {name!r} is already loaded; remove_embedding(model, {name!r}) "
                             "first, or load this one under another name (name=...)")
    tokenizer = encoder.tokenizer.base if isinstance(encoder.tokenizer, PlaceholderTokenizer) else encoder.tokenizer
    ids = tokenizer.encode(name) if isinstance(encoder, FrozenCLIPEmbedder) else \
        tokenizer.encode(name, add_special_tokens=False)
    if len(ids) == 1:
        raise EmbeddingError(
            f"{name!r} is already a word of the text encoder's vocabulary (token {ids[0]}); as an embedding name it "
            f"would take that word away from every prompt. Choose a name that is not a word, e.g. '<{name}>'")


def add_embedding(model, name: str, vectors: torch.Tensor, trainable: bool = False) -> nn.Parameter:
    """Add the word ``name`` standing for ``vectors`` [N, width] (or [width]) to the model's text encoder; returns
    the Parameter holding them (``trainable``: it requires grad)."""
    encoder = text_encoder(model)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    parent, attr = _slot(encoder)
    width = getattr(parent, attr).embedding_dim
    if vectors.ndim != 2 or vectors.shape[1] != width:
        got = int(vectors.shape[-1])
        raise EmbeddingError(f"the embedding {name!r} has vectors of width {got} ({describe_width(got)}), but "
                             f"{_describe(encoder)}; use an embedding made for this model")
    _check_name(encoder, name, added_tokens(encoder))
    weight = getattr(parent, attr).weight
    param = added_tokens(encoder, create=True).add(name, vectors.to(weight.device, weight.dtype), trainable)
    _renew_tokenizer(encoder)
    return param


def _renew_tokenizer(encoder) -> None:
    """A new wrapper object after each change, so caches keyed by the tokenizer (word piece counts of grounding and
    attention maps) never keep a count from before a word became a placeholder."""
    old = encoder.tokenizer
    encoder.tokenizer = PlaceholderTokenizer(old.base, old.added, old.layout)


def initial_vectors(model, text: str, num_vectors: int) -> torch.Tensor:
    """Vectors to start training from, A1111's rule: the token embeddings of ``text`` spread over ``num_vectors``
    (vector i is token i·T/N of its T tokens); zeros when ``text`` has no tokens."""
    if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or num_vectors < 1:
        raise ValueError(f"num_vectors must be a whole number >= 1, got {num_vectors!r}")
    encoder = text_encoder(model)
    table = getattr(*_slot(encoder)).weight.detach()
    tokenizer = encoder.tokenizer.base if isinstance(encoder.tokenizer, PlaceholderTokenizer) else encoder.tokenizer
    ids = tokenizer.encode(text) if isinstance(encoder, FrozenCLIPEmbedder) else \
        tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        return torch.zeros(num_vectors, table.shape[1], dtype=table.dtype, device=table.device)
    rows = table[torch.tensor(ids, device=table.device)]
    return torch.stack([rows[i * len(ids) // num_vectors] for i in range(num_vectors)]).clone()


def load_embedding(model, source: str | Path | Embedding, name: str | None = None) -> str:
    """Load an embedding file (A1111 ``.pt``/``.safetensors``, diffusers ``.bin``/``.safetensors``) or an
    :class:`Embedding` into the model's text encoder; returns the word prompts use (the file name, or ``name``)."""
    embedding = source if isinstance(source, Embedding) else read_embedding(source, name)
    if name is not None:
        embedding = Embedding(name, embedding.vectors, embedding.step, embedding.checkpoint_name)
    try:
        add_embedding(model, embedding.name, embedding.vectors)
    except EmbeddingError as err:
        where = f"{Path(source).name}: " if not isinstance(source, Embedding) else ""
        raise EmbeddingError(where + str(err)) from None
    return embedding.name


def embedding_names(model) -> list[str]:
    """The words added to the model's text encoder, in the order they were added."""
    added = added_tokens(model)
    return list(added.names) if added is not None else []


def get_embedding(model, name: str, step: int | None = None, checkpoint_name: str | None = None) -> Embedding:
    """The loaded (or trained) embedding ``name`` as an :class:`Embedding` (a detached float32 copy)."""
    added = added_tokens(model)
    if added is None:
        raise KeyError(f"no embedding named {name!r} is loaded; none is")
    vectors = added.vectors[added.index(name)]
    return Embedding(added.names[added.index(name)], vectors.detach().float().cpu().clone(), step, checkpoint_name)


def save_embedding(model, name: str, path: str | Path, step: int | None = None,
                   checkpoint_name: str | None = None) -> Path:
    """Write the embedding ``name`` as an A1111 ``.pt`` or ``.safetensors`` file (atomically)."""
    return write_embedding(get_embedding(model, name, step, checkpoint_name), path)


def remove_embedding(model, name: str) -> None:
    """Take the word ``name`` out of the model's text encoder; with none left, the encoder is as it was."""
    encoder = text_encoder(model)
    added = added_tokens(encoder)
    if added is None:
        raise KeyError(f"no embedding named {name!r} is loaded; none is")
    added.remove(name)
    if not added.names:
        parent, attr = _slot(encoder)
        setattr(parent, attr, getattr(parent, attr).plain())
        encoder.tokenizer = encoder.tokenizer.base
    else:
        _renew_tokenizer(encoder)
