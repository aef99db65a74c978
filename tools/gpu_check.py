"""The GPU check of issue 21 (item 5), one command on a lent machine: SD v1 speed and memory, sdkit beside diffusers.

    bash tools/gpu_check.sh               # on the GPU machine (installs the carried wheels, then runs this)
    bash tools/gpu_check.sh --cpu-smoke   # here: every code path on tiny configs at 64x64, a few steps, on the CPU
    python tools/gpu_check.py --help      # the options (budget, steps, sampler, compile mode, groups)

What it measures, most important first (each group runs in its own child process, so one that fails, hangs or
outlives the budget loses nothing else; the parent kills it at the budget and moves on):

1. ``eager``: the bundled ``sd-v1-inference`` config as ``sdkit.load_model`` builds it (random weights), 512x512,
   50 steps, guidance 7.5 (one guided batch of 2 per step), fp16 then bf16, SDPA attention, without and with
   channels_last. sdkit's loop is what its pipelines run: ``samplers.sample(denoiser(model, cond, uncond, 7.5),
   x_T, ...)`` with float32 latents (the UNet casts to its dtype). diffusers' loop is its StableDiffusionPipeline
   loop: ``UNet2DConditionModel`` holding the *same* weight tensors (converted by ``sdkit.checkpoints.keys``), the
   same scheduler type (DDIM by default; ``--sampler dpmpp_2m`` = DPMSolverMultistepScheduler), latents in the
   model dtype. Text states come from sdkit's own CLIP (random weights, no tokenizer download), the same tensors
   for both. Warm-up runs first; then ``--rounds`` timed loops alternate the libraries, each between
   ``torch.cuda.synchronize()`` calls. Also the VAE decode of one 64x64 latent to 512x512 pixels.
2. ``train``: one full-size training step of the ``sd-v1-train`` model (CLIP at random weights instead of the
   pretrained download): bf16 autocast, gradient checkpointing, AdamW, EMA update, VAE + CLIP encoding of the
   batch included (as the config trains: no caches), batch ``--train-batch`` (8) at 512x512; the median of the
   timed steps after a warm-up step.
3. ``fsdp``: ``sdkit train``'s own building blocks (merge_configs, build_module, build_trainer) with
   ``sd-v1-train.yaml`` + ``sd-v1-train-fsdp.yaml`` (sdkit.training.strategies.fsdp_strategy), devices=1,
   synthetic shapes data at 512x512, max_steps=2: per-step time (the last step) and peak memory. Lightning makes
   the single-process group itself.
4. ``compile-fp16`` and 5. ``compile-bf16``: item 1's loops with ``torch.compile`` (``--compile-mode``) on the UNets
   and channels_last; the first (warm-up) call's time is reported as the compile time.

Memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. For the sampling loops, ``work``
is the peak above what was allocated before the loop; ``peak`` = the model's weights (UNet + VAE + CLIP, the same
size for both libraries since they hold the same tensors) + work, i.e. what one library alone would need.
For training: the absolute peak of the child process (model, EMA, AdamW state, activations).

Output: printed as it goes; under ``$OUT`` (else ./gpu_check_out): ``gpu_check.jsonl`` (one record per
measurement, written as soon as it is made), ``gpu_check.json`` (all records + environment) and
``gpu_check.md`` (the table, with the published anchors beside it).

CPU smoke mode (``--cpu-smoke``): the same code on the ``tiny-test`` config at 64x64 pixels, 4 steps, on the CPU:
fp32 and bf16 weights (float16 convolutions crawl on a CPU; the code is the same), torch.compile through the
``aot_eager`` backend (dynamo + AOTAutograd trace the same graphs; inductor's CPU code generation takes minutes
on 2 cores: ``--compile-backend inductor`` tries it under the group timeout), the training step under CPU bf16
autocast;
the FSDP group runs the same Lightning path with the strategy left to Lightning (``auto``), since Lightning
refuses FSDP on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "a photograph of an astronaut riding a horse"

ANCHORS = [  # published numbers for SD v1 at 512x512, 50 steps, fp16, batch 1 image (guided batch of 2)
    ("diffusers, A100, SDPA", 31.0),
    ("diffusers, A100, torch.compile + channels_last", 47.0),
    ("stable-fast, A100", 61.8),
    ("stable-fast, H100", 104.6),
]

GPU = {  # what the lent GPU machine runs
    "config": "sd-v1-inference", "train_config": "sd-v1-train", "image": 512, "steps": 50, "warmup_steps": 3,
    "rounds": 2, "vae_repeats": 3, "train_batch": 8, "train_steps": 3, "fsdp_steps": 2, "dtypes": ["fp16", "bf16"],
    "budget_s": 440, "compile_timeout_s": 300,
}
SMOKE = {  # the same code paths on the CPU, small
    "config": "tiny-test", "train_config": "tiny-test", "image": 64, "steps": 4, "warmup_steps": 1,
    "rounds": 1, "vae_repeats": 1, "train_batch": 2, "train_steps": 2, "fsdp_steps": 2, "dtypes": ["fp32", "bf16"],
    "budget_s": 1800, "compile_timeout_s": 300,
}

# group -> (seconds it needs to be worth starting on the GPU, what it is)
GROUPS = {
    "eager": (60, "SD v1 sampling loop + VAE decode, fp16 and bf16, eager (and channels_last)"),
    "train": (45, "one full-size training step, bf16, gradient checkpointing, AdamW"),
    "fsdp": (60, "one FSDP step through Lightning on one GPU"),
    "compile-fp16": (120, "sampling loop with torch.compile + channels_last, fp16"),
    "compile-bf16": (120, "sampling loop with torch.compile + channels_last, bf16"),
}
RESERVE_S = 8  # kept for writing the table at the end


# ================================================================================================ output


class Recorder:
    """Appends each measurement to gpu_check.jsonl as soon as it is made, and prints it."""

    def __init__(self, out: Path, group: str):
        self.path, self.group = out / "gpu_check.jsonl", group

    def add(self, **record) -> dict:
        record = {"group": self.group, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print("  result:", json.dumps(record), flush=True)
        return record


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


# ================================================================================================ helpers


def dtype_of(name: str):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


@contextlib.contextmanager
def peak_memory(device, into: dict):
    """into['work_gb'] = peak allocated above the start; into['peak_abs_gb'] = absolute peak (CUDA only)."""
    import torch
    if device.type != "cuda":
        into.update(work_gb=None, peak_abs_gb=None)
        yield
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    into.update(work_gb=(peak - base) / 2**30, peak_abs_gb=peak / 2**30)


def param_gb(*modules) -> float:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total / 2**30


def free(device) -> None:
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), sm=f"{props.major}.{props.minor}")
    for name in ("diffusers", "transformers", "lightning", "omegaconf"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            env[name] = f"missing ({type(e).__name__})"
    return env


# ================================================================================================ inference


def build_master(settings: dict):
    """The model as users load it (fp32, CPU, random weights), built once per child; variants are copies."""
    import sdkit
    t0 = time.perf_counter()
    model = sdkit.load_model(settings["config"])
    filled = fill_zero_init(model.model)
    log(f"filled {filled} zero-initialised UNet tensors with N(0, 0.02²) so that ε is not 0 (CompVis zero-inits "
        "the output layers of every residual branch and the UNet's last conv)")
    log(f"built {settings['config']} on the CPU in {time.perf_counter() - t0:.1f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    return model


def fill_zero_init(module, std: float = 0.02) -> int:
    """Random weights as load_model gives them leave the UNet's output at exactly 0 (zero_module); the speed
    does not depend on the values, but the sdkit/diffusers agreement check and the NaN checks mean more when the
    network computes something: fill the all-zero tensors (seeded)."""
    import torch
    g, n = torch.Generator().manual_seed(3), 0
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() > 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def variant(master, device, dtype):
    """A copy of the master on ``device`` with the networks in ``dtype``, exactly as load_model(device, dtype)."""
    from torch import nn
    model = copy.deepcopy(master).to(device)
    for part in ("model", "first_stage_model", "cond_stage_model"):
        if isinstance(getattr(model, part, None), nn.Module):
            getattr(model, part).to(dtype)
    return model.eval()


def diffusers_modules(model, config_name: str) -> dict:
    """diffusers' UNet and VAE holding ``model``'s weight tensors (shared, not copied): benchmarks/model_speed.py's
    construction for any bundled config."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdkit.checkpoints import keys
    from sdkit.config import load_config

    params = load_config(config_name).model.params
    unet_params = keys.as_plain(params.unet_config.params)
    fs = keys.as_plain(params.first_stage_config.params)
    state = keys.split_compvis(model.state_dict())
    out = {}
    for part, cls, config, weights in (
            ("unet", UNet2DConditionModel, keys.unet_diffusers_config(unet_params),
             keys.unet_to_diffusers(state["unet"], unet_params)),
            ("vae", AutoencoderKL, keys.vae_diffusers_config(fs["ddconfig"], fs["embed_dim"],
                                                             float(params.scale_factor)),
             keys.vae_to_diffusers(state["vae"], fs["ddconfig"]))):
        with torch.device("meta"):
            module = cls(**config)
        module.load_state_dict(weights, strict=True, assign=True)
        out[part] = module.eval()
    return out


