"""Do the words' attention maps fall on their objects? DAAM maps (sdkit.editing.attention_maps) of the shipped small
model against the generated image's own ground truth.

    python benchmarks/attention_maps.py [--n 100] [--steps 20] [--guidance 5] [--out benchmarks/results/attention_maps.txt]

Prompts: the canonical captions of the shapes dataset's validation split (held-out attribute combinations), as in
benchmarks/prompt_following.py (dataset seed 1, image i sampled with seed i, DPM-Solver++(2M)), so the images are
that benchmark's. For every group of a scene, its colour word's and its shape word's map (the k-th colour word and
the k-th shape word of the caption belong to group k) is thresholded and compared with the group's mask in the
image (the pixels of its exact colour: benchmarks/shape_masks.py).

Threshold rule, fixed before measuring (DAAM's, Tang et al. 2022): the map min-max normalised to [0, 1], > 0.4.
Floor: a uniform map, which the same rule turns into the whole image: IoU = the mask's share of the image. Groups
whose colour the image does not show (an empty mask) have no ground truth and are counted apart. In two-group
scenes the map is also compared with the *other* group's mask: a word bound to its own object scores higher there.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import sdkit
from sdkit.data.shapes import COLOURS, ShapesDataset
from sdkit.editing import attention_maps
from sdkit.training.grounding import SHAPE_WORDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shape_masks import group_mask, iou

THRESHOLD = 0.4   # DAAM's τ on the min-max normalised map


def thresholded(m: torch.Tensor) -> torch.Tensor:
    span = float(m.max() - m.min())
    return (m - m.min()) / span > THRESHOLD if span > 0 else torch.ones_like(m, dtype=torch.bool)


def group_words(words) -> tuple[list[int], list[int]]:
    """Indices of the colour words and the shape words of a canonical caption, in order (the k-th of each is
    group k's; a background colour comes after every group)."""
    colours = [i for i, w in enumerate(words) if w.text in COLOURS]
    shapes = [i for i, w in enumerate(words) if w.text in SHAPE_WORDS]
    return colours, shapes


def measure(model, n: int, steps: int, guidance: float, batch: int, seed: int = 0) -> dict:
    data = ShapesDataset(length=n, size=64, seed=1, split="validation", caption_style="canonical")
    items = [data[i] for i in range(n)]
    rows = defaultdict(list)        # (word class, groups) -> [(iou, floor, iou with the other group's mask)]
    missing = defaultdict(int)
    start = time.perf_counter()
    for b in range(0, n, batch):
        chunk = items[b:b + batch]
        results = attention_maps(model, [it["caption"] for it in chunk], seed=seed + b, steps=steps,
                                 guidance_scale=guidance, progress=False)
        for item, res in zip(chunk, results):
            groups = item["meta"]["scene"]["groups"]
            colours, shapes = group_words(res.words)
            masks = [group_mask(res.image, g["colour"]) for g in groups]
            for k, mask in enumerate(masks):
                for word_class, index in (("colour", colours[k]), ("shape", shapes[k])):
                    key = (word_class, len(groups))
                    if not mask.any():
                        missing[key] += 1
                        continue
                    predicted = thresholded(res.maps[index])
                    other = iou(predicted, masks[1 - k]) if len(groups) == 2 and masks[1 - k].any() else None
                    rows[key].append((iou(predicted, mask), float(mask.float().mean()), other))
    return {"rows": rows, "missing": missing, "seconds": time.perf_counter() - start}


def report(out: dict, args) -> str:
    lines = [(f"Attention maps (DAAM) of the shipped tiny model vs the generated objects: {args.n} held-out scenes "
             f"(validation captions, dataset seed 1, image i seed i), dpmpp_2m {args.steps} steps, guidance "
             f"{args.guidance:g}; threshold: min-max normalised map > {THRESHOLD} (DAAM's rule, fixed beforehand); "
             f"floor: a uniform map (the whole image). {out['seconds']:.0f} s."),
             (f"command: python benchmarks/attention_maps.py --n {args.n} --steps {args.steps} "
             f"--guidance {args.guidance:g}"), "",
             (f"{'word class':12s} {'scenes':>8s} {'words':>6s} {'mean IoU':>9s} {'uniform':>8s} "
             f"{'other group':>12s} {'no mask':>8s}")]
    keys = [("colour", 1), ("shape", 1), ("colour", 2), ("shape", 2)]
    everything = []
    for key in keys:
        rows = out["rows"].get(key, [])
        everything += rows
        others = [r[2] for r in rows if r[2] is not None]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        lines.append(f"{key[0]:12s} {str(key[1]) + '-group':>8s} {len(rows):6d} {mean([r[0] for r in rows]):9.3f} "
                     f"{mean([r[1] for r in rows]):8.3f} "
                     f"{(f'{mean(others):.3f}' if others else '-'):>12s} {out['missing'].get(key, 0):8d}")
    lines.append(f"{'all':12s} {'':>8s} {len(everything):6d} {sum(r[0] for r in everything) / len(everything):9.3f} "
                 f"{sum(r[1] for r in everything) / len(everything):8.3f}")
    lines += ["", ("mean IoU: the word's thresholded map vs its group's mask (the pixels of the group's colour); "
              "uniform: the same for a uniform map; other group: the word's map vs the other group's mask "
              "(two-group scenes); no mask: words whose group's colour the image does not show (not scored).")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_maps.txt"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sdkit.load_model("tiny")
    text = report(measure(model, args.n, args.steps, args.guidance, args.batch), args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
