"""Training the first stages: the KL and VQ autoencoders with their adversarial losses (Lightning 2, manual
optimization with two optimizers, as CompVis' PL-1 ``optimizer_idx`` loop did).

The model config carries the loss in ``lossconfig`` (``sdkit.nn.losses.LPIPSWithDiscriminator`` /
``VQLPIPSWithDiscriminator``). Each batch: one autoencoder step (reconstruction + regulariser + adaptive GAN
term), then one discriminator step on the same reconstructions, detached (CompVis ran a second forward pass for
the discriminator step; the detached reuse gives the same expected update at half the cost).

Lightning counts every ``optimizer.step()`` as a global step in manual optimization, so ``trainer.max_steps``
and ``every_n_train_steps`` count 2 per batch here. ``disc_start`` counts batches (autoencoder steps), as in
CompVis. Gradient accumulation is not available with manual optimization.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..nn.autoencoder import AutoencoderKL, VQModel
from ..nn.distributions import DiagonalGaussianDistribution
from .common import WrappedModule, build, image_input, per_sample_randn, sample_generators
from .diffusion import with_scheduler

VALIDATION_STEP = -1


class _AutoencoderModule(WrappedModule):
    inner = "autoencoder"
    model_class: type = nn.Module

    def __init__(self, model: Any, learning_rate: float = 4.5e-6, seed: int = 0, betas=(0.5, 0.9)):
        super().__init__(seed=seed, learning_rate=learning_rate)
        self.autoencoder = build(model)
        if not isinstance(self.autoencoder, self.model_class):
            raise TypeError(f"{type(self).__name__} trains a {self.model_class.__name__}, "
                            f"got {type(self.autoencoder).__name__}")
        if isinstance(self.autoencoder.loss, nn.Identity):
            raise ValueError(f"{type(self.autoencoder).__name__} was built without a training loss (lossconfig is "
                             f"torch.nn.Identity); set model.params.lossconfig to sdkit.nn.losses."
                             f"{'LPIPSWithDiscriminator' if self.model_class is AutoencoderKL else 'VQLPIPSWithDiscriminator'}")
        self.betas = tuple(betas)
        self.automatic_optimization = False
        self.ae_steps = 0  # batches trained: the step disc_start counts (saved in checkpoints)

    @property
    def image_key(self) -> str:
        return self.autoencoder.image_key

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["sdkit_ae_steps"] = self.ae_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.ae_steps = int(checkpoint.get("sdkit_ae_steps", 0))

    # subclasses: reconstruct(x, generators) -> (xrec, extra); losses(x, xrec, extra, idx, step, split)
    def training_step(self, batch: Mapping, batch_idx: int):
        self.seed_step(batch_idx)
        x = image_input(batch, self.image_key)
        generators = sample_generators(self.seed, self.ae_steps, batch["index"])
        xrec, extra = self.reconstruct(x, generators)
        opt_ae, opt_disc = self.optimizers()
        last_layer = self.autoencoder.get_last_layer()

        aeloss, log_ae = self.losses(x, xrec, extra, 0, self.ae_steps, last_layer, "train")
        opt_ae.zero_grad()
        self.manual_backward(aeloss)
        opt_ae.step()

        discloss, log_disc = self.losses(x, xrec.detach(), extra, 1, self.ae_steps, last_layer, "train")
        opt_disc.zero_grad()
        if discloss.requires_grad:
            self.manual_backward(discloss)
        opt_disc.step()

        for scheduler in self._schedulers():
            scheduler.step()
        if getattr(self.autoencoder, "use_ema", False):
            self.autoencoder.model_ema(self.autoencoder)
        self.ae_steps += 1
        n = x.shape[0]
        self.log("aeloss", aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("discloss", discloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log_dict({**log_ae, **log_disc}, on_step=True, on_epoch=False, batch_size=n)

    def _schedulers(self) -> list:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return schedulers if isinstance(schedulers, list) else [schedulers]

    @torch.no_grad()
    def validation_step(self, batch: Mapping, batch_idx: int):
        x = image_input(batch, self.image_key)
        generators = sample_generators(self.seed, VALIDATION_STEP, batch["index"])
        xrec, extra = self.reconstruct(x, generators)
        last_layer = self.autoencoder.get_last_layer()
        _, log_ae = self.losses(x, xrec, extra, 0, self.ae_steps, last_layer, "val")
        _, log_disc = self.losses(x, xrec, extra, 1, self.ae_steps, last_layer, "val")
        n = x.shape[0]
        self.log("val/rec_loss", log_ae["val/rec_loss"], on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log_dict({k: v for k, v in {**log_ae, **log_disc}.items() if k != "val/rec_loss"},
                      on_step=False, on_epoch=True, sync_dist=True, batch_size=n)

    def _optimizers(self, ae_params: list, ae_lr: float):
        disc = self.autoencoder.loss.discriminator.parameters()
        opt_ae = torch.optim.Adam(ae_params, lr=ae_lr, betas=self.betas)
        opt_disc = torch.optim.Adam(disc, lr=self.learning_rate, betas=self.betas)
        scheduler_config = getattr(self.autoencoder, "scheduler_config", None)
        if scheduler_config is None:
            return [opt_ae, opt_disc]
        first, second = with_scheduler(opt_ae, scheduler_config), with_scheduler(opt_disc, scheduler_config)
        return [first, second]

    @torch.no_grad()
    def log_images(self, batch: Mapping, N: int = 4, **kwargs) -> dict:
        x = image_input(batch, self.image_key)[:N].to(self.device)
        generators = sample_generators(0, 0, batch["index"][:N])
        xrec, _ = self.reconstruct(x, generators)
        log = {"inputs": x, "reconstructions": xrec}
        captions = batch.get("caption")
        if isinstance(captions, list):
            log["captions"] = captions[:N]
        return log


class AutoencoderKLModule(_AutoencoderModule):
    """Trains an AutoencoderKL with LPIPSWithDiscriminator (Adam, betas (0.5, 0.9), both at learning_rate).
    The loss's ``logvar`` is not optimised, exactly as in CompVis (it is not in either optimizer)."""

    model_class = AutoencoderKL

    def reconstruct(self, x: torch.Tensor, generators):
        posterior = self.autoencoder.encode(x)
        eps = per_sample_randn(generators, posterior.mean.shape[1:], x.device, posterior.mean.dtype)
        z = posterior.mean + posterior.std * eps
        return self.autoencoder.decode(z), posterior

    def losses(self, x, xrec, posterior: DiagonalGaussianDistribution, optimizer_idx, step, last_layer, split):
        return self.autoencoder.loss(x, xrec, posterior, optimizer_idx, step, last_layer=last_layer, split=split)

    def configure_optimizers(self):
        ae = self.autoencoder
        params = (list(ae.encoder.parameters()) + list(ae.decoder.parameters()) + list(ae.quant_conv.parameters())
                  + list(ae.post_quant_conv.parameters()))
        return self._optimizers(params, self.learning_rate)

    @torch.no_grad()
    def log_images(self, batch: Mapping, N: int = 4, **kwargs) -> dict:
        log = super().log_images(batch, N, **kwargs)
        posterior = self.autoencoder.encode(log["inputs"])
        z = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        log["samples"] = self.autoencoder.decode(z)  # decoded prior samples, as CompVis
        return log


