"""Closed-form denoisers for testing samplers: data whose ideal ε-prediction is known exactly.

Work in σ-space: a VP sample at timestep t is x_t = √ᾱ_t · x_σ with x_σ = x₀ + σ z and ᾱ_t = 1/(1+σ_t²).
For any data distribution the ideal model is ε(x_t, t) = (x_σ − E[x₀ | x_σ]) / σ. Fractional timesteps map to σ
by linear interpolation of log σ between training timesteps (the inverse of ``sdkit.schedules.sigma_to_t``).

Gaussian data x₀ ~ N(μ, s²) (per element, independent): E[x₀ | x_σ] = μ + s²/(s²+σ²)·(x_σ − μ), and the
probability-flow ODE dx_σ/dσ = (x_σ − E[x₀|x_σ])/σ = (x_σ − μ)·σ/(s²+σ²) integrates to
    (x_σ − μ) / √(s²+σ²) = const,
so the exact solution from (σ_a, x_a) to σ_b is x_b = μ + (x_a − μ)·√(s²+σ_b²)/√(s²+σ_a²). At σ_b = 0 that is
x₀ = μ + (x_a − μ)·s/√(s²+σ_a²). A Gaussian mixture (per element) gives a nonlinear ε for parity tests; its ODE
solution is computed numerically (RK4 in log σ, fine enough to be exact to ~1e-10 against the sampler errors).

Everything is computed in float64; ``eps`` returns the dtype of its input.
"""
from __future__ import annotations

import math

import torch


class _Oracle:
    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.detach().double().cpu()
        self.log_sigmas = (0.5 * ((1 - ac) / ac).log())
        self.calls = 0          # number of eps_fn calls (= NFE for unguided sampling)
        self.timesteps = []     # every t it was called with (first element of the batch)

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """σ for float timesteps t ∈ [0, T−1], log-linear between training timesteps."""
        t = t.detach().double().cpu().clamp(0, len(self.log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ideal ε-prediction for the VP sample x at timesteps t (shape [B])."""
        self.calls += 1
        self.timesteps.append(float(t.reshape(-1)[0]))
        sigma = self.sigma_at(t).reshape(-1, *[1] * (x.ndim - 1))
        x_sigma = x.detach().double().cpu() * (1 + sigma ** 2).sqrt()
        eps = (x_sigma - self.denoise(x_sigma, sigma)) / sigma
        return eps.to(dtype=x.dtype, device=x.device)

    __call__ = eps


class GaussianOracle(_Oracle):
    """x₀ ~ N(mean, std²) element-wise; mean/std broadcast against the sample shape (without batch)."""

    def __init__(self, alphas_cumprod, mean, std):
        super().__init__(alphas_cumprod)
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)

    def denoise(self, x_sigma, sigma):
        var = self.std ** 2
        return self.mean + var / (var + sigma ** 2) * (x_sigma - self.mean)

    def pf_ode(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float, vp: bool = True) -> torch.Tensor:
        """Exact probability-flow ODE solution from σ_start to σ_end. With ``vp`` both the input and the result are
        VP samples (x_t = x_σ/√(1+σ²)), the convention of sdkit samplers; otherwise σ-space samples."""
        x = x_start.detach().double().cpu()
        if vp:
            x = x * math.sqrt(1 + sigma_start ** 2)
        var = self.std ** 2
        out = self.mean + (x - self.mean) * ((var + sigma_end ** 2) / (var + sigma_start ** 2)).sqrt()
        return out / math.sqrt(1 + sigma_end ** 2) if vp else out


class GaussianMixtureOracle(_Oracle):
    """x₀ element-wise from a 1-D mixture Σ_k w_k N(μ_k, s_k²): the same mixture for every element."""

    def __init__(self, alphas_cumprod, weights=(0.3, 0.7), means=(-1.0, 0.8), stds=(0.3, 0.5)):
        super().__init__(alphas_cumprod)
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.mu = torch.tensor(means, dtype=torch.float64)
        self.s = torch.tensor(stds, dtype=torch.float64)

    def denoise(self, x_sigma, sigma):
        x, sigma = x_sigma.unsqueeze(-1), sigma.unsqueeze(-1)        # components on the last axis
        var = self.s ** 2 + sigma ** 2
        log_resp = self.w.log() - 0.5 * var.log() - 0.5 * (x - self.mu) ** 2 / var
        resp = torch.softmax(log_resp, dim=-1)
        return (resp * (self.mu + self.s ** 2 / var * (x - self.mu))).sum(-1)

    def pf_ode(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float, vp: bool = True,
               steps: int = 800) -> torch.Tensor:
        """The probability-flow ODE solution by classical RK4 in τ = log σ (dx/dτ = x − D(x, σ)), ``steps`` equal
        steps. To σ_end = 0 it integrates to σ = 1e-6 and returns D there (x₀ up to O(1e-12)). ``vp`` as in
        :meth:`GaussianOracle.pf_ode`."""
        x = x_start.detach().double().cpu()
        if vp:
            x = x * math.sqrt(1 + sigma_start ** 2)
        stop = max(sigma_end, 1e-6)
        taus = torch.linspace(math.log(sigma_start), math.log(stop), steps + 1, dtype=torch.float64)

        def f(y, tau):
            return y - self.denoise(y, torch.exp(tau))
        for a, b in zip(taus[:-1], taus[1:]):
            h = b - a
            k1 = f(x, a)
            k2 = f(x + 0.5 * h * k1, a + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, a + 0.5 * h)
            k4 = f(x + h * k3, b)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if sigma_end == 0:
            x = self.denoise(x, torch.tensor(stop, dtype=torch.float64))
        return x / math.sqrt(1 + sigma_end ** 2) if vp else x
