"""How long does the shipped small model take for one 64×64 image with 20 steps, on this machine's CPU?

    python benchmarks/tiny_speed.py [--threads 2] [--repeats 10] [--steps 20] [--guidance 5]

sdkit: ``txt2img(model, prompt, steps=20, guidance_scale=5)`` end to end (text encoding, 20 DPM-Solver++(2M) steps
with classifier-free guidance = 20 UNet evaluations on batches of 2, VAE decode, PNG-ready PIL image).
Reference: the same weights in diffusers' UNet2DConditionModel and AutoencoderKL, driven by diffusers'
DPMSolverMultistepScheduler (the same text states, the same guidance, uint8 pixels at the end), in the same process.
After one warm-up call each, ``--repeats`` rounds alternate the two (sdkit first in even rounds, diffusers first in
odd ones); the ratio reported is the median of the per-round ratios sdkit / diffusers (below 1.0: sdkit is faster),
which stands up to a shared machine's load shifting between rounds; the median seconds of each, and the ratio of
those medians, are printed beside it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def alternating_seconds(fns: dict, repeats: int) -> dict:
    """{name: [seconds per round]} after one warm-up call each, alternating the order round by round."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def diffusers_pipeline(model, steps: int, guidance: float):
    """The shipped model's weights in diffusers' modules, with diffusers' scheduler: one image per call."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        UNet2DConditionModel,
    )
    from omegaconf import OmegaConf

    from sdkit.checkpoints import keys
    from sdkit.config import load_config

    cfg = load_config("tiny").model.params
    unet_params = OmegaConf.to_container(cfg.unet_config.params)
    fs = OmegaConf.to_container(cfg.first_stage_config.params)
    parts = keys.split_compvis(model.state_dict())
    unet = UNet2DConditionModel(**keys.unet_diffusers_config(unet_params, sample_size=16)).eval()
    unet.load_state_dict(keys.unet_to_diffusers(parts["unet"], unet_params))
    vae = AutoencoderKL(**keys.vae_diffusers_config(fs["ddconfig"], fs["embed_dim"], float(model.scale_factor),
                                                    sample_size=64)).eval()
    vae.load_state_dict(keys.vae_to_diffusers(parts["vae"], fs["ddconfig"]))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                            timestep_spacing="leading", steps_offset=1)

    @torch.inference_mode()
    def run(prompt: str, seed: int = 0):
        text = model.get_learned_conditioning([prompt, ""])
        scheduler.set_timesteps(steps)
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
        for t in scheduler.timesteps:
            eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample.chunk(2)
            x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        pixels = vae.decode(x / vae.config.scaling_factor).sample
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompt", default="a red circle on the left")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import sdkit
    from sdkit.pipelines import txt2img

    model = sdkit.load_model("tiny")
    reference = diffusers_pipeline(model, args.steps, args.guidance)
    times = alternating_seconds({
        "sdkit": lambda: txt2img(model, args.prompt, seed=0, steps=args.steps, guidance_scale=args.guidance,
                                 progress=False),
        "diffusers": lambda: reference(args.prompt)}, args.repeats)
    ours, theirs = statistics.median(times["sdkit"]), statistics.median(times["diffusers"])
    rounds = statistics.median(a / b for a, b in zip(times["sdkit"], times["diffusers"]))
    print(f"one 64x64 image, {args.steps} steps DPM-Solver++(2M), guidance {args.guidance:g}, "
          f"{args.threads} CPU threads, torch {torch.__version__}, median of {args.repeats} alternating rounds:")
    print(f"  sdkit txt2img      {ours:6.3f} s")
    print(f"  diffusers modules  {theirs:6.3f} s")
    print(f"  ratio sdkit/diffusers {rounds:.2f} (median of the per-round ratios; ratio of the medians: "
          f"{ours / theirs:.2f})")


if __name__ == "__main__":
    main()
