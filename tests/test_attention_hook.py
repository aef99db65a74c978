"""The attention hook (sdkit.nn.attention_processors): a processor installed on the UNet sees every attention call
of a denoising step, with the shapes the UNet config implies, and removing it gives back the exact model.

Oracles: the layer count and shapes are derived here from the config (which levels have attention, how many
transformer blocks each), not read from the model; the default processor is checked against an explicit softmax.
"""
from __future__ import annotations

import pytest
import torch

import sdkit
from sdkit.nn.attention import CrossAttention, fused_attention
from sdkit.nn.attention_processors import (AttentionRecorder, attention_layers, attention_processor,
                                           set_attention_processor)
from sdkit.samplers.denoisers import denoiser


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sdkit.load_model("tiny-test")


def expected_attention_calls(unet_params: dict, batch: int, latent: int, tokens: int) -> list[tuple]:
    """(x shape, context shape) of every cross-attention call of one UNet pass, from the config alone: each level
    with attention has num_res_blocks transformers on the way down and num_res_blocks + 1 on the way up, and the
    middle block one; level i runs at latent / 2**i pixels per side with model_channels × channel_mult[i] channels."""
    mult, n = unet_params["channel_mult"], unet_params["num_res_blocks"]
    ch, ctx, depth = unet_params["model_channels"], unet_params["context_dim"], unet_params["transformer_depth"]
    levels = [i for i in range(len(mult)) if 2 ** i in unet_params["attention_resolutions"]]
    shape = lambda i: ((batch, (latent // 2 ** i) ** 2, ch * mult[i]), (batch, tokens, ctx))  # noqa: E731
    down = [shape(i) for i in range(len(mult)) if i in levels for _ in range(n * depth)]
    middle = [shape(len(mult) - 1)] * depth
    up = [shape(i) for i in reversed(range(len(mult))) if i in levels for _ in range((n + 1) * depth)]
    return down + middle + up


def test_a_processor_sees_every_cross_attention_call_of_a_guided_step_and_removal_is_exact(model):
    prompts = model.get_learned_conditioning(["a red circle", "a blue square"])
    empty = model.get_learned_conditioning(["", ""])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0, 500.0])
    eps_fn = denoiser(model, prompts, empty, 5.0)          # guidance: one UNet pass over a batch of 4
    with torch.no_grad():
        before = eps_fn(x, t)
    calls = []

    def spy(attn, x, context=None, mask=None):
        calls.append((tuple(x.shape), tuple(context.shape)))
        return fused_attention(attn, x, context, mask)

    with torch.no_grad(), attention_processor(model.unet, spy, kind="cross"):
        during = eps_fn(x, t)
    params = sdkit.load_config("tiny-test").model.params.unet_config.params
    assert calls == expected_attention_calls(params, batch=4, latent=8, tokens=prompts.shape[1])
    assert torch.equal(during, before)                       # the spy computes the default attention
    with torch.no_grad():
        after = eps_fn(x, t)
    assert torch.equal(after, before)
    assert not any("processor" in m.__dict__ for m in model.modules())
    with attention_processor(model.unet, spy, kind="all"):
        assert not any("processor" in key for key in model.state_dict())   # never a checkpoint key


def test_recorder_on_self_attention_and_explicit_maps_match_the_fused_kernel(model):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300.0])
    c = model.get_learned_conditioning(["a green star"])
    with torch.no_grad():
        fused = model.apply_model(x, t, c)
        with attention_processor(model.unet, AttentionRecorder(), kind="self") as recorder:
            explicit = model.apply_model(x, t, c)
    names = [name for name, _ in attention_layers(model.unet, "self")]
    assert list(recorder.maps) == names and all(name.endswith("attn1") for name in names)
    for name, (probs,) in recorder.maps.items():
        pixels = probs.shape[-1]
        assert probs.shape[:3] == (1, 4, pixels)                        # self-attention: pixels over pixels
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:3]))
    # explicit softmax vs the fused kernel: float32 rounding of a sum over at most 64 keys, through the UNet
    assert (explicit - fused).abs().max() <= 1e-5 * fused.abs().max()


def test_hook_errors_name_what_is_wrong(model):
    with pytest.raises(ValueError, match="kind must be one of"):
        set_attention_processor(model.unet, fused_attention, kind="cross-attention")
    with pytest.raises(ValueError, match="no cross attention layers"):
        set_attention_processor(torch.nn.Linear(2, 2), fused_attention, kind="cross")
    assert isinstance(attention_layers(model.unet, "cross")[0][1], CrossAttention)