def diffusers_scheduler(model, sampler: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from sdkit.checkpoints.keys import scheduler_diffusers_config

    cfg = scheduler_diffusers_config(model.betas, model.linear_start, model.linear_end)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "skip_prk_steps"}
    if sampler == "ddim":
        return DDIMScheduler.from_config(cfg)
    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)


class Loops:
    """sdkit's and diffusers' denoising loops over the same weights, noise and text states."""

    def __init__(self, model, ref: dict, settings: dict, sampler: str, device, guidance: float = 7.5):
        import torch
        self.model, self.ref, self.sampler, self.device, self.guidance = model, ref, sampler, device, guidance
        self.dtype = next(model.model.parameters()).dtype
        with torch.no_grad():
            self.cond = model.get_learned_conditioning([PROMPT])
            self.uncond = model.get_learned_conditioning([""])
        self.latent = settings["image"] // model.vae_factor
        g = torch.Generator().manual_seed(0)
        self.x_T = torch.randn(1, 4, self.latent, self.latent, generator=g).to(device)
        self.scheduler = diffusers_scheduler(model, sampler)
        self.context = torch.cat([self.uncond, self.cond]).to(self.dtype)

    def sdkit(self, steps: int):
        from sdkit.samplers import denoiser, sample
        eps_fn = denoiser(self.model, self.cond, self.uncond, self.guidance)
        return sample(eps_fn, self.x_T.clone(), self.model.alphas_cumprod, sampler=self.sampler, steps=steps,
                      progress=False)

    def diffusers(self, steps: int):
        import torch
        unet, sched = self.ref["unet"], self.scheduler
        sched.set_timesteps(steps, device=self.device)
        latents = self.x_T.to(self.dtype) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:   # StableDiffusionPipeline.__call__'s loop
                inp = sched.scale_model_input(torch.cat([latents] * 2), t)
                noise = unet(inp, t, encoder_hidden_states=self.context, return_dict=False)[0]
                uncond, cond = noise.chunk(2)
                noise = uncond + self.guidance * (cond - uncond)
                latents = sched.step(noise, t, latents, return_dict=False)[0]
        return latents


