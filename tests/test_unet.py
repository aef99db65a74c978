"""The CompVis UNet and its attention blocks against SD v1's checkpoint keys, diffusers, and closed forms."""
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.models.embeddings import get_timestep_embedding

from sdkit.nn.attention import (CrossAttention, LinAttnBlock, LinearAttention,
                                SpatialSelfAttention, SpatialTransformer)
from sdkit.nn.unet import AttentionBlock, QKVAttentionLegacy, UNetModel, timestep_embedding

FIXTURE = Path(__file__).parent / "fixtures" / "sd_v1_checkpoint_keys.txt"
PREFIX = "model.diffusion_model."

# unet_config.params of CompVis configs/stable-diffusion/v1-inference.yaml
SD_V1_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
    context_dim=768, use_checkpoint=True, legacy=False,
)
TINY_UNET = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2], num_res_blocks=2,
    channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True, transformer_depth=1, context_dim=16,
    use_checkpoint=True, legacy=False,
)


def reinit_(model, seed):
    """Give every parameter seeded random values of modest size, so that no branch is zero (as zero_module
    leaves them) and every weight matters in a comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                p.normal_(generator=gen)  # in place: 860M draws take seconds, not a minute
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and name == "weight":
                    p.mul_(0.1).add_(1)
                elif p.ndim >= 2 and not isinstance(module, nn.Embedding):
                    p.div_(math.sqrt(p[0].numel()))  # std 1/sqrt(fan_in)
                else:
                    p.mul_(0.1)
    return model


def diffusers_twin(unet_params, state_dict):
    """A diffusers UNet2DConditionModel holding `state_dict` (CompVis layout), converted by diffusers' own code."""
    original_config = {"model": {"params": {
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    checkpoint = {PREFIX + k: v for k, v in state_dict.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size is deprecated there, but it spares a model-type guess
        config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=256)
    if unet_params.get("use_scale_shift_norm"):
        config["resnet_time_scale_shift"] = "scale_shift"
    if unet_params.get("num_head_channels", -1) != -1:  # the helper only reads num_heads; diffusers wants heads
        config["attention_head_dim"] = [c // unet_params["num_head_channels"] for c in config["block_out_channels"]]
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        twin = UNet2DConditionModel(**config)
    twin.load_state_dict(converted, strict=True, assign=True)  # shares the tensors: no second copy in memory
    return twin.eval()


def compare_with_diffusers(ours, unet_params, batch=2, size=8, tokens=77, labels=None):
    """Max abs difference of the two outputs over float and int timesteps, relative to the output std."""
    ours.eval()
    twin = diffusers_twin(unet_params, ours.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, ours.in_channels, size, size, generator=gen)
    context = torch.randn(batch, tokens, ours.context_dim, generator=gen)
    worst = 0.0
    for t in (torch.tensor([1.0, 981.0]), torch.tensor([1, 981])):
        with torch.no_grad():
            eps = ours(x, t, context, y=labels)
            ref = twin(x, t, encoder_hidden_states=context, class_labels=labels).sample
        assert eps.shape == ref.shape == x.shape
        assert ref.std() > 0.1  # the comparison is not trivially zero
        worst = max(worst, ((eps - ref).abs().max() / ref.std()).item())
    return worst


# (a) checkpoint layout -----------------------------------------------------------------------------------------


def test_sd_v1_unet_state_dict_matches_checkpoint_keys_and_shapes():
    expected = {}
    for line in FIXTURE.read_text().splitlines():
        name, shape = line.split(" ", 1)
        if name.startswith(PREFIX):
            expected[name[len(PREFIX):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert len(expected) == 686
    with torch.device("meta"):
        model = UNetModel(**SD_V1_UNET)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected
    # SD v1 (legacy=False, num_head_channels=-1): 8 heads everywhere, head width channels/8
    heads = {(m.heads, m.to_q.out_features // m.heads) for m in model.modules() if isinstance(m, CrossAttention)}
    assert heads == {(8, 40), (8, 80), (8, 160)}


# (b) full-size parity with diffusers ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sd_v1_unet_matches_diffusers():
    with torch.device("meta"):
        ours = UNetModel(**SD_V1_UNET)
    ours = reinit_(ours.to_empty(device="cpu"), seed=0)
    worst = compare_with_diffusers(ours, SD_V1_UNET)
    print(f"SD v1 UNet vs diffusers: max |diff| / std = {worst:.2e}")
    assert worst <= 1e-4


# (c) small configurations against diffusers --------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {},
    {"num_heads": -1, "num_head_channels": 8, "attention_resolutions": [1, 2]},
    {"transformer_depth": 2, "num_res_blocks": 1, "channel_mult": [1, 2, 2], "attention_resolutions": [1, 4]},
    {"num_classes": 10},
    {"legacy": True, "context_dim": [16]},
    {"use_scale_shift_norm": True},
])
def test_small_unet_matches_diffusers(changes):
    params = {**TINY_UNET, **changes}
    torch.manual_seed(0)
    ours = reinit_(UNetModel(**params), seed=0)
    labels = torch.tensor([3, 7]) if "num_classes" in changes else None
    worst = compare_with_diffusers(ours, params, tokens=5, labels=labels)
    print(f"{changes}: max |diff| / std = {worst:.2e}")
    assert worst <= 1e-4, worst


def test_context_dim_from_omegaconf_listconfig():
    from omegaconf import OmegaConf

    params = OmegaConf.create({**TINY_UNET, "context_dim": [16]})
    model = UNetModel(**params)
    assert model.context_dim == 16
    assert model.input_blocks[-1][1].transformer_blocks[0].attn2.to_k.in_features == 16


# (d) timestep embedding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [320, 7])
def test_timestep_embedding_matches_diffusers(dim):
    t = torch.tensor([0.0, 1.0, 0.5, 981.0, 999.0, 123.456])
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, dim), ref, rtol=0, atol=1e-6)
    ints = torch.tensor([0, 1, 981])
    torch.testing.assert_close(timestep_embedding(ints, dim), timestep_embedding(ints.float(), dim))


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2 * freqs), torch.sin(2 * freqs)]))
    assert torch.equal(timestep_embedding(torch.tensor([3.0, 5.0]), 4, repeat_only=True),
                       torch.tensor([[3.0] * 4, [5.0] * 4]))


