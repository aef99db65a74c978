"""Attend-and-Excite (sdkit.editing.attend_excite).

Oracles: hand computations of the loss's pieces (token positions of a CLIP-tokenized prompt, the Gaussian kernel,
the softmax of a uniform map), first-order descent (a small enough gradient step lowers the loss), and txt2img:
with no excitation and the DDIM sampler the run is DDIM sampling, so it must give txt2img's latents.
"""
from __future__ import annotations

import math

import pytest
import torch

import sdkit
from sdkit.editing.attend_excite import (attend_and_excite, binding_loss, colour_shape_pairs, excite_losses,
                                         gaussian_kernel, subject_maxima, subject_tokens)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def model(live_tiny_test):
    return live_tiny_test   # tests/conftest.py: tiny-test whose zero-initialised layers got small random weights


def test_subject_tokens_by_hand(model):
    # CLIP BPE keeps each of these words whole: <start> a red circle and a blue square -> positions 1..7
    assert subject_tokens(model, PROMPT) == [(3,), (7,)]
    assert subject_tokens(model, PROMPT, "colour+shape") == [(2,), (3,), (6,), (7,)]
    assert subject_tokens(model, PROMPT, ["square"]) == [(7,)]
    with pytest.raises(ValueError, match="not a word of the prompt"):
        subject_tokens(model, PROMPT, ["triangle"])
    with pytest.raises(ValueError, match="no shape words"):
        subject_tokens(model, "a cat")