def measure_loops(rec: Recorder, loops: Loops, settings: dict, dtype_name: str, variant_name: str,
                  weights_gb: float, compile_s: dict | None = None) -> None:
    """Warm-up each library, then ``rounds`` alternating timed loops; records it/s and memory per library."""
    import torch
    steps, device = settings["steps"], loops.device
    fns = {"sdkit": loops.sdkit, "diffusers": loops.diffusers}
    warm = {}
    for name, fn in fns.items():
        seconds, _ = timed(lambda fn=fn: fn(settings["warmup_steps"]), device)
        warm[name] = seconds
        log(f"{dtype_name} {variant_name} {name}: warm-up ({settings['warmup_steps']} steps) {seconds:.1f} s")
    times = {name: [] for name in fns}
    memory = {name: {} for name in fns}
    finals = {}
    for r in range(settings["rounds"]):
        for name in (("sdkit", "diffusers") if r % 2 == 0 else ("diffusers", "sdkit")):
            if r == 0:
                with peak_memory(device, memory[name]):
                    seconds, finals[name] = timed(lambda f=fns[name]: f(steps), device)
            else:
                seconds, _ = timed(lambda f=fns[name]: f(steps), device)
            times[name].append(seconds)
            log(f"{dtype_name} {variant_name} {name}: {steps} steps in {seconds:.3f} s = {steps / seconds:.2f} it/s")
    a, b = finals["sdkit"].float(), finals["diffusers"].float()
    agreement = float((a - b).norm() / b.norm().clamp_min(1e-12))
    for name in fns:
        s = statistics.median(times[name])
        work = memory[name].get("work_gb")
        rec.add(item="sampling", lib=name, dtype=dtype_name, variant=variant_name, sampler=loops.sampler,
                steps=steps, image=settings["image"], it_s=steps / s, loop_s=s, loop_s_all=times[name],
                warmup_s=warm[name], compile_s=(compile_s or {}).get(name),
                work_gb=work, peak_gb=None if work is None else weights_gb + work,
                peak_abs_gb=memory[name].get("peak_abs_gb"), weights_gb=weights_gb,
                final_latent_rel_diff_vs_other=agreement, finite=bool(torch.isfinite(a).all()))


