"""Training latent diffusion models (text-to-image and the concat-conditioned upscaler) with Lightning.

The model is a plain :class:`sdkit.diffusion.LatentDiffusion` built from the config's ``model`` section; this
module adds what CompVis' LightningModule did (ε loss, EMA, ema-scoped validation, AdamW + LambdaLR, image
logging) and what it lacked: conditioning dropout for classifier-free guidance, per-sample random draws that
make runs exactly reproducible and resumable, and optional caches of latents and text embeddings.

Options go in ``model.training`` of the config (they do not change the model, so ``sdkit.load_model`` ignores
them)::

    model:
      base_learning_rate: 1.0e-4
      target: sdkit.diffusion.LatentDiffusion
      params: {... ucg_probability: 0.1, use_ema: true, scheduler_config: {...}}
      training:
        cache_latents: true        # encode each image once (needs a deterministic dataset: no random augmentation)
        cache_text: true           # encode each distinct caption once
                                   # (sdkit train keeps both caches in <run>/cache/, so a resumed run reuses them)
        gradient_checkpointing: false
        weight_decay: 0.01
        addons:                    # extra training losses, each {target, params} (e.g. training/grounding.py)
          grounding: {target: sdkit.training.grounding.GroundingLoss, params: {weight: 0.5, max_timestep: 700}}
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..config import instantiate_from_config
from ..diffusion import LatentDiffusion
from ..nn.autoencoder import AutoencoderKL
from ..nn.distributions import DiagonalGaussianDistribution
from . import encoding_cache
from .strategies import ema_update, full_parameters, is_fsdp
from .common import WrappedModule, batch_value, build, image_input, per_sample_randn, sample_generators

VALIDATION_STEP = -1  # the "step" validation draws are keyed by: the same noise at every validation
ADDON_PREFIX = "addon_modules."      # state dict keys of add-on weights (LatentDiffusionModule.addon_modules)
ADDON_STATE_KEY = "sdkit_addon_state"  # where checkpoints keep them, outside the CompVis state dict


class LatentDiffusionModule(WrappedModule):
    """Lightning wrapper of a LatentDiffusion model.

    Args:
        model: a LatentDiffusion or its ``{target, params}`` config.
        learning_rate: AdamW rate (the run sets it from base_learning_rate and the scaling rule).
        seed: seed of every per-sample draw.
        cache_latents: keep each training image's posterior (mean, log-variance) after its first encoding.
        cache_text: keep each distinct caption's embedding after its first encoding.
        cache_dtype: storage type of cached text embeddings ("float16" halves the memory). Every embedding goes
            through the cache type, also the first time, so a run gives the same numbers with or without a warm
            cache.
        gradient_checkpointing: recompute UNet activations in backward (None: keep the config's use_checkpoint).
        weight_decay, betas, eps: AdamW options (torch defaults, as CompVis).
        log_images_kwargs: defaults for :meth:`log_images`.
        first_stage_ckpt: weights of the (frozen) autoencoder: an autoencoder run's checkpoint (``sdkit train``
            of an AutoencoderKL/VQModel config) or any file whose keys are the autoencoder's, with or without
            the ``first_stage_model.`` prefix. CompVis put this in first_stage_config.params.ckpt_path.
        init_from: a full LatentDiffusion checkpoint to start from (fine-tuning), loaded with EMA weights when
            ``init_use_ema`` and the file has them.
        init_strict: with False, weights the model has and ``init_from`` lacks keep their initial values (with a
            warning), so a trained model can grow: e.g. a SpatialTransformer added at another resolution starts
            as the identity (its output projection is zero-initialised) and the grown model at first computes
            exactly what the checkpoint's model did.
        addons: extra training losses, a list or a name -> config mapping of ``{target, params}`` objects with
            ``name``, ``weight``, ``setup(module)`` (refuse what they cannot work with) and ``watch(module, batch,
            t, drop, cond)``: a context manager around the training forward pass that yields a function returning
            the extra loss (or None). Example: the attention grounding loss, ``sdkit.training.grounding``. None
            (the default) leaves training as CompVis had it. Add-ons act on training batches only.
            An add-on that trains weights of its own (LoRA, textual inversion) registers the module that holds
            them in ``module.addon_modules[name]`` during ``setup`` (so they move with the module, are synced
            under DDP and are saved in checkpoints, outside the CompVis ``state_dict``) and defines
            ``trainable_parameters(module) -> list[Parameter]``. When any add-on does, only those parameters are
            optimised: the base model is frozen (``requires_grad`` off, no EMA update) and keeps its weights.
    """

    inner = "ldm"

    def __init__(self, model: Any, learning_rate: float = 1e-4, seed: int = 0, cache_latents: bool = False,
                 cache_text: bool = False, cache_dtype: str = "float16", gradient_checkpointing: bool | None = None,
                 weight_decay: float = 0.01, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 log_images_kwargs: Mapping | None = None, first_stage_ckpt: str | None = None,
                 init_from: str | None = None, init_use_ema: bool = True, init_strict: bool = True,
                 addons: Mapping | Sequence | None = None):
        super().__init__(seed=seed, learning_rate=learning_rate)
        self.ldm: LatentDiffusion = build(model)
        if not isinstance(self.ldm, LatentDiffusion):
            raise TypeError(f"LatentDiffusionModule trains a LatentDiffusion, got {type(self.ldm).__name__}")
        if self.ldm.model.conditioning_key in ("hybrid", "adm"):
            raise NotImplementedError(
                f"training with conditioning_key={self.ldm.model.conditioning_key!r} (inpainting / class "
                f"labels) is not implemented; this module trains text-to-image (crossattn), concat-conditioned "
                f"(super-resolution) and unconditional models")
        if init_from is not None:  # fine-tuning: every weight from a checkpoint (EMA ones by default)
            from ..checkpoints import load_weights
            load_weights(self.ldm, init_from, use_ema=init_use_ema, strict=init_strict)
        if first_stage_ckpt is not None:
            load_first_stage(self.ldm, first_stage_ckpt)
        self.cache_latents, self.cache_text = cache_latents, cache_text
        self.cache_dtype = getattr(torch, cache_dtype)
        self.weight_decay, self.betas, self.eps = weight_decay, tuple(betas), eps
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self._latent_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._text_cache: dict[str, torch.Tensor] = {}
        self._cache_dir: Path | None = None   # set by sdkit train: <run>/cache (see encoding_cache)
        self._cache_data_config = ""
        self._cache_fingerprint: str | None = None
        self._cache_sizes_saved = (0, 0)
        if gradient_checkpointing is not None:
            set_gradient_checkpointing(self.ldm.model, gradient_checkpointing)
        addons = addons.values() if isinstance(addons, Mapping) else (addons or [])
        self.addons = [a if hasattr(a, "watch") else instantiate_from_config(a) for a in addons if a is not None]
        self.addon_modules = nn.ModuleDict()   # weights add-ons train (see addons above)
        for addon in self.addons:
            addon.setup(self)
        self._freeze_base_for_addons()

    # ------------------------------------------------------------------ inputs
    @property
    def is_text_conditioned(self) -> bool:
        return self.ldm.is_text_conditioned

    def posterior_moments(self, batch: Mapping, split: str) -> torch.Tensor:
        """The first stage's posterior parameters [B, 2C, h, w] (KL) or latent [B, C, h, w] (VQ), cached per
        dataset index when ``cache_latents``."""
        if not self.cache_latents:
            return self._moments(image_input(batch, self.ldm.first_stage_key).to(self.device))
        keys = [(split, i) for i in batch["index"].tolist()]
        missing = [j for j, k in enumerate(keys) if k not in self._latent_cache]
        if missing:
            x = image_input(batch, self.ldm.first_stage_key)
            # one item at a time: kernels may round differently for other batch sizes, and a cached value must
            # not depend on which batch an item first came in (a resumed run refills the cache in other batches)
            for j in missing:
                self._latent_cache[keys[j]] = self._moments(x[j:j + 1].to(self.device))[0].detach().cpu()
        return torch.stack([self._latent_cache[k] for k in keys]).to(self.device)

    def _full_precision(self):
        """Frozen encoders run in float32 also under mixed precision (bf16-mixed): their outputs are inputs to
        the diffusion model, cached and reused for the whole run, and at inference they run in float32."""
        if not torch.amp.is_autocast_available(self.device.type):  # e.g. "meta": nothing to switch off
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        # the images in the autoencoder's own dtype: float32, except under FSDP with bf16-mixed, whose forward
        # holds every parameter of the root unit (the frozen autoencoder too) in bfloat16 (found on a GPU run)
        dtype = self.ldm.first_stage_model.encoder.conv_in.weight.dtype
        with self._full_precision():
            encoded = self.ldm.encode_first_stage(x.to(dtype))
        moments = encoded.parameters if isinstance(encoded, DiagonalGaussianDistribution) else encoded
        return moments.float()

    def latents(self, moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Scaled latents: a posterior sample (one draw per item) × scale_factor, as get_first_stage_encoding."""
        if isinstance(self.ldm.first_stage_model, AutoencoderKL):
            posterior = DiagonalGaussianDistribution(moments)
            eps = per_sample_randn(generators, posterior.mean.shape[1:], moments.device, moments.dtype)
            z = posterior.mean + posterior.std * eps
        else:
            z = moments
        return self.ldm.scale_factor * z

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Text conditioning, through the cache when ``cache_text`` (frozen text encoders only)."""
        if self.ldm.cond_stage_trainable:
            return self.ldm.get_learned_conditioning(captions)
        if not self.cache_text:
            with self._full_precision():
                return self.ldm.get_learned_conditioning(captions)
        missing = sorted({c for c in captions if c not in self._text_cache})
        with torch.no_grad(), self._full_precision():
            for c in missing:  # one at a time, so the cached value does not depend on the batch (see above)
                self._text_cache[c] = self.ldm.get_learned_conditioning([c])[0].detach().to("cpu", self.cache_dtype)
        return torch.stack([self._text_cache[c].float() for c in captions]).to(self.device)

    def conditioning(self, batch: Mapping, drop: list[bool] | None = None):
        """The encoded conditioning; ``drop[i]`` replaces item i's caption with the empty prompt."""
        if self.ldm.cond_stage_model is None:  # an unconditional model
            return None
        c = batch_value(batch, self.ldm.cond_stage_key)
        if isinstance(c, (list, tuple)) and all(isinstance(s, str) for s in c):
            captions = ["" if drop is not None and drop[i] else s for i, s in enumerate(c)]
            return self.encode_text(captions)
        if isinstance(c, torch.Tensor):
            c = c.to(self.device).float()
            if c.ndim == 4 and c.shape[-1] in (1, 3, 4) and c.shape[1] not in (1, 3, 4):
                c = c.permute(0, 3, 1, 2).contiguous()
        return self.ldm.get_learned_conditioning(c)

    # ------------------------------------------------------------------ caches kept across restarts
    def use_cache_dir(self, folder: Path | str, data_config: str) -> None:
        """Keep the latent and text caches in ``folder`` (written at checkpoints, read when a run starts)."""
        self._cache_dir, self._cache_data_config = Path(folder), data_config

    def _cache_file(self) -> Path | None:
        if self._cache_dir is None or not (self.cache_latents or self.cache_text):
            return None
        if self._cache_fingerprint is None:
            text_encoder = None if self.ldm.cond_stage_trainable else self.ldm.cond_stage_model
            self._cache_fingerprint = encoding_cache.fingerprint(
                self._cache_data_config, self.ldm.first_stage_model, text_encoder, self.cache_dtype)
        return self._cache_dir / f"encodings-rank{self.global_rank}.pt"

    def on_fit_start(self) -> None:
        path = self._cache_file()
        stored = encoding_cache.load(path, self._cache_fingerprint) if path is not None else None
        if stored is not None:
            latents, texts = stored
            for k, v in latents.items():
                self._latent_cache.setdefault(k, v)
            for k, v in texts.items():
                self._text_cache.setdefault(k, v)
            self._cache_sizes_saved = (len(latents), len(texts))
            print(f"encoding cache {path}: {len(latents)} latents, {len(texts)} captions")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # add-on weights travel beside the state dict, which stays a CompVis checkpoint that load_model reads
        state = checkpoint.get("state_dict", {})
        addon_keys = [k for k in state if k.startswith(ADDON_PREFIX)]
        if addon_keys:
            checkpoint[ADDON_STATE_KEY] = {k: state.pop(k) for k in addon_keys}
        for addon in self.addons:
            if hasattr(addon, "on_save_checkpoint"):   # e.g. the LoRA add-on writes its .safetensors file
                addon.on_save_checkpoint(self, checkpoint)
        path = self._cache_file()
        sizes = (len(self._latent_cache), len(self._text_cache))
        if path is not None and sizes != self._cache_sizes_saved:  # only when they grew: after an epoch, never
            encoding_cache.save(path, self._cache_fingerprint, self._latent_cache, self._text_cache)
            self._cache_sizes_saved = sizes

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].update(checkpoint.pop(ADDON_STATE_KEY, {}))

    def on_fit_end(self) -> None:
        for addon in self.addons:
            if hasattr(addon, "on_fit_end"):
                addon.on_fit_end(self)

    # ------------------------------------------------------------------ loss
    def shared_step(self, batch: Mapping, step: int, split: str, ucg: float):
        """Loss and logs of one batch, every random draw coming from the items' own generators."""
        generators = sample_generators(self.seed, step, batch["index"])
        # fixed draw order per item: dropout coin, timestep, posterior sample, noise
        drop = [bool(torch.rand((), generator=g) < ucg) for g in generators]
        t = torch.stack([torch.randint(0, self.ldm.num_timesteps, (), generator=g) for g in generators])
        z = self.latents(self.posterior_moments(batch, split), generators)
        noise = per_sample_randn(generators, z.shape[1:], z.device, z.dtype)
        cond = self.conditioning(batch, drop if ucg > 0 else None)
        addons = self.addons if split == "train" else []
        with contextlib.ExitStack() as stack:
            extra_losses = [stack.enter_context(addon.watch(self, batch, t, drop, cond)) for addon in addons]
            loss, logs = self.ldm.p_losses(z, cond, t.to(self.device), noise=noise)
            for addon, extra_loss in zip(addons, extra_losses):
                value = extra_loss()
                if value is not None:
                    logs[f"train/loss_{addon.name}"] = value.detach()
                    loss = loss + addon.weight * value
        return loss, logs, drop

    def training_step(self, batch: Mapping, batch_idx: int):
        self.seed_step(batch_idx)
        if self.ldm.scale_by_std and self.global_step == 0 and batch_idx == 0 and float(self.ldm.scale_factor) == 1.0:
            self.set_scale_by_std(batch)
        ucg = float(self.ldm.ucg_probability) if self.is_text_conditioned else 0.0
        loss, logs, drop = self.shared_step(batch, self.global_step, "train", ucg)
        logs["train/ucg_dropped"] = torch.tensor(sum(drop) / len(drop))
        self.log_dict(logs, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=len(drop))
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def set_scale_by_std(self, batch: Mapping) -> None:
        """CompVis scale_by_std: scale_factor = 1 / std of the first batch's latents, so the diffusion model sees
        unit-variance inputs. Under DDP the statistics of all ranks' batches are combined (CompVis let each rank
        keep its own factor). Stored as a buffer, so checkpoints carry it."""
        z = self.latents(self.posterior_moments(batch, "train"), sample_generators(self.seed, -2, batch["index"]))
        stats = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=z.device)]).double()
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        mean = stats[0] / stats[2]
        std = torch.sqrt(stats[1] / stats[2] - mean**2)
        self.ldm.scale_factor.fill_(float(1.0 / std))
        print(f"scale_by_std: setting scale_factor to {float(self.ldm.scale_factor):.5f}")

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # EMA after each optimizer step (not per accumulation micro-batch), and before any checkpoint callback
        if self.ldm.use_ema:
            if is_fsdp(self.trainer):  # sharded parameters: gather them, update the (replicated) EMA buffers
                with full_parameters(self.trainer, writeback=False):
                    ema_update(self.ldm.model_ema, self.ldm.model)
            else:
                self.ldm.model_ema(self.ldm.model)

    @torch.no_grad()
    def validation_step(self, batch: Mapping, batch_idx: int):
        _, logs, _ = self.shared_step(batch, VALIDATION_STEP, "validation", 0.0)
        n = len(batch["index"])
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        if is_fsdp(self.trainer):  # swapping EMA weights into sharded parameters is not supported
            return
        with self.ldm.ema_scope():
            _, logs_ema, _ = self.shared_step(batch, VALIDATION_STEP, "validation", 0.0)
        logs_ema = {k + "_ema": v for k, v in logs_ema.items()}
        self.log_dict(logs_ema, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)

    # ------------------------------------------------------------------ optimizer
    def addon_parameters(self) -> list[nn.Parameter] | None:
        """The parameters the add-ons train, each once, or None when no add-on trains weights of its own."""
        owners = [addon for addon in self.addons if hasattr(addon, "trainable_parameters")]
        if not owners:
            return None
        params = {id(p): p for addon in owners for p in addon.trainable_parameters(self)}
        if not params:
            names = ", ".join(getattr(addon, "name", type(addon).__name__) for addon in owners)
            raise ValueError(f"the training add-on(s) {names} gave no parameters to train; check their config")
        return list(params.values())

    def _freeze_base_for_addons(self) -> None:
        """When add-ons train their own weights, the base model is frozen: only theirs change."""
        params = self.addon_parameters()
        if params is None:
            return
        trained = {id(p) for p in params}
        for p in self.ldm.parameters():
            p.requires_grad_(id(p) in trained)   # frozen parameters also get no EMA update (LitEma skips them)
        for p in params:
            p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The add-ons' own weights when an add-on trains some (the base model frozen); otherwise the UNet, plus
        the cond stage when trainable and logvar when learned (as CompVis)."""
        addon_params = self.addon_parameters()
        if addon_params is not None:
            return addon_params
        params = list(self.ldm.model.parameters())
        if self.ldm.cond_stage_trainable and self.ldm.cond_stage_model is not None:
            params += list(self.ldm.cond_stage_model.parameters())
        if self.ldm.learn_logvar:
            params.append(self.ldm.logvar)
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate,
                                weight_decay=self.weight_decay, betas=self.betas, eps=self.eps)
        return with_scheduler(opt, self.ldm.scheduler_config)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def log_images(self, batch: Mapping, N: int = 4, sample: bool = True, ddim_steps: int = 20,
                   ddim_eta: float = 0.0, sampler: str = "ddim", unconditional_guidance_scale: float = 5.0,
                   plot_reconstruction: bool = True, seed: int = 0, **kwargs) -> dict:
        """Images for the image logger, in [-1, 1]: ``inputs``, ``reconstruction``, ``samples`` (EMA weights,
        classifier-free guidance for text models) and ``captions`` (list of str), for the first N items."""
        from ..samplers import denoiser, sample as run_sampler

        options = {**self.log_images_kwargs, **kwargs}
        N = min(N, len(batch["index"]))
        small = {k: (v[:N] if isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in batch.items()}
        log: dict[str, Any] = {}
        x = image_input(small, self.ldm.first_stage_key).to(self.device)
        log["inputs"] = x
        cond_input = batch_value(small, self.ldm.cond_stage_key) if self.ldm.cond_stage_model is not None else None
        if isinstance(cond_input, (list, tuple)):
            log["captions"] = [str(s) for s in cond_input]
        elif isinstance(cond_input, torch.Tensor) and cond_input.ndim == 4:  # e.g. the upscaler's low-res image
            low = image_input(small, self.ldm.cond_stage_key).to(self.device)
            log["conditioning"] = low
            if low.shape[-2:] != x.shape[-2:]:
                log["conditioning_bicubic"] = torch.nn.functional.interpolate(
                    low, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        moments = self.posterior_moments(small, "log_images")
        z = self.latents(moments, sample_generators(seed, 0, small["index"]))
        if plot_reconstruction:
            log["reconstruction"] = self.ldm.decode_first_stage(z)
        if sample:
            cond = self.conditioning(small)
            scale = float(options.pop("unconditional_guidance_scale", unconditional_guidance_scale))
            uncond = self.conditioning({**small, self.ldm.cond_stage_key: [""] * N}) \
                if self.is_text_conditioned and scale != 1.0 else None
            eps_fn = denoiser(self.ldm, cond, uncond, scale)
            x_T = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
            steps = int(options.pop("ddim_steps", ddim_steps))
            extra = {"eta": options.pop("ddim_eta", ddim_eta)} if sampler in ("ddim",) else {}
            with self.ldm.ema_scope():
                z0 = run_sampler(eps_fn, x_T, self.ldm.alphas_cumprod, sampler=sampler, steps=steps,
                                 progress=False, **extra)
            log["samples"] = self.ldm.decode_first_stage(z0)
        self._latent_cache = {k: v for k, v in self._latent_cache.items() if k[0] != "log_images"}
        return log


def load_first_stage(ldm: LatentDiffusion, path: str) -> None:
    """Load autoencoder weights into ``ldm.first_stage_model`` (strict), from an autoencoder checkpoint (its loss
    and discriminator weights are left out) or a full model checkpoint (``first_stage_model.*`` keys)."""
    from ..checkpoints import CheckpointError, read_checkpoint

    state, _ = read_checkpoint(path)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
    expected = ldm.first_stage_model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"first_stage_ckpt {path!r} does not fit first_stage_config: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape "
            f"{wrong[:3]}. Use the checkpoint of an autoencoder trained with the same ddconfig/embed_dim.")
    ldm.first_stage_model.load_state_dict(state, strict=True)


def with_scheduler(optimizer: torch.optim.Optimizer, scheduler_config) -> Any:
    """Lightning's optimizer config: the optimizer, plus a LambdaLR stepping every optimizer step when a CompVis
    ``scheduler_config`` (a multiplier schedule) is given."""
    if scheduler_config is None:
        return optimizer
    schedule = instantiate_from_config(scheduler_config)
    # the schedule object itself is the lambda, so LambdaLR saves its state (cycle bookkeeping) in checkpoints
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on/off in every UNet block that supports it (use_checkpoint / checkpoint)."""
    for m in module.modules():
        for attr in ("use_checkpoint", "checkpoint"):
            if isinstance(getattr(m, attr, None), bool):
                setattr(m, attr, bool(enabled))
