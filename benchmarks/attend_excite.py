"""Does Attend-and-Excite bind colours to shapes in two-group prompts? Colour+shape on the held-out two-group
prompts, before and after, same seeds, read back by the shapes dataset's checker.

    python benchmarks/attend_excite.py [--n 60] [--steps 20] [--guidance 5] [--variants softmax:16:20 ...]

Prompts: the canonical captions with two groups among the shapes dataset's validation split (seed 1, as
benchmarks/prompt_following.py draws them; attribute combinations never seen in training), image i with seed i.
Rows:

- txt2img: the plain sampler (DPM-Solver++(2M)), the kit's usual number;
- A&E off: the same run as Attend-and-Excite with step size 0 (DDIM steps for the first half, then the sampler
  from there), the fair "before";
- one row per variant NORMALISE:RESOLUTION:STEP_SIZE[:SUBJECTS] (normalise "softmax" = the paper's ×100 softmax,
  "renormalise" = attention renormalised over the prompt's words; resolution of the maps used; subjects "shape"
  or "colour+shape"), with the paper's iterative refinement.

Colour+shape: every group has an object of its colour and shape (shapes_checker's colour_and_shape); "both
groups found separately" is the same thing; count and "everything" are given beside it. Writes
benchmarks/results/attend_excite.txt (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import sdkit
from sdkit.data.shapes import Scene, ShapesDataset
from sdkit.data.shapes_checker import check
from sdkit.editing.attend_excite import attend_and_excite


def two_group_prompts(n: int, seed: int = 1) -> list[tuple[str, Scene]]:
    data = ShapesDataset(length=20 * n, size=64, seed=seed, split="validation", caption_style="canonical")
    found = []
    for i in range(len(data)):
        scene, _, caption = data.example(i)
        if len(scene.groups) == 2:
            found.append((caption, scene))
            if len(found) == n:
                return found
    raise RuntimeError(f"only {len(found)} two-group prompts among {len(data)} items")


def rates(images, items) -> dict:
    results = [check(image, scene) for image, (_, scene) in zip(images, items)]
    n = len(results)
    return {"colour_and_shape": sum(r.colour_and_shape for r in results) / n,
            "count": sum(r.count for r in results) / n, "correct": sum(r.correct for r in results) / n,
            "verdicts": [r.colour_and_shape for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first SKIP two-group prompts (e.g. those a variant was chosen on)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--variants", nargs="*", default=["softmax:16:20", "renormalise:16:20"])
    parser.add_argument("--no-baselines", action="store_true", help="skip the txt2img and A&E-off rows")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attend_excite.txt"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sdkit.load_model("tiny")
    items = two_group_prompts(args.skip + args.n)[args.skip:]
    prompts = [p for p, _ in items]
    common = {"steps": args.steps, "guidance_scale": args.guidance, "progress": False}
    lines = [f"$ python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}",
             f"{args.n} two-group held-out prompts (shapes validation split, seed 1; the first {args.skip} left "
             f"out), seeds 0..{args.n - 1}, "
             f"dpmpp_2m {args.steps} steps, guidance {args.guidance:g}, shipped tiny model",
             "", f"{'run':44s} {'colour+shape':>12s} {'count':>6s} {'everything':>10s} {'seconds':>8s}"]
    verdicts = {}

    def run(name, generate):
        start, images = time.perf_counter(), []
        for i in range(0, args.n, args.batch):
            images += generate(prompts[i:i + args.batch], i).images
            print(f"  {name}: {len(images)}/{args.n}", flush=True)
        r = rates(images, items)
        verdicts[name] = r["verdicts"]
        lines.append(f"{name:44s} {r['colour_and_shape']:12.1%} {r['count']:6.1%} {r['correct']:10.1%} "
                     f"{time.perf_counter() - start:8.0f}")
        print(lines[-1], flush=True)

    if not args.no_baselines:
        run("txt2img (dpmpp_2m)", lambda p, i: sdkit.txt2img(model, p, seed=i, **common))
        run("A&E off (step size 0: DDIM first half)",
            lambda p, i: attend_and_excite(model, p, seed=i, step_size=0.0, **common))
    for variant in args.variants:
        normalise, resolution, step_size, *rest = variant.split(":")
        subjects = rest[0] if rest else "shape"
        run(f"A&E {normalise}, {resolution}x{resolution}, step {step_size}, {subjects}",
            lambda p, i, v=(float(step_size), normalise, int(resolution), subjects): attend_and_excite(
                model, p, seed=i, step_size=v[0], normalise=v[1], resolution=v[2], subjects=v[3], **common))
    names = list(verdicts)
    if len(names) >= 2 and "A&E off (step size 0: DDIM first half)" in verdicts:
        base = verdicts["A&E off (step size 0: DDIM first half)"]
        lines.append("")
        for name in names[2:]:
            fixed = sum(1 for a, b in zip(base, verdicts[name]) if b and not a)
            broken = sum(1 for a, b in zip(base, verdicts[name]) if a and not b)
            lines.append(f"{name}: {fixed} prompts fixed, {broken} broken against A&E off (same seeds)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
