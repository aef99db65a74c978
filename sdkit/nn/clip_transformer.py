"""The transformer shared by CLIP's text and vision towers: attention, MLP, pre-norm layer, layer stack.

Module names are those of transformers' CLIP (``self_attn.q_proj``, ``mlp.fc1``, ``layer_norm1``, ...), so the
towers' state-dict keys are the checkpoints' own. The two towers differ only in the attention mask: the text
tower is causal (a token sees itself and the ones before), the vision tower is not. ``config`` is either tower's
config: anything with ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
``hidden_act`` and ``layer_norm_eps``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # what OpenAI CLIP was trained with
    "gelu": F.gelu,
}


class CLIPAttention(nn.Module):
    """Multi-head self-attention (q/k/v/out projections with bias); causal for the text tower, not for vision."""

    def __init__(self, config, causal: bool = True):
        super().__init__()
        self.causal = causal
        dim, self.heads = config.hidden_size, config.num_attention_heads
        if dim % self.heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {self.heads}.")
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # text: each token sees itself and the ones before; vision: every patch sees every patch
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; use one of {list(ACTIVATIONS)}.")
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(config, causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The layer stack shared by CLIP's text (causal) and vision (bidirectional) towers."""

    def __init__(self, config, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
