"""CompVis ``ldm`` sampler classes (``DDIMSampler``, ``PLMSSampler``, ``DPMSolverSampler``) over a LatentDiffusion
model: the same constructors, ``make_schedule`` / ``sample`` signatures and return values, as thin adapters over the
model-agnostic samplers. Unlike CompVis they run on any device (buffers live on the model's device), take a
``generator``, and ``stochastic_encode``/``decode`` agree on the noise level (no img2img off-by-one, strength 1 works).
"""
from __future__ import annotations

import numpy as np
import torch

from .ddim import ddim_alphas, ddim_sigmas, sample_ddim
from .dpm_solver import sample_dpm_solver_pp
from .denoisers import batch_size_of, denoiser
from .plms import sample_plms


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = True) -> np.ndarray:
    """CompVis' DDIM timesteps (ascending, "+1" included; S that does not divide T gives extra steps)."""
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"the number of DDIM steps must be between 1 and {num_ddpm_timesteps}, "
                         f"got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise ValueError(f"ddim_discretize must be 'uniform' or 'quad', got {ddim_discr_method!r}")
    # "+1 to get the final alpha values right" (CompVis); unique/clip only matter for S = T
    steps = np.unique(np.clip(steps + 1, 0, num_ddpm_timesteps - 1))
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps}")
    return steps


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _repaint_mask(mask, x0) -> dict:
    """CompVis' ``mask`` is 1 where ``x0`` is kept; the samplers' is 1 where they repaint, with ``known`` kept."""
    return {} if mask is None and x0 is None else {"mask": None if mask is None else 1.0 - mask, "known": x0}


class _CompVisSampler:
    """Shared plumbing: buffers on the model's device, the guided ε-function, noise, the CompVis callbacks."""

    def __init__(self, model, schedule: str = "linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def register_buffer(self, name: str, attr) -> None:
        if isinstance(attr, torch.Tensor):
            attr = attr.to(_model_device(self.model))
        setattr(self, name, attr)

    def _eps_fn(self, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                score_corrector=None, corrector_kwargs=None):
        eps_fn = denoiser(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        if score_corrector is None:
            return eps_fn
        if getattr(self.model, "parameterization", "eps") != "eps":
            raise ValueError("score_corrector needs an ε-parameterised model")
        return lambda x, t: score_corrector.modify_score(self.model, eps_fn(x, t), x, t, conditioning,
                                                         **(corrector_kwargs or {}))

    def _start(self, batch_size, shape, conditioning, x_T, generator):
        if conditioning is not None:
            size = batch_size_of(conditioning)
            if size is not None and size != batch_size:
                raise ValueError(f"got {size} conditionings for batch_size {batch_size}; pass one per sample, e.g. "
                                 "model.get_learned_conditioning(batch_size * [prompt])")
        if x_T is not None:
            return x_T.to(_model_device(self.model))
        size = (batch_size, *shape)
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(size, generator=generator, device=device).to(_model_device(self.model))

    @staticmethod
    def _callbacks(callback, img_callback, log_every_t, intermediates):
        """CompVis' callback(i), img_callback(pred_x0, i) and the x_inter/pred_x0 log, from the agnostic callback."""
        def on_step(i, total, x, x0):
            index = total - i - 1
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(x0)
        return on_step


class DDIMSampler(_CompVisSampler):
    """CompVis ``DDIMSampler``: ``make_schedule`` then ``sample`` → (samples, intermediates)."""

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose)
        ac = self.model.alphas_cumprod
        if ac.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("model.alphas_cumprod must have one value per timestep (model.num_timesteps)")
        ac64 = ac.detach().double().cpu()
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ac64[:-1]])
        to = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
        for name, value in {"betas": getattr(self.model, "betas", 1 - ac64 / prev), "alphas_cumprod": ac64,
                            "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": ac64.sqrt(),
                            "sqrt_one_minus_alphas_cumprod": (1 - ac64).sqrt(),
                            "log_one_minus_alphas_cumprod": (1 - ac64).log(),
                            "sqrt_recip_alphas_cumprod": (1 / ac64).sqrt(),
                            "sqrt_recipm1_alphas_cumprod": (1 / ac64 - 1).sqrt()}.items():
            self.register_buffer(name, to(value))
        a, a_prev = ddim_alphas(ac, self.ddim_timesteps[::-1])
        a, a_prev = a[::-1], a_prev[::-1]  # CompVis keeps these in ascending timestep order
        self.ddim_eta = ddim_eta
        self.register_buffer("ddim_sigmas", to(ddim_sigmas(a, a_prev, ddim_eta)))
        self.register_buffer("ddim_alphas", to(a))
        self.register_buffer("ddim_alphas_prev", to(a_prev))
        self.register_buffer("ddim_sqrt_one_minus_alphas", to(np.sqrt(1.0 - np.asarray(a))))
        self.register_buffer("ddim_sigmas_for_original_num_steps",
                             to(ddim_eta * ((1 - prev) / (1 - ac64) * (1 - ac64 / prev)).sqrt()))
        if verbose:
            print(f"Selected alphas for ddim sampler: a_t: {np.asarray(a)}; a_(t-1): {np.asarray(a_prev)}")

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               generator=None, **kwargs):
        return self._run(sample_ddim, S, batch_size, shape, conditioning, callback, img_callback, quantize_x0, eta,
                         verbose, x_T, log_every_t, unconditional_guidance_scale, unconditional_conditioning,
                         score_corrector, corrector_kwargs, generator, eta=eta, temperature=temperature,
                         noise_dropout=noise_dropout, **_repaint_mask(mask, x0))

    def _run(self, sampler_fn, S, batch_size, shape, conditioning, callback, img_callback, quantize_x0, ddim_eta,
             verbose, x_T, log_every_t, scale, uc, score_corrector, corrector_kwargs, generator, **sampler_kwargs):
        """The body CompVis' DDIM and PLMS ``sample`` share: schedule, start noise, guided ε, callbacks."""
        self.make_schedule(ddim_num_steps=S, ddim_eta=ddim_eta, verbose=verbose)
        img = self._start(batch_size, shape, conditioning, x_T, generator)
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        x0_fn = (lambda z: self.model.first_stage_model.quantize(z)[0]) if quantize_x0 else None
        samples = sampler_fn(
            self._eps_fn(conditioning, uc, scale, score_corrector, corrector_kwargs),
            img, self.model.alphas_cumprod, timesteps=self.ddim_timesteps, generator=generator,
            callback=self._callbacks(callback, img_callback, log_every_t, intermediates),
            progress=verbose, x0_fn=x0_fn, **sampler_kwargs)
        return samples, intermediates

    def _encode_table(self, use_original_steps):
        if getattr(self, "ddim_timesteps", None) is None:
            raise RuntimeError("call make_schedule(ddim_num_steps, ddim_eta=...) before stochastic_encode/decode")
        if use_original_steps:
            return self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        return self.ddim_alphas.sqrt(), self.ddim_sqrt_one_minus_alphas

    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None, generator=None):
        """Noise ``x0`` to the level where ``decode(…, t_start=t)`` starts: t = the number of steps decode runs
        (img2img: ``t = int(strength · S)``). CompVis noised one step too far here; t = 0 returns x0."""
        sqrt_a, sqrt_1ma = self._encode_table(use_original_steps)
        t = torch.as_tensor(t, device=x0.device).long().reshape(-1).expand(x0.shape[0])
        if (t < 0).any() or (t > len(sqrt_a)).any():
            raise ValueError(f"t must be between 0 and {len(sqrt_a)} (the number of steps decode will run, "
                             f"i.e. strength·steps with 0 ≤ strength ≤ 1), got {t.tolist()}")
        one, zero = torch.ones(1, device=sqrt_a.device), torch.zeros(1, device=sqrt_a.device)
        a = torch.cat([one, sqrt_a])[t.to(sqrt_a.device)].to(x0).reshape(-1, *[1] * (x0.ndim - 1))
        b = torch.cat([zero, sqrt_1ma])[t.to(sqrt_a.device)].to(x0).reshape(-1, *[1] * (x0.ndim - 1))
        if noise is None:
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
        return a * x0 + b * noise

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, generator=None, callback=None):
        """Run the first ``t_start`` DDIM steps in reverse from ``x_latent`` (img2img's denoising half)."""
        self._encode_table(use_original_steps)  # checks that make_schedule ran
        timesteps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        if not 0 <= t_start <= len(timesteps):
            raise ValueError(f"t_start must be between 0 and {len(timesteps)}, got {t_start}")
        if t_start == 0:
            return x_latent
        eps_fn = self._eps_fn(cond, unconditional_conditioning, unconditional_guidance_scale)
        return sample_ddim(eps_fn, x_latent, self.model.alphas_cumprod, eta=self.ddim_eta,
                           timesteps=timesteps[:t_start], generator=generator, progress=True,
                           final_alpha_cumprod=1.0 if use_original_steps else None,
                           callback=(lambda i, n, x, x0: callback(i)) if callback else None)