def measure_vae(rec: Recorder, loops: Loops, settings: dict, dtype_name: str) -> None:
    import torch
    model, vae, device = loops.model, loops.ref["vae"], loops.device
    scale = float(model.scale_factor)
    z = torch.randn(1, 4, loops.latent, loops.latent, generator=torch.Generator().manual_seed(1)).to(device)
    vdtype = next(model.first_stage_model.parameters()).dtype
    fns = {"sdkit": lambda: model.decode_first_stage(z.to(vdtype)),
           "diffusers": lambda: vae.decode(z.to(vdtype) / scale).sample}
    with torch.no_grad():
        for name, fn in fns.items():
            timed(fn, device)  # warm-up
            mem, times = {}, []
            with peak_memory(device, mem):
                times.append(timed(fn, device)[0])
            times += [timed(fn, device)[0] for _ in range(settings["vae_repeats"] - 1)]
            s = statistics.median(times)
            log(f"{dtype_name} VAE decode {name}: {s * 1000:.1f} ms")
            rec.add(item="vae_decode", lib=name, dtype=dtype_name, variant="eager", image=settings["image"],
                    batch=1, ms=s * 1000, work_gb=mem.get("work_gb"))


def fits(seconds_needed: float, deadline: float | None) -> bool:
    return deadline is None or time.time() + seconds_needed < deadline


def group_eager(rec: Recorder, settings: dict, args, device, deadline) -> None:
    import torch
    master = build_master(settings)
    for dtype_name in settings["dtypes"]:
        if not fits(15, deadline):
            log(f"skipped {dtype_name} eager: budget spent")
            rec.add(item="skipped", what=f"eager {dtype_name}", why="budget")
            continue
        try:
            model = variant(master, device, dtype_of(dtype_name))
            ref = diffusers_modules(model, settings["config"])
            weights = param_gb(model)
            loops = Loops(model, ref, settings, args.sampler, device)
            with torch.no_grad():
                measure_loops(rec, loops, settings, dtype_name, "eager", weights)
                try:
                    measure_vae(rec, loops, settings, dtype_name)
                except Exception as e:  # noqa: BLE001 - the channels_last loops still run
                    traceback.print_exc()
                    rec.add(item="error", what=f"VAE decode {dtype_name}", error=f"{type(e).__name__}: {e}"[:2000])
                if fits(10, deadline):
                    model.model.to(memory_format=torch.channels_last)
                    ref["unet"].to(memory_format=torch.channels_last)
                    measure_loops(rec, loops, settings, dtype_name, "eager+channels_last", weights)
        except Exception as e:  # noqa: BLE001 - one dtype failing keeps the other
            traceback.print_exc()
            rec.add(item="error", what=f"eager {dtype_name}", error=f"{type(e).__name__}: {e}")
        finally:
            model = ref = loops = None
            free(device)


def group_compile(rec: Recorder, settings: dict, args, device, deadline, dtype_name: str) -> None:
    """torch.compile + channels_last on both UNets; the warm-up call compiles (its time is the compile time)."""
    import torch
    master = build_master(settings)
    model = variant(master, device, dtype_of(dtype_name))
    del master
    gc.collect()
    ref = diffusers_modules(model, settings["config"])
    weights = param_gb(model)
    model.model.to(memory_format=torch.channels_last)
    ref["unet"].to(memory_format=torch.channels_last)
    options = {"backend": args.compile_backend}
    if args.compile_backend == "inductor":
        options["mode"] = args.compile_mode
    model.model.diffusion_model.compile(**options)
    ref["unet"].compile(**options)
    loops = Loops(model, ref, settings, args.sampler, device)
    compile_s = {}
    from torch._dynamo.utils import counters
    with torch.no_grad():
        for name, fn in (("sdkit", loops.sdkit), ("diffusers", loops.diffusers)):
            seconds, _ = timed(lambda fn=fn: fn(settings["warmup_steps"]), device)
            compile_s[name] = seconds
            log(f"{dtype_name} compile {name}: first {settings['warmup_steps']} steps (compiling) {seconds:.1f} s")
            rec.add(item="compile_warmup", lib=name, dtype=dtype_name, backend=args.compile_backend,
                    mode=args.compile_mode, seconds=seconds, unique_graphs=counters["stats"]["unique_graphs"],
                    graph_breaks=sum(counters["graph_break"].values()),
                    graph_break_reasons=list(counters["graph_break"])[:5])
            counters.clear()
        how = args.compile_mode if args.compile_backend == "inductor" else args.compile_backend
        measure_loops(rec, loops, settings, dtype_name, f"compile({how})+channels_last", weights, compile_s)


# ================================================================================================ training


def train_config(settings: dict):
    from omegaconf import OmegaConf

    from sdkit.config import load_config, merge_configs
    if settings["train_config"] == "sd-v1-train":
        # the pretrained CLIP would be downloaded: random weights of the same shape instead (no network there)
        return merge_configs(["sd-v1-train"], ["model.params.cond_stage_config.params.pretrained=false"])
    config = load_config(settings["train_config"])       # smoke: a tiny model with the same code path
    config.model.training = OmegaConf.create({"gradient_checkpointing": True})
    return config


