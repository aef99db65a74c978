"""Samplers: parity with diffusers' schedulers on the same ε-function, CompVis facts, the closed-form ODE solution,
callbacks, determinism and error messages.

The ε-function is a closed-form ideal denoiser (tests/gaussian_oracle.py), so runs are cheap and exact. diffusers is
driven with the loop its pipelines use; for σ-space schedulers it starts from x_T·√(1+σ_max²), sdkit's convention
(diffusers' own init_noise_sigma is σ_max for linspace/trailing spacings, √(1+σ_max²) for SD's leading spacing).
"""
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
from gaussian_oracle import GaussianMixtureOracle, GaussianOracle

from sdkit.samplers import SAMPLERS, DDIMSampler, DPMSolverSampler, PLMSSampler, cfg_eps_fn, sample
from sdkit.schedules import timesteps as sd_timesteps

# diffusers' own warnings (numpy-2 np.array on tensors, its deprecated noise-prediction DPM-Solver) are not ours
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
AC = DDIMScheduler(**SD).alphas_cumprod  # diffusers' float32 ᾱ; both libraries get the same schedule
SHAPE = (2, 4, 8, 8)
TOL = 1e-4


def noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def rel_diff(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run_diffusers(scheduler, eps_fn, x_T, steps=None, timesteps=None, generator=None, **step_kwargs):
    """The diffusers pipeline loop; σ-space schedulers start from x_T·√(1+σ_max²)."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(steps)
    sigma_space = float(scheduler.init_noise_sigma) != 1.0
    x = x_T * math.sqrt(1 + float(scheduler.sigmas.max()) ** 2) if sigma_space else x_T.clone()
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        eps = eps_fn(model_in, t.float().expand(x.shape[0]))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def both(name, scheduler, steps, diffusers_timesteps=None, seed=None, **options):
    """(sdkit, diffusers) final samples for the same ε-function and x_T (and the same noise seed)."""
    x_T = noise()
    gen = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    ours = sample(GaussianMixtureOracle(AC), x_T, AC, name, steps, progress=False, generator=gen(),
                  **options)
    theirs = run_diffusers(scheduler, GaussianMixtureOracle(AC), x_T, steps, diffusers_timesteps, gen())
    return ours, theirs


# --------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("spacing", ["compvis", "leading", "trailing"])
def test_ddim_matches_diffusers(steps, eta, spacing):
    sched = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                          timestep_spacing="leading" if spacing == "compvis" else spacing)
    x_T = noise()
    ours = sample(GaussianMixtureOracle(AC), x_T, AC, "ddim", steps, eta=eta, spacing=spacing,
                  generator=torch.Generator().manual_seed(5), progress=False)
    theirs = run_diffusers(sched, GaussianMixtureOracle(AC), x_T, steps, eta=eta,
                           generator=torch.Generator().manual_seed(5))
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_plms_matches_diffusers_pndm(steps):
    sched = PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    x_T, ours_eps, theirs_eps = noise(), GaussianMixtureOracle(AC), GaussianMixtureOracle(AC)
    ours = sample(ours_eps, x_T, AC, "plms", steps, progress=False)
    theirs = run_diffusers(sched, theirs_eps, x_T, steps)
    assert rel_diff(ours, theirs) < TOL
    assert ours_eps.calls == theirs_eps.calls == steps + 1  # pseudo improved Euler: 2 calls in the first step


def test_ddpm_matches_diffusers():
    steps = 50
    sched = DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small")
    grid = sd_timesteps(steps, "compvis")[::-1]
    ours, theirs = both("ddpm", sched, steps, diffusers_timesteps=grid, seed=3)
    assert rel_diff(ours, theirs) < TOL


DPM_SPACINGS = [("compvis", False), ("leading", False), ("trailing", False), ("linspace", False), ("leading", True)]


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("spacing,karras", DPM_SPACINGS)
def test_dpmpp_2m_matches_diffusers(steps, spacing, karras):
    sched = DPMSolverMultistepScheduler(**SD, steps_offset=1, use_karras_sigmas=karras,
                                        timestep_spacing="leading" if spacing == "compvis" else spacing)
    grid = sd_timesteps(steps, "compvis")[::-1] if spacing == "compvis" and not karras else None
    ours, theirs = both("dpmpp_2m", sched, steps, grid, spacing=spacing, karras=karras)
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_sde_matches_diffusers_with_same_noise(steps, karras):
    sched = DPMSolverMultistepScheduler(**SD, steps_offset=1, timestep_spacing="leading",
                                        algorithm_type="sde-dpmsolver++", use_karras_sigmas=karras)
    ours, theirs = both("dpmpp_2m_sde", sched, steps, seed=11, spacing="leading", karras=karras)
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("algorithm,solver_type", [("dpmsolver++", "dpm_solver"), ("dpmsolver++", "taylor"),
                                                   ("dpmsolver", "dpm_solver")])
def test_dpm_solver_order3_diffusers_discretisation(steps, algorithm, solver_type):
    """3M with lower_order_final: the 2nd-to-last step is 2nd order below 15 steps (diffusers and DPM-Solver)."""
    sched = DPMSolverMultistepScheduler(**SD, steps_offset=1, timestep_spacing="leading", solver_order=3,
                                        algorithm_type=algorithm,
                                        solver_type="midpoint" if solver_type == "dpm_solver" else "heun",
                                        final_sigmas_type="zero" if algorithm == "dpmsolver++" else "sigma_min")
    name = "dpm_solver++" if algorithm == "dpmsolver++" else "dpm_solver"
    ours, theirs = both(name, sched, steps, order=3, method="multistep", solver_type=solver_type,
                        discretization="diffusers", spacing="leading")
    assert rel_diff(ours, theirs) < TOL


K_SPACINGS = [("leading", False), ("trailing", False), ("linspace", False), ("leading", True), ("linspace", True)]


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("spacing,karras", K_SPACINGS)
@pytest.mark.parametrize("name,scheduler_cls", [("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler),
                                                ("lms", LMSDiscreteScheduler)])
def test_k_samplers_match_diffusers(name, scheduler_cls, steps, spacing, karras):
    sched = scheduler_cls(**SD, steps_offset=1, timestep_spacing=spacing, use_karras_sigmas=karras)
    ours, theirs = both(name, sched, steps, spacing=spacing, karras=karras)
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "euler_a"])
def test_compvis_spacing_equals_leading_when_steps_divide_1000(name):
    """sdkit's default spacing is CompVis'; for 1000/steps whole it is diffusers' leading (steps_offset=1)."""
    kw = dict(progress=False)
    a = sample(GaussianMixtureOracle(AC), noise(), AC, name, 20, spacing="compvis",
               generator=torch.Generator().manual_seed(1), **kw)
    b = sample(GaussianMixtureOracle(AC), noise(), AC, name, 20, spacing="leading",
               generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_euler_ancestral_matches_diffusers_with_same_noise(steps):
    sched = EulerAncestralDiscreteScheduler(**SD, steps_offset=1, timestep_spacing="leading")
    ours, theirs = both("euler_a", sched, steps, seed=7, spacing="leading")
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("spacing,karras", [("leading", False), ("trailing", False), ("linspace", False),
                                            ("leading", True)])
def test_unipc_matches_diffusers(steps, spacing, karras):
    sched = UniPCMultistepScheduler(**SD, steps_offset=1, timestep_spacing=spacing, use_karras_sigmas=karras)
    ours, theirs = both("unipc", sched, steps, spacing=spacing, karras=karras)
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("order,solver_type,final", [(3, "bh1", "sigma_min"), (2, "bh1", "sigma_min"),
                                                     (1, "bh2", "zero"), (3, "bh2", "zero"), (2, "bh2", "sigma_min")])
def test_unipc_orders_and_variants_match_diffusers(order, solver_type, final):
    # (diffusers' bh1 returns NaN when the last σ is 0: B(h) = h is infinite there, so bh1 is tested with σ_min)
    sched = UniPCMultistepScheduler(**SD, steps_offset=1, timestep_spacing="leading", solver_order=order,
                                    solver_type=solver_type, final_sigmas_type=final)
    ours, theirs = both("unipc", sched, 20, spacing="leading", order=order, solver_type=solver_type, final=final)
    assert rel_diff(ours, theirs) < TOL


# DPM-Solver library discretisation (CompVis): with time_uniform and 999/steps whole, every model time is an
# integer, so diffusers with those timesteps and a final σ_min solves the very same problem.
def _library_grid(steps):
    return [999 - k * 999 // steps for k in range(steps)]


@pytest.mark.parametrize("steps", [9, 27])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", ["dpm_solver++", "dpm_solver"])
def test_dpm_solver_library_multistep_matches_diffusers(name, order, steps):
    algorithm = "dpmsolver++" if name == "dpm_solver++" else "dpmsolver"
    sched = DPMSolverMultistepScheduler(**SD, solver_order=order, algorithm_type=algorithm,
                                        final_sigmas_type="sigma_min")
    ours, theirs = both(name, sched, steps, _library_grid(steps), order=order, method="multistep")
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("steps,order,solver_type", [(9, 2, "dpm_solver"), (9, 2, "taylor"), (9, 3, "taylor"),
                                                     (27, 3, "taylor")])
@pytest.mark.parametrize("name", ["dpm_solver++", "dpm_solver"])
def test_dpm_solver_library_singlestep_matches_diffusers(name, steps, order, solver_type):
    sched = DPMSolverSinglestepScheduler(**SD, solver_order=order, final_sigmas_type="sigma_min",
                                         lower_order_final=True,
                                         algorithm_type="dpmsolver++" if name == "dpm_solver++" else "dpmsolver",
                                         solver_type="midpoint" if solver_type == "dpm_solver" else "heun")
    ours, theirs = both(name, sched, steps, _library_grid(steps), order=order, method="singlestep",
                        solver_type=solver_type)
    assert rel_diff(ours, theirs) < TOL


# --------------------------------------------------------------------------- closed-form accuracy
def test_deterministic_samplers_converge_to_the_exact_ode_solution():
    """Gaussian data: the probability-flow ODE has a closed form. From x_T at t = 999 every deterministic sampler
    converges to it (error within 1 % at 200 steps, 5× smaller than at 20), and the 4th-order multistep ones
    (LMS, PLMS) are within 1e-4. (The step onto σ = 0 dominates the error of most samplers: benchmarks/.)"""
    oracle = GaussianOracle(AC, mean=0.2, std=1.0)
    x_T = noise()
    sig = ((1 - AC.double()) / AC.double()).sqrt()
    sigma_max, sigma_min = float(sig[-1]), float(sig[0])
    errors = {}
    for name, sigma_end in [("ddim", sigma_min), ("plms", sigma_min), ("euler", 0.0), ("heun", 0.0), ("lms", 0.0),
                            ("dpmpp_2m", 0.0), ("unipc", 0.0), ("dpm_solver++", sigma_min),
                            ("dpm_solver", sigma_min)]:
        exact = oracle.pf_ode(x_T, sigma_max, sigma_end)
        spacing = {} if name.startswith("dpm_solver") else {"spacing": "trailing"}
        errors[name] = [rel_diff(sample(oracle, x_T, AC, name, steps, progress=False, **spacing), exact)
                        for steps in (20, 200)]
    for name, (coarse, fine) in errors.items():
        assert fine < 1e-2 and fine < coarse / 5, (name, coarse, fine)
    assert errors["lms"][1] < 1e-4 and errors["plms"][1] < 1e-4, errors


def test_oracle_pf_ode_is_the_ode_solution():
    """The closed form agrees with a fine numerical integration (RK4 in σ, 2000 log-spaced steps)."""
    oracle = GaussianOracle(AC, mean=torch.tensor([0.5, -0.2]).reshape(2, 1, 1), std=0.7)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 14.0
    sigmas = torch.logspace(math.log10(14.0), math.log10(0.02), 2001, dtype=torch.float64)

    def f(x, s):
        return (x - oracle.denoise(x, torch.tensor(s, dtype=torch.float64))) / s
    y = x.clone()
    for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        h = b - a
        k1 = f(y, a)
        k2 = f(y + h / 2 * k1, a + h / 2)
        k3 = f(y + h / 2 * k2, a + h / 2)
        k4 = f(y + h * k3, b)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert rel_diff(y, oracle.pf_ode(x, 14.0, 0.02, vp=False)) < 1e-8


# --------------------------------------------------------------------------- CompVis facts and classes
class FakeLDM(torch.nn.Module):
    """The LatentDiffusion interface the CompVis samplers use, with a closed-form ε plus a conditioning term."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("alphas_cumprod", AC.clone())
        self.num_timesteps = 1000
        self.parameterization = "eps"
        self.oracle = GaussianMixtureOracle(AC)
        self.batches = []

    def apply_model(self, x, t, c):
        self.batches.append(x.shape[0])
        return self.oracle(x, t.float()) + 0.1 * c.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def _conds(batch=2):
    g = torch.Generator().manual_seed(9)
    return torch.randn(batch, 3, 8, generator=g), torch.randn(batch, 3, 8, generator=g)


def _guided_eps(model, cond, uncond, scale):
    def eps(x, t):
        e_u, e_c = model.apply_model(x, t, uncond), model.apply_model(x, t, cond)
        return e_u + scale * (e_c - e_u)
    return eps


def test_compvis_ddim_schedule_facts():
    sampler = DDIMSampler(FakeLDM())
    sampler.make_schedule(50, verbose=False)
    assert sampler.ddim_timesteps.tolist() == list(range(1, 1000, 20))
    assert float(sampler.ddim_alphas_prev[0]) == pytest.approx(float(AC[0]))  # ᾱ₀, not 1
    assert torch.allclose(sampler.ddim_alphas_prev[1:], AC[sampler.ddim_timesteps[:-1]])
    sampler.make_schedule(15, verbose=False)
    assert len(sampler.ddim_timesteps) == 16 and sampler.ddim_timesteps[-1] == 991


def test_compvis_ddim_sampler_with_guidance_matches_diffusers():
    model, (cond, uncond) = FakeLDM(), _conds()
    x_T = noise()
    samples, inter = DDIMSampler(model).sample(50, 2, SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                                               unconditional_guidance_scale=7.5, unconditional_conditioning=uncond)
    assert set(model.batches) == {4}  # one batched pass over cat([uncond, cond]) per step
    sched = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    theirs = run_diffusers(sched, _guided_eps(model, cond, uncond, 7.5), x_T, 50)
    assert rel_diff(samples, theirs) < TOL
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 3  # x_T, index 49, index 0 (log_every_t = 100)


def test_compvis_plms_sampler_nfe_and_eta():
    model, (cond, uncond) = FakeLDM(), _conds()
    sampler = PLMSSampler(model)
    out, _ = sampler.sample(20, 2, SHAPE[1:], conditioning=cond, x_T=noise(), verbose=False,
                            unconditional_guidance_scale=3.0, unconditional_conditioning=uncond)
    assert len(model.batches) == 21  # NFE = S + 1
    theirs = run_diffusers(PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
                           _guided_eps(FakeLDM(), cond, uncond, 3.0), noise(), 20)
    assert rel_diff(out, theirs) < TOL
    with pytest.raises(ValueError, match="eta"):
        sampler.sample(20, 2, SHAPE[1:], conditioning=cond, eta=0.5, verbose=False)


def test_compvis_dpm_solver_sampler():
    """DPM-Solver++(2M), time-uniform, NFE = S; at S = 9 every model time is an integer, so diffusers with those
    timesteps (final σ_min, lower_order_final below 15 steps) is an exact reference."""
    model, (cond, uncond) = FakeLDM(), _conds()
    x, none = DPMSolverSampler(model).sample(9, 2, SHAPE[1:], conditioning=cond, x_T=noise(), verbose=False,
                                             unconditional_guidance_scale=5.0, unconditional_conditioning=uncond)
    assert none is None and len(model.batches) == 9
    sched = DPMSolverMultistepScheduler(**SD, final_sigmas_type="sigma_min")
    theirs = run_diffusers(sched, _guided_eps(FakeLDM(), cond, uncond, 5.0), noise(), timesteps=_library_grid(9))
    assert rel_diff(x, theirs) < TOL


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_compvis_img2img_matches_diffusers(strength):
    """stochastic_encode + decode noise to the level of the first denoising step (diffusers img2img does the
    same); CompVis noised one step further and failed at strength 1."""
    model, (cond, _) = FakeLDM(), _conds()
    init, z = noise(1), noise(2)
    sampler = DDIMSampler(model)
    sampler.make_schedule(50, verbose=False)
    t_enc = int(strength * 50)
    z_enc = sampler.stochastic_encode(init, torch.tensor([t_enc] * 2), noise=z)
    ours = sampler.decode(z_enc, cond, t_enc)
    sched = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(50)
    start = sched.timesteps[50 - t_enc:]
    x = sched.add_noise(init, z, start[:1])
    for t in start:
        x = sched.step(model.apply_model(x, t.expand(2), cond), t, x).prev_sample
    assert rel_diff(ours, x) < TOL
    assert torch.equal(sampler.stochastic_encode(init, 0, noise=z), init)


def test_compvis_ddim_inpainting_blend_matches_diffusers():
    """mask = 1 keeps x0 noised to the current level before every step (CompVis DDIM's mask/x0 option)."""
    model, (cond, _) = FakeLDM(), _conds()
    x0, x_T = noise(3), noise()
    mask = torch.zeros(SHAPE)
    mask[..., :4] = 1.0
    ours, _ = DDIMSampler(model).sample(20, 2, SHAPE[1:], conditioning=cond, x_T=x_T, mask=mask, x0=x0,
                                        verbose=False, generator=torch.Generator().manual_seed(4))
    sched = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(20)
    gen, x = torch.Generator().manual_seed(4), x_T.clone()
    for t in sched.timesteps:
        known = sched.add_noise(x0, torch.randn(SHAPE, generator=gen), t.reshape(1))
        x = known * mask + (1 - mask) * x
        x = sched.step(model.apply_model(x, t.expand(2), cond), t, x).prev_sample
    assert rel_diff(ours, x) < TOL


def test_compvis_samplers_accept_x0_parameterised_models():
    eps_model, x0_model, (cond, _) = FakeLDM(), FakeLDM(), _conds()
    x0_model.parameterization = "x0"
    ac = AC.double()

    def predict_x0(x, t, c):  # the same model, answering with x̂₀ = (x − √(1−ᾱ) ε)/√ᾱ
        a = ac[t.long()].reshape(-1, 1, 1, 1)
        return ((x.double() - (1 - a).sqrt() * eps_model.apply_model(x, t, c).double()) / a.sqrt()).float()
    x0_model.apply_model = predict_x0
    a, _ = DDIMSampler(eps_model).sample(20, 2, SHAPE[1:], conditioning=cond, x_T=noise(), verbose=False)
    b, _ = DDIMSampler(x0_model).sample(20, 2, SHAPE[1:], conditioning=cond, x_T=noise(), verbose=False)
    assert rel_diff(b, a) < TOL


def test_cfg_eps_fn():
    calls = []

    def model_eps(x, t, c):
        calls.append(x.shape[0])
        value = c["c_crossattn"][0].mean(dim=(1, 2)) + c["c_concat"][0].mean(dim=(1, 2, 3))
        return x * 0 + value.reshape(-1, 1, 1, 1)

    x, t = noise(), torch.full((2,), 500.0)
    cond = {"c_crossattn": [torch.ones(2, 3, 8)], "c_concat": [torch.full((2, 1, 8, 8), 2.0)]}
    uncond = {"c_crossattn": [torch.zeros(2, 3, 8)], "c_concat": [torch.full((2, 1, 8, 8), 2.0)]}
    out = cfg_eps_fn(model_eps, cond, uncond, 7.5)(x, t)
    assert calls == [4] and torch.allclose(out, torch.full_like(x, 2.0 + 7.5 * 1.0))
    calls.clear()
    assert torch.allclose(cfg_eps_fn(model_eps, cond, uncond, 1.0)(x, t), torch.full_like(x, 3.0))
    assert torch.allclose(cfg_eps_fn(model_eps, cond, None, 7.5)(x, t), torch.full_like(x, 3.0))
    assert calls == [2, 2]  # scale 1 or no uncond: a single unguided pass
    with pytest.raises(ValueError, match="batch size"):
        cfg_eps_fn(model_eps, cond, uncond, 7.5)(noise()[:1], t[:1])


# --------------------------------------------------------------------------- callbacks, determinism, errors
def test_callback_receives_x0_every_step():
    """The callback gets (i, total, x, x̂₀) after every step; x̂₀ is diffusers' pred_original_sample."""
    x_T, seen = noise(), []
    out = sample(GaussianMixtureOracle(AC), x_T, AC, "ddim", 20, progress=False,
                 callback=lambda i, n, x, x0: seen.append((i, n, x.clone(), x0.clone())))
    sched = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(20)
    oracle, x = GaussianMixtureOracle(AC), x_T.clone()
    for k, t in enumerate(sched.timesteps):
        step = sched.step(oracle(x, t.float().expand(2)), t, x)
        x = step.prev_sample
        assert seen[k][:2] == (k, 20)
        assert rel_diff(seen[k][3], step.pred_original_sample) < TOL
    assert torch.equal(seen[-1][2], out)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_reports_each_step(name):
    seen = []
    out = sample(GaussianMixtureOracle(AC), noise(), AC, name, 10, progress=False,
                 generator=torch.Generator().manual_seed(0), callback=lambda i, n, x, x0: seen.append((i, n, x)))
    assert [s[0] for s in seen] == list(range(seen[0][1])) and len(seen) == seen[0][1]
    assert torch.allclose(seen[-1][2], out) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,options", [("ddim", {"eta": 1.0}), ("euler_a", {}), ("dpmpp_2m_sde", {}),
                                          ("ddpm", {})])
def test_generator_determinism(name, options):
    def run(seed):
        return sample(GaussianMixtureOracle(AC), noise(), AC, name, 10, progress=False,
                      generator=torch.Generator().manual_seed(seed), **options)
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_progress_bar(capsys):
    sample(GaussianMixtureOracle(AC), noise(), AC, "euler", 5)
    assert "euler" in capsys.readouterr().err
    sample(GaussianMixtureOracle(AC), noise(), AC, "euler", 5, progress=False)
    assert capsys.readouterr().err == ""


def test_errors_are_clear():
    eps, x = GaussianMixtureOracle(AC), noise()
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'.*dpmpp_2m"):
        sample(eps, x, AC, "dpm++")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(eps, x, AC, "euler", 0)
    with pytest.raises(ValueError, match="does not take option.*warp"):
        sample(eps, x, AC, "euler", 5, warp=3)
    with pytest.raises(ValueError, match="no eta"):
        sample(eps, x, AC, "heun", 5, eta=0.5)
    with pytest.raises(ValueError, match="eta must be 0"):
        sample(eps, x, AC, "plms", 5, eta=0.5)
    with pytest.raises(ValueError, match="unknown spacing"):
        sample(eps, x, AC, "euler", 5, spacing="quadratic")
    with pytest.raises(ValueError, match="same shape"):
        sample(lambda x, t: x[:, :2], x, AC, "ddim", 5, progress=False)

    def overflowing(x, t):
        return eps(x, t) * (float("nan") if t[0] < 500 else 1.0)
    with pytest.raises(FloatingPointError, match=r"step \d+ of 20.*eps_fn returned NaN/inf") as error:
        sample(overflowing, x, AC, "dpmpp_2m", 20, progress=False)
    assert "float16" not in str(error.value)     # a float32 sample: no half-precision hint
    with pytest.raises(FloatingPointError, match=r"step \d+ of 20.*torch.float16: run in float32"):
        sample(lambda x, t: overflowing(x.float(), t).half(), x.half(), AC, "ddim", 20, progress=False)
