"""Exponential moving average of a module's parameters, stored the CompVis ``LitEma`` way.

Each trainable parameter gets a buffer named after it with the dots removed
(``diffusion_model.input_blocks.0.0.weight`` → ``diffusion_modelinput_blocks00weight``), plus ``decay`` and
``num_updates``, so under a LatentDiffusion the keys read ``model_ema.diffusion_modelinput_blocks00weight``
exactly as in an official full checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn


def ema_buffer_name(param_name: str) -> str:
    return param_name.replace(".", "")


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = ema_buffer_name(name)
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update: shadow -= (1 - d)(shadow - param), with the CompVis warm-up d = min(decay, (1+n)/(10+n))."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            n = int(self.num_updates)
            decay = min(decay, (1 + n) / (10 + n))
        one_minus = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_(one_minus * (s - p.detach().to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(shadow[self.m_name2s_name[name]])

    def store(self, parameters) -> None:
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for saved, p in zip(self.collected_params, parameters):
            p.copy_(saved)
        self.collected_params = []
