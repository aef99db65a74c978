"""Does prompt-to-prompt change one attribute and keep the picture? Word swaps on held-out shape scenes with the
shipped small model, read back by the dataset's checker.

    python benchmarks/prompt_to_prompt.py [--n 100] [--steps 20] [--guidance 5] [--cross 0.8] [--self 0.4]
                                          [--dataset-seed 1] [--out benchmarks/results/prompt_to_prompt.txt]

Scenes: the canonical captions of the shapes dataset's validation split (held-out attribute combinations; dataset
seed 1 as in benchmarks/prompt_following.py, scene i sampled with seed i). Scene i swaps one group's colour word
(even i) or shape word (odd i); the group, and its new colour (one the scene does not use) or new shape, are drawn
from a generator seeded with i. The source and the edit are sampled together (sdkit.editing.prompt_to_prompt), and
the edited prompt alone from the same seed gives the contrast without injection.

- changed: the checker (sdkit.data.shapes_checker) finds an object with the edited group's new colour and shape
  in the edited image;
- in place: IoU of the edited image's object mask (every non-background pixel, the checker's rule:
  benchmarks/shape_masks.py) with the source image's. A perfect shape swap cannot reach 1 (a circle covers
  π/4 of the square around it).

Knobs (--cross, --self) are chosen on scenes of another dataset seed (--dataset-seed 11), never on these.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import sdkit
from sdkit.data.shapes import COLOURS, SHAPES, Scene, ShapesDataset, caption
from sdkit.data.shapes_checker import check
from sdkit.editing import prompt_to_prompt
from sdkit.pipelines import txt2img

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shape_masks import iou, object_mask


def swap(scene: Scene, i: int) -> tuple[Scene, int, str]:
    """Scene i's edit: (edited scene, index of the edited group, "colour" or "shape")."""
    rng = np.random.default_rng([19, i])
    kind = "colour" if i % 2 == 0 else "shape"
    k = int(rng.integers(len(scene.groups)))
    group = scene.groups[k]
    if kind == "colour":
        used = {g.colour for g in scene.groups}
        group = replace(group, colour=str(rng.choice([c for c in COLOURS if c not in used])))
    else:
        group = replace(group, shape=str(rng.choice([s for s in SHAPES if s != group.shape])))
    groups = list(scene.groups)
    groups[k] = group
    return Scene(tuple(groups), scene.background), k, kind


def measure(model, n: int, steps: int, guidance: float, cross: float, self_: float, batch: int,
            dataset_seed: int, on_batch=None) -> dict:
    data = ShapesDataset(length=n, size=64, seed=dataset_seed, split="validation", caption_style="canonical")
    scenes = [Scene.from_dict(data[i]["meta"]["scene"]) for i in range(n)]
    edits = [swap(scene, i) for i, scene in enumerate(scenes)]
    rows = []
    start = time.perf_counter()
    for b in range(0, n, batch):
        part = range(b, min(n, b + batch))
        sources = [caption(scenes[i]) for i in part]
        targets = [caption(edits[i][0]) for i in part]
        run = {"seed": b, "steps": steps, "guidance_scale": guidance, "progress": False}
        injected = prompt_to_prompt(model, sources, targets, cross_replace_steps=cross,
                                    self_replace_steps=self_, **run)
        plain = txt2img(model, targets, **run).images
        for j, i in enumerate(part):
            edited_scene, k, kind = edits[i]
            source_mask = object_mask(injected.source[j])
            row = {"kind": kind, "groups": len(scenes[i].groups),
                   "source_right": check(injected.source[j], scenes[i]).colour_and_shape}
            for name, image in (("p2p", injected.edited[j]), ("plain", plain[j])):
                row[name] = (check(image, edited_scene).groups[k]["colour_and_shape"],
                             iou(object_mask(image), source_mask))
            rows.append(row)
        if on_batch is not None:                 # a partial report after every batch: long runs can be read early
            on_batch({"rows": rows, "seconds": time.perf_counter() - start})
    return {"rows": rows, "seconds": time.perf_counter() - start}


def report(out: dict, args) -> str:
    rows = out["rows"]
    lines = [(f"Prompt-to-prompt word swaps on the shipped tiny model: {len(rows)} held-out scenes (validation "
             f"captions, dataset seed {args.dataset_seed}, scene i seed i), dpmpp_2m {args.steps} steps, guidance "
             f"{args.guidance:g}, cross-attention injected for {args.cross:g} of the steps, self-attention for "
             f"{args.self:g}. {out['seconds']:.0f} s."),
             (f"command: python benchmarks/prompt_to_prompt.py --n {args.n} --steps {args.steps} --guidance "
             f"{args.guidance:g} --cross {args.cross:g} --self {args.self:g} "
             f"--dataset-seed {args.dataset_seed}"), "",
             (f"{'edit':8s} {'scenes':>8s} {'n':>4s} {'source ok':>10s} | {'p2p: changed':>13s} {'in place':>9s} | "
             f"{'no injection: changed':>22s} {'in place':>9s}")]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kind"], f"{r['groups']}-group")].append(r)
        groups[(r["kind"], "all")].append(r)
        groups[("all", "all")].append(r)
    for key in [("colour", "1-group"), ("colour", "2-group"), ("shape", "1-group"), ("shape", "2-group"),
                ("colour", "all"), ("shape", "all"), ("all", "all")]:
        rs = groups.get(key, [])
        if not rs:
            continue
        mean = lambda xs: sum(xs) / len(xs)
        lines.append(f"{key[0]:8s} {key[1]:>8s} {len(rs):4d} {mean([r['source_right'] for r in rs]):10.1%} | "
                     f"{mean([r['p2p'][0] for r in rs]):13.1%} {mean([r['p2p'][1] for r in rs]):9.3f} | "
                     f"{mean([r['plain'][0] for r in rs]):22.1%} {mean([r['plain'][1] for r in rs]):9.3f}")
    lines += ["", ("changed: the checker finds the edited group's new colour+shape in the edited image (target 80%); "
              "in place: mean IoU of the edited image's object mask with the source image's (target 0.7); "
              "no injection: the edited prompt alone from the same seed; source ok: the source image shows the "
              "source prompt's colour+shape for every group.")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--cross", type=float, default=0.8, help="fraction of steps with cross-attention injected")
    parser.add_argument("--self", type=float, default=0.4, help="fraction of steps with self-attention injected")
    parser.add_argument("--batch", type=int, default=10, help="scene pairs sampled at once")
    parser.add_argument("--dataset-seed", type=int, default=1, help="1: the measured scenes; another: for choosing knobs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prompt_to_prompt.txt"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sdkit.load_model("tiny")
    partial = Path(args.out).with_suffix(".partial.txt") if args.out else None
    out = measure(model, args.n, args.steps, args.guidance, args.cross, args.self, args.batch,
                  args.dataset_seed, on_batch=lambda o: partial and partial.write_text(report(o, args) + "\n"))
    text = report(out, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
