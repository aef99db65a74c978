"""LatentDiffusion: the Stable Diffusion v1 model as one nn.Module, with CompVis names and methods.

The state dict reads exactly like an official checkpoint: ``model.diffusion_model.*`` (the UNet, inside a
``DiffusionWrapper`` that routes conditioning), ``first_stage_model.*`` (the autoencoder), ``cond_stage_model.*``
(the text encoder), the schedule buffers (``betas``, ``alphas_cumprod``, ...) and ``model_ema.*`` when EMA is on.
The Lightning training wrapper lives in ``sdkit.training``; this module is plain PyTorch.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import instantiate_from_config
from .ema import LitEma
from .nn.distributions import DiagonalGaussianDistribution
from .schedules import make_beta_schedule, schedule_buffers

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``.train()`` on frozen parts, so ``model.train()`` never switches them out of eval mode."""
    return self


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """``a[t]`` shaped to broadcast over a batch of images ``[B, 1, 1, 1]``."""
    out = a.gather(-1, t.to(a.device).long())
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


class DiffusionWrapper(nn.Module):
    """Routes conditioning into the UNet, the four ways CompVis does (``conditioning_key``):

    - ``concat``: channel-concatenate ``c_concat`` to the input (super-resolution, LDM inpainting)
    - ``crossattn``: ``c_crossattn`` becomes the cross-attention context (text-to-image)
    - ``hybrid``: both (SD inpainting: [noisy latent, mask, masked-image latent] + text)
    - ``adm``: ``c_crossattn[0]`` is a class/vector label ``y`` added to the time embedding
    """

    def __init__(self, diff_model_config: Any, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key must be one of {CONDITIONING_KEYS}, got {conditioning_key!r}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None):
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x] + _require(c_concat, "c_concat", key), dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(_require(c_crossattn, "c_crossattn", key), 1))
        if key == "hybrid":
            xc = torch.cat([x] + _require(c_concat, "c_concat", key), dim=1)
            return self.diffusion_model(xc, t, context=torch.cat(_require(c_crossattn, "c_crossattn", key), 1))
        return self.diffusion_model(x, t, y=_require(c_crossattn, "c_crossattn", key)[0])  # adm


def _require(value, name: str, key: str) -> list:
    if value is None:
        raise ValueError(f"this model uses conditioning_key={key!r} and needs {name!r} conditioning, got none")
    return value if isinstance(value, (list, tuple)) else [value]