def test_binding_loss_by_hand():
    # 4 pixels; tokens: start, colour₁, shape₁, colour₂, shape₂, end. Each word attends to two pixels only.
    def maps(on):                                       # on: word token -> its two pixels
        m = torch.zeros(4, 6)
        for token, pixels in on.items():
            m[pixels, token] = 1.0
        return m
    bound = maps({1: [0, 1], 2: [0, 1], 3: [2, 3], 4: [2, 3]})
    assert float(binding_loss(bound, 6, [(1,), (2,), (3,), (4,)])) == pytest.approx(0.0, abs=1e-6)
    # the shapes swapped: each pair's words apart (1 − 0 each), and across pairs (c₁,s₂), (s₁,c₂) overlap fully
    # while (c₁,c₂), (s₁,s₂) do not: 1 + (1 + 1 + 0 + 0)/4 = 1.5
    swapped = maps({1: [0, 1], 2: [2, 3], 3: [2, 3], 4: [0, 1]})
    assert float(binding_loss(swapped, 6, [(1,), (2,), (3,), (4,)])) == pytest.approx(1.5, abs=1e-6)
    # half-overlapping pairs: renormalised over the words, pixel 1 is shared by c₁ and s₁ (1/2 each) ...
    half = maps({1: [0, 1], 2: [1, 2], 3: [3], 4: [3]})
    # c₁: pixel 0 → 1, pixel 1 → 1/2: as a distribution (2/3, 1/3, 0, 0); s₁: (0, 1/3, 2/3, 0); overlap 1/3.
    # c₂ = s₂ = (0, 0, 0, 1): overlap 1; across pairs nothing overlaps. Loss (1 − 1/3 + 0)/2 + 0 = 1/3
    assert float(binding_loss(half, 6, [(1,), (2,), (3,), (4,)])) == pytest.approx(1 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        binding_loss(bound, 6, [(1,), (2,), (3,)])


def test_gaussian_kernel_by_hand():
    k = gaussian_kernel(0.5)
    w = math.exp(-1 / (2 * 0.25))                       # weight one pixel off the centre, before normalising
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(k[1, 1]) == pytest.approx(1 / (1 + 2 * w) ** 2, rel=1e-6)
    assert float(k[0, 0]) == pytest.approx(w * w / (1 + 2 * w) ** 2, rel=1e-6)


def test_subject_maxima_by_hand():
    pixels, tokens, length = 16, 10, 6                  # 4 word tokens (1..4) between start and end
    uniform = torch.full((pixels, tokens), 0.1)
    # equal attention: the softmax over the 4 words gives 1/4 everywhere, and smoothing a constant keeps it
    assert torch.allclose(subject_maxima(uniform, length, [(1,), (2, 3)]), torch.tensor([0.25, 0.5]))
    peaked = uniform.clone()
    peaked[5, 2] = 1.0                                  # one pixel where word 2 wins outright (×100 softmax)
    top = subject_maxima(peaked, length, [(2,)])
    # at the peak: softmax ≈ 1 there and 1/4 around it; the 3×3 smoothing mixes 1 with weight k[1,1] and 1/4
    k = gaussian_kernel(0.5)
    expected = float(k[1, 1]) * 1.0 + (1 - float(k[1, 1])) * 0.25
    assert float(top[0]) == pytest.approx(expected, rel=1e-4)
    # renormalised over the words instead: 1/4 everywhere for the uniform map, 1/1.3 at the peak pixel
    assert torch.allclose(subject_maxima(uniform, length, [(1,)], normalise="renormalise"), torch.tensor([0.25]))
    top = subject_maxima(peaked, length, [(2,)], normalise="renormalise")
    assert float(top[0]) == pytest.approx(float(k[1, 1]) / 1.3 + (1 - float(k[1, 1])) * 0.25, rel=1e-5)


def test_a_small_gradient_step_lowers_the_loss(model):
    cond = model.get_learned_conditioning([PROMPT, "two green triangles and a yellow star"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    lengths = [9, 9]                                    # 7 / 7 words + start and end
    subjects = [[(3,), (7,)], [(3,), (7,)]]
    losses, grad = excite_losses(model, x, 500.0, cond, lengths, subjects, None)
    assert losses.shape == (2,) and bool((losses > 0).all()) and bool((losses < 1).all())
    step = 1e-3 / float(grad.abs().max())              # small enough for the first-order term to dominate
    after, _ = excite_losses(model, x - step * grad, 500.0, cond, lengths, subjects, None)
    assert bool((after < losses).all())
    # the binding loss, on each group's (colour, shape) words: the same first-order descent
    pairs = [[(2,), (3,), (6,), (7,)], [(2,), (3,), (6,), (7,)]]
    losses, grad = excite_losses(model, x, 500.0, cond, lengths, pairs, None, objective="bind")
    assert bool((losses > 0).all()) and bool((losses < 2).all())
    step = 1e-3 / float(grad.abs().max())
    after, _ = excite_losses(model, x - step * grad, 500.0, cond, lengths, pairs, None, objective="bind")
    assert bool((after < losses).all())


def test_without_excitation_on_ddim_it_is_txt2img(model):
    kwargs = dict(sampler="ddim", steps=4, guidance_scale=5.0, seed=3, height=32, width=32, progress=False)
    reference = sdkit.txt2img(model, [PROMPT, PROMPT], **kwargs)
    record = []
    plain = attend_and_excite(model, [PROMPT, PROMPT], step_size=0.0, excite_steps=2, record=record, **kwargs)
    # the same DDIM steps, written twice (here and in the sampler): float32 rounding of a few ops per step
    assert torch.allclose(plain.latents, reference.latents, atol=1e-5 * float(reference.latents.abs().max()))
    assert [i for i, _ in record] == [0, 1]
    excited = attend_and_excite(model, [PROMPT, PROMPT], step_size=20.0, excite_steps=2, max_refinement=1,
                                **kwargs)
    assert excited.latents.shape == reference.latents.shape
    assert not torch.allclose(excited.latents, reference.latents)
    # the binding objective: step size 0 is the same run; a step moves it; its default pairs are the groups'
    bound_plain = attend_and_excite(model, [PROMPT, PROMPT], step_size=0.0, excite_steps=2, objective="bind", **kwargs)
    assert torch.equal(bound_plain.latents, plain.latents)
    bound = attend_and_excite(model, [PROMPT, PROMPT], step_size=60.0, excite_steps=2, objective="bind", **kwargs)
    assert not torch.allclose(bound.latents, reference.latents)
    assert colour_shape_pairs(model, PROMPT + " on a green background") == [(2,), (3,), (6,), (7,)]
    with pytest.raises(ValueError, match="objective"):
        attend_and_excite(model, PROMPT, objective="bound", **kwargs)
