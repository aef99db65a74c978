"""Vector quantisation for the VQ autoencoders (taming-transformers ``VectorQuantizer2``, as ldm imports it).

Each latent vector is replaced by its nearest codebook entry (L2). Gradients reach the encoder through the
straight-through estimator, and the codebook learns from the VQ-VAE loss
``||sg[z_q] - z||² + ||z_q - sg[z]||²`` with β on one of the two terms (``legacy`` picks which, see below).
Parameter and buffer names (``embedding.weight``, ``used``) match taming, so VQ checkpoints load unchanged.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2.

    Args:
        n_e: number of codebook entries.
        e_dim: size of each entry (the latent channel count it quantises).
        beta: weight of the β term of the loss.
        remap: optional path to a ``.npy`` of the codebook indices actually used (a 1-D integer array; an array or
            tensor also works). Indices are then reported as positions in that list.
        unknown_index: what a code outside ``remap`` becomes: ``"random"`` (a random used position), ``"extra"``
            (one extra index, ``len(used)``), or an int.
        sane_index_shape: return indices shaped (B, H, W) instead of flat.
        legacy: True (taming's default, used by every CompVis VQ model) puts β on the codebook term,
            ``mean((sg[z_q]-z)²) + β·mean((z_q-sg[z])²)``; False puts β on the commitment term as in the VQ-VAE
            paper. The loss *value* is (1+β)·mse either way; only the gradients differ.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        remap: str | os.PathLike | Sequence[int] | np.ndarray | torch.Tensor | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

        self.remap = remap
        if remap is not None:
            used = np.load(remap) if isinstance(remap, (str, os.PathLike)) else remap
            self.register_buffer("used", torch.as_tensor(np.asarray(used), dtype=torch.long))
            if self.used.ndim != 1:
                raise ValueError(
                    f"remap must list the used codebook indices as a 1-D array, got shape {tuple(self.used.shape)}"
                )
            self.re_embed = self.used.shape[0]
            if unknown_index == "extra":
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")
            self.unknown_index = unknown_index
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    # -- index remapping -------------------------------------------------------------------------------------
    def remap_to_used(self, inds: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codebook indices (B, ...) -> positions in ``used``; codes not in ``used`` get ``unknown_index``."""
        shape = inds.shape
        if len(shape) < 2:
            raise ValueError(f"remap_to_used needs indices with a batch axis, got shape {tuple(shape)}")
        inds = inds.reshape(shape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, :]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            draw = torch.randint(0, self.re_embed, size=(int(unknown.sum()),), generator=generator)
            new[unknown] = draw.to(new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(shape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` (B, ...) -> codebook indices; the "extra" index maps to ``used[0]`` as in taming."""
        shape = inds.shape
        if len(shape) < 2:
            raise ValueError(f"unmap_to_all needs indices with a batch axis, got shape {tuple(shape)}")
        inds = inds.reshape(shape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:
            inds = torch.where(inds >= used.shape[0], torch.zeros_like(inds), inds)  # taming edits in place
        return used[inds].reshape(shape)

    # -- quantisation ----------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        """Quantise z (B, e_dim, H, W). Returns ``(z_q, loss, (perplexity, min_encodings, indices))``; like
        taming, perplexity and min_encodings are None. ``temp``/``rescale_logits``/``return_logits`` only exist
        for interface compatibility with the Gumbel quantiser."""
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits are for the Gumbel quantiser; leave them unset")
        if z.ndim != 4 or z.shape[1] != self.e_dim:
            raise ValueError(
                f"VectorQuantizer expects z shaped (batch, {self.e_dim}, height, width), got {tuple(z.shape)}"
            )
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flat = z.view(-1, self.e_dim)
        codebook = self.embedding.weight
        # ||z - e||² = ||z||² + ||e||² - 2 z·e, the same expansion as taming (so ties resolve the same way)
        dist = z_flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z_flat @ codebook.t()
        indices = torch.argmin(dist, dim=1)
        z_q = self.embedding(indices).view(z.shape)

        commitment = torch.mean((z_q.detach() - z) ** 2)  # pulls the encoder output towards its code
        codebook_term = torch.mean((z_q - z.detach()) ** 2)  # pulls the code towards the encoder output
        if self.legacy:
            loss = commitment + self.beta * codebook_term
        else:
            loss = self.beta * commitment + codebook_term

        z_q = z + (z_q - z).detach()  # straight-through: forward value z_q, gradient of identity
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
        """Look up codes; ``shape`` is (batch, height, width, channel) and gives a (B, C, H, W) result."""
        if self.remap is not None:
            if shape is None:
                raise ValueError("with remap, get_codebook_entry needs shape=(batch, height, width, channel)")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


# The name taming and ldm use.
VectorQuantizer2 = VectorQuantizer
