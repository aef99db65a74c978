"""Prompt-to-prompt (sdkit.editing.prompt_to_prompt): editing a prompt into itself gives the plain txt2img image; the
edited branch's maps are the source branch's for the injected steps only (word swap, refinement, re-weighting),
checked on every attention call of the run; per-step unconditional embeddings act as a negative prompt would.

Oracles: plain ``txt2img`` (the same seed, prompt, noise or negative prompt), and the definition of each edit
applied to the maps the source branch computed in the same call (recorded by a subclass of the editor).
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from test_attention_maps import random_tiny_test_model

from sdkit.editing import prompt_to_prompt
from sdkit.pipelines import txt2img

p2p_module = importlib.import_module("sdkit.editing.prompt_to_prompt")   # the package exports the function
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4        # CompVis spacing: 4 steps at timesteps 750, 500, 250, 0
RUN = {"seed": 7, "steps": STEPS, "guidance_scale": 5.0, "height": 32, "width": 32, "progress": False}


@pytest.fixture(scope="module")
def model():
    return random_tiny_test_model()


def assert_same_latent(a: torch.Tensor, b: torch.Tensor) -> None:
    """A batch of 2 pairs against an image alone, explicit softmax against the fused kernel: float32 rounding
    (2^-24 relative) in sums of up to 288 products (3x3 convs over 32 channels) per layer, over a few dozen layers
    and 4 steps, stays far below 1e-4 of the latent's range (measured: 1.5e-6)."""
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= 1e-4 * scale


@pytest.fixture
def recorded(monkeypatch):
    """Every attention call of the next prompt_to_prompt run: (step, layer name, maps in, maps out)."""
    calls = []

    class Recording(p2p_module.PromptToPromptEditor):
        def edit(self, name, probs):
            out = super().edit(name, probs)
            calls.append((self.clock.step, name, probs.clone(), out.clone()))
            return out

    monkeypatch.setattr(p2p_module, "PromptToPromptEditor", Recording)
    return calls


def test_editing_a_prompt_into_itself_gives_the_plain_image(model):
    edit = prompt_to_prompt(model, "a red circle", "a red circle", **RUN)
    plain = txt2img(model, "a red circle", **RUN)
    for z in edit.result.latents:
        assert_same_latent(z, plain.latents[0])
    for image in (edit.source[0], edit.edited[0]):      # rounding may move a pixel across a level of 1/255
        diff = np.abs(np.asarray(image, dtype=int) - np.asarray(plain.images[0], dtype=int))
        assert diff.max() <= 1
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    from_noise = prompt_to_prompt(model, "a red circle", "a red circle", **{**RUN, "seed": 0}, x_T=noise)
    assert_same_latent(from_noise.result.latents[1], txt2img(model, "a red circle", **RUN, x_T=noise).latents[0])


def test_word_swap_gives_the_edit_the_source_maps_for_the_injected_steps_only(model, recorded):
    prompt_to_prompt(model, "a red circle", "a blue circle", cross_replace_steps=0.5, self_replace_steps=0.25, **RUN)
    assert {step for step, *_ in recorded} == set(range(STEPS))
    cross_seen = self_seen = 0
    for step, name, before, after in recorded:
        uncond, source, edited = before[:2], before[2:3], before[3:4]
        assert torch.equal(after[:2], uncond)                   # the unconditional half is never edited
        assert torch.equal(after[2:3], source)                  # nor the source branch
        injected = step < (2 if name.endswith("attn2") else 1)  # 0.5 and 0.25 of 4 steps
        if injected:
            assert torch.equal(after[3:4], source)              # swap: every token takes the source's map
            cross_seen += name.endswith("attn2")
            self_seen += name.endswith("attn1")
        else:
            assert torch.equal(after[3:4], edited)
    assert cross_seen and self_seen
    late = [b for step, name, b, _ in recorded if step == 3 and name.endswith("attn2")]
    assert not torch.equal(late[0][3], late[0][2])               # left alone, the edit's maps differ


def test_refinement_keeps_the_new_words_own_maps_and_reweighting_scales_a_word(model, recorded):
    # CLIP tokens: "a red circle" = 1..3 then the end token 4; the edit adds "on the left" at 4..6, its end at 7
    prompt_to_prompt(model, "a red circle", "a red circle on the left", cross_replace_steps=0.5,
                     self_replace_steps=0.0, reweight={"red": 3.0}, **RUN)
    cross = [(step, b, a) for step, name, b, a in recorded if name.endswith("attn2")]
    assert all(torch.equal(a, b) for _, name, b, a in recorded if name.endswith("attn1"))
    for step, before, after in cross:
        source, own, out = before[2], before[3], after[3]
        if step >= 2:
            assert torch.equal(out, own)
            continue
        torch.testing.assert_close(out[..., [0, 1, 3]], source[..., [0, 1, 3]], rtol=0, atol=0)
        torch.testing.assert_close(out[..., 2], 3.0 * source[..., 2], rtol=1e-6, atol=0)   # "red" x 3
        assert torch.equal(out[..., 4:7], own[..., 4:7])                                      # "on the left"
        assert torch.equal(out[..., 7:], source[..., 4:4 + out.shape[-1] - 7])               # end and padding


def test_per_step_unconditional_embeddings_act_as_a_negative_prompt(model):
    with torch.no_grad():
        square = model.get_learned_conditioning(["a blue square"])
    edit = prompt_to_prompt(model, "a red circle", "a red circle", uncond_embeddings=[square] * STEPS, **RUN)
    negative = txt2img(model, "a red circle", negative_prompt="a blue square", **RUN)
    plain = txt2img(model, "a red circle", **RUN)
    assert_same_latent(edit.result.latents[1], negative.latents[0])
    assert float((negative.latents[0] - plain.latents[0]).abs().max()) > 1e-2   # the embeddings did matter
    with pytest.raises(RuntimeError, match="one per step"):
        prompt_to_prompt(model, "a red circle", "a red circle", uncond_embeddings=[square] * 2, **RUN)
    with pytest.raises(ValueError, match=r"uncond_embeddings\[0\]"):
        prompt_to_prompt(model, "a red circle", "a red circle", uncond_embeddings=[square[:, :5]] * STEPS, **RUN)
    with pytest.raises(ValueError, match="guidance_scale=1"):
        prompt_to_prompt(model, "a red circle", "a red circle", uncond_embeddings=[square] * STEPS,
                         **{**RUN, "guidance_scale": 1.0})


def test_bad_requests_are_refused_in_words(model):
    with pytest.raises(ValueError, match="not a word of the edited"):
        prompt_to_prompt(model, "a red circle", "a blue circle", reweight={"green": 2.0}, **RUN)
    with pytest.raises(ValueError, match="one edited prompt per source"):
        prompt_to_prompt(model, ["a red circle", "a cat"], ["a blue circle"], **RUN)
    with pytest.raises(ValueError, match="cross_replace_steps"):
        prompt_to_prompt(model, "a red circle", "a blue circle", cross_replace_steps=1.5, **RUN)
