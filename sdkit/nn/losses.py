"""Autoencoder training losses: CompVis ``LPIPSWithDiscriminator`` (KL) and taming/ldm ``VQLPIPSWithDiscriminator``.

Both are a pixel reconstruction term, a perceptual term, a regulariser (KL to N(0, I), or the codebook loss) and
an adversarial term from a PatchGAN discriminator, switched on at ``disc_start`` and balanced against the
reconstruction with an adaptive weight computed at the decoder's last layer:
``d_weight = ‖∇_last nll‖ / (‖∇_last g_loss‖ + 1e-4)``, clamped to [0, 1e4], times ``disc_weight``.

The perceptual term: CompVis uses LPIPS (VGG16 features with learned linear heads). Those weights are a
download, which this kit cannot assume. ``perceptual_loss`` picks what is used:

- ``"lpips"``: the ``lpips`` package, when it is installed and its VGG weights are available (exact CompVis);
- ``"gradient"``: a documented substitute with no weights: the mean absolute difference of image gradients
  (horizontal and vertical finite differences) at three scales (1, 1/2, 1/4), one value per image like LPIPS.
  It rewards sharp edges and penalises blur, the part of LPIPS that matters most for small autoencoders;
- ``"none"``: no perceptual term;
- ``"auto"`` (default): ``"lpips"`` when available, else ``"gradient"`` (with a warning saying so).

Parameter names (``logvar``, ``discriminator.main.*``) and constructor names are CompVis', so loss state in a
CompVis autoencoder checkpoint loads (except LPIPS' own ``perceptual_loss.*`` weights when it is not used).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# ================================================================================================ discriminator


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first batch (taming's ActNorm, used with
    ``use_actnorm=True``). Keys: ``loc``, ``scale``, ``initialized``."""

    def __init__(self, num_features: int, logdet: bool = False, affine: bool = True, allow_reverse_init: bool = False):
        super().__init__()
        if not affine:
            raise ValueError("ActNorm is always affine")
        self.logdet, self.allow_reverse_init = logdet, allow_reverse_init
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
        self.loc.data.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.data.copy_((1.0 / (flat.std(1) + 1e-6)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    """taming's init: convolutions N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): ``n_layers`` stride-2 4×4 convolutions, then two stride-1 ones;
    outputs one logit per overlapping patch. The layers live in ``main`` (keys ``main.0.weight`` ...)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = norm_layer is not nn.BatchNorm2d
        kw, padw = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=use_bias),
                       norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=use_bias),
                   norm_layer(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# ================================================================================================ loss terms


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps, ``weight`` from then on (how disc_start switches the GAN on)."""
    return value if global_step < threshold else weight


class GradientPerceptualLoss(nn.Module):
    """The weight-free substitute for LPIPS (see the module docstring): per image, the mean |∇x − ∇x̂| of
    horizontal and vertical differences at scales 1, 1/2 and 1/4, summed over scales. Returns [B, 1, 1, 1]."""

    def __init__(self, scales: int = 3):
        super().__init__()
        self.scales = scales

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(x.shape[0])
        for s in range(self.scales):
            if s:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            if min(x.shape[-2:]) < 2:
                break
            dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
            dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
            total = total + dx.abs().mean(dim=(1, 2, 3)) + dy.abs().mean(dim=(1, 2, 3))
        return total.view(-1, 1, 1, 1)


class _NoPerceptual(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 1, 1, 1)


@functools.lru_cache(maxsize=1)
def _lpips_available() -> bool:
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    return True


def perceptual_module(kind: str) -> nn.Module:
    """The perceptual term by name: "lpips", "gradient", "none" or "auto" (see the module docstring)."""
    if kind == "auto":
        if _lpips_available():
            kind = "lpips"
        else:
            warnings.warn("LPIPS is not installed here (its VGG weights are a download); using the weight-free "
                          "'gradient' perceptual substitute. Set perceptual_loss: gradient to silence this.",
                          stacklevel=3)
            kind = "gradient"
    if kind == "lpips":
        if not _lpips_available():
            raise ImportError("perceptual_loss='lpips' needs the lpips package and its VGG16 weights "
                              "(pip install lpips; the first use downloads VGG16). Offline, use 'gradient'.")
        import lpips

        return lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
    if kind == "gradient":
        return GradientPerceptualLoss()
    if kind == "none":
        return _NoPerceptual()
    raise ValueError(f"perceptual_loss must be 'auto', 'lpips', 'gradient' or 'none', got {kind!r}")


class _AdversarialLoss(nn.Module):
    """What both autoencoder losses share: discriminator, disc_start schedule, adaptive weight."""

    def __init__(self, disc_start: int, disc_num_layers: int, disc_in_channels: int, disc_factor: float,
                 disc_weight: float, perceptual_weight: float, use_actnorm: bool, disc_conditional: bool,
                 disc_loss: str, disc_ndf: int, perceptual_loss: str):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {list(DISC_LOSSES)}, got {disc_loss!r}")
        self.perceptual_weight = perceptual_weight
        self.perceptual_kind = perceptual_loss
        # not a registered child: it holds no trained weights, and LPIPS' VGG must stay out of checkpoints
        object.__setattr__(self, "perceptual_loss", perceptual_module(perceptual_loss) if perceptual_weight > 0
                           else _NoPerceptual())
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)
        self.discriminator.apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.disc_factor, self.discriminator_weight = disc_factor, disc_weight
        self.disc_conditional = disc_conditional

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.__dict__["perceptual_loss"]._apply(fn)
        return self

    def perceptual(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        if self.perceptual_weight <= 0:
            return inputs.new_zeros(inputs.shape[0], 1, 1, 1)
        return self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor | None) -> torch.Tensor:
        """‖∇nll‖ / (‖∇g‖ + 1e-4) at the decoder's last layer, clamped to [0, 1e4], × disc_weight (detached)."""
        if last_layer is None:
            raise ValueError("the adaptive GAN weight needs last_layer (the decoder's conv_out weight)")
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _logits(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("disc_conditional=True needs cond")
            return self.discriminator(x.contiguous())
        if not self.disc_conditional:
            raise ValueError("cond given but disc_conditional=False")
        return self.discriminator(torch.cat((x.contiguous(), cond), dim=1))

    def generator_term(self, nll_loss, reconstructions, cond, global_step, last_layer, device):
        """(d_weight, disc_factor, g_loss). The discriminator is skipped entirely while its factor is 0
        (before disc_start): the total is the same as CompVis', without the wasted forward and gradients."""
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        zero = torch.tensor(0.0, device=device)
        if disc_factor == 0:
            return zero, disc_factor, zero
        g_loss = -torch.mean(self._logits(reconstructions, cond))
        if self.training and torch.is_grad_enabled():
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        else:  # CompVis: autograd fails in validation and the weight falls back to 0
            d_weight = zero
        return d_weight, disc_factor, g_loss

    def discriminator_term(self, inputs, reconstructions, cond, global_step, split):
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if disc_factor == 0:  # before disc_start the loss is 0 · (...): skip the two discriminator passes
            zero = torch.tensor(0.0, device=inputs.device)
            return zero, {f"{split}/disc_loss": zero, f"{split}/logits_real": zero, f"{split}/logits_fake": zero}
        logits_real = self._logits(inputs.detach(), cond)
        logits_fake = self._logits(reconstructions.detach(), cond)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log


# ================================================================================================ the two losses


class LPIPSWithDiscriminator(_AdversarialLoss):
    """The KL autoencoder loss (CompVis contperceptual.py)::

        rec   = |x − x̂| + perceptual_weight · P(x, x̂)              (per pixel; P is per image)
        nll   = Σ (rec / exp(logvar) + logvar) / B                   (logvar: a learned scalar)
        loss  = nll + kl_weight · KL/B + d_weight · disc_factor · g_loss

    ``forward(inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer, cond, split,
    weights)`` returns (loss, log) for the autoencoder (optimizer_idx 0) or the discriminator (1).
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 disc_ndf: int = 64, perceptual_loss: str = "auto"):
        super().__init__(disc_start, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                         perceptual_weight, use_actnorm, disc_conditional, disc_loss, disc_ndf, perceptual_loss)
        self.kl_weight, self.pixel_weight = kl_weight, pixelloss_weight
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)

    def forward(self, inputs, reconstructions, posteriors, optimizer_idx: int, global_step: int,
                last_layer=None, cond=None, split: str = "train", weights=None):
        if optimizer_idx == 1:
            return self.discriminator_term(inputs, reconstructions, cond, global_step, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        p_loss = self.perceptual(inputs, reconstructions)
        rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        d_weight, disc_factor, g_loss = self.generator_term(nll_loss, reconstructions, cond, global_step,
                                                            last_layer, inputs.device)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {f"{split}/total_loss": loss.clone().detach().mean(), f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(), f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(), f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(), f"{split}/disc_factor": torch.tensor(float(disc_factor)),
               f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log


class VQLPIPSWithDiscriminator(_AdversarialLoss):
    """The VQ autoencoder loss (taming / ldm vqperceptual.py)::

        rec  = |x − x̂| (or (x − x̂)² with pixel_loss "l2") + perceptual_weight · P(x, x̂)
        loss = mean(rec) + d_weight · disc_factor · g_loss + codebook_weight · codebook_loss

    The codebook loss comes from the quantiser (its ``legacy`` flag decides where β goes).
    """

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 n_classes: int | None = None, perceptual_loss: str = "auto", pixel_loss: str = "l1"):
        super().__init__(disc_start, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                         perceptual_weight, use_actnorm, disc_conditional, disc_loss, disc_ndf, perceptual_loss)
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        self.codebook_weight, self.pixel_weight = codebook_weight, pixelloss_weight
        self.pixel_loss, self.n_classes = pixel_loss, n_classes

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx: int, global_step: int,
                last_layer=None, cond=None, split: str = "train", predicted_indices=None):
        if optimizer_idx == 1:
            return self.discriminator_term(inputs, reconstructions, cond, global_step, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
        diff = inputs.contiguous() - reconstructions.contiguous()
        rec_loss = diff.abs() if self.pixel_loss == "l1" else diff.pow(2)
        p_loss = self.perceptual(inputs, reconstructions)
        rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = torch.mean(rec_loss)
        d_weight, disc_factor, g_loss = self.generator_term(nll_loss, reconstructions, cond, global_step,
                                                            last_layer, inputs.device)
        if codebook_loss is None:
            codebook_loss = torch.tensor(0.0, device=inputs.device)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/quant_loss": codebook_loss.detach().mean(), f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(), f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(), f"{split}/disc_factor": torch.tensor(float(disc_factor)),
               f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log