# (e) AttentionBlock path, the other attention layers, and gradient checkpointing -------------------------------


def reference_qkv_attention(qkv, heads, legacy):
    """softmax(q^T k / sqrt(ch)) over positions, written out with einsum."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:  # heads outermost: [H x (q, k, v) x ch]
        q, k, v = qkv.reshape(bs, heads, 3, ch, length).unbind(2)
    else:  # (q, k, v) outermost: [(q, k, v) x H x ch]
        q, k, v = qkv.reshape(bs, 3, heads, ch, length).unbind(1)
    weight = torch.einsum("bhct,bhcs->bhts", q, k).div(math.sqrt(ch)).softmax(-1)
    return torch.einsum("bhts,bhcs->bhct", weight, v).reshape(bs, heads * ch, length)


@pytest.mark.parametrize("legacy_order", [True, False])
def test_attention_block_matches_written_out_attention(legacy_order):
    block = reinit_(AttentionBlock(64, num_head_channels=32, use_new_attention_order=not legacy_order), seed=2)
    assert block.num_heads == 2
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(3))
    h = x.reshape(2, 64, 16)
    qkv = block.qkv(block.norm(h))
    ref = h + block.proj_out(reference_qkv_attention(qkv, 2, legacy_order))
    torch.testing.assert_close(block(x), ref.reshape(x.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("legacy", [True, False])
def test_unet_with_attention_blocks_runs(legacy):
    model = UNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
                      attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=32, legacy=legacy)
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == 4 and all(b.num_heads == 2 for b in blocks)  # 1 encoder, middle, 2 decoder, 64 channels
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([10, 500])).shape == (2, 5, 8, 8)


def test_resblock_updown_codebook_head_and_bfloat16_run():
    model = UNetModel(**dict(TINY_UNET, resblock_updown=True, n_embed=11)).eval()
    assert set(dict(model.input_blocks[3][0].named_children())) >= {"in_layers", "h_upd", "x_upd", "emb_layers"}
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert model(x, t, context).shape == (2, 11, 8, 8)  # logits over the codebook
        reinit_(model, seed=12)
        full = model(x, t, context)
        half = model.to(torch.bfloat16)(x, t, context)
    assert half.dtype == torch.float32  # computed in bf16, returned in the input's dtype
    assert (half - full).norm() < 0.05 * full.norm()  # bf16 keeps about 3 significant digits


def test_cross_attention_mask_hides_context_tokens():
    attn = reinit_(CrossAttention(8, context_dim=6, heads=2, dim_head=4), seed=4)
    gen = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 5, 6, generator=gen)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, True]])
    q = attn.to_q(x).reshape(2, 3, 2, 4).transpose(1, 2)
    k = attn.to_k(context).reshape(2, 5, 2, 4).transpose(1, 2)
    v = attn.to_v(context).reshape(2, 5, 2, 4).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask[:, None, None, :], -torch.finfo(q.dtype).max)
    ref = attn.to_out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(attn(x, context, mask=mask), ref, rtol=1e-5, atol=1e-6)
    # the masked tokens really make no difference
    changed = context.clone()
    changed[0, 3:] = 100.0
    torch.testing.assert_close(attn(x, changed, mask=mask)[0], attn(x, context, mask=mask)[0])


def test_spatial_self_attention_and_linear_attention_closed_forms():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 32, 3, 4, generator=gen)
    ssa = reinit_(SpatialSelfAttention(32), seed=7)
    h = ssa.norm(x)
    q, k, v = (m(h).reshape(2, 32, 12) for m in (ssa.q, ssa.k, ssa.v))
    w = (torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32)).softmax(-1)
    ref = x + ssa.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 3, 4))
    torch.testing.assert_close(ssa(x), ref, rtol=1e-5, atol=1e-5)

    lin = reinit_(LinearAttention(32, heads=4, dim_head=8), seed=8)
    q, k, v = lin.to_qkv(x).reshape(2, 3, 4, 8, 12).unbind(1)
    out = torch.einsum("bhde,bhdn->bhen", torch.einsum("bhdn,bhen->bhde", k.softmax(-1), v), q)
    torch.testing.assert_close(lin(x), lin.to_out(out.reshape(2, 32, 3, 4)), rtol=1e-5, atol=1e-5)
    block = LinAttnBlock(32)
    assert block.heads == 1 and block.to_qkv.weight.shape == (96, 32, 1, 1)


def test_spatial_transformer_without_context_is_self_attention():
    st = reinit_(SpatialTransformer(32, n_heads=2, d_head=16), seed=9)
    x = torch.randn(1, 32, 2, 2)
    tokens = st.proj_in(st.norm(x)).flatten(2).transpose(1, 2)
    block = st.transformer_blocks[0]
    torch.testing.assert_close(block.attn2(tokens), block.attn2(tokens, context=tokens))
    assert st(x).shape == x.shape


def count_calls(module_type, model):
    calls = []
    for m in model.modules():
        if isinstance(m, module_type):
            m.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("use_spatial_transformer", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_spatial_transformer):
    params = dict(TINY_UNET, num_res_blocks=1, use_spatial_transformer=use_spatial_transformer)
    if not use_spatial_transformer:
        params.update(context_dim=None, num_heads=-1, num_head_channels=32)
    grads, n_calls = [], []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = reinit_(UNetModel(**dict(params, use_checkpoint=use_checkpoint)), seed=10).train()
        calls = count_calls(CrossAttention if use_spatial_transformer else QKVAttentionLegacy, model)
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(2, 4, 8, 8, generator=gen)
        context = torch.randn(2, 5, 16, generator=gen) if use_spatial_transformer else None
        model(x, torch.tensor([3.0, 700.0]), context).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        n_calls.append(len(calls))
    assert n_calls[1] == 2 * n_calls[0]  # the checkpointed blocks ran again during backward
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


# (f) clear errors ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return UNetModel(**dict(TINY_UNET, channel_mult=[1, 2, 2], attention_resolutions=[2])).eval()


def test_wrong_latent_size_says_which_sizes_work(tiny):
    with pytest.raises(ValueError, match=r"multiples of 4.*12x8 or 12x12.*multiples of 32 pixels"):
        tiny(torch.randn(1, 4, 12, 10), torch.tensor([1]), torch.randn(1, 5, 16))


def test_missing_or_wrong_context(tiny):
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="needs `context`"):
        tiny(x, t)
    with pytest.raises(ValueError, match="context_dim=16"):
        tiny(x, t, torch.randn(2, 5, 768))
    with pytest.raises(ValueError, match=r"shape \[2, tokens, 16\]"):
        tiny(x, t, torch.randn(1, 5, 16))


def test_wrong_channels_timesteps_and_labels(tiny):
    context = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"\[batch, 4, height, width\].*\(2, 9, 8, 8\)"):
        tiny(torch.randn(2, 9, 8, 8), torch.tensor([1, 2]), context)
    with pytest.raises(ValueError, match="needs `timesteps`"):
        tiny(torch.randn(2, 4, 8, 8), None, context)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        tiny(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="not class-conditional"):
        tiny(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), context, y=torch.tensor([0, 1]))
    # a single timestep is used for the whole batch
    with torch.no_grad():
        torch.testing.assert_close(tiny(torch.zeros(2, 4, 8, 8), 5, context),
                                   tiny(torch.zeros(2, 4, 8, 8), torch.tensor([5, 5]), context))
    conditional = UNetModel(**dict(TINY_UNET, num_classes=3))
    with pytest.raises(ValueError, match="class-conditional .*pass labels as y"):
        conditional(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), context)


@pytest.mark.parametrize("changes, message", [
    ({"context_dim": None}, "needs context_dim"),
    ({"use_spatial_transformer": False}, "use_spatial_transformer=False"),
    ({"num_heads": -1}, "num_heads or num_head_channels"),
    ({"dims": 3}, "only 2-D"),
    ({"num_heads": -1, "num_head_channels": 24, "use_spatial_transformer": False, "context_dim": None},
     "heads of 24 channels"),
])
def test_constructor_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**dict(TINY_UNET, **changes))
