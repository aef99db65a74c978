"""Beta schedules, schedule buffers and timestep spacings against diffusers and closed forms."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sdkit.schedules import (karras_sigmas, make_beta_schedule, schedule_buffers, sd_v1_alphas_cumprod,
                             sigma_to_t, sigmas_from_alphas_cumprod, timesteps)


def test_sd_v1_linear_schedule_is_diffusers_scaled_linear():
    ours = torch.tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012), dtype=torch.float32)
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").betas
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
    # the numbers quoted for SD v1: ᾱ₀ = 0.99915, ᾱ₉₉₉ ≈ 0.0046601, σ from 0.02917 to 14.6146
    ac = sd_v1_alphas_cumprod()
    assert ac[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)
    assert ac[-1].item() == pytest.approx(0.0046601, rel=1e-4)
    sig = sigmas_from_alphas_cumprod(ac)
    assert sig[0].item() == pytest.approx(0.02917, rel=1e-3) and sig[-1].item() == pytest.approx(14.6146, rel=1e-4)


def test_sqrt_linear_is_plain_linear_and_sqrt_is_its_root():
    ref = DDPMScheduler(beta_start=1e-4, beta_end=2e-2, beta_schedule="linear").betas
    torch.testing.assert_close(torch.tensor(make_beta_schedule("sqrt_linear"), dtype=torch.float32), ref)
    np.testing.assert_allclose(make_beta_schedule("sqrt"), np.linspace(1e-4, 2e-2, 1000) ** 0.5)


def test_cosine_matches_diffusers_squaredcos_cap_v2():
    # CompVis normalises ᾱ by ᾱ(0); the ratio ᾱ(t+1)/ᾱ(t) is unchanged, so the betas are the same as diffusers'.
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas
    torch.testing.assert_close(torch.tensor(make_beta_schedule("cosine"), dtype=torch.float32), ref,
                               rtol=1e-5, atol=1e-7)


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="linear.*cosine"):
        make_beta_schedule("quadratic")


def test_schedule_buffers_closed_forms():
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    b = schedule_buffers(betas)
    ac = np.cumprod(1 - betas)
    prev = np.concatenate([[1.0], ac[:-1]])
    np.testing.assert_allclose(b["alphas_cumprod_prev"].numpy(), prev, rtol=1e-6)
    var = betas * (1 - prev) / (1 - ac)
    np.testing.assert_allclose(b["posterior_variance"].numpy(), var, rtol=1e-5)
    # q(x_{t-1}|x_t,x0) mean coefficients: Ho et al. (2020), eq. 7
    np.testing.assert_allclose(b["posterior_mean_coef1"].numpy(), np.sqrt(prev) * betas / (1 - ac), rtol=1e-5)
    np.testing.assert_allclose(b["posterior_mean_coef2"].numpy(), np.sqrt(1 - betas) * (1 - prev) / (1 - ac),
                               rtol=1e-5)
    assert b["posterior_log_variance_clipped"][0].item() == pytest.approx(math.log(1e-20))
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in b.values())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 20, 50, 7])
def test_spacings_match_diffusers(spacing, steps):
    s = DDIMScheduler(steps_offset=1 if spacing == "leading" else 0, timestep_spacing=spacing)
    s.set_timesteps(steps)
    np.testing.assert_array_equal(timesteps(steps, spacing)[::-1], s.timesteps.numpy())


def test_compvis_spacing_keeps_its_plus_one_and_extra_steps():
    np.testing.assert_array_equal(timesteps(50, "compvis"), np.arange(1, 1000, 20))
    assert len(timesteps(15, "compvis")) == 16 and timesteps(15, "compvis")[-1] == 991


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="positive integer"):
        timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        timesteps(10, "uniform")


def test_karras_sigmas_endpoints_and_rho():
    s = karras_sigmas(10, 0.03, 14.6, rho=7.0)
    assert s[0].item() == pytest.approx(14.6) and s[-1].item() == pytest.approx(0.03)
    # equally spaced in σ^(1/ρ)
    d = np.diff(s.numpy() ** (1 / 7))
    np.testing.assert_allclose(d, d[0], rtol=1e-9)


def test_sigma_to_t_inverts_the_training_sigmas():
    ac = sd_v1_alphas_cumprod()
    sig = sigmas_from_alphas_cumprod(ac)
    t = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(sigma_to_t(sig[t], ac), t.double(), atol=1e-4, rtol=0)
