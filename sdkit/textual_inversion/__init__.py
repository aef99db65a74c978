"""Textual inversion: new words for the kit's text encoders, each standing for N learned vectors (Gal et al. 2022,
"An Image is Worth One Word"), in the files A1111 and diffusers exchange.

    from sdkit.textual_inversion import load_embedding, save_embedding
    word = load_embedding(model, "hexagon-style.pt")          # A1111 .pt / .safetensors, diffusers .bin too
    sdkit.txt2img(model, f"a red {word} at the top")
    save_embedding(model, word, "hexagon-style.safetensors")  # written atomically, in A1111's layout

Works on SD v1 (sdkit's CLIP text encoder, width 768) and the small models (the frozen MiniLM, width 384); the
encoder's code and checkpoint keys stay as they are. Files: ``files.py`` (the layouts), ``tokens.py`` (how a
placeholder becomes N tokens and N vectors), ``apply.py`` (the entry points). Training is an add-on of
``sdkit train``: ``sdkit.training.textual_inversion``.
"""
from .apply import (
    add_embedding,
    added_tokens,
    embedding_names,
    get_embedding,
    initial_vectors,
    load_embedding,
    remove_embedding,
    save_embedding,
    text_encoder,
)
from .files import Embedding, EmbeddingError, read_embedding, write_embedding

__all__ = ["Embedding", "EmbeddingError", "add_embedding", "added_tokens", "embedding_names", "get_embedding",
           "initial_vectors", "load_embedding", "read_embedding", "remove_embedding", "save_embedding",
           "text_encoder", "write_embedding"]
