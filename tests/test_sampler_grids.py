"""Named σ grids (grid="karras" | "exponential" | "ays" | "fitted" | a list of σ) and DPM-Solver++(3M): parity with
diffusers where it has the same grid or solver, and accuracy against the closed-form probability-flow ODE solution
(tests/gaussian_oracle.py) on problems the fitted grid was not fitted on (benchmarks/fit_sampler_grid.py lists its
training problems: other means, standard deviations, mixtures and seeds)."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from gaussian_oracle import GaussianMixtureOracle, GaussianOracle
from test_samplers import SD, both, noise, rel_diff, run_diffusers

from sdkit.samplers import noise_levels, sample
from sdkit.samplers.grids import AYS_SD1_SIGMAS, FITTED_SD1_SIGMAS, sigma_grid
from sdkit.schedules import sigma_to_t, sigmas_from_alphas_cumprod

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

AC = DDIMScheduler(**SD).alphas_cumprod
TABLE = sigmas_from_alphas_cumprod(AC.double())
SIGMA_MIN, SIGMA_MAX = float(TABLE[0]), float(TABLE[-1])
TOL = 1e-4
AYS_TIMESTEPS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]   # the paper's SD 1.5 schedule, 10 steps


def rel_rms(x, exact):
    return float((x.double() - exact).norm() / exact.norm())


def pf_error(sampler, steps, mean=0.2, std=1.0, seed=0, final="zero", **options):
    """Relative RMS error of ``sampler`` against the exact ODE solution (Gaussian data) from σ_max to the end."""
    oracle = GaussianOracle(AC, mean, std)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = sample(oracle, x_T, AC, sampler, steps, progress=False, final=final, **options)
    assert oracle.calls == steps                                   # NFE = steps for these multistep solvers
    return rel_rms(out, oracle.pf_ode(x_T, SIGMA_MAX, 0.0 if final == "zero" else SIGMA_MIN))


# --------------------------------------------------------------------------- the grids themselves
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_exponential_grid_is_diffusers_exponential_sigmas(steps):
    """Uniform in log σ from σ_max to σ_min, then 0: diffusers' use_exponential_sigmas. The model times are the
    fractional σ→t (diffusers truncates them to integers)."""
    sigmas, ts = sigma_grid(AC, steps, family="dpm", grid="exponential")
    for cls in (UniPCMultistepScheduler, DPMSolverMultistepScheduler):
        sched = cls(**SD, use_exponential_sigmas=True)
        sched.set_timesteps(steps)
        torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=2e-6, atol=0)
        lag = ts - sched.timesteps.double()                       # diffusers truncates σ→t (999 comes out 998)
        assert bool((lag > -1e-6).all() and (lag < 1 + 1e-6).all()), (ts, sched.timesteps)
    lam = -sigmas[:-1].log()
    torch.testing.assert_close(lam.diff(), torch.full((steps - 1,), float(lam[1] - lam[0]), dtype=torch.float64))
    torch.testing.assert_close(sigma_to_t(sigmas[:-1], AC), ts)


def test_ays_grid_is_the_published_schedule():
    """10 steps: the paper's SD 1.5 timesteps (σ at those integer timesteps), then 0; other step counts
    interpolate the 11 published levels in log σ (ComfyUI's AlignYourStepsScheduler) and end at 0."""
    sigmas, ts = sigma_grid(AC, 10, family="dpm", grid="ays")
    torch.testing.assert_close(ts, torch.tensor(AYS_TIMESTEPS, dtype=torch.float64), rtol=0, atol=2e-3)
    torch.testing.assert_close(sigmas[:-1], TABLE[AYS_TIMESTEPS], rtol=1e-5, atol=0)   # published digits
    assert float(sigmas[-1]) == 0.0
    for steps in (4, 20):
        sigmas, _ = sigma_grid(AC, steps, family="dpm", grid="ays")
        levels = np.log(np.array(AYS_SD1_SIGMAS))
        expect = np.exp(np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, 11), levels[::-1]))[::-1][:-1]
        np.testing.assert_allclose(sigmas[:-1].numpy(), expect, rtol=2e-6)
        assert float(sigmas[0]) == pytest.approx(SIGMA_MAX, rel=1e-9) and float(sigmas[-1]) == 0.0


