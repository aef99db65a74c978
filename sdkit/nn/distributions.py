"""The diagonal Gaussian posterior of the KL autoencoder (CompVis ``ldm.modules.distributions``).

The encoder of ``AutoencoderKL`` predicts, per latent pixel, a mean and a log-variance stacked along the channel
axis; this class splits them and offers sampling, the KL to N(0, I) (or to another diagonal Gaussian) and the
negative log-likelihood, with the same clamps and sums as CompVis.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from ``parameters`` = cat([mean, logvar], dim=1).

    ``deterministic=True`` turns it into a point mass at the mean (std 0, KL 0), as CompVis does.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.shape[1] % 2:
            raise ValueError(
                f"DiagonalGaussianDistribution needs mean and log-variance stacked on dim 1 (an even number of "
                f"channels), got shape {tuple(parameters.shape)}; pass the encoder's 'moments', not a latent"
            )
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        # The clamp keeps exp() finite for untrained or diverging encoders (same bounds as CompVis).
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps. The noise is drawn in float32 on the generator's device (CPU by default, like
        CompVis, so a seed gives the same latent on every device) and then moved to the mean's device/dtype."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over (C, H, W), one value per batch item; ``other=None`` means N(0, I)."""
        if self.deterministic:
            return torch.tensor([0.0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return torch.tensor([0.0], device=self.mean.device)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def mode(self) -> torch.Tensor:
        return self.mean
