"""Speed switches (sdkit.speed): each is exact where its idea says it must be, and leaves the model as it found it.

Oracles: DeepCache at interval 1 is the plain UNet; a cached call whose deep features cannot have changed (the same
input again) equals a full call; a cached call with a new input equals the blocks composed by hand (new shallow
path, old deep features). Token merging of tokens that are truly equal (each 2×2 window one repeated value) is
exact by proportional attention, checked against full attention over all tokens; merging conserves the tokens' sum.
"""
from __future__ import annotations

import pytest
import torch

from sdkit.nn.attention import CrossAttention, fused_attention
from sdkit.nn.unet import timestep_embedding
from sdkit.speed import channels_last, compiled, deep_cache, merge_tokens, token_merging

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(live_tiny_test):
    return live_tiny_test   # tests/conftest.py: tiny-test whose zero-initialised layers got small random weights


def inputs(seed: int, model, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, 16, 16, generator=gen)
    t = torch.full((batch,), 400.0)
    context = model.get_learned_conditioning(["a red circle", "a blue square"][:batch])
    return latent, t, context


def test_deep_cache_at_interval_1_is_the_plain_unet(model):
    x, t, c = inputs(0, model)
    with torch.no_grad():
        plain = model.apply_model(x, t, c)
        with deep_cache(model, interval=1) as state:
            cached = [model.apply_model(x, t, c) for _ in range(2)]
    assert state.full_calls == 2
    for out in cached:
        assert torch.equal(out, plain)       # the same ops in the same order: bit-identical
    assert "forward" not in vars(model.unet)  # the class's forward is back


def test_a_cached_call_reuses_the_deep_features_and_runs_the_shallow_path_anew(model):
    x0, t, c = inputs(0, model)
    x1, _, _ = inputs(1, model)
    unet = model.unet
    with torch.no_grad():
        with deep_cache(model, interval=3) as state:
            first = model.apply_model(x0, t, c)
            same_again = model.apply_model(x0, t, c)
            new_input = model.apply_model(x1, t, c)
        plain_first = model.apply_model(x0, t, c)
        # by hand: the deep features of x0 (what enters the last output block), the shallow path of x1
        emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
        h, skips = x0, []
        for block in unet.input_blocks:
            h = block(h, emb, c)
            skips.append(h)
        h = unet.middle_block(h, emb, c)
        for block in unet.output_blocks[:-1]:
            h = block(torch.cat([h, skips.pop()], 1), emb, c)
        shallow = unet.input_blocks[0](x1, emb, c)
        by_hand = unet.out(unet.output_blocks[-1](torch.cat([h, shallow], 1), emb, c))
    assert state.calls == 3 and state.full_calls == 1
    torch.testing.assert_close(first, plain_first, rtol=0, atol=0)
    # the same input: the cache holds exactly what a full call computes
    torch.testing.assert_close(same_again, plain_first, rtol=0, atol=0)
    # a new input: not the plain UNet, but the composition above (same kernels; 1e-6 of the output's scale covers
    # a different summation order in the recomputed blocks)
    assert not torch.allclose(new_input, model.apply_model(x1, t, c), atol=1e-3)
    torch.testing.assert_close(new_input, by_hand, rtol=0, atol=1e-6 * by_hand.abs().max().item())


def test_deep_cache_refuses_bad_options(model):
    with pytest.raises(ValueError, match="interval"):
        with deep_cache(model, interval=0):
            pass
    with pytest.raises(ValueError, match="branch"):
        with deep_cache(model, branch=99):
            pass


def test_merge_tokens_conserves_the_sum_and_counts_every_token():
    x = torch.randn(3, 8 * 6, 5, generator=torch.Generator().manual_seed(0))
    tokens, sizes = merge_tokens(x, (8, 6), ratio=0.5)
    assert tokens.shape[1] == 48 - 24 and sizes.sum(1).tolist() == [48.0] * 3
    # merged tokens are size-weighted means, so Σ size·token = Σ x (float sums of ≤ 48 terms of size ~1: 1e-5)
    torch.testing.assert_close((tokens * sizes.unsqueeze(-1)).sum(1), x.sum(1), rtol=0, atol=1e-5)


def test_merging_equal_tokens_is_exact_by_proportional_attention():
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=16, heads=2, dim_head=8).eval()
    coarse = torch.randn(2, 16, 4, 4)                       # each 2×2 window of the 8×8 grid holds one value
    grid = torch.nn.functional.interpolate(coarse, scale_factor=2, mode="nearest")
    x = grid.flatten(2).transpose(1, 2).contiguous()       # [2, 64 tokens, 16]
    with torch.no_grad():
        full = fused_attention(layer, x)
        with token_merging(_Holder(layer), ratio=0.75, min_tokens=1) as merging:
            merging.latent_size = (8, 8)
            merged = layer(x)
    # 48 of 64 keys merged away: only the 16 distinct ones remain, each with weight 4 (log 4 bias); softmax over
    # 64 vs 16 terms reorders float sums: ≤ 64·2⁻²⁴ relative, 1e-5 of the output's scale covers it
    torch.testing.assert_close(merged, full, rtol=0, atol=1e-5 * full.abs().max().item())
    # not a no-op: different tokens are merged approximately
    y = torch.randn(2, 64, 16)
    with torch.no_grad(), token_merging(_Holder(layer), ratio=0.5, min_tokens=1) as merging:
        merging.latent_size = (8, 8)
        assert not torch.allclose(layer(y), fused_attention(layer, y), atol=1e-4)


class _Holder(torch.nn.Module):
    """A module holding one attention layer as a transformer block's attn1 (where token merging installs)."""

    def __init__(self, layer):
        super().__init__()
        self.block = torch.nn.Module()
        self.block.attn1 = layer

    def forward(self, x):
        return self.block.attn1(x)


def test_token_merging_ratio_0_and_small_layers_are_the_default(model):
    x, t, c = inputs(0, model)
    with torch.no_grad():
        plain = model.apply_model(x, t, c)
        with token_merging(model, ratio=0.0, min_tokens=1):
            assert torch.equal(model.apply_model(x, t, c), plain)
        with token_merging(model, ratio=0.5, min_tokens=10**6):   # no layer has that many tokens
            assert torch.equal(model.apply_model(x, t, c), plain)
        with token_merging(model, ratio=0.5, min_tokens=1):
            assert not torch.equal(model.apply_model(x, t, c), plain)
    with pytest.raises(ValueError, match="ratio"):
        with token_merging(model, ratio=1.0):
            pass


def test_layout_and_compile_switches_leave_the_model_as_they_found_it(model):
    keys = list(model.state_dict())
    x, t, c = inputs(0, model)
    with torch.no_grad():
        plain = model.apply_model(x, t, c)
        with channels_last(model):
            assert model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
            # the same values through other kernels: fp32 sums in another order, 1e-5 of the output's scale
            torch.testing.assert_close(model.apply_model(x, t, c), plain, rtol=0,
                                       atol=1e-5 * plain.abs().max().item())
    assert all(p.is_contiguous() for p in model.parameters())
    with compiled(model):          # compiles lazily on the first call; here only the switch itself
        assert model.unet._compiled_call_impl is not None
        assert list(model.state_dict()) == keys
    assert model.unet._compiled_call_impl is None
