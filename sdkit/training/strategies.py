"""Multi-GPU strategies for the full-size model, buildable from YAML.

    lightning:
      trainer:
        strategy: {target: sdkit.training.strategies.fsdp_strategy, params: {sharding_strategy: FULL_SHARD}}

FSDP needs CUDA (Lightning refuses it on CPU), so this module is not exercised by the CPU test-suite.
"""
from __future__ import annotations

import contextlib
from typing import Any

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

    return FSDPStrategy(auto_wrap_policy={ResBlock, SpatialTransformer}, sharding_strategy=sharding_strategy,
                        state_dict_type=state_dict_type, cpu_offload=cpu_offload,
                        limit_all_gathers=limit_all_gathers, use_orig_params=True, **kwargs)


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
