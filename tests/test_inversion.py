"""DDIM inversion and null-text inversion (sdkit.editing.inversion).

Oracles:
- a Gaussian data distribution N(μ, s²): its ε(x, t) is known in closed form, and so is the exact probability-flow
  map from a clean sample to any noise level (in x̄ = x/√ᾱ, σ = √((1−ᾱ)/ᾱ): x̄_σ − μ = (x̄_σ₀ − μ)·√((s²+σ²)/(s²+σ₀²))).
  DDIM inversion must converge to it at first order; with fixed-point refinement it must invert DDIM sampling
  itself, so sampling back returns the start to float64 rounding;
- an ε that does not depend on x: then the backward DDIM step is the exact inverse of the forward one;
- null-text: on a toy model ε(x, t, c) = ε_gauss(x, t) + c the guided step can follow the pivot exactly, so the
  optimisation must shrink the guided reconstruction error by orders of magnitude, and sampling with the returned
  embeddings must retrace the trajectory the optimiser ended on (its reported loss).
"""
from __future__ import annotations

import math

import pytest
import torch

import sdkit
from sdkit.editing.inversion import (ddim_invert, invert_ddim, null_text_invert, optimise_null_text,
                                     sample_inversion, sampling_grid, stepwise_guided_eps_fn)
from sdkit.samplers import sample
from sdkit.samplers.denoisers import cfg_combine
from sdkit.schedules import sd_v1_alphas_cumprod

pytestmark = pytest.mark.usefixtures("one_thread")

AC = sd_v1_alphas_cumprod().double()
MU, S = 0.3, 0.5


def gauss_eps(x, t):
    """Exact ε for data N(MU, S²): x_t ~ N(√ᾱ μ, ᾱ s² + 1 − ᾱ), ε = √(1−ᾱ)(x − √ᾱ μ)/(ᾱ s² + 1 − ᾱ)."""
    a = AC[t.long()].view(-1, *[1] * (x.ndim - 1)).to(x)
    return (x - a.sqrt() * MU) * (1 - a).sqrt() / (a * S * S + 1 - a)


def start(shape=(2, 3, 4, 4), seed=0):
    return MU + S * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_flow(x0, steps):
    """The probability-flow ODE's map from x0 (at the level the DDIM sampler ends on, ᾱ₀) to the first step's level."""
    _, a, a_prev = sampling_grid(AC, steps)
    sig0, sig_t = math.sqrt((1 - a_prev[-1]) / a_prev[-1]), math.sqrt((1 - a[0]) / a[0])
    x_bar = x0 / math.sqrt(a_prev[-1])
    return (MU + (x_bar - MU) * math.sqrt((S * S + sig_t ** 2) / (S * S + sig0 ** 2))) * math.sqrt(a[0])


def test_ddim_inversion_converges_to_the_exact_flow_at_first_order():
    x0 = start()
    errors = {n: float((invert_ddim(gauss_eps, x0, AC, n, progress=False)[0] - exact_flow(x0, n)).abs().max())
              for n in (100, 500)}
    # Euler-type first order: 5x the steps cut the error about 5x (measured 4.2x); 3x leaves room for the
    # uneven compvis grid, while a zeroth-order (non-converging) inversion would give ~1x.
    assert errors[500] < errors[100] / 3
    assert errors[500] < 0.01


def test_fixed_point_inversion_inverts_ddim_sampling_to_float64_rounding():
    x0 = start()
    for steps in (10, 50):
        path = invert_ddim(gauss_eps, x0, AC, steps, fixed_point_iterations=25, progress=False)
        assert len(path) == steps + 1 and torch.equal(path[-1], x0)
        back = sample(gauss_eps, path[0], AC, "ddim", steps, progress=False)
        # the fixed-point map contracts by ~0.2-0.4 per iteration here (measured): 25 iterations reach rounding;
        # each of the `steps` steps adds a few ulps of |x| ≤ 3 (1e-15), and the unit-variance noise
        # amplifies them by up to 1/√ᾱ_T ≈ 15 on the way down: 1e-11 is a wide bound
        assert float((back - x0).abs().max()) < 1e-11
    plain = invert_ddim(gauss_eps, x0, AC, 10, progress=False)
    assert float((sample(gauss_eps, plain[0], AC, "ddim", 10, progress=False) - x0).abs().max()) > 0.05


def test_inversion_is_exact_when_eps_does_not_depend_on_x():
    x0 = start(seed=1)
    c = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def eps_fn(x, t):
        return c * (1 + t.view(-1, 1, 1, 1) / 1000)     # depends on t, not on x

    for spacing in ("compvis", "trailing"):
        path = invert_ddim(eps_fn, x0, AC, 20, spacing=spacing, progress=False)
        back = sample(eps_fn, path[0], AC, "ddim", 20, spacing=spacing, progress=False)
        assert float((back - x0).abs().max()) < 1e-12     # 20 affine steps, each a few ulps


