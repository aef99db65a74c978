"""The attention grounding loss (sdkit.training.grounding) and its use in LatentDiffusionModule.

Oracles: the shapes dataset's own scenes and layouts (which words belong to which group, where each group's objects
are drawn), closed-form token losses of hand-made attention maps, and PyTorch's fused attention.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sdkit.data.shapes import BACKGROUNDS, COLOURS, ShapesDataset, render
from sdkit.data.transforms import to_tensor
from sdkit.nn.attention import CrossAttention
from sdkit.nn.attention_processors import AttentionRecorder
from sdkit.nn.text import bert_wordpiece_tokenizer
from sdkit.nn.tokenizer import CLIPTokenizer
from sdkit.training import grounding
from sdkit.training.datamodule import collate

ROOT = Path(__file__).resolve().parents[1]


def test_recorded_attention_gives_the_fused_result_and_keeps_softmax_maps():
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=16, context_dim=8, heads=2, dim_head=4)
    x, context = torch.randn(3, 10, 16), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    for m in (None, mask):
        fused = layer(x, context, mask=m)
        recorder = AttentionRecorder()
        layer.processor = recorder.bind("layer", layer)
        recorded = layer(x, context, mask=m)
        del layer.processor
        torch.testing.assert_close(recorded, fused, atol=1e-6, rtol=1e-5)
        q = layer.to_q(x).reshape(3, 10, 2, 4).transpose(1, 2)
        k = layer.to_k(context).reshape(3, 5, 2, 4).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / 2.0                        # dim_head 4: scale 1/2
        if m is not None:
            logits = logits.masked_fill(~m[:, None, None, :], float("-inf"))
        torch.testing.assert_close(recorder.maps["layer"][0], logits.softmax(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tokenizer", [bert_wordpiece_tokenizer, CLIPTokenizer], ids=["minilm", "clip"])
def test_grounded_tokens_are_each_groups_colour_and_shape_words(tokenizer):
    tok = tokenizer()
    data = ShapesDataset(length=60, size=64, seed=3, caption_style="varied", two_group_prob=0.7)
    for i in range(len(data)):
        scene, _, text = data.example(i)
        groups = grounding.grounded_groups(text, tok, 32)
        assert [g.colour for g in groups] == [g.colour for g in scene.groups], text
        ids = tok([text], max_length=32, truncation=True, padding="max_length", return_tensors="pt")["input_ids"][0]
        for found, truth in zip(groups, scene.groups):
            colour, *shape = (tok.decode([int(ids[t])]).strip() for t in found.tokens)   # a shape may be cut
            assert colour == truth.colour and "".join(shape).startswith(truth.shape), (text, colour, shape)
    # a background colour after the groups is not a group's word; other captions ground nothing
    text = "a green circle and a blue star on a light blue background"
    tokens = [g.tokens for g in grounding.grounded_groups(text, tok, 32)]
    words = tok([text], max_length=32, padding="max_length", return_tensors="pt")["input_ids"][0]
    assert [[tok.decode([int(words[t])]).strip() for t in pair] for pair in tokens] == [["green", "circle"],
                                                                                         ["blue", "star"]]
    # a caption the encoder cuts is not grounded (the cut words have no state to attend)
    long = "a simple drawing of three small pink triangles in the middle and two large black crosses on the right"
    assert len(grounding.grounded_groups(long, tok, 32)) == 2
    assert grounding.grounded_groups(long, tok, 12) == []
    assert grounding.grounded_groups("a grinning face with big eyes", tok, 32) == []
    assert grounding.grounded_groups("", tok, 32) == []


def test_colour_mask_is_the_groups_own_objects():
    data = ShapesDataset(length=40, size=64, seed=5, two_group_prob=1.0)
    stray = 0
    for i in range(len(data)):
        scene, objects, _ = data.example(i)
        full = render(scene, 64, objects=objects)
        background = (np.asarray(full) == np.array(BACKGROUNDS[scene.background])).all(-1)
        for group in scene.groups:
            alone = [o for o in objects if o.colour == group.colour]
            # the group drawn alone on the background: pixels not background are its objects
            only = np.asarray(render(scene, 64, objects=alone)).astype(int)
            drawn = np.abs(only - np.array(BACKGROUNDS[scene.background])).sum(-1) > 0
            solid = (only == np.array(COLOURS[group.colour])).all(-1)
            mask = grounding.colour_mask(to_tensor(full), group.colour).bool().numpy()
            assert mask[solid].all(), f"item {i}: a pixel of the {group.colour} objects is missing"
            # outside its objects only a stray antialiased edge pixel of another colour (red fading into white
            # passes within 47 of pink), never a background pixel
            outside = mask & ~drawn
            assert not (outside & background).any(), f"item {i}: background in the mask"
            stray += int(outside.sum())
    assert stray <= 5, f"{stray} stray pixels in 40 two-group images"


def test_token_loss_closed_form():
    # one item, 4×4 map (16 pixels), tokens 0..4; group tokens (1, 3); the group's colour fills the top-left 2×2
    image = torch.ones(3, 64, 64)
    image[:, :32, :32] = torch.tensor([215, 25, 35]).view(3, 1, 1) / 127.5 - 1          # red
    targets = grounding.GroundingTargets(image[None], [[grounding.GroundedGroup((1, 3), "red")]], 5)
    cells = targets.cells(4).reshape(4, 4)
    assert cells[:2, :2].all() and cells.sum() == 4
    uniform = torch.full((1, 2, 16, 5), 1 / 5)
    assert grounding.token_loss(uniform, targets).item() == pytest.approx((1 - 4 / 16) ** 2)
    inside = torch.zeros(1, 2, 16, 5)
    inside[..., 0] = 1.0
    for p in (0, 1, 4, 5):      # the four top-left cells
        inside[0, :, p, 0], inside[0, :, p, 1], inside[0, :, p, 3] = 0.5, 0.25, 0.25
    assert grounding.token_loss(inside, targets).item() == pytest.approx(0.0)
    # half of token 1's attention outside, token 3 all inside: ((1 - 1/2)² + 0) / 2
    half = inside.clone()
    half[0, :, 15, 1], half[0, :, 15, 0] = 1.0, 0.0
    assert grounding.token_loss(half, targets).item() == pytest.approx(0.125)
    # no shape caption in the batch: no loss
    assert grounding.grounding_loss([], grounding.GroundingTargets(image[None], [[]], 5)) is None


def tiny_module(grounding_weight: float, checkpointing: bool = False, max_timestep: int | None = None):
    from sdkit.training.diffusion import LatentDiffusionModule

    config = OmegaConf.load(ROOT / "sdkit" / "configs" / "tiny-test.yaml").model
    config.params.unet_config.params.use_checkpoint = checkpointing
    torch.manual_seed(0)
    addon = {"target": "sdkit.training.grounding.GroundingLoss",
             "params": {"weight": grounding_weight, "max_timestep": max_timestep}}
    return LatentDiffusionModule({"target": config.target, "params": config.params},
                                 addons={"grounding": addon} if grounding_weight else None,
                                 gradient_checkpointing=checkpointing)


def shapes_batch(n: int = 6, size: int = 32) -> dict:
    data = ShapesDataset(length=n, size=size, seed=2, caption_style="varied", two_group_prob=1.0)
    return collate([{**data[i], "index": i} for i in range(n)])


def test_module_adds_the_weighted_grounding_loss_and_it_can_be_learned():
    torch.set_num_threads(1)
    batch = shapes_batch()
    plain, grounded = tiny_module(0.0), tiny_module(2.0)
    grounded.ldm.load_state_dict(plain.ldm.state_dict())
    loss0, logs0, _ = plain.shared_step(batch, 0, "train", 0.0)
    loss, logs, _ = grounded.shared_step(batch, 0, "train", 0.0)
    assert "train/loss_grounding" not in logs0
    assert loss.item() == pytest.approx(loss0.item() + 2.0 * logs["train/loss_grounding"].item(), rel=1e-5)
    _, val_logs, _ = grounded.shared_step(batch, 0, "validation", 0.0)
    assert "train/loss_grounding" not in val_logs          # validation losses stay comparable across runs
    # the loss reaches the text keys, and a few steps on one batch lower it
    optimizer = torch.optim.Adam(grounded.trainable_parameters(), lr=3e-3)
    first = None
    for step in range(30):
        loss, logs, _ = grounded.shared_step(batch, 0, "train", 0.0)
        first = first if first is not None else logs["train/loss_grounding"].item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert logs["train/loss_grounding"].item() < 0.5 * first
    assert not any("processor" in m.__dict__ for m in grounded.ldm.modules())   # the recorder was removed


def test_grounding_max_timestep_leaves_noisier_items_out():
    torch.set_num_threads(1)
    batch = shapes_batch()
    every = tiny_module(1.0)
    loss, _, _ = every.shared_step(batch, 0, "train", 0.0)
    none_below, all_below = tiny_module(1.0, max_timestep=0), tiny_module(1.0, max_timestep=1000)
    for module in (none_below, all_below):
        module.ldm.load_state_dict(every.ldm.state_dict())
    limited, logs, _ = none_below.shared_step(batch, 0, "train", 0.0)
    assert "train/loss_grounding" not in logs and limited.item() == pytest.approx(logs["train/loss"].item())
    assert all_below.shared_step(batch, 0, "train", 0.0)[0].item() == pytest.approx(loss.item())


def test_grounding_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="gradient checkpointing"):
        tiny_module(1.0, checkpointing=True)
