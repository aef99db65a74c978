"""Does the text-to-image model draw what the prompt says? Generate one image per held-out shape prompt and read it
back with the dataset's own checker (sdkit.data.shapes_checker): named colour, shape, both, count, position, size.

    python benchmarks/prompt_following.py [--config tiny] [--ckpt FILE] [--n 200] [--guidance 5] [--sheet out.png]

Prompts: the canonical captions of the shapes dataset's validation split (attribute combinations never seen in
training), seed 1 (the training run validates on seed 0). Prints the overall rates and a breakdown per colour, shape,
count, position and number of groups; --sheet writes a contact sheet of the first 48 images with their prompts and
verdicts. --split train draws the prompts from the training split instead (seed 1: scenes no training run drew, but
attribute combinations it saw), which tells a failure to generalise apart from a failure to learn.
"""
from __future__ import annotations

import argparse
import json
import textwrap
import time
from collections import defaultdict

import torch
from PIL import Image, ImageDraw

import sdkit
from sdkit.data.shapes import Scene, ShapesDataset
from sdkit.data.shapes_checker import check
from sdkit.pipelines import txt2img

ATTRIBUTES = ("colour", "shape", "colour_and_shape", "count", "position", "size", "correct")


def contact_sheet(images, captions, marks=None, columns: int = 8, cell: int = 128) -> Image.Image:
    """Images enlarged to ``cell`` pixels with their caption (and a ✓/✗ mark) underneath."""
    rows = (len(images) + columns - 1) // columns
    text_h = 30
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(text, width=cell // 6) or [""]   # default bitmap font: ~6 px a character
        if marks is not None:
            lines[0] = ("ok " if marks[i] else "X ") + lines[0]
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines[:2]), fill="black", spacing=1)
    return sheet


def evaluate(model, n: int = 200, guidance: float = 5.0, steps: int = 20, sampler: str = "dpmpp_2m",
             seed: int = 0, batch: int = 25, split: str = "validation") -> dict:
    data = ShapesDataset(length=n, size=64, seed=1, split=split, caption_style="canonical")
    items = [data[i] for i in range(n)]
    prompts = [item["caption"] for item in items]
    images = []
    start = time.perf_counter()
    for i in range(0, n, batch):
        images += txt2img(model, prompts[i:i + batch], seed=seed + i, steps=steps, sampler=sampler,
                          guidance_scale=guidance, progress=False).images
    seconds = time.perf_counter() - start
    results = [check(image, Scene.from_dict(item["meta"]["scene"])) for image, item in zip(images, items)]
    overall = {a: sum(getattr(r, a) for r in results) / n for a in ATTRIBUTES}
    breakdown = defaultdict(lambda: defaultdict(lambda: [0, 0]))   # attribute -> value -> [right, total]
    for item, r in zip(items, results):
        for group in item["meta"]["scene"]["groups"]:
            for attribute in ("colour", "shape", "count", "position"):
                cell = breakdown[attribute][str(group[attribute])]
                cell[0] += int(r.colour_and_shape if attribute in ("colour", "shape") else getattr(r, attribute))
                cell[1] += 1
        # Binding across groups is the hard part: one group taking the other's colour fails only two-group prompts.
        cell = breakdown["groups"][str(len(item["meta"]["scene"]["groups"]))]
        cell[0] += int(r.colour_and_shape)
        cell[1] += 1
    return {"n": n, "split": split, "guidance": guidance, "steps": steps, "sampler": sampler, "seconds": seconds,
            "overall": overall, "breakdown": {a: {v: c[0] / c[1] for v, c in sorted(vals.items())}
                                              for a, vals in breakdown.items()},
            "counts": {a: {v: c[1] for v, c in sorted(vals.items())} for a, vals in breakdown.items()},
            "images": images, "prompts": prompts, "verdicts": [r.colour_and_shape for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--ckpt", default=None, help="weights (default: the config's shipped weights)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--split", default="validation", choices=("validation", "train"),
                        help="validation: held-out attribute combinations (the bar); train: combinations seen in training")
    parser.add_argument("--sheet", help="write a contact sheet PNG of the first 48 images")
    parser.add_argument("--json", help="write the numbers as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sdkit.load_model(args.config, args.ckpt)
    out = evaluate(model, args.n, args.guidance, args.steps, args.sampler, split=args.split)
    kind = "held-out" if args.split == "validation" else "training-split"
    print(f"{out['n']} {kind} prompts, {args.sampler} {args.steps} steps, guidance {args.guidance:g} "
          f"({out['seconds']:.0f} s to generate)")
    for a in ATTRIBUTES:
        print(f"  {a:17s} {out['overall'][a]:6.1%}")
    for attribute, values in out["breakdown"].items():
        right = "  ".join(f"{v} {rate:.0%} (n={out['counts'][attribute][v]})" for v, rate in values.items())
        what = "colour and shape right" if attribute in ("colour", "shape", "groups") else attribute + " right"
        print(f"  by {attribute} ({what}): {right}")
    if args.sheet:
        contact_sheet(out["images"][:48], out["prompts"][:48], out["verdicts"][:48]).save(args.sheet)
        print(f"wrote {args.sheet}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in out.items() if k != "images"}, f, indent=1)


if __name__ == "__main__":
    main()