def test_null_text_optimisation_makes_guided_sampling_follow_the_pivot():
    x0, steps, scale = start(), 6, 3.0
    c = 0.2 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    empty = torch.zeros(1, *x0.shape[1:], dtype=torch.float64)

    def model_eps(x, t, cond):
        return gauss_eps(x, t) + cond

    pivot = invert_ddim(lambda x, t: model_eps(x, t, c), x0, AC, steps, progress=False)
    guided = sample(lambda x, t: cfg_combine(model_eps(x, t, empty), model_eps(x, t, c), scale), pivot[0], AC,
                    "ddim", steps, progress=False)
    nulls, losses = optimise_null_text(model_eps, pivot, c, empty, AC, steps, scale, inner_steps=30, learning_rate=0.05,
                                       tolerance=0.0, progress=False)
    assert len(nulls) == len(sampling_grid(AC, steps)[0]) == 7 and all(n.shape == x0.shape for n in nulls)  # compvis
    back = sample(stepwise_guided_eps_fn(model_eps, c, nulls, sampling_grid(AC, steps)[0], scale), pivot[0], AC,
                  "ddim", steps, progress=False)
    # sampling with the embeddings retraces the optimiser's own last step: its reported loss, to rounding
    assert float((back - x0).square().flatten(1).mean(1).max()) == pytest.approx(losses[-1], rel=1e-9)
    # an exact solution exists at every step; 30 Adam steps get the error down ~190x (measured 3.5 -> 0.019)
    assert float((back - x0).abs().max()) < float((guided - x0).abs().max()) / 30


def test_stepwise_embeddings_refuse_a_timestep_off_their_grid():
    eps_fn = stepwise_guided_eps_fn(lambda x, t, c: x, torch.zeros(1, 3), [torch.zeros(1, 3)], [981], 5.0)
    with pytest.raises(ValueError, match="not on the grid"):
        eps_fn(torch.zeros(1, 3), torch.tensor([500.0]))


# ------------------------------------------------------------------------------------------------ with a model
@pytest.fixture(scope="module")
def untrained():
    """tiny-test as loaded: random weights, but the UNet's output conv is zero-initialised, so ε ≡ 0."""
    torch.manual_seed(0)
    return sdkit.load_model("tiny-test")


@pytest.fixture(scope="module")
def model(live_tiny_test):
    return live_tiny_test   # tests/conftest.py: tiny-test whose zero-initialised layers got small random weights


def image(seed=0, size=32):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_with_eps_zero_inversion_then_sampling_gives_the_image_latent_back(untrained):
    # ε ≡ 0: every DDIM step is x → √(ᾱ_next/ᾱ) x, so inverting and sampling back multiply by reciprocal factors
    inv = ddim_invert(untrained, [image(0), image(1)], ["a red circle", "a blue square"], steps=4, progress=False)
    side = 32 // untrained.vae_factor
    assert inv.latent.shape == (2, 4, side, side) and len(inv.path) == 5
    back = sample_inversion(untrained, inv, progress=False)
    # float32: 2 × 4 multiplications by factors up to 1/√ᾱ_T ≈ 15 and back: a few ulps of the largest value
    assert torch.allclose(back, inv.image_latent, rtol=1e-5, atol=1e-6 * float(inv.image_latent.abs().max()))


def test_null_text_embeddings_are_used_at_their_own_steps_when_sampling_back(model):
    x = image(2)
    inv = null_text_invert(model, x, "a red circle", steps=3, guidance_scale=5.0, inner_steps=2, progress=False)
    empty = model.get_learned_conditioning([""])
    assert len(inv.nulls) == len(sampling_grid(model.alphas_cumprod, 3)[0]) == 4     # compvis: 1000 // 3 → 4 steps
    assert all(n.shape == empty.shape for n in inv.nulls)
    assert all(p.requires_grad for p in model.model.parameters())           # weights left as they were
    back = sample_inversion(model, inv, progress=False)
    # the optimiser's last step ended on a latent whose error it reported; sampling with the embeddings at their
    # steps must retrace it (float32 UNet passes in another batch layout: ~1e-6 relative)
    assert float((back - inv.image_latent).square().mean()) == pytest.approx(inv.losses[-1], rel=1e-3)
    edited = sample_inversion(model, inv, prompt=["a red circle", "a blue circle"], progress=False)
    assert edited.shape == (2, *back.shape[1:])
    # the same prompt in a batch of two: the same latent up to the batch's summation order (~1e-6 relative per
    # UNet pass), amplified by the untrained UNet's gain and 1/√ᾱ_T ≈ 15 over 4 steps (measured 1.3e-5)
    assert float((edited[0] - back[0]).abs().max()) < 1e-4 * float(back.abs().max())


def test_inversion_refuses_sizes_the_unet_cannot_take(model):
    with pytest.raises(ValueError, match="multiples of"):
        ddim_invert(model, image(size=32 + model.vae_factor), "x", steps=2, progress=False)
