"""What every sdkit Lightning module shares: per-sample random draws, CompVis checkpoint keys, batch access."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn

from ..config import instantiate_from_config

# CompVis SD configs name the batch keys after webdataset fields; sdkit datasets use image/caption.
KEY_ALIASES = {"jpg": "image", "png": "image", "txt": "caption", "LR_image": "lr_image", "lr": "lr_image"}


def draw_key(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing), for one torch.Generator."""
    return int(np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def sample_generators(seed: int, step: int, indices: Sequence[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per batch item, seeded by (seed, step, item index).

    Every random draw of a training sample (timestep, noise, posterior sample, conditioning dropout) comes from
    its generator, so it does not depend on which process, batch position or accumulation micro-batch the item
    landed in: a 2-process DDP run then equals a 1-process run, and a resumed run equals an unbroken one.
    """
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    return [torch.Generator().manual_seed(draw_key(seed, step, i)) for i in indices]


def per_sample_randn(generators: list[torch.Generator], shape: Sequence[int], device, dtype=torch.float32):
    """Stack one standard-normal draw of ``shape`` per generator: a [B, *shape] tensor on ``device``."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device=device, dtype=dtype)


def batch_value(batch: Mapping, key: str) -> Any:
    """``batch[key]``, accepting the CompVis key names (jpg, txt) for sdkit's (image, caption)."""
    if key in batch:
        return batch[key]
    alias = KEY_ALIASES.get(key)
    if alias is not None and alias in batch:
        return batch[alias]
    raise KeyError(f"the batch has no {key!r} entry (keys: {sorted(batch)}). Set the model's first_stage_key / "
                   f"cond_stage_key / image_key to one of them.")


def image_input(batch: Mapping, key: str) -> torch.Tensor:
    """Images as a float [B, C, H, W] tensor. sdkit datasets give channels-first; CompVis datasets give
    [B, H, W, C] (recognised by a last axis of 1, 3 or 4 channels and a larger second axis)."""
    x = batch_value(batch, key)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch[{key!r}] must be an image tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"batch[{key!r}] must be a batch of images [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    return x.to(memory_format=torch.contiguous_format).float()


def build(model: Any) -> nn.Module:
    """An nn.Module from a ``{target, params}`` config, or the module itself."""
    return model if isinstance(model, nn.Module) else instantiate_from_config(model)


PREFIX_KEY = "sdkit_state_dict_prefix"


def add_state_dict_prefix(checkpoint: dict, prefix: str | None = None) -> dict:
    """Give the keys of a checkpoint written by a WrappedModule their Lightning prefix back (idempotent).
    Done when the file is read, because some strategies (FSDP) load the weights before any module hook runs."""
    prefix = prefix or checkpoint.get(PREFIX_KEY)
    state = checkpoint.get("state_dict")
    if prefix and isinstance(state, dict):
        checkpoint["state_dict"] = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    return checkpoint


class WrappedModule(L.LightningModule):
    """A LightningModule around one plain sdkit model stored as ``self.<inner>``.

    Checkpoints keep the plain model's own keys (``model.diffusion_model.*``, ``model_ema.*`` ...), without the
    wrapper's attribute prefix, so a Lightning ``.ckpt`` is also a CompVis checkpoint that ``sdkit.load_model``
    reads. The prefix is added back when Lightning resumes from it.
    """

    inner = "net"

    def __init__(self, seed: int = 0, learning_rate: float = 1e-4):
        super().__init__()
        self.seed = int(seed)
        self.learning_rate = float(learning_rate)

    @property
    def net(self) -> nn.Module:
        return getattr(self, self.inner)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefix = self.inner + "."
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        checkpoint[PREFIX_KEY] = prefix  # how AtomicCheckpointIO restores Lightning's keys when resuming
        config = getattr(self, "run_config", None)
        if config is not None:
            checkpoint["sdkit_config"] = config  # the merged YAML text of the run

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        add_state_dict_prefix(checkpoint, self.inner + ".")

    def seed_step(self, batch_idx: int) -> None:
        """Seed the global RNGs from (seed, step, micro-batch, rank): layers that draw from them (dropout) then
        repeat exactly on resume without saving generator states."""
        torch.manual_seed(draw_key(self.seed, self.global_step, batch_idx, self.global_rank, 17))
