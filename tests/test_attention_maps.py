"""Attention maps per word (sdkit.editing.attention_maps): the DAAM aggregation against a hand computation over the
maps of the same run, the maps' closed-form total, and the image unchanged by the observer (plain txt2img).

The small random model (tiny-test) starts its attention outputs and UNet output at zero, as CompVis does, which would
make attention irrelevant to the image; those zero weights get small random values here so that it matters.
"""
from __future__ import annotations

import importlib

import matplotlib
import pytest
import torch
import torch.nn.functional as F

import sdkit
from sdkit.editing import attention_maps, plot_attention_maps, prompt_words
from sdkit.pipelines import txt2img

attention_maps_module = importlib.import_module("sdkit.editing.attention_maps")   # the package exports the function

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_thread")
RUN = {"seed": 5, "steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32, "progress": False}


def random_tiny_test_model():
    torch.manual_seed(0)
    model = sdkit.load_model("tiny-test")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def model():
    return random_tiny_test_model()


def test_word_positions_are_the_tokens_of_each_word(model):
    # CLIP's BPE cuts "triangles" into "tri" + "angles</w>": positions 3 and 4 after the start token
    words = prompt_words(model, "two red triangles")
    assert [(w.text, w.tokens) for w in words] == [("two", (1,)), ("red", (2,)), ("triangles", (3, 4))]
    ids = model.cond_stage_model.tokenizer(["two red triangles"])["input_ids"][0]
    alone = model.cond_stage_model.tokenizer(["triangles"])["input_ids"][0]
    assert ids[[3, 4]].tolist() == alone[[1, 2]].tolist()
    with pytest.raises(ValueError, match="tokens long"):
        prompt_words(model, "red " * 80)


def test_word_maps_equal_a_hand_aggregation_of_every_recorded_map(model, monkeypatch):
    calls = []

    class Recording(attention_maps_module.CrossAttentionAggregator):
        def observe(self, name, probs):
            calls.append(probs.clone())
            super().observe(name, probs)

    monkeypatch.setattr(attention_maps_module, "CrossAttentionAggregator", Recording)
    prompts = ["two red triangles", "a blue circle"]
    results = attention_maps(model, prompts, **RUN)
    # By hand: every call's conditional half (second half of the guided batch), the heads summed, the word's tokens
    # summed, each call's grid upsampled bicubically to 32x32, then the mean over all (call, head) maps.
    n_maps = sum(p.shape[1] for p in calls)
    assert all(p.shape[0] == 4 for p in calls)                            # [uncond x2, cond x2]
    for item, tokens, word in ((0, [3, 4], "triangles"), (0, [2], "red"), (1, [3], "circle")):
        total = torch.zeros(32, 32)
        for p in calls:
            side = int(p.shape[2] ** 0.5)
            grid = p[2 + item].sum(0)[:, tokens].sum(-1).reshape(1, 1, side, side)
            total += F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)[0, 0]
        # sums of at most 4 steps x 7 layers x 4 heads of values <= 1, in another order: float32 rounding < 1e-5
        torch.testing.assert_close(results[item][word], total / n_maps, rtol=0, atol=1e-5)
    # every pixel's attention sums to 1 over the tokens, and bicubic interpolation keeps a constant (weights sum to 1)
    torch.testing.assert_close(results[0].token_maps.sum(0), torch.ones(32, 32), rtol=0, atol=1e-5)
    assert results[0].as_dict().keys() == {"two", "red", "triangles"}


def test_the_observer_does_not_change_the_image(model):
    maps = attention_maps(model, "a red circle", **RUN)
    plain = txt2img(model, "a red circle", **RUN)
    # the observer computes each layer's output with the default's fused kernel: bit for bit the same image
    assert torch.equal(maps.latent, plain.latents[0])
    assert maps.image.tobytes() == plain.images[0].tobytes()


def test_plot_puts_the_image_beside_every_word_on_one_colour_scale(model):
    maps = attention_maps(model, "a red circle", **RUN)
    fig = plot_attention_maps(maps)
    panels = [ax for ax in fig.axes if ax.images and ax.get_title() != "image" and ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["a", "red", "circle"]
    assert {ax.images[0].get_clim() for ax in panels} == {(0.0, float(maps.maps.max()))}
    with pytest.raises(KeyError, match="square"):
        maps["square"]
    with pytest.raises(ValueError, match="one batch"):
        attention_maps(model, ["a", "b"], batch_size=1, **RUN)