class LatentDiffusion(nn.Module):
    """Denoising diffusion in the latent space of a frozen autoencoder (Rombach et al. 2022), CompVis layout.

    Constructor names follow CompVis ``ldm.models.diffusion.ddpm.LatentDiffusion`` so its YAML configs work
    unchanged. Options that belong to training loops (``monitor``, ``scheduler_config``, ``log_every_t``) are
    kept as attributes for the Lightning wrapper.
    """

    def __init__(self, unet_config, first_stage_config, cond_stage_config, *, num_timesteps_cond: int = 1,
                 cond_stage_key: str = "image", cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: str | None = None, conditioning_key: str | None = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False, timesteps: int = 1000,
                 beta_schedule: str = "linear", loss_type: str = "l2", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3,
                 log_every_t: int = 100, clip_denoised: bool = True, linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas=None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 parameterization: str = "eps", learn_logvar: bool = False, logvar_init: float = 0.0,
                 ema_decay: float = 0.9999, ucg_probability: float = 0.0, monitor: str = "val/loss",
                 scheduler_config=None, ckpt_path: str | None = None, **unused: Any):
        super().__init__()
        # CompVis accepts (and ignores) several options; say so instead of failing on a valid CompVis config.
        ignored = set(unused) - {"ignore_keys", "load_only_unet", "use_positional_encodings", "personalization_config"}
        if ignored:
            warnings.warn(f"LatentDiffusion ignores unknown options {sorted(ignored)}", stacklevel=2)
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization must be 'eps' or 'x0' (SD v1 is 'eps'), got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        if num_timesteps_cond > timesteps:
            raise ValueError("num_timesteps_cond cannot exceed timesteps")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None

        self.parameterization = parameterization
        self.loss_type = loss_type
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.image_size, self.channels = image_size, channels
        self.log_every_t, self.clip_denoised = log_every_t, clip_denoised
        self.original_elbo_weight, self.l_simple_weight = original_elbo_weight, l_simple_weight
        self.v_posterior = v_posterior
        self.num_timesteps_cond = num_timesteps_cond
        self.cond_stage_trainable, self.cond_stage_forward = cond_stage_trainable, cond_stage_forward
        self.ucg_probability = ucg_probability
        self.monitor, self.scheduler_config = monitor, scheduler_config
        self.unet_config = unet_config

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)

        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)

        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        self.learn_logvar = learn_logvar
        self.logvar = nn.Parameter(logvar) if learn_logvar else logvar

        # scale_by_std stores the factor in the checkpoint (it is learned from the first batch); otherwise it is
        # a plain attribute and not in the state dict, as in CompVis.
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = float(scale_factor)

        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        if ckpt_path is not None:
            raise ValueError("load weights with sdkit.load_model(config, ckpt=...) rather than ckpt_path")

    # ------------------------------------------------------------------ schedule
    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000,
                          linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3) -> None:
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        buffers = schedule_buffers(betas, self.v_posterior)
        lvlb = buffers.pop("lvlb_weights")
        if self.parameterization == "x0":
            ac = buffers["alphas_cumprod"]
            lvlb = 0.5 * torch.sqrt(ac) / (2.0 * 1 - ac)  # CompVis's expression, kept verbatim in meaning
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.register_buffer("lvlb_weights", lvlb, persistent=False)

    # ------------------------------------------------------------------ stages
    def instantiate_first_stage(self, config) -> None:
        model = instantiate_from_config(config)
        self.first_stage_model = _freeze(model)

    def instantiate_cond_stage(self, config) -> None:
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(config)
            self.cond_stage_model = model if self.cond_stage_trainable else _freeze(model)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    # ------------------------------------------------------------------ what pipelines ask of a model
    @property
    def unet(self) -> nn.Module:
        """The denoising network (``model.diffusion_model``, the CompVis place)."""
        return self.model.diffusion_model

    @property
    def vae_factor(self) -> int:
        """How many pixels one latent pixel spans per side (8 for SD v1's autoencoder)."""
        first = self.first_stage_model
        factor = getattr(getattr(first, "encoder", None), "downsampling_factor", 0)
        return int(factor or 2 ** (len(first.decoder.up) - 1))

    @property
    def unet_multiple(self) -> int:
        """Latent sides must be multiples of this: each UNet level halves the size, and the way up must meet the
        skip connections again (2**(levels − 1) = 8 for SD v1, so its pixel sides are multiples of 64)."""
        return 2 ** (len(getattr(self.unet, "channel_mult", (1,))) - 1)

    @property
    def default_image_size(self) -> int:
        """The pixel size the model was trained at (``image_size`` latent pixels × ``vae_factor``: 512 for SD v1)."""
        return int(self.image_size) * self.vae_factor

    @property
    def unet_in_channels(self) -> int | None:
        return getattr(self.unet, "in_channels", None)

    @property
    def is_inpainting(self) -> bool:
        """The 9-channel inpainting UNet: [noisy latent, mask, masked-image latent] by ``hybrid`` conditioning."""
        return self.model.conditioning_key == "hybrid" and self.unet_in_channels == 2 * int(self.channels) + 1

    @property
    def is_superresolution(self) -> bool:
        """An LDM upscaler: the low-resolution image (3 channels) concatenated to the noisy latent."""
        return self.model.conditioning_key in ("concat", "hybrid") and self.unet_in_channels == int(self.channels) + 3

    @property
    def is_text_conditioned(self) -> bool:
        return self.model.conditioning_key in ("crossattn", "hybrid") and self.cond_stage_model is not None

    # ------------------------------------------------------------------ EMA
    @contextmanager
    def ema_scope(self, context: str | None = None):
        """Swap the EMA weights in for the duration of the block (no-op without EMA)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                print(f"{context}: switched to EMA weights")
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    print(f"{context}: restored training weights")

    # ------------------------------------------------------------------ conditioning
    def get_learned_conditioning(self, c):
        """Encode conditioning (prompts for SD) with the cond stage, as CompVis does."""
        if self.cond_stage_model is None:
            raise ValueError("this model is unconditional; it has no cond stage to encode conditioning")
        if self.cond_stage_forward is None:
            encode = getattr(self.cond_stage_model, "encode", None)
            c = encode(c) if callable(encode) else self.cond_stage_model(c)
            if isinstance(c, DiagonalGaussianDistribution):  # a first-stage model used as cond stage
                c = c.mode()
            return c
        return getattr(self.cond_stage_model, self.cond_stage_forward)(c)

    # ------------------------------------------------------------------ first stage
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """Pixels in [-1, 1] → the autoencoder's posterior (KL) or pre-quantisation latent (VQ)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator: torch.Generator | None = None):
        """Posterior → scaled latent: a *sample* of the posterior (as CompVis, also in img2img) × scale_factor."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False):
        """Scaled latent → pixels in about [-1, 1]. NaN/inf are reported with the stage they came from."""
        _check_finite(z, "the latents given to the decoder",
                      "The sampler produced them; try float32 for the UNet or fewer/lower guidance steps.")
        z = z / self.scale_factor
        decode = self.first_stage_model.decode
        if "force_not_quantize" in inspect.signature(decode).parameters:  # VQModelInterface
            x = decode(z, force_not_quantize=force_not_quantize)
        else:
            x = decode(z)
        _check_finite(x, "the decoded image",
                      "The VAE decoder overflowed; run the VAE in float32 (fp16 VAE decodes are a known cause).")
        return x

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε."""
        if noise is None:  # drawn on the CPU so a seed gives the same noise on every device
            noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype).to(x_start.device)
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t, t, noise):
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def q_posterior(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x₀)."""
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, extract_into_tensor(self.posterior_variance, t, x_t.shape),
                extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape))

    # ------------------------------------------------------------------ denoiser
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond, return_ids: bool = False):
        """ε (or x₀) prediction. ``cond`` is a tensor/list (routed by conditioning_key) or a dict with
        ``c_concat`` / ``c_crossattn`` lists, as in CompVis."""
        if not isinstance(cond, dict):
            if not isinstance(cond, (list, tuple)):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        out = self.model(x_noisy, t, **cond)
        return (out, None) if return_ids else out

    # ------------------------------------------------------------------ training objective
    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred) if mean else F.mse_loss(target, pred, reduction="none")

    def p_losses(self, x_start, cond, t, noise: torch.Tensor | None = None, generator=None):
        """CompVis training loss: simple ε-MSE weighted by the (optionally learned) logvar, plus the optional
        VLB term. Returns (loss, dict of logged values)."""
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype).to(x_start.device)
        x_noisy = self.q_sample(x_start, t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = noise if self.parameterization == "eps" else x_start
        prefix = "train" if self.training else "val"
        loss_simple = self.get_loss(model_output, target, mean=False).mean(dim=[1, 2, 3])
        logs = {f"{prefix}/loss_simple": loss_simple.mean()}
        logvar_t = self.logvar.to(x_start.device)[t.to(x_start.device)]
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            logs[f"{prefix}/loss_gamma"] = loss.mean()
            logs["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        if self.original_elbo_weight:
            loss_vlb = self.get_loss(model_output, target, mean=False).mean(dim=(1, 2, 3))
            loss_vlb = (self.lvlb_weights[t] * loss_vlb).mean()
            logs[f"{prefix}/loss_vlb"] = loss_vlb
            loss = loss + self.original_elbo_weight * loss_vlb
        logs[f"{prefix}/loss"] = loss
        return loss, logs

    def forward(self, x: torch.Tensor, c, *, generator: torch.Generator | None = None):
        """Training loss on latents ``x`` with conditioning ``c`` (already encoded), t ~ U{0..T-1}."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), generator=generator).to(x.device)
        return self.p_losses(x, c, t, generator=generator)


class LatentInpaintDiffusion(LatentDiffusion):
    """SD inpainting (runwayml v1-inpainting-inference): a 9-channel UNet fed [noisy latent 4, mask 1,
    masked-image latent 4] through ``hybrid`` conditioning, the text through cross-attention."""

    def __init__(self, *args, concat_keys=("mask", "masked_image"), masked_image_key: str = "masked_image",
                 finetune_keys=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key
        self.finetune_keys = finetune_keys


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.train = disabled_train.__get__(model)
    for p in model.parameters():
        p.requires_grad = False
    return model


def _check_finite(x: torch.Tensor, what: str, advice: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise FloatingPointError(f"{bad} NaN/inf values in {what}. {advice}")
