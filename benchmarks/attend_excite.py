"""Does Attend-and-Excite bind colours to shapes in two-group prompts? Colour+shape on the held-out two-group
prompts, before and after, same seeds, read back by the shapes dataset's checker.

    python benchmarks/attend_excite.py [--n 60] [--skip 0] [--rows txt2img off renormalise:16:20 ...] [--json FILE]
    python benchmarks/attend_excite.py --merge A.json B.json     # rows run in separate processes, one table

Prompts: the canonical captions with two groups among the shapes dataset's validation split (seed 1, as
benchmarks/prompt_following.py draws them; attribute combinations never seen in training), image i with seed i.
Rows:

- txt2img: the plain sampler (DPM-Solver++(2M)), the kit's usual number;
- A&E off: the same run as Attend-and-Excite with step size 0 (DDIM steps for the first half, then the sampler
  from there), the fair "before";
- one row per Attend-and-Excite variant NORMALISE:RESOLUTION:STEP_SIZE[:SUBJECTS] (normalise "softmax" = the
  paper's ×100 softmax, "renormalise" = attention renormalised over the prompt's words; resolution of the maps
  used; subjects "shape" or "colour+shape"), with the paper's iterative refinement;
- bind:RESOLUTION:STEP_SIZE: the same latent steps on sdkit.editing.attend_excite.binding_loss (each colour word's
  map onto its shape word's, the groups' maps apart), without refinement.

Colour+shape: every group has an object of its colour and shape (shapes_checker's colour_and_shape); count and
"everything" are given beside it. Writes
benchmarks/results/attend_excite.txt (or --out).
"""
from __future__ import annotations

import argparse
import json
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


OFF = "A&E off (step size 0: DDIM first half)"


def row_line(name: str, r: dict) -> str:
    return f"{name:44s} {r['colour_and_shape']:12.1%} {r['count']:6.1%} {r['correct']:10.1%} {r['seconds']:8.0f}"


def table(header: list[str], rows: dict) -> list[str]:
    """The result lines: one per row, then each variant's prompts fixed and broken against A&E off."""
    lines = header + ["", f"{'run':44s} {'colour+shape':>12s} {'count':>6s} {'everything':>10s} {'seconds':>8s}"]
    lines += [row_line(name, r) for name, r in rows.items()]
    if OFF in rows:
        lines.append("")
        for name, r in rows.items():
            if name.startswith("A&E") and name != OFF:
                pairs = list(zip(rows[OFF]["verdicts"], r["verdicts"]))
                fixed, broken = sum(b and not a for a, b in pairs), sum(a and not b for a, b in pairs)
                lines.append(f"{name}: {fixed} prompts fixed, {broken} broken against A&E off (same seeds)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first SKIP two-group prompts (e.g. those a variant was chosen on)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--rows", nargs="*", default=["txt2img", "off", "renormalise:16:20", "softmax:16:20"],
                        help="txt2img, off, NORMALISE:RESOLUTION:STEP_SIZE[:SUBJECTS] or bind:RESOLUTION:STEP_SIZE")
    parser.add_argument("--json", help="also save the rows (with each prompt's verdict) as JSON")
    parser.add_argument("--merge", nargs="+", help="write the table of rows saved by earlier --json runs instead")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attend_excite.txt"))
    args = parser.parse_args()
    command = f"$ python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}"
    if args.merge:
        saved = []
        for path in args.merge:
            with open(path) as f:
                saved.append(json.load(f))
        header = [command] + [line for s in saved for line in s["header"]]
        rows = {name: r for s in saved for name, r in s["rows"].items()}
        lines = table(header, rows)
    else:
        lines, rows = run_rows(args, command)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


def run_rows(args, command: str) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    model = sdkit.load_model("tiny")
    items = two_group_prompts(args.skip + args.n)[args.skip:]
    prompts = [p for p, _ in items]
    common = {"steps": args.steps, "guidance_scale": args.guidance, "progress": False}
    header = [command, f"{args.n} two-group held-out prompts (shapes validation split, seed 1; the first "
                       f"{args.skip} left out), seeds 0..{args.n - 1}, dpmpp_2m {args.steps} steps, guidance "
                       f"{args.guidance:g}, shipped tiny model, torch threads {torch.get_num_threads()}"]
    rows = {}
    for row in args.rows:
        if row == "txt2img":
            name, generate = "txt2img (dpmpp_2m)", lambda p, i: sdkit.txt2img(model, p, seed=i, **common)
        elif row == "off":
            name, generate = OFF, lambda p, i: attend_and_excite(model, p, seed=i, step_size=0.0, **common)
        else:
            normalise, resolution, step_size, *rest = row.split(":")
            if normalise == "bind":
                v = (float(step_size), int(resolution))
                name = f"A&E binding loss, {v[1]}x{v[1]}, step {v[0]:g}"
                generate = lambda p, i, v=v: attend_and_excite(
                    model, p, seed=i, step_size=v[0], objective="bind", resolution=v[1], **common)
            else:
                v = (float(step_size), normalise, int(resolution), rest[0] if rest else "shape")
                name = f"A&E {v[1]}, {v[2]}x{v[2]}, step {v[0]:g}, {v[3]}"
                generate = lambda p, i, v=v: attend_and_excite(
                    model, p, seed=i, step_size=v[0], normalise=v[1], resolution=v[2], subjects=v[3], **common)
        start, images = time.perf_counter(), []
        for i in range(0, args.n, args.batch):
            images += generate(prompts[i:i + args.batch], i).images
            print(f"  {name}: {len(images)}/{args.n}", flush=True)
        rows[name] = {**rates(images, items), "seconds": time.perf_counter() - start}
        print(row_line(name, rows[name]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    return table(header, rows), rows


if __name__ == "__main__":
    main()