def synthetic_batch(settings: dict, batch: int):
    import torch
    g = torch.Generator().manual_seed(2)
    size = settings["image"]
    return {"image": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
            "caption": [f"a red circle and a blue square, picture {i}" for i in range(batch)],
            "index": torch.arange(batch)}


def group_train(rec: Recorder, settings: dict, args, device, deadline) -> None:
    """One training step as Lightning's bf16-mixed runs it: autocast(bf16) around the step's forward, backward
    outside, AdamW step, EMA update; frozen VAE and CLIP encode the batch in float32 (LatentDiffusionModule)."""
    import torch

    from sdkit.training.run import build_module
    config = train_config(settings)
    t0 = time.perf_counter()
    module = build_module(config, learning_rate=float(config.model.get("base_learning_rate", 1e-4)), seed=23)
    log(f"built the training module in {time.perf_counter() - t0:.1f} s "
        f"(gradient checkpointing on: {any(getattr(m, 'use_checkpoint', False) for m in module.ldm.model.modules())})")
    module.to(device)
    module.train()
    optim = module.configure_optimizers()
    optimizer = optim["optimizer"] if isinstance(optim, dict) else optim
    ucg = float(module.ldm.ucg_probability) if module.is_text_conditioned else 0.0
    for batch_size in args.train_batch:
        if not fits(20, deadline):
            rec.add(item="skipped", what=f"train batch {batch_size}", why="budget")
            continue
        batch = synthetic_batch(settings, batch_size)
        times, losses, mem = [], [], {}

        def step(i, batch=batch):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _, _ = module.shared_step(batch, i, "train", ucg)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if module.ldm.use_ema:
                module.ldm.model_ema(module.ldm.model)
            return float(loss.detach())

        try:
            warm, loss = timed(lambda: step(0), device)
            log(f"train batch {batch_size}: warm-up step {warm:.2f} s (loss {loss:.4f})")
            with peak_memory(device, mem):
                for i in range(settings["train_steps"]):
                    seconds, loss = timed(lambda i=i: step(i + 1), device)
                    times.append(seconds)
                    losses.append(loss)
                    log(f"train batch {batch_size}: step {i + 1} {seconds:.3f} s (loss {loss:.4f})")
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            s = statistics.median(times)
            rec.add(item="train_step", config=settings["train_config"], batch=batch_size, image=settings["image"],
                    precision="bf16 autocast", gradient_checkpointing=True, optimizer="AdamW",
                    ema=bool(module.ldm.use_ema), step_s=s, steps_s=times, images_per_s=batch_size / s,
                    warmup_s=warm, peak_gb=peak, losses=losses)
        except torch.cuda.OutOfMemoryError as e:
            rec.add(item="error", what=f"train batch {batch_size}", error=f"out of memory: {e}"[:300])
            optimizer.zero_grad(set_to_none=True)
            free(device)


def _safe(fn, *a):
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 - a diagnostic must not lose the measurement
        return f"{type(e).__name__}: {e}"


def buffer_dtypes(module) -> dict:
    """dtypes of the buffers mixed precision could touch (FSDP's MixedPrecision has a buffer_dtype): the noise
    schedule and the EMA copy, which need float32 (an EMA of decay 0.9999 does not move in bf16)."""
    out = {}
    ldm = module.ldm
    for name in ("alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_factor"):
        t = getattr(ldm, name, None)
        if t is not None and hasattr(t, "dtype"):
            out[name] = str(t.dtype)
    ema = getattr(ldm, "model_ema", None)
    if ema is not None:
        dtypes = sorted({str(b.dtype) for b in ema.buffers()})
        out["model_ema"] = dtypes
    return out