def test_fitted_grid_and_interpolation():
    for steps, stored in FITTED_SD1_SIGMAS.items():
        sigmas, ts = sigma_grid(AC, steps, family="dpm", grid="fitted")
        np.testing.assert_allclose(sigmas[1:-1].numpy(), np.array(stored[1:]), rtol=1e-6)
        assert float(sigmas[0]) == pytest.approx(SIGMA_MAX, rel=1e-9) and len(ts) == steps
    for steps in (3, 7, 14, 30):             # between the fitted counts: decreasing, σ_max first, then 0
        sigmas, ts = sigma_grid(AC, steps, family="dpm", grid="fitted")
        assert len(ts) == steps and bool((sigmas.diff() < 0).all()) and float(sigmas[-1]) == 0.0
        assert float(sigmas[0]) == pytest.approx(SIGMA_MAX, rel=1e-9) and float(sigmas[-2]) >= SIGMA_MIN * 0.999999


def test_named_grids_follow_another_schedule():
    """Stored levels keep their place in [log σ_min, log σ_max] of another schedule (here a linear β schedule)."""
    other = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear").alphas_cumprod
    table = sigmas_from_alphas_cumprod(other.double())
    for grid in ("ays", "fitted", "exponential"):
        ours, _ = sigma_grid(AC, 10, family="dpm", grid=grid)
        theirs, ts = sigma_grid(other, 10, family="dpm", grid=grid)
        frac = lambda s, t: (s[:-1].log() - math.log(t[-1])) / (math.log(t[0]) - math.log(t[-1]))  # noqa: E731
        torch.testing.assert_close(frac(ours, TABLE), frac(theirs, table), rtol=0, atol=1e-6)
        torch.testing.assert_close(sigma_to_t(theirs[:-1], other), ts)


def test_grid_list_and_karras_name():
    """A list of σ is a grid too (one per step); grid='karras' is karras=True."""
    named, _ = sigma_grid(AC, 10, family="dpm", grid="exponential")
    x_T = noise()
    a = sample(GaussianMixtureOracle(AC), x_T, AC, "unipc", 10, progress=False, order=3, grid="exponential")
    b = sample(GaussianMixtureOracle(AC), x_T, AC, "unipc", 10, progress=False, order=3,
               grid=named[:-1].tolist())
    assert torch.equal(a, b)
    a = sample(GaussianMixtureOracle(AC), x_T, AC, "dpmpp_2m", 12, progress=False, karras=True)
    b = sample(GaussianMixtureOracle(AC), x_T, AC, "dpmpp_2m", 12, progress=False, grid="karras")
    assert torch.equal(a, b)


def test_grid_errors_are_clear():
    eps, x = GaussianMixtureOracle(AC), noise()
    with pytest.raises(ValueError, match="last σ .* is the final σ_min: a step of length 0"):
        sample(eps, x, AC, "unipc", 2, grid=[SIGMA_MAX, SIGMA_MIN], final="sigma_min")
    with pytest.raises(ValueError, match="unknown grid 'logsnr'.*exponential"):
        sample(eps, x, AC, "unipc", 10, grid="logsnr")
    with pytest.raises(ValueError, match="karras=True is grid='karras'"):
        sample(eps, x, AC, "dpmpp_2m", 10, karras=True, grid="ays")
    with pytest.raises(ValueError, match="grid lists 3 σ but steps=4"):
        sample(eps, x, AC, "dpmpp_3m", 4, grid=[10.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="decrease strictly and lie in the training range"):
        sample(eps, x, AC, "dpmpp_3m", 3, grid=[20.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="decrease strictly"):
        sample(eps, x, AC, "dpmpp_3m", 3, grid=[1.0, 2.0, 0.1])
    with pytest.raises(ValueError, match="does not take option.*grid"):
        sample(eps, x, AC, "euler", 10, grid="ays")


# --------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("spacing,karras", [("leading", False), ("trailing", False), ("linspace", False),
                                            ("leading", True)])
