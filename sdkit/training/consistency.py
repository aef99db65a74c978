"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"): teach a copy of a trained
text-to-image model to jump from any noise level straight to the image, so that 4 sampling steps (the ``lcm``
sampler) give what 20 solver steps gave.

The teacher's probability-flow ODE, followed with classifier-free guidance, carries every noisy latent x_t to an
image. The student learns the consistency function f(x_t, t) = that image, in the boundary-condition form
``f = c_skip(t)·x + c_out(t)·x̂₀(x, t)`` (``sdkit.samplers.lcm.boundary_scalings``: f(x, 0) = x by construction).
One training item:

1. a latent z of a training image and its caption; an index n of the 50-step DDIM grid (t_{n+k} = 19, 39, …, 999),
   t_n = t_{n+k} − 20 (k = 20 of the 1000 training steps, LCM's skipping step; 0 below the first grid point);
2. x = √ᾱ z + √(1−ᾱ) ε at t_{n+k};
3. the frozen teacher takes one guided DDIM step from t_{n+k} to t_n (ε = ε_u + w·(ε_c − ε_u), sdkit's w: 5 is the
   base model's tested guidance; LCM's w is this minus 1) — a point x_prev on the same guided ODE trajectory;
4. the loss pulls the student's f(x, t_{n+k}) towards the target network's f(x_prev, t_n), the target being an EMA
   of the student (decay 0.95, as LCM) and not differentiated: pseudo-Huber √(d² + c²) − c, mean over elements,
   c = 0.001 (the LCM code's; our unit-variance 16×16×4 latents are scaled like SD's).

Consistency at every adjacent pair of grid points, plus f(x, 0) = x, makes f constant along the guided trajectory.

Choices at laptop scale, and why:

- **Fixed guidance** (w = 5), not LCM's w sampled from a range and fed in through an extra embedding: that
  embedding (``time_cond_proj_dim``) changes SD v1's UNet, and a student shown a range without it learns a blur of
  them (LCM-LoRA's behaviour). The live preview needs one good setting; the distilled model samples without
  guidance (one UNet pass per step), which is what makes 4 steps fast.
- **A low-rank student** (LCM-LoRA, Luo et al. 2023b): the student is the frozen teacher plus a rank-r delta of every
  linear and conv layer (:mod:`sdkit.nn.lowrank`); the file that ships is what was trained (rank 16: 4.9 MB in
  float16, under the budget of the repository's 64 MiB carry limit) and merges into ``load_model("tiny")``'s
  weights for a plain-speed UNet. Teacher, student and target are one set of UNet weights run with different
  deltas (``functional_call``), so memory and checkpoints hold the UNet once.
- The data and its caches are the base model's (shapes + emoji, cached latents and text states), through
  :class:`LatentDiffusionModule`; every random draw comes from per-item generators, so a resumed run computes what
  the unbroken run would have.

Every checkpoint also writes the target network's delta to ``<run>/lcm/tiny-lcm-step<N>.safetensors`` and
``<run>/lcm/last.safetensors`` (the file that ships as ``data/tiny-lcm.safetensors``).
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..nn.lowrank import LowRankDelta, save_delta
from ..samplers.lcm import TIMESTEP_SCALING, boundary_scalings
from .common import batch_value, per_sample_randn, sample_generators
from .diffusion import VALIDATION_STEP, LatentDiffusionModule

EXPORT_DIR = "lcm"


def ddim_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n) of the distillation grid: k·j − 1 for j = 1 … N (k = T/N), and the grid point below each
    (0 below the first: the last solver step lands on the cleanest training timestep, as LCM's DDIMSolver)."""
    k = num_train_timesteps // num_ddim_timesteps
    start = torch.arange(1, num_ddim_timesteps + 1) * k - 1
    return start, torch.clamp(start - k, min=0)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """mean(√((a − b)² + c²) − c): squared error for |a − b| ≪ c, absolute error beyond (LCM's consistency loss)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


class ConsistencyDistillationModule(LatentDiffusionModule):
    """Latent consistency distillation of a text-to-image model into a low-rank delta (see the module docstring).

    Args:
        teacher: the model to distil, as ``sdkit.load_model`` takes it (a bundled name or a YAML path), frozen.
        teacher_ckpt: its weights (None: the config's shipped ``weights:``).
        rank: the delta's rank on every linear and conv layer of the UNet.
        guidance_scale: w of the teacher's classifier-free guidance (sdkit's convention, ε_u + w·(ε_c − ε_u)).
        num_ddim_timesteps: N of the teacher's solver grid (skipping step k = T/N: 50 → k = 20).
        timestep_scaling: s of the boundary condition (LCM: 10).
        huber_c: c of the pseudo-Huber loss.
        ema_decay: of the target network (LCM: 0.95).
        delta_seed: seed of the delta's initialisation.
        warm_up_steps: linear learning-rate warm-up from 0 (then constant, as the LCM scripts).
        other arguments: as :class:`LatentDiffusionModule` (learning rate, caches, AdamW options, image logging).
    """

    def __init__(self, teacher: str = "tiny", teacher_ckpt: str | None = None, rank: int = 16,
                 guidance_scale: float = 5.0, num_ddim_timesteps: int = 50,
                 timestep_scaling: float = TIMESTEP_SCALING, huber_c: float = 0.001, ema_decay: float = 0.95,
                 delta_seed: int = 0, warm_up_steps: int = 0, learning_rate: float = 1e-4, seed: int = 0, cache_latents: bool = False,
                 cache_text: bool = False, cache_dtype: str = "float16", weight_decay: float = 0.01,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, log_images_kwargs: Mapping | None = None):
        from ..checkpoints import load_model

        ldm = load_model(teacher, teacher_ckpt)
        super().__init__(ldm, learning_rate=learning_rate, seed=seed, cache_latents=cache_latents,
                         cache_text=cache_text, cache_dtype=cache_dtype, weight_decay=weight_decay, betas=betas,
                         eps=eps, log_images_kwargs=log_images_kwargs)
        if not self.is_text_conditioned or self.ldm.parameterization != "eps":
            raise ValueError("consistency distillation here needs a text-conditioned ε-prediction model (the tiny "
                             f"t2i model or SD v1), got conditioning {self.ldm.model.conditioning_key!r}, "
                             f"parameterization {self.ldm.parameterization!r}")
        T = self.ldm.num_timesteps
        if not 1 <= num_ddim_timesteps <= T or T % num_ddim_timesteps:
            raise ValueError(f"num_ddim_timesteps must divide the {T} training timesteps (50: k = 20), "
                             f"got {num_ddim_timesteps}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: the target is the student itself), got {ema_decay}")
        self.ldm.requires_grad_(False)           # the teacher is frozen; the student is the delta alone
        self.ldm.use_ema = False                 # (LatentDiffusionModule would update an EMA of the UNet)
        self.ldm.monitor = "val/loss_lcm"        # what sdkit train keeps the best checkpoint by (validation_step)
        self.ldm.scheduler_config = None if not warm_up_steps else {
            "target": "sdkit.lr_schedulers.LambdaLinearScheduler",
            "params": {"warm_up_steps": [int(warm_up_steps)], "cycle_lengths": [10 ** 13], "f_start": [1e-6],
                       "f_max": [1.0], "f_min": [1.0]}}
        self.teacher_name = teacher
        self.guidance_scale, self.timestep_scaling = float(guidance_scale), float(timestep_scaling)
        self.huber_c, self.ema_decay, self.num_ddim_timesteps = float(huber_c), float(ema_decay), num_ddim_timesteps
        self.grid_start, self.grid_prev = ddim_grid(T, num_ddim_timesteps)
        # student and target: registered as add-on modules, so checkpoints keep them beside the CompVis state
        # dict of the teacher (sdkit_addon_state) and a resumed run restores both
        student = LowRankDelta(self.unet, rank=rank, seed=delta_seed)
        target = LowRankDelta(self.unet, rank=rank, seed=delta_seed)
        target.load_state_dict(student.state_dict())
        target.requires_grad_(False)
        self.addon_modules["lcm_student"], self.addon_modules["lcm_target"] = student, target

    @property
    def unet(self) -> torch.nn.Module:
        return self.ldm.model.diffusion_model

    @property
    def student(self) -> LowRankDelta:
        return self.addon_modules["lcm_student"]

    @property
    def target(self) -> LowRankDelta:
        return self.addon_modules["lcm_target"]

    # ------------------------------------------------------------------ the consistency function
    def consistency(self, delta: LowRankDelta | None, x: torch.Tensor, t: torch.Tensor,
                    cond: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip·x + c_out·x̂₀ of the UNet with ``delta`` (None: the teacher itself)."""
        t_model = t.to(x.device, torch.float32)
        eps = self.unet(x, t_model, context=cond) if delta is None else delta.run(self.unet, x, t_model, context=cond)
        return self.boundary(x, eps, t)

    def boundary(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = boundary_scalings(t.to(x.device, torch.float64), self.timestep_scaling)
        x0 = self.ldm.predict_start_from_noise(x, t.to(x.device), eps)
        view = (-1,) + (1,) * (x.ndim - 1)
        return c_skip.view(view).to(x.dtype) * x + c_out.view(view).to(x.dtype) * x0

    @torch.no_grad()
    def teacher_ddim_step(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, cond: torch.Tensor,
                          uncond: torch.Tensor) -> torch.Tensor:
        """One guided DDIM step (η = 0) of the frozen teacher from t to t_prev: both ε in one batch of 2B."""
        eps_u, eps_c = self.unet(torch.cat([x, x]), torch.cat([t, t]).to(x.device, torch.float32),
                                 context=torch.cat([uncond, cond])).float().chunk(2)
        eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        x0 = self.ldm.predict_start_from_noise(x.float(), t.to(x.device), eps)
        a_prev = self.ldm.alphas_cumprod[t_prev.to(x.device)].view(-1, *([1] * (x.ndim - 1)))
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def distillation_loss(self, batch: Mapping, step: int, split: str, student: LowRankDelta | None = None):
        """The consistency loss of one batch (student ``student``, default the trained one), every random draw
        from the items' own generators: grid index, posterior sample, noise (in that order)."""
        generators = sample_generators(self.seed, step, batch["index"])
        n = torch.stack([torch.randint(0, self.num_ddim_timesteps, (), generator=g) for g in generators])
        t, t_prev = self.grid_start[n], self.grid_prev[n]
        z = self.latents(self.posterior_moments(batch, split), generators)
        noise = per_sample_randn(generators, z.shape[1:], z.device, z.dtype)
        x = self.ldm.q_sample(z, t.to(z.device), noise=noise)
        cond = self.conditioning(batch)
        uncond = self.encode_text([""] * len(n))
        with torch.no_grad():
            x_prev = self.teacher_ddim_step(x, t, t_prev, cond, uncond)
            target = self.consistency(self.target, x_prev, t_prev, cond)
        prediction = self.consistency(self.student if student is None else student, x, t, cond)
        return pseudo_huber(prediction, target, self.huber_c)

    # ------------------------------------------------------------------ Lightning
    def training_step(self, batch: Mapping, batch_idx: int):
        self.seed_step(batch_idx)
        loss = self.distillation_loss(batch, self.global_step, "train")
        n = len(batch["index"])
        self.log("train/loss_lcm", loss.detach(), prog_bar=True, logger=True, on_step=True, on_epoch=True,
                 batch_size=n)
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping, batch_idx: int):
        """The target network's (the shipped model's) consistency with itself across one teacher step, on held-out
        items with fixed draws: falls as the distillation converges."""
        loss = self.distillation_loss(batch, VALIDATION_STEP, "validation", student=self.target)
        self.log("val/loss_lcm", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch["index"]))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.student.parameters())

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.target.lerp_towards(self.student, 1.0 - self.ema_decay)

    # ------------------------------------------------------------------ the file that ships
    def export_dir(self) -> Path | None:
        if self._trainer is None or not self.trainer.default_root_dir:
            return None
        return Path(self.trainer.default_root_dir) / EXPORT_DIR

    def export(self, path: str | Path) -> Path:
        """Write the target network's delta (the distilled model) with what a user needs to sample it."""
        meta = {"base": self.teacher_name, "method": "latent consistency distillation (sdkit.training.consistency)",
                "sampler": "lcm", "steps": 4, "guidance_scale_distilled": self.guidance_scale,
                "sample_guidance_scale": 1.0, "original_inference_steps": self.num_ddim_timesteps,
                "timestep_scaling": self.timestep_scaling, "huber_c": self.huber_c, "ema_decay": self.ema_decay,
                "global_step": self.global_step if self._trainer is not None else 0}
        return save_delta(self.target, self.unet, path, meta)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        folder = self.export_dir()
        if folder is not None and self.global_rank == 0:
            step_file = self.export(folder / f"tiny-lcm-step{self.global_step:06}.safetensors")
            shutil.copyfile(step_file, folder / "last.safetensors")

    def on_fit_end(self) -> None:
        super().on_fit_end()
        folder = self.export_dir()
        if folder is not None and self.global_rank == 0:
            self.export(folder / "last.safetensors")

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def log_images(self, batch: Mapping, N: int = 4, lcm_steps: Sequence[int] = (1, 2, 4), teacher_steps: int = 20,
                   seed: int = 0, **kwargs) -> dict:
        """The first N captions drawn by the distilled model (the target network) at each of ``lcm_steps`` lcm
        steps without guidance, and by the teacher with DPM-Solver++(2M), ``teacher_steps`` steps, its guidance."""
        from ..samplers import denoiser, sample

        N = min(N, len(batch["index"]))
        captions = [str(c) for c in list(batch_value(batch, self.ldm.cond_stage_key))[:N]]
        cond, uncond = self.encode_text(captions), self.encode_text([""] * N)
        shape = (N, self.ldm.channels, self.ldm.image_size, self.ldm.image_size)
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        log: dict = {"captions": captions}

        def student_eps(x, t):
            return self.target.run(self.unet, x, t, context=cond)

        for steps in lcm_steps:
            z = sample(student_eps, x_T, self.ldm.alphas_cumprod, "lcm", steps, progress=False,
                       generator=torch.Generator().manual_seed(seed + 1))
            log[f"lcm_{steps}step"] = self.ldm.decode_first_stage(z)
        z = sample(denoiser(self.ldm, cond, uncond, self.guidance_scale), x_T, self.ldm.alphas_cumprod, "dpmpp_2m",
                   teacher_steps, progress=False)
        log[f"teacher_{teacher_steps}step"] = self.ldm.decode_first_stage(z)
        return log
