"""The speed switches (sdkit.speed), each measured for what it gains in time and what it costs in quality, in one run.

    python benchmarks/speed_switches.py                       # both models, CPU, 2 threads (about 15 min)
    python benchmarks/speed_switches.py --models tiny --n 48  # quicker
    python benchmarks/speed_switches.py --no-compile          # without torch.compile (needs a C++ compiler)

Small model (the shipped ``tiny``, as users run it): ``txt2img`` of one 64×64 image, 20 DPM-Solver++(2M) steps,
guidance 5. Time: after a warm-up, ``--rounds`` rounds alternate the plain run and the switched one; the speed-up is
the median of the per-round ratios plain/switched (above 1: faster). Quality: colour+shape right on the first
``--n`` held-out prompts of benchmarks/prompt_following.py (validation captions, seed 1), checked by the dataset's
checker, and the PSNR of the switched images against the plain ones (same prompts, same seeds).

SD v1 (``load_model("sd-v1-inference")``, random weights: quality is the numerical difference from the plain run):
a 10-step DDIM loop at the guided batch of 2 on a 32×32 latent (256×256 pixels) with random text states. The
weights CompVis initialises to zero (the output conv, each transformer's proj_out) are filled with N(0, 0.02²), or
ε would be exactly 0 and every switch would leave the latents unchanged. Time as above; quality: the relative RMS
difference of the final latents from the plain run's.

Switches: channels_last, bf16 autocast (CPU), torch.compile (the UNet; compile time excluded, reported apart),
DeepCache (a full UNet call every 2 or 3 calls), token merging (half the self-attention keys/values, on the layers
with at least 256 tokens: every level of the small model's 16×16 latents has ≤ 256, SD v1 at 32×32 has 1,024).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from gpu_check import fill_zero_init

SWITCHES = ("channels_last", "bf16 autocast", "torch.compile", "deep_cache /2", "deep_cache /3",
            "token merging 0.5")


def switch(name: str, model):
    """The context manager that turns ``name`` on for ``model``."""
    from sdkit import speed
    return {"channels_last": lambda: speed.channels_last(model),
            "bf16 autocast": lambda: speed.bf16_autocast(),
            "torch.compile": lambda: speed.compiled(model),
            "deep_cache /2": lambda: speed.deep_cache(model, interval=2),
            "deep_cache /3": lambda: speed.deep_cache(model, interval=3),
            "token merging 0.5": lambda: speed.token_merging(model, ratio=0.5, min_tokens=256)}[name]()


def speedup(plain, switched, rounds: int) -> tuple[float, float, float]:
    """(median per-round ratio plain/switched, median plain seconds, median switched seconds), after a warm-up."""
    plain(), switched()
    a, b = [], []
    for i in range(rounds):
        for fn, times in ((plain, a), (switched, b)) if i % 2 == 0 else ((switched, b), (plain, a)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(x / y for x, y in zip(a, b)), statistics.median(a), statistics.median(b)


def psnr(images, reference) -> float:
    a = np.stack([np.asarray(i, dtype=np.float64) for i in images])
    b = np.stack([np.asarray(i, dtype=np.float64) for i in reference])
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def tiny_rows(switches, n: int, rounds: int) -> None:
    import sdkit
    from sdkit.data.shapes import ShapesDataset
    from sdkit.data.shapes_checker import check
    from sdkit.pipelines import txt2img

    model = sdkit.load_model("tiny")
    prompts = [item["caption"] for item in ShapesDataset(length=n, size=64, seed=1, split="validation")]
    options = {"steps": 20, "guidance_scale": 5.0, "progress": False}

    def generate(context=contextlib.nullcontext):
        with context():
            return txt2img(model, prompts, seed=0, **options).images

    def rate(images):
        return 100 * np.mean([check(im, p).colour_and_shape for im, p in zip(images, prompts)])

    def one():
        return txt2img(model, "two red circles and a blue square", seed=0, **options)

    plain_images = generate()
    print(f"{'plain':<18} {'1.00':>8} {'':>9} {rate(plain_images):10.1f} {'':>8}", flush=True)
    for name in switches:
        with switch(name, model):
            start = time.perf_counter()
            one()                                   # compiles here, for torch.compile
            first = time.perf_counter() - start
            images = generate()
        ratio, plain_s, fast_s = _alternate(model, name, one, rounds)
        extra = f"  (first call {first:.1f} s)" if name == "torch.compile" else ""
        print(f"{name:<18} {ratio:8.2f} {fast_s:9.3f} {rate(images):10.1f} {psnr(images, plain_images):8.1f}"
              f"  (plain {plain_s:.3f} s)" + extra, flush=True)


def _alternate(model, name, fn, rounds):
    """Alternate the plain call and the switched one (the switch entered around each switched call)."""
    def switched():
        with switch(name, model):
            return fn()
    return speedup(fn, switched, rounds)


def sd_rows(switches, rounds: int) -> None:
    import sdkit
    from sdkit.samplers import sample
    from sdkit.samplers.denoisers import cfg_eps_fn

    torch.manual_seed(0)
    model = sdkit.load_model("sd-v1-inference")
    fill_zero_init(model.model)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, 32, 32, generator=gen)
    cond, uncond = torch.randn(1, 77, 768, generator=gen), torch.randn(1, 77, 768, generator=gen)
    eps_fn = cfg_eps_fn(model.apply_model, cond, uncond, scale=7.5)

    def run():
        with torch.inference_mode():
            return sample(eps_fn, x_T, model.alphas_cumprod, sampler="ddim", steps=10, progress=False)

    plain = run()
    for name in switches:
        with switch(name, model):
            start = time.perf_counter()
            out = run()
            first = time.perf_counter() - start
        difference = ((out.float() - plain).norm() / plain.norm()).item()
        ratio, plain_s, fast_s = _alternate(model, name, run, rounds)
        extra = f"  (first call {first:.1f} s)" if name == "torch.compile" else ""
        print(f"{name:<18} {ratio:8.2f} {fast_s:9.2f} {difference:12.2e}  (plain {plain_s:.2f} s)" + extra,
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "sd-v1"], choices=["tiny", "sd-v1"])
    parser.add_argument("--n", type=int, default=200, help="held-out prompts for the small model's quality")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--switches", nargs="+", choices=SWITCHES, default=list(SWITCHES),
                        help="only these rows (each row is its own plain/switched comparison)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    switches = [s for s in args.switches if not (args.no_compile and s == "torch.compile")]
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; speed-up = median over {args.rounds} "
          "alternating rounds of plain/switched (above 1: faster)")
    if "tiny" in args.models:
        print(f"\nsmall model: txt2img 64x64, 20 steps dpmpp_2m, guidance 5; quality on {args.n} held-out prompts")
        print(f"{'switch':<18} {'speed-up':>8} {'s/image':>9} {'col+shape%':>10} {'PSNR dB':>8}")
        tiny_rows(switches, args.n, args.rounds)
    if "sd-v1" in args.models:
        print("\nSD v1 (random weights): 10 DDIM steps, guided batch 2, latent 32x32; quality = rel. RMS difference "
              "of the final latents from the plain run")
        print(f"{'switch':<18} {'speed-up':>8} {'s/run':>9} {'latent diff':>12}")
        sd_rows(switches, args.rounds)


if __name__ == "__main__":
    main()