def test_dpmpp_3m_matches_diffusers(steps, spacing, karras):
    sched = DPMSolverMultistepScheduler(**SD, steps_offset=1, solver_order=3, timestep_spacing=spacing,
                                        use_karras_sigmas=karras)
    ours, theirs = both("dpmpp_3m", sched, steps, spacing=spacing, karras=karras)
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("name,order", [("dpmpp_2m", 2), ("dpmpp_3m", 3)])
def test_ays_grid_matches_diffusers_with_the_papers_timesteps(name, order):
    """DPMSolverMultistepScheduler(timesteps=[999, 850, ..., 24]) — the authors' diffusers recipe — ending at 0."""
    sched = DPMSolverMultistepScheduler(**SD, solver_order=order, final_sigmas_type="zero")
    ours, theirs = both(name, sched, 10, AYS_TIMESTEPS, grid="ays")
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("name,cls", [("unipc", UniPCMultistepScheduler), ("dpmpp_3m", DPMSolverMultistepScheduler)])
def test_third_order_on_exponential_grid_matches_diffusers_arithmetic(name, cls, steps):
    """diffusers' use_exponential_sigmas walks the same σ but calls the model at integer (truncated) timesteps, so the
    solvers are compared on an ε-function that depends on x only: the same σ grid and update formulas give the same
    numbers."""
    def eps_fn(x, t):
        return 0.6 * torch.tanh(1.5 * x) + 0.2 * x
    sched = cls(**SD, solver_order=3, use_exponential_sigmas=True)
    x_T = noise()
    ours = sample(eps_fn, x_T, AC, name, steps, progress=False, order=3, grid="exponential") if name == "unipc" \
        else sample(eps_fn, x_T, AC, name, steps, progress=False, grid="exponential")
    theirs = run_diffusers(sched, eps_fn, x_T, steps)
    assert rel_diff(ours, theirs) < TOL


# --------------------------------------------------------------------------- closed-form accuracy
@pytest.mark.parametrize("grid", ["exponential", "fitted"])
@pytest.mark.parametrize("mean,std,seed", [(0.2, 1.0, 0), (-1.0, 1.0, 5), (1.0, 1.0, 6), (0.2, 1.5, 7),
                                           (0.2, 2.0, 8), (0.0, 3.5, 9)])
def test_unipc3_reaches_5e3_at_10_model_calls(grid, mean, std, seed):
    """The accuracy table's problem (μ = 0.2, s = 1, seed 0) and held-out Gaussians: UniPC-3 at 10 NFE on the
    log-SNR-uniform or the fitted grid is within 5e-3 of the exact ODE solution (the previous best sdkit
    configuration at 10 NFE, LMS, is at 1.1e-2 on the first)."""
    assert pf_error("unipc", 10, mean, std, seed, order=3, grid=grid) < 5e-3


def test_fitted_grid_on_held_out_narrow_data():
    """Narrower data (s = 0.3, 0.5) and a held-out mixture (ODE solved by RK4): the fitted grid keeps UniPC-3 within
    5e-3 where the log-SNR-uniform grid is off by 1e-2 and more."""
    for std in (0.3, 0.5):
        fitted = pf_error("unipc", 10, 0.2, std, 1, order=3, grid="fitted")
        exponential = pf_error("unipc", 10, 0.2, std, 1, order=3, grid="exponential")
        assert fitted < 5e-3 and exponential > 1e-2, (std, fitted, exponential)
    oracle = GaussianMixtureOracle(AC, (0.3, 0.7), (-1.0, 0.8), (0.3, 0.5))
    x_T = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = oracle.pf_ode(x_T, SIGMA_MAX, 0.0)
    errors = {grid: rel_rms(sample(oracle, x_T, AC, "unipc", 10, progress=False, order=3, grid=grid), exact)
              for grid in ("fitted", "exponential")}
    assert errors["fitted"] < 5e-3 and errors["exponential"] > 1e-2, errors


