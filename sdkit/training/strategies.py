"""Multi-GPU strategies for the full-size model, buildable from YAML.

    lightning:
      trainer:
        strategy: {target: sdkit.training.strategies.fsdp_strategy, params: {sharding_strategy: FULL_SHARD}}

FSDP needs CUDA (Lightning refuses it on CPU), so the CPU test-suite checks only its configuration (buffers stay
float32 under a bf16 precision); tools/gpu_check.sh runs one real FSDP step.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "full",
                  cpu_offload: bool = False, limit_all_gathers: bool = True, **kwargs: Any):
    """Lightning's FSDPStrategy that shards the UNet per ResBlock / SpatialTransformer (and the CLIP text layers
    and autoencoder blocks when they train). ``state_dict_type="full"`` gathers a CompVis-layout checkpoint
    on rank 0 (a sharded checkpoint is a folder that only FSDP reads back)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from ..nn.attention import SpatialTransformer
    from ..nn.unet import ResBlock

    class FSDPWithFloat32Buffers(FSDPStrategy):
        """Lightning's precision plugin casts buffers to the low precision too ("bf16-mixed": parameters, gradient
        reduction and buffers in bfloat16). sdkit's buffers must stay float32: the noise schedule (ᾱ is 0.99915 at
        t = 0, which bfloat16, spaced 2⁻⁸ below 1, rounds to 1: no noise at all) and the EMA weights (a decay of
        0.9999 moves them by 1e-4 of the gap, below bfloat16's relative resolution of 2⁻⁸: they would never move)."""

        @property
        def mixed_precision_config(self):
            config = super().mixed_precision_config
            if config is None or config.buffer_dtype in (None, torch.float32):
                return config
            return dataclasses.replace(config, buffer_dtype=torch.float32)

    return FSDPWithFloat32Buffers(auto_wrap_policy={ResBlock, SpatialTransformer},
                                  sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                                  cpu_offload=cpu_offload, limit_all_gathers=limit_all_gathers, use_orig_params=True,
                                  **kwargs)


def is_fsdp(trainer) -> bool:
    if trainer is None:
        return False
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


@contextlib.contextmanager
def full_parameters(trainer, writeback: bool):
    """Under FSDP, gather the full parameters for the block (e.g. to update or swap in EMA weights);
    elsewhere a no-op."""
    if not is_fsdp(trainer):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(trainer.strategy.model, writeback=writeback, recurse=True):
        yield


def clean_name(name: str) -> str:
    """A parameter name without FSDP / activation-checkpointing / torch.compile wrapper segments."""
    for prefix in FSDP_PREFIXES:
        name = name.replace(prefix, "")
    return name


def ema_update(ema, model: nn.Module) -> None:
    """LitEma's update with parameter names cleaned of wrapper segments (FSDP renames what it wraps)."""
    import torch

    with torch.no_grad():
        decay = float(ema.decay)
        if ema.num_updates >= 0:
            ema.num_updates += 1
            n = int(ema.num_updates)
            decay = min(decay, (1 + n) / (10 + n))
        shadow = dict(ema.named_buffers())
        for name, p in model.named_parameters():
            key = ema.m_name2s_name.get(clean_name(name))
            if key is not None and p.requires_grad:
                s = shadow[key]
                s.sub_((1.0 - decay) * (s - p.detach().to(s.dtype)))
