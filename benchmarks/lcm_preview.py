"""The distilled laptop model as a live preview: time per 64×64 image and held-out prompt following, at 4 lcm steps
without guidance, beside the base model at its 20-step DPM-Solver++(2M), guidance 5 setting.

    python benchmarks/lcm_preview.py [--delta FILE] [--n 200] [--steps 4] [--threads 2] [--rounds 7]

``--delta``: a distillation run's file (``logs/<run>/lcm/last.safetensors``) merged into ``load_model("tiny")``;
default ``load_model("tiny-lcm")`` (data/tiny-lcm.safetensors). Timing: one image per call (``txt2img``, seed
fixed, prompt encoded each time, decode included, as the widgets call it), base and distilled alternating in
``--rounds`` rounds, the median per model; the first call of each is a warm-up. Prompt following:
benchmarks/prompt_following.py's ``evaluate`` on the same ``--n`` held-out prompts for both (``--n 0`` skips it).
The issue's bar: ≤ 0.5 s per image on 2 cores, colour+shape ≥ 85%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sdkit
from sdkit.nn.lowrank import merge_delta_file
from sdkit.pipelines import txt2img

PROMPT = "a red circle and a blue square on a white background"


def load_distilled(delta: str | None):
    if delta is None:
        return sdkit.load_model("tiny-lcm")
    model = sdkit.load_model("tiny")
    merge_delta_file(model, delta)
    return model


def time_one(model, **options) -> float:
    start = time.perf_counter()
    txt2img(model, PROMPT, seed=0, progress=False, **options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delta", default=None, help="a delta file (default: the shipped data/tiny-lcm.safetensors)")
    parser.add_argument("--n", type=int, default=200, help="held-out prompts for prompt following (0: skip)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, distilled = sdkit.load_model("tiny"), load_distilled(args.delta)
    settings = {"base": (base, {"sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 5.0}),
                "distilled": (distilled, {"sampler": "lcm", "steps": args.steps, "guidance_scale": 1.0})}
    times: dict[str, list[float]] = {name: [] for name in settings}
    with torch.inference_mode():
        for name, (model, options) in settings.items():
            time_one(model, **options)                      # warm-up
        for _ in range(args.rounds):
            for name, (model, options) in settings.items():
                times[name].append(time_one(model, **options))
    rows = {}
    for name, (model, options) in settings.items():
        row = {"setting": options, "seconds_per_image": statistics.median(times[name])}
        if args.n:
            from prompt_following import evaluate
            result = evaluate(model, n=args.n, guidance=options["guidance_scale"], steps=options["steps"],
                              sampler=options["sampler"])
            row["prompt_following"] = result["overall"]
        rows[name] = row
    print(f"torch threads: {args.threads}; one 64x64 image per call, median of {args.rounds} rounds")
    print(f"{'model':10} {'sampler':9} {'steps':>5} {'guidance':>8} {'s/image':>8} {'colour+shape':>12} "
          f"{'count':>6} {'position':>8} {'everything':>10}")
    for name, row in rows.items():
        o, pf = row["setting"], row.get("prompt_following", {})
        cells = [f"{100 * pf[a]:.1f}%" if a in pf else "-" for a in ("colour_and_shape", "count", "position",
                                                                      "correct")]
        print(f"{name:10} {o['sampler']:9} {o['steps']:>5} {o['guidance_scale']:>8g} "
              f"{row['seconds_per_image']:>8.3f} {cells[0]:>12} {cells[1]:>6} {cells[2]:>8} {cells[3]:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