@pytest.mark.parametrize("name,options", [("unipc", {"order": 3}), ("dpmpp_3m", {})])
def test_convergence_on_exponential_grid(name, options):
    """Against the exact solution at σ_min (no jump to 0) the error falls at least 3.5× per doubling of the steps
    from 20 to 80: second order at least. (Both start at orders 1 and 2, which bounds a multistep method's global
    order by 2 as the steps shrink; the third order is what makes them accurate at 10-20 steps.)"""
    errors = [pf_error(name, steps, final="sigma_min", grid="exponential", **options) for steps in (20, 40, 80)]
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors


def test_start_step_on_a_named_grid():
    """img2img: noise_levels knows the grid. Started at step k from the exact ODE state at noise_levels[k], the sampler
    walks the rest of the same grid (the same as a grid listing those σ), its first model call is at that level's
    timestep, and its result is close to the exact x₀."""
    oracle = GaussianOracle(AC, 0.2, 1.0)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    levels = noise_levels("unipc", AC, 10, grid="fitted")
    sigmas, ts = sigma_grid(AC, 10, family="dpm", grid="fitted")
    torch.testing.assert_close(levels, 1 / (1 + sigmas[:-1] ** 2))
    k = 3
    start = oracle.pf_ode(x_T, SIGMA_MAX, math.sqrt(1 / float(levels[k]) - 1))
    out = sample(oracle, start, AC, "unipc", 10, progress=False, order=3, grid="fitted", start_step=k)
    assert oracle.timesteps[0] == pytest.approx(float(ts[k])) and oracle.calls == 10 - k
    tail = sample(oracle, start, AC, "unipc", 10 - k, progress=False, order=3, grid=sigmas[k:-1].tolist())
    assert torch.equal(out, tail)
    assert rel_rms(out, oracle.pf_ode(x_T, SIGMA_MAX, 0.0)) < 1e-2


@pytest.mark.parametrize("grid", ["exponential", "ays", "fitted"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"])
@pytest.mark.parametrize("start_step", [0, 4])
def test_first_model_call_is_at_the_level_noise_levels_reports(grid, name, start_step):
    """For every sampler that takes a grid: started at step k, the first model call sees the x it was given at a
    timestep whose σ is noise_levels(…)[k]'s (these grids call the model at fractional σ→t, so exactly)."""
    calls = []

    def eps_fn(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.zeros_like(x)
    levels = noise_levels(name, AC, 10, grid=grid)
    a = float(levels[start_step])
    x_start = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample(eps_fn, x_start, AC, name, 10, grid=grid, start_step=start_step, progress=False,
           generator=torch.Generator().manual_seed(1))
    x, t = calls[0]
    torch.testing.assert_close(x, x_start)
    sigma = float(GaussianOracle(AC, 0.0, 1.0).sigma_at(t)[0])
    assert 1 / (1 + sigma ** 2) == pytest.approx(a, rel=1e-9)
    assert len(calls) == 10 - start_step and bool((levels[1:] > levels[:-1]).all())


def test_mixture_oracle_ode_solution_is_exact_for_one_component():
    """The mixture oracle's numerical ODE solution (RK4 in log σ) against the Gaussian closed form."""
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for end in (0.0, SIGMA_MIN, 1.0):
        numeric = GaussianMixtureOracle(AC, (1.0,), (0.3,), (0.8,)).pf_ode(x_T, SIGMA_MAX, end)
        exact = GaussianOracle(AC, 0.3, 0.8).pf_ode(x_T, SIGMA_MAX, end)
        assert rel_rms(numeric, exact) < 1e-8