class PLMSSampler(DDIMSampler):
    """CompVis ``PLMSSampler`` (deterministic: eta must be 0)."""

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS (got {ddim_eta}); use DDIMSampler for eta > 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               generator=None, **kwargs):
        return self._run(sample_plms, S, batch_size, shape, conditioning, callback, img_callback, quantize_x0, eta,
                         verbose, x_T, log_every_t, unconditional_guidance_scale, unconditional_conditioning,
                         score_corrector, corrector_kwargs, generator, **_repaint_mask(mask, x0))

    def stochastic_encode(self, *args, **kwargs):
        raise NotImplementedError("PLMSSampler has no stochastic_encode (CompVis img2img is DDIM only); "
                                  "use DDIMSampler for img2img")

    def decode(self, *args, **kwargs):
        raise NotImplementedError("PLMSSampler has no decode (CompVis img2img is DDIM only); use DDIMSampler")


class DPMSolverSampler(_CompVisSampler):
    """CompVis ``DPMSolverSampler``: DPM-Solver++(2M), time-uniform, multistep, lower_order_final; returns (x, None)."""

    def __init__(self, model, **kwargs):
        super().__init__(model)
        self.register_buffer("alphas_cumprod", model.alphas_cumprod.detach().clone().float())

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               generator=None, **kwargs):
        img = self._start(batch_size, shape, conditioning, x_T, generator)
        log = {"x_inter": [], "pred_x0": []}
        x = sample_dpm_solver_pp(
            self._eps_fn(conditioning, unconditional_conditioning, unconditional_guidance_scale),
            img, self.alphas_cumprod, S, order=2, method="multistep", skip_type="time_uniform",
            lower_order_final=True, callback=self._callbacks(callback, img_callback, log_every_t, log),
            progress=verbose)
        return x.to(_model_device(self.model)), None


__all__ = ["DDIMSampler", "PLMSSampler", "DPMSolverSampler", "make_ddim_timesteps"]
