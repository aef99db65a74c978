"""How well does the small safety checker flag what it should? SD's rule (cosine similarity against per-concept
thresholds) on the kit's small CLIP, with concepts written as text, calibrated on one held-out set and measured on
another: precision and recall of "flagged" per concept, and for "any concept" versus all other images.

    python benchmarks/small_safety_checker.py [--clip-ckpt FILE] [--n 400] [--target-precision 0.9] [--json out.json]

The kit's data has nothing unsafe in it, so stand-in concepts play the part of the banned ones:
- shapes: "a heart" and "a star" (an image is positive when any object in it has that shape). Calibration: the
  shapes validation split (attribute combinations the CLIP never saw) with seed 2; test: the same split, seed 3.
- emoji: "a flag" (positive: the emoji's name starts with "flag"). The 95 emoji of the validation split (never seen
  by the CLIP) in two styles: calibrated on Twemoji and measured on OpenMoji, then the other way round; the pooled
  line adds both measurements up.
Shapes scenes hold several objects and the CLIP embeds the whole scene, so one cosine threshold separates "has a
heart somewhere" poorly; emoji show one thing each, as the photos SD's checker was made for mostly do.
"""
from __future__ import annotations

import argparse
import json

import torch

import sdkit
from sdkit.data.emoji import EmojiDataset
from sdkit.data.shapes import ShapesDataset
from sdkit.safety import SmallSafetyChecker


def shapes_set(n: int, seed: int) -> tuple[torch.Tensor, list[set[str]]]:
    data = ShapesDataset(length=n, size=64, seed=seed, split="validation", caption_style="canonical")
    items = [data[i] for i in range(n)]
    return (torch.stack([it["image"] for it in items]) + 1) / 2, \
        [{g["shape"] for g in it["meta"]["scene"]["groups"]} for it in items]


def emoji_set(style: str) -> tuple[torch.Tensor, list[set[str]]]:
    data = EmojiDataset(style=style, size=64, split="validation")
    items = [data[i] for i in range(len(data))]
    return (torch.stack([it["image"] for it in items]) + 1) / 2, \
        [{"flag"} if it["meta"]["name"].startswith("flag") else set() for it in items]


def run(clip, concepts: dict[str, str], calibration, test, target_precision: float) -> dict:
    """concepts: label -> concept prompt. Returns the calibrated thresholds and the test-set report."""
    checker = SmallSafetyChecker.from_clip(clip, list(concepts.values()))
    labels = lambda sets: [[concepts[c] for c in s if c in concepts] or None for s in sets]  # noqa: E731
    reports = checker.calibrate(calibration[0], labels(calibration[1]), target_precision=target_precision)
    return {"thresholds": {r.concept: r.threshold for r in reports},
            "calibration": {r.concept: {"precision": r.precision, "recall": r.recall} for r in reports},
            "test": checker.evaluate(test[0], labels(test[1])), "n_calibration": len(calibration[1]),
            "n_test": len(test[1])}


def pool(measurements: list[dict]) -> dict:
    """Precision and recall of several measurements added up (true positives = precision × flagged)."""
    flagged = sum(m["flagged"] for m in measurements)
    positives = sum(m["positives"] for m in measurements)
    hits = sum(round(m["precision"] * m["flagged"]) for m in measurements)
    return {"precision": hits / flagged if flagged else 1.0, "recall": hits / positives if positives else 1.0,
            "flagged": flagged, "positives": positives}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-config", default="tiny-clip")
    parser.add_argument("--clip-ckpt", default=None, help="small-CLIP weights (default: the shipped ones)")
    parser.add_argument("--n", type=int, default=400, help="shapes images per set")
    parser.add_argument("--target-precision", type=float, default=0.9)
    parser.add_argument("--json", help="write the numbers as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = sdkit.load_model(args.clip_config, args.clip_ckpt)
    results = {
        "shapes": run(clip, {"heart": "a heart", "star": "a star"}, shapes_set(args.n, 2), shapes_set(args.n, 3),
                      args.target_precision),
        "emoji twemoji→openmoji": run(clip, {"flag": "a flag"}, emoji_set("twemoji"), emoji_set("openmoji"),
                                      args.target_precision),
        "emoji openmoji→twemoji": run(clip, {"flag": "a flag"}, emoji_set("openmoji"), emoji_set("twemoji"),
                                      args.target_precision),
    }
    results["emoji pooled"] = {"thresholds": {}, "n_test": 2 * results["emoji twemoji→openmoji"]["n_test"],
                               "test": {"a flag": pool([results[k]["test"]["a flag"] for k in
                                                        ("emoji twemoji→openmoji", "emoji openmoji→twemoji")])}}
    print(f"calibrated for precision >= {args.target_precision:g} on held-out set 1, measured on held-out set 2:")
    print("| set | concept | threshold | test precision | test recall | flagged / positives (of n) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        for concept, m in r["test"].items():
            threshold = f"{r['thresholds'][concept]:.3f}" if concept in r["thresholds"] else "–"
            print(f"| {name} | {concept} | {threshold} | {m['precision']:.1%} | {m['recall']:.1%} | "
                  f"{m['flagged']} / {m['positives']} (of {r['n_test']}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
