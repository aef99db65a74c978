"""The lcm sampler against diffusers' LCMScheduler (the test oracle): same ε-function, same x_T, same noise seed.

Tolerance: both compute in float32 tensors from the same float32 ᾱ (sdkit forms each step's coefficients in
float64 and rounds once, diffusers forms them in float32: a few ulps, ~1e-7 relative, apart per coefficient). Each
step multiplies that by the ε-function's gain (the Gaussian-mixture oracle's Jacobian is O(1)) and, from the second
step on, the difference is re-noised at a lower level, so after ≤ 50 steps it stays near 1e-6 of the sample's
scale; 1e-5 leaves a margin of about 10 on any x86-64 CPU and thread count.
"""
import math

import pytest
import torch
from diffusers import LCMScheduler
from gaussian_oracle import GaussianMixtureOracle

from sdkit.samplers import noise_levels, sample
from sdkit.samplers.lcm import boundary_scalings, lcm_timesteps

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SHAPE = (2, 4, 8, 8)
TOL = 1e-5


def scheduler(**kw):
    # set_alpha_to_one: the final ᾱ is used only when a step's next timestep is negative, which never happens on
    # LCM grids; clip_sample off: sdkit's samplers do not clip x̂₀ (a latent is not in [-1, 1])
    return LCMScheduler(**SD, clip_sample=False, **kw)


AC = scheduler().alphas_cumprod


def diffusers_lcm(sched, eps_fn, x_T, steps=None, seed=0, **set_kw):
    """The LatentConsistencyModelPipeline loop: eps at each timestep, step with the generator, prev_sample on."""
    sched.set_timesteps(steps, **set_kw)
    generator, x = torch.Generator().manual_seed(seed), x_T.clone()
    for t in sched.timesteps:
        x = sched.step(eps_fn(x, t.float().expand(x.shape[0])), t, x, generator=generator).prev_sample
    return x, sched.timesteps


def rel_diff(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_matches_diffusers_lcm_scheduler(steps):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ours = sample(GaussianMixtureOracle(AC), x_T, AC, "lcm", steps, progress=False,
                  generator=torch.Generator().manual_seed(0))
    theirs, ts = diffusers_lcm(scheduler(), GaussianMixtureOracle(AC), x_T, steps, seed=0)
    assert lcm_timesteps(steps).tolist() == ts.tolist()
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("original,steps", [(25, 4), (100, 6)])
def test_lcm_original_inference_steps_and_scaling_match_diffusers(original, steps):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ours = sample(GaussianMixtureOracle(AC), x_T, AC, "lcm", steps, progress=False, original_inference_steps=original,
                  timestep_scaling=1.0, generator=torch.Generator().manual_seed(5))
    theirs, ts = diffusers_lcm(scheduler(original_inference_steps=original, timestep_scaling=1.0),
                               GaussianMixtureOracle(AC), x_T, steps, seed=5)
    assert lcm_timesteps(steps, original_inference_steps=original).tolist() == ts.tolist()
    assert rel_diff(ours, theirs) < TOL


def test_lcm_custom_timesteps_match_diffusers():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    custom = [999, 679, 379, 119]
    ours = sample(GaussianMixtureOracle(AC), x_T, AC, "lcm", 4, progress=False, timesteps=custom,
                  generator=torch.Generator().manual_seed(1))
    theirs, _ = diffusers_lcm(scheduler(), GaussianMixtureOracle(AC), x_T, None, seed=1, timesteps=custom)
    assert rel_diff(ours, theirs) < TOL


def test_lcm_grid_and_boundary_condition_facts():
    """The published grid (4 steps: 999, 759, 499, 259) and f(x, 0) = x; at t = 19 f is x̂₀ to 4e-6."""
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(1).tolist() == [999]
    assert lcm_timesteps(50).tolist() == list(range(999, 0, -20))
    assert boundary_scalings(0.0) == (1.0, 0.0)
    c_skip, c_out = boundary_scalings(19.0)
    assert c_skip == pytest.approx(0.25 / (190 ** 2 + 0.25)) and abs(1 - c_out) < 4e-6
    levels = noise_levels("lcm", AC, 4)
    assert torch.equal(levels, AC.double()[[999, 759, 499, 259]])


def test_lcm_one_step_is_the_consistency_function_and_the_noise_is_the_generators():
    """1 step = f(x_T, 999) (no noise drawn); 2 steps re-noise f's output with the generator's first draw."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    eps_fn = GaussianMixtureOracle(AC)
    a = AC.double()
    t = torch.full((SHAPE[0],), 999.0)
    c_skip, c_out = boundary_scalings(999.0)
    f = c_out * (x_T - math.sqrt(1 - a[999]) * eps_fn(x_T, t)) / math.sqrt(a[999]) + c_skip * x_T
    one = sample(eps_fn, x_T, AC, "lcm", 1, progress=False)
    assert rel_diff(one, f) < TOL
    seen = []
    sample(eps_fn, x_T, AC, "lcm", 2, progress=False, generator=torch.Generator().manual_seed(9),
           callback=lambda i, n, x, x0: seen.append(x))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    expected = math.sqrt(a[499]) * f + math.sqrt(1 - a[499]) * z
    assert rel_diff(seen[0], expected) < TOL


def test_lcm_errors_are_clear():
    eps, x = GaussianMixtureOracle(AC), torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="at most original_inference_steps=50"):
        sample(eps, x, AC, "lcm", 51, progress=False)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(eps, x, AC, "lcm", 2, progress=False, timesteps=[259, 999])
    with pytest.raises(ValueError, match="does not take option.*eta|no eta"):
        sample(eps, x, AC, "lcm", 4, progress=False, eta=0.5)
