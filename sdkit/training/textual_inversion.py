"""Training a textual-inversion embedding with ``sdkit train``: a new word whose vectors are the only weights that
learn (Gal et al. 2022, "An Image is Worth One Word").

An add-on of :class:`~sdkit.training.diffusion.LatentDiffusionModule`::

    model:
      training:
        cache_text: false              # the text states change as the word's vectors learn
        addons:
          textual_inversion:
            target: sdkit.training.textual_inversion.TextualInversion
            params: {placeholder: hexagon-ti, num_vectors: 2, init_text: shape}

At setup it adds ``placeholder`` to the model's text encoder (``sdkit.textual_inversion``), starting from the token
embeddings of ``init_text`` (A1111's rule), and hands its Parameter to the module as the add-on's weights: then
only they train; the UNet, the autoencoder and the text encoder's own embedding table keep their weights bit for
bit. The loss is the plain diffusion loss on captions that use the placeholder (``sdkit.data.concepts``). At each
checkpoint and at the end, the embedding is written as an A1111 file: ``out``, or ``<run>/embeddings/<placeholder>.pt``
(A1111 names the prompt word after the file).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

from ..textual_inversion import (
    add_embedding,
    added_tokens,
    initial_vectors,
    save_embedding,
    text_encoder,
)


class TextualInversion:
    """Learn the vectors of one new word; see the module docstring.

    Args:
        placeholder: the word prompts will use (not a word the tokenizer already has, e.g. "hexagon-ti").
        num_vectors: how many token vectors it stands for (A1111's "vectors per token").
        init_text: the vectors start as this text's token embeddings ("" or no tokens: zeros).
        out: the embedding file (.pt or .safetensors) written at checkpoints and at the end of the run.
        checkpoint_name: the base model's name, stored in the file (A1111's sd_checkpoint_name).
    """

    name = "textual_inversion"
    weight = 0.0          # no loss of its own: the diffusion loss trains the vectors

    def __init__(self, placeholder: str, num_vectors: int = 1, init_text: str = "*", out: str | None = None,
                 checkpoint_name: str | None = None):
        self.placeholder, self.num_vectors, self.init_text = placeholder, num_vectors, init_text
        self.out, self.checkpoint_name = out, checkpoint_name
        self.parameter = None

    def setup(self, module) -> None:
        ldm = module.ldm
        if not ldm.is_text_conditioned or ldm.cond_stage_trainable:
            raise ValueError("textual inversion learns a word for a frozen text encoder: the model must be "
                             "text-conditioned (crossattn) with cond_stage_trainable: false")
        if module.cache_text:
            raise ValueError("textual inversion changes the text states as the word's vectors learn, so they cannot "
                             "be cached: set model.training.cache_text: false")
        text_encoder(ldm)   # a CLIP or MiniLM encoder, or a clear error
        vectors = initial_vectors(ldm, self.init_text, self.num_vectors)
        self.parameter = add_embedding(ldm, self.placeholder, vectors, trainable=True)
        # the module holding the vectors travels with the Lightning module (device, DDP, checkpoints, resume)
        module.addon_modules[self.name] = added_tokens(ldm)

    def trainable_parameters(self, module) -> list:
        return [self.parameter]

    @contextlib.contextmanager
    def watch(self, module, batch, t, drop, cond):
        yield lambda: None

    def output_path(self, module) -> Path:
        if self.out is not None:
            return Path(self.out)
        safe = re.sub(r"[^\w.+-]", "_", self.placeholder)      # a file name on every system
        return Path(module.trainer.default_root_dir) / "embeddings" / f"{safe}.pt"

    def save(self, module) -> Path | None:
        """Write the embedding file (rank zero only); returns its path."""
        if module.global_rank != 0:
            return None
        path = self.output_path(module)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_embedding(module.ldm, self.placeholder, path, step=int(module.global_step),
                              checkpoint_name=self.checkpoint_name)

    def on_save_checkpoint(self, module, checkpoint: dict) -> None:
        self.save(module)

    def on_fit_end(self, module) -> None:
        path = self.save(module)
        if path is not None:
            print(f"textual inversion: wrote {path} (use '{self.placeholder}' in prompts; "
                  f"sdkit.textual_inversion.load_embedding(model, path, name='{self.placeholder}'))")
