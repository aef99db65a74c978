"""How well does inversion give a real image back? Reconstruction PSNR of DDIM inversion and null-text inversion
on images the shipped model never generated, with the autoencoder's own reconstruction as the ceiling.

    python benchmarks/inversion.py [--shapes 6] [--emoji 2] [--steps 20 50] [--inner-steps 10] [--guidance 5]

Images: renders of the shapes dataset's validation split (seed 1; attribute combinations never seen in training)
and Twemoji of the emoji validation split (names held out from training), 64×64, each with its caption as the
prompt. For each step count (DDIM, CompVis spacing):

- VAE: decode(encode(image)) — the ceiling every row below is bounded by;
- DDIM inversion at guidance 1, sampled back at guidance 1 (and with 3 fixed-point iterations per step);
- the same inversion sampled back at guidance 5 (what editing with guidance would start from, without null-text);
- null-text inversion at guidance 5 (Mokady et al.: pivot at guidance 1, ``--inner-steps`` Adam steps per step).

PSNR is over RGB in [0, 1] against the original image (mean over images, and the worst image); all images of a
row run as one batch. Writes benchmarks/results/inversion.txt (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import sdkit
from sdkit.data.emoji import list_emoji, make_caption, render_emoji, split_of
from sdkit.data.shapes import ShapesDataset
from sdkit.editing.inversion import ddim_invert, image_latents, null_text_invert, sample_inversion
from sdkit.pipelines.images import to_tensor


def real_images(n_shapes: int, n_emoji: int) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """(images [3, 64, 64] in [-1, 1], prompts, kinds)."""
    data = ShapesDataset(length=max(n_shapes, 1), size=64, seed=1, split="validation", caption_style="canonical")
    items = [data[i] for i in range(n_shapes)]
    images, prompts = [it["image"] for it in items], [it["caption"] for it in items]
    held_out = [e for e in list_emoji("twemoji") if split_of(e.name) == "validation"][:n_emoji]
    images += [to_tensor(render_emoji(e.emoji, "twemoji", 64)) for e in held_out]
    prompts += [make_caption(e.name, "twemoji") for e in held_out]
    return images, prompts, ["shapes"] * n_shapes + ["emoji"] * len(held_out)


def psnr(decoded: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of RGB in [0, 1] (both in [-1, 1] on the way in; decoded clipped as when saved)."""
    mse = ((decoded.clamp(-1, 1) - images) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=6)
    parser.add_argument("--emoji", type=int, default=2)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "inversion.txt"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sdkit.load_model("tiny")
    images, prompts, kinds = real_images(args.shapes, args.emoji)
    x = torch.stack(images)
    lines = [f"$ python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}",
             f"{len(images)} held-out images ({kinds.count('shapes')} shapes validation renders, "
             f"{kinds.count('emoji')} Twemoji of the validation split), 64x64, shipped tiny model, DDIM compvis "
             f"spacing; torch threads {torch.get_num_threads()}",
             "", f"{'method':46s} {'steps':>5s} {'PSNR dB':>8s} {'worst':>7s} {'seconds':>8s}"]

    def report(name, steps, decoded, seconds):
        p = psnr(decoded, x)
        lines.append(f"{name:46s} {steps:>5} {float(p.mean()):8.2f} {float(p.min()):7.2f} {seconds:8.1f}")
        print(lines[-1], flush=True)

    def decode(z):
        with torch.no_grad():
            return model.decode_first_stage(z)

    start = time.perf_counter()
    report("VAE reconstruction (ceiling)", "-", decode(image_latents(model, images)), time.perf_counter() - start)
    for steps in args.steps:
        start = time.perf_counter()
        inv = ddim_invert(model, images, prompts, steps, progress=False)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        report("DDIM inversion, sampled at guidance 1", steps, decode(sample_inversion(model, inv, progress=False)),
               seconds + time.perf_counter() - start)
        start = time.perf_counter()
        report(f"DDIM inversion, sampled at guidance {args.guidance:g}", steps,
               decode(sample_inversion(model, inv, guidance_scale=args.guidance, progress=False)),
               seconds + time.perf_counter() - start)
        start = time.perf_counter()
        fixed = ddim_invert(model, images, prompts, steps, fixed_point_iterations=3, progress=False)
        report("DDIM inversion + 3 fixed-point its, guidance 1", steps,
               decode(sample_inversion(model, fixed, progress=False)), time.perf_counter() - start)
        start = time.perf_counter()
        nti = null_text_invert(model, images, prompts, steps, guidance_scale=args.guidance,
                               inner_steps=args.inner_steps, progress=False)
        report(f"null-text inversion, guidance {args.guidance:g} ({args.inner_steps} Adam its)", steps,
               decode(sample_inversion(model, nti, progress=False)), time.perf_counter() - start)
    lines.append("")
    lines.append("PSNR: RGB in [0, 1] against the original image, mean over images (worst image beside it); "
                 "seconds: wall time of the row's inversion and sampling (the CPU was shared).")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