class VQModelModule(_AutoencoderModule):
    """Trains a VQModel with VQLPIPSWithDiscriminator. The autoencoder optimizer covers encoder, decoder,
    quantizer and the 1×1 convs at ``lr_g_factor × learning_rate``. ``legacy`` (model.training) sets where the
    quantiser puts β (True: CompVis/taming behaviour)."""

    model_class = VQModel

    def __init__(self, model: Any, learning_rate: float = 4.5e-6, seed: int = 0, betas=(0.5, 0.9),
                 legacy: bool | None = None):
        super().__init__(model, learning_rate, seed, betas)
        if legacy is not None:
            self.autoencoder.quantize.legacy = bool(legacy)

    def reconstruct(self, x: torch.Tensor, generators):
        quant, qloss, (_, _, indices) = VQModel.encode(self.autoencoder, x)
        return VQModel.decode(self.autoencoder, quant), (qloss, indices)

    def losses(self, x, xrec, extra, optimizer_idx, step, last_layer, split):
        qloss, indices = extra
        return self.autoencoder.loss(qloss, x, xrec, optimizer_idx, step, last_layer=last_layer, split=split,
                                     predicted_indices=indices)

    def configure_optimizers(self):
        ae = self.autoencoder
        params = (list(ae.encoder.parameters()) + list(ae.decoder.parameters()) + list(ae.quantize.parameters())
                  + list(ae.quant_conv.parameters()) + list(ae.post_quant_conv.parameters()))
        return self._optimizers(params, ae.lr_g_factor * self.learning_rate)