def group_fsdp(rec: Recorder, settings: dict, args, device, deadline) -> None:
    """``sdkit train``'s building blocks with the FSDP overlay, devices=1, synthetic data, max_steps."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from omegaconf import OmegaConf

    from sdkit.config import merge_configs
    from sdkit.training import run as train_run

    smoke = device.type == "cpu"
    steps = settings["fsdp_steps"]
    overrides = ["lightning.trainer.devices=1", "lightning.trainer.num_nodes=1",
                 "lightning.trainer.accumulate_grad_batches=1", f"lightning.trainer.max_steps={steps}",
                 "lightning.trainer.enable_checkpointing=false", "lightning.trainer.enable_progress_bar=false",
                 "lightning.trainer.benchmark=false", "lightning.callbacks.last_checkpoint=null",
                 "lightning.callbacks.resilience=null", "lightning.callbacks.image_logger=null"]
    if smoke:   # Lightning refuses FSDP on the CPU: the same path with the default strategy
        config = merge_configs([settings["train_config"]], overrides + [
            "lightning.trainer.accelerator=cpu", "lightning.trainer.precision=bf16-mixed"])
        config.model.training = OmegaConf.create({"gradient_checkpointing": True})
        strategy_note = "auto (FSDP skipped: Lightning refuses FSDP on the CPU)"
    else:
        config = merge_configs(["sd-v1-train", "sd-v1-train-fsdp"], overrides + [
            "model.params.cond_stage_config.params.pretrained=false", "lightning.trainer.accelerator=gpu"])
        strategy_note = "sdkit.training.strategies.fsdp_strategy (FULL_SHARD, one device)"
    config.data = OmegaConf.create({
        "target": "sdkit.training.DataModule",
        "params": {"batch_size": args.fsdp_batch, "num_workers": 2,
                   "train": {"target": "sdkit.data.shapes.ShapesDataset",
                             "params": {"length": 64, "size": settings["image"]}}}})
    train_run.check_config(config, ["gpu_check"])

    class StepTimer(Callback):
        def __init__(self):
            self.times, self.peaks, self._t = [], [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(device)
            self.times.append(time.perf_counter() - self._t)
            self.peaks.append(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
            log(f"fsdp step {len(self.times)}: {self.times[-1]:.3f} s, peak {self.peaks[-1]} GB")

    run_dir = Path(args.workdir) / "fsdp_run"
    L.seed_everything(23, workers=True)
    t0 = time.perf_counter()
    data = train_run.instantiate_from_config(config.data)
    module = train_run.build_module(config, learning_rate=float(config.model.base_learning_rate), seed=23)
    trainer = train_run.build_trainer(config, run_dir, module, data)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    module.learning_rate = train_run.scaled_learning_rate(config, trainer, False)
    log(f"fsdp: strategy {type(trainer.strategy).__name__}, precision {trainer.precision}, built in "
        f"{time.perf_counter() - t0:.1f} s")
    fit_s, _ = timed(lambda: trainer.fit(module, datamodule=data), device)
    rec.add(item="fsdp_step", strategy=strategy_note, strategy_class=type(trainer.strategy).__name__,
            precision=str(trainer.precision), batch=args.fsdp_batch, image=settings["image"], steps=steps,
            global_step=trainer.global_step, step_s=timer.times[-1] if timer.times else None, steps_s=timer.times,
            peak_gb=max((p for p in timer.peaks if p is not None), default=None),
            peak_abs_process_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            fit_s=fit_s, buffer_dtypes=_safe(buffer_dtypes, module))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ================================================================================================ child process


def child(group: str, args) -> int:
    import torch
    settings = SMOKE if args.cpu_smoke else GPU
    settings = {**settings, "steps": args.steps or settings["steps"]}
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke here")
    rec = Recorder(Path(args.out), group)
    deadline = args.deadline
    log(f"group {group}: {GROUPS[group][1]}")
    try:
        if group == "eager":
            group_eager(rec, settings, args, device, deadline)
        elif group == "train":
            group_train(rec, settings, args, device, deadline)
        elif group == "fsdp":
            group_fsdp(rec, settings, args, device, deadline)
        elif group.startswith("compile-"):
            group_compile(rec, settings, args, device, deadline, group.split("-", 1)[1])
    except Exception as e:  # noqa: BLE001 - the parent carries on with the next group
        traceback.print_exc()
        rec.add(item="error", what=group, error=f"{type(e).__name__}: {e}"[:2000])
        return 1
    return 0


# ================================================================================================ parent


class Stopped(Exception):
    """The parent got SIGTERM/SIGINT (e.g. from `timeout`): stop the child, write what there is."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def run_group(group: str, args, argv: list[str], timeout: float) -> tuple[str, float]:
    """Run one group in a child, in its own process group, so that a timeout also ends its compile workers."""
    cmd = [sys.executable, __file__, "--child", group, "--deadline", str(time.time() + timeout), *argv]
    start = time.time()
    proc = subprocess.Popen(cmd, process_group=0)
    try:
        rc = proc.wait(timeout=timeout)
        return ("ok" if rc == 0 else f"exit {rc}"), time.time() - start
    except (subprocess.TimeoutExpired, Stopped, KeyboardInterrupt) as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            return f"killed after {timeout:.0f} s (budget)", time.time() - start
        raise


def fmt(v, spec=".2f", none="—"):
    return none if v is None else format(v, spec)


def table(records: list[dict], env: dict, settings: dict, smoke: bool) -> str:
    lines = []
    what = ("CPU SMOKE RUN (tiny-test config, 64x64, a few steps): the numbers only show the code runs"
            if smoke else f"{env.get('gpu', '?')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
                          f"diffusers {env.get('diffusers')}")
    lines += [f"# GPU check (issue 21): {what}", ""]
    samp = [r for r in records if r.get("item") == "sampling"]
    if samp:
        r0 = samp[0]
        lines += [f"## SD v1 sampling loop: {r0['image']}x{r0['image']}, {r0['steps']} steps, {r0['sampler']}, "
                  f"guidance 7.5 (batch 2 per step), same random weights", "",
                  "| dtype | variant | sdkit it/s | diffusers it/s | time ratio sdkit/diffusers | sdkit peak GB | "
                  "diffusers peak GB | compile s (sdkit / diffusers) | latents rel. diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        keys = []
        for r in samp:
            if (r["dtype"], r["variant"]) not in keys:
                keys.append((r["dtype"], r["variant"]))
        for dt, var in keys:
            by = {r["lib"]: r for r in samp if r["dtype"] == dt and r["variant"] == var}
            s, d = by.get("sdkit"), by.get("diffusers")
            ratio = (s["loop_s"] / d["loop_s"]) if s and d else None
            comp = (f"{fmt(s.get('compile_s'), '.0f')} / {fmt(d.get('compile_s'), '.0f')}"
                    if s and d and s.get("compile_s") is not None else "—")
            lines.append(f"| {dt} | {var} | {fmt(s and s['it_s'])} | {fmt(d and d['it_s'])} | {fmt(ratio)} | "
                         f"{fmt(s and s['peak_gb'])} | {fmt(d and d['peak_gb'])} | {comp} | "
                         f"{fmt((s or d or {}).get('final_latent_rel_diff_vs_other'), '.1e')} |")
        for r in (r for r in records if r.get("item") == "compile_warmup"):
            lines.append(f"- compile {r['dtype']} {r['lib']}: first call {fmt(r['seconds'], '.0f')} s "
                         f"({r['backend']}, mode {r['mode']}), {r.get('unique_graphs')} graph(s), "
                         f"{r.get('graph_breaks')} graph break(s) {r.get('graph_break_reasons') or ''}")
        lines += ["", "peak GB = the model's weights (UNet + VAE + CLIP, the same tensors for both) + the loop's "
                      "peak above them (torch.cuda.max_memory_allocated). Time ratio below 1: sdkit is faster.", ""]
    lines += ["Published anchors (512x512, 50 steps, fp16, one image):", ""]
    lines += [f"- {name}: {value} it/s" for name, value in ANCHORS]
    lines.append("")
    vae = [r for r in records if r.get("item") == "vae_decode"]
    if vae:
        lines += ["## VAE decode, one latent to pixels", "", "| dtype | image | sdkit ms | diffusers ms | "
                  "sdkit work GB | diffusers work GB |", "|---|---|---|---|---|---|"]
        for dt in dict.fromkeys(r["dtype"] for r in vae):
            by = {r["lib"]: r for r in vae if r["dtype"] == dt}
            s, d = by.get("sdkit", {}), by.get("diffusers", {})
            lines.append(f"| {dt} | {(s or d).get('image')}² | {fmt(s.get('ms'), '.1f')} | {fmt(d.get('ms'), '.1f')} "
                         f"| {fmt(s.get('work_gb'))} | {fmt(d.get('work_gb'))} |")
        lines.append("")
    tr = [r for r in records if r.get("item") == "train_step"]
    if tr:
        lines += ["## Training step (bf16 autocast, gradient checkpointing, AdamW, EMA update when the config has EMA; VAE + CLIP encode included)",
                  "", "| config | batch | image | s/step | images/s | peak GB |", "|---|---|---|---|---|---|"]
        for r in tr:
            lines.append(f"| {r['config']} | {r['batch']} | {r['image']}² | {fmt(r['step_s'], '.3f')} | "
                         f"{fmt(r['images_per_s'], '.1f')} | {fmt(r['peak_gb'])} |")
        lines.append("")
    fs = [r for r in records if r.get("item") == "fsdp_step"]
    for r in fs:
        lines += ["## FSDP step through Lightning, one device", "",
                  f"strategy {r['strategy']}, precision {r['precision']}, batch {r['batch']} at {r['image']}², "
                  f"{r['global_step']} steps: last step {fmt(r['step_s'], '.3f')} s (all: "
                  f"{', '.join(fmt(t, '.3f') for t in r['steps_s'])}), peak {fmt(r['peak_gb'])} GB, "
                  f"fit() {fmt(r['fit_s'], '.1f')} s in all; buffer dtypes after fit: {r.get('buffer_dtypes')}", ""]
    other = [r for r in records if r.get("item") in ("error", "skipped", "group")]
    if other:
        lines += ["## Groups, skips and errors", ""]
        for r in other:
            if r["item"] == "group":
                lines.append(f"- group {r['group']}: {r['status']} ({fmt(r['seconds'], '.0f')} s)")
            elif r["item"] == "skipped":
                lines.append(f"- skipped {r['what']}: {r['why']}")
            else:
                lines.append(f"- error in {r['what']}: {r['error'][:300]}")
        lines.append("")
    return "\n".join(lines)


def parent(args, argv: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "gpu_check.jsonl"
    jsonl.unlink(missing_ok=True)
    settings = SMOKE if args.cpu_smoke else GPU
    budget = args.budget or settings["budget_s"]
    start = time.time()
    deadline = start + budget
    import torch
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        log("no CUDA device here: run `bash tools/gpu_check.sh --cpu-smoke` on a machine without a GPU")
        return 2
    env = environment(device)
    log(f"gpu_check: {'CPU smoke' if args.cpu_smoke else 'GPU'} mode, budget {budget:.0f} s, out {out}")
    log("environment: " + json.dumps(env))
    groups = args.groups or list(GROUPS)
    rec = Recorder(out, "parent")
    signal.signal(signal.SIGTERM, _stop)
    try:
        run_groups(args, argv, groups, settings, deadline, rec)
    except (Stopped, KeyboardInterrupt) as e:
        log(f"stopped ({e or 'interrupt'}): writing what was measured")
        rec.add(item="skipped", what="the remaining groups", why=f"stopped by {e or 'interrupt'}")
    return finish(args, out, env, settings, budget, start)


def run_groups(args, argv, groups, settings, deadline, rec) -> None:
    for group in groups:
        if args.cpu_smoke and group == "compile-fp16":   # float16 convolutions crawl on the CPU
            log("SKIPPED group compile-fp16 in the smoke run: the same code as compile-bf16, which runs")
            rec.add(item="skipped", what="group compile-fp16", why="smoke run: same code as compile-bf16")
            continue
        needed = GROUPS[group][0] if not args.cpu_smoke else 5
        left = deadline - time.time() - RESERVE_S
        if left < needed:
            log(f"SKIPPED group {group} ({GROUPS[group][1]}): {left:.0f} s of the budget left, it needs ~{needed} s")
            rec.add(item="skipped", what=f"group {group}", why=f"budget: {left:.0f} s left, needs ~{needed} s")
            continue
        timeout = left
        if group.startswith("compile-"):
            timeout = min(timeout, settings["compile_timeout_s"])
        log(f"=== group {group}: {GROUPS[group][1]} (at most {timeout:.0f} s)")
        status, seconds = run_group(group, args, argv, timeout)
        log(f"=== group {group}: {status} in {seconds:.0f} s; {deadline - time.time():.0f} s of the budget left")
        rec.add(item="group", status=status, seconds=seconds, group_name=group)


def finish(args, out, env, settings, budget, start) -> int:
    jsonl = out / "gpu_check.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] \
        if jsonl.exists() else []
    for r in records:   # the parent's group lines name the child group
        if r.get("item") == "group":
            r["group"] = r.pop("group_name")
    text = table(records, env, settings, args.cpu_smoke)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps(
        {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "environment": env, "budget_s": budget,
         "wall_s": time.time() - start, "anchors_it_s": dict(ANCHORS), "records": records}, indent=1))
    print("\n" + text, flush=True)
    log(f"gpu_check done in {time.time() - start:.0f} s; files in {out}")
    errors = [r for r in records if r.get("item") == "error"]
    return 1 if args.strict and errors else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU (every code path, small)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder ($OUT)")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (GPU 450, smoke 600)")
    p.add_argument("--groups", nargs="+", choices=list(GROUPS), default=None, help="run only these groups")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (GPU 50, smoke 4)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpmpp_2m"], help="the scheduler of both loops")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (default, reduce-overhead, max-autotune-no-cudagraphs, ...)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (GPU: inductor; smoke: aot_eager, which traces the same graphs "
                        "through dynamo and AOTAutograd without inductor's slow CPU code generation)")
    p.add_argument("--train-batch", type=int, nargs="+", default=None, help="training batch sizes (GPU 8)")
    p.add_argument("--fsdp-batch", type=int, default=None, help="FSDP batch size (GPU 4, as the config; smoke 2)")
    p.add_argument("--workdir", default="/tmp/gpu_check_work", help="scratch folder (Lightning's run folder)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any measurement failed")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    settings = SMOKE if args.cpu_smoke else GPU
    args.train_batch = args.train_batch or [settings["train_batch"]]
    args.compile_backend = args.compile_backend or ("aot_eager" if args.cpu_smoke else "inductor")
    args.fsdp_batch = args.fsdp_batch or (2 if args.cpu_smoke else 4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        return child(args.child, args)
    child_argv = [a for a in argv]
    return parent(args, child_argv)


if __name__ == "__main__":
    sys.exit(main())
