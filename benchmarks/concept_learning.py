"""Did the model learn the new shape? Draw held-out prompts naming the hexagon (a shape the shipped model never saw)
with the word under test, and read the images back with the checker, which reads hexagons when asked.

    python benchmarks/concept_learning.py                                   # before: the word "hexagon", base model
    python benchmarks/concept_learning.py --embedding RUN/embeddings/hexagon-ti.pt     # textual inversion
    python benchmarks/concept_learning.py --ckpt FILE --word sks                        # DreamBooth weights
    python benchmarks/concept_learning.py --lora RUN/lora/lora.safetensors --prior     # a LoRA (FILE[:SCALE])
    python benchmarks/concept_learning.py --merge base=a.json lora=b.json,prior.json ... OUT.json   # one table

Prompts: the canonical captions of the shapes dataset's validation split drawn with shapes=["hexagon"] (held-out
attribute combinations; colours, counts, sizes, positions and backgrounds vary; seed 1, which the training recipes
do not use for training), "hexagon"/"hexagons" replaced by --word (default: the embedding's word, else "hexagon").
Each image is checked against the prompt's true scene with shapes=ALL_SHAPES. Prints the rates of colour+shape
(the concept was drawn in the named colour), shape (drawn at all), count, position, size and everything, plus how
often the images show one of the old shapes in the hexagon's place. --prior also runs benchmarks/prompt_following's
200 held-out prompts of the base model (the prior a fine-tune should keep).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdkit
from sdkit.data.concepts import ReplaceWords
from sdkit.data.shapes import ALL_SHAPES, Scene, ShapesDataset
from sdkit.data.shapes_checker import check
from sdkit.pipelines import txt2img

ATTRIBUTES = ("colour", "shape", "colour_and_shape", "count", "position", "size", "correct")


def evaluate(model, word: str, n: int = 100, guidance: float = 5.0, steps: int = 20, sampler: str = "dpmpp_2m",
             seed: int = 0, batch: int = 25) -> dict:
    data = ReplaceWords(ShapesDataset(length=n, size=64, seed=1, split="validation", caption_style="canonical",
                                      shapes=["hexagon"], two_group_prob=0.0),
                        {"hexagon": word, "hexagons": word} if word != "hexagon" else {"hexagon": "hexagon"})
    items = [data[i] for i in range(n)]
    prompts = [item["caption"] for item in items]
    images, start = [], time.perf_counter()
    for i in range(0, n, batch):
        images += txt2img(model, prompts[i:i + batch], seed=seed + i, steps=steps, sampler=sampler,
                          guidance_scale=guidance, progress=False).images
    seconds = time.perf_counter() - start
    results = [check(image, Scene.from_dict(item["meta"]["scene"]), shapes=ALL_SHAPES)
               for image, item in zip(images, items)]
    drawn = Counter(c.shape for r in results for c in r.components)
    return {"n": n, "word": word, "guidance": guidance, "steps": steps, "sampler": sampler, "seconds": seconds,
            "overall": {a: sum(getattr(r, a) for r in results) / n for a in ATTRIBUTES},
            "shapes_drawn": dict(drawn.most_common()), "prompts": prompts, "images": images,
            "verdicts": [r.colour_and_shape for r in results]}


def merge(named_files: list[str], out: str) -> None:
    """One table from several runs' --json files, given as NAME=FILE or NAME=FILE,PRIOR_FILE: the rows notebook 12
    prints. PRIOR_FILE supplies the prior of a run measured without --prior: another --prior run of the same weights
    (the prior's 200 prompts do not name the hexagon, so they are the same prompts whatever --word was)."""
    rows = []
    for spec in named_files:
        name, _, paths = spec.partition("=")
        path, _, prior_path = paths.partition(",")
        with open(path) as f:
            run = json.load(f)
        prior = run.get("prior")
        if prior_path:
            with open(prior_path) as f:
                prior = json.load(f)["prior"]
        rows.append({"name": name, "word": run["word"], "concept": run["overall"]["colour_and_shape"],
                     "shape": run["overall"]["shape"], "n": run["n"],
                     "prior": prior["overall"]["colour_and_shape"] if prior else None,
                     "prior_n": prior["n"] if prior else None, "prior_from": prior_path or None,
                     "seconds": round(run["seconds"])})
    with open(out, "w") as f:
        json.dump({"what": "colour+shape on 100 held-out hexagon prompts (concept) and on the base model's 200 "
                           "held-out prompts (prior); dpmpp_2m 20 steps, guidance 5", "rows": rows}, f, indent=1)
    print(f"{'run':36s} {'word':>18s} {'hexagon c+s':>12s} {'hexagon shape':>14s} {'prior c+s':>10s}")
    for r in rows:
        prior = f"{r['prior']:.1%}" if r["prior"] is not None else "-"
        print(f"{r['name']:36s} {r['word']:>18s} {r['concept']:>12.1%} {r['shape']:>14.1%} {prior:>10s}")


def main() -> None:
    if sys.argv[1:2] == ["--merge"]:
        *files, out = sys.argv[2:]
        return merge(files, out)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--ckpt", default=None, help="weights (default: the config's shipped weights)")
    parser.add_argument("--embedding", help="a textual-inversion file to load (A1111 .pt / .safetensors)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA file to apply (repeatable)")
    parser.add_argument("--word", help="the word prompts use for the hexagon (default: the embedding's, or hexagon)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--prior", action="store_true", help="also the 200 held-out prompts of the base model")
    parser.add_argument("--sheet", help="write a contact sheet PNG of the first 48 images")
    parser.add_argument("--json", help="write the numbers as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sdkit.load_model(args.config, args.ckpt)
    word = args.word or "hexagon"
    for spec in args.lora:
        from sdkit.lora import load_lora
        path, _, scale = spec.partition(":")
        lora = load_lora(model, path, scale=float(scale or 1.0))
        print(f"LoRA {path} at scale {lora.scale:g}")
    if args.embedding:
        from sdkit.textual_inversion import load_embedding
        word = load_embedding(model, args.embedding, name=args.word)
    out = evaluate(model, word, args.n, args.guidance, args.steps, args.sampler)
    print(f"{out['n']} held-out hexagon prompts with the word {word!r}, {args.sampler} {args.steps} steps, guidance "
          f"{args.guidance:g} ({out['seconds']:.0f} s to generate)")
    for a in ATTRIBUTES:
        print(f"  {a:17s} {out['overall'][a]:6.1%}")
    print("  objects read as:", ", ".join(f"{s} {k}" for s, k in out["shapes_drawn"].items()))
    numbers = {k: v for k, v in out.items() if k != "images"}
    if args.prior:
        from benchmarks.prompt_following import evaluate as prompt_following
        prior = prompt_following(model, 200, args.guidance, args.steps, args.sampler)
        print(f"  base model's 200 held-out prompts: colour+shape {prior['overall']['colour_and_shape']:.1%}, "
              f"everything {prior['overall']['correct']:.1%}")
        numbers["prior"] = {k: v for k, v in prior.items() if k != "images"}
    if args.sheet:
        from benchmarks.prompt_following import contact_sheet
        contact_sheet(out["images"][:48], out["prompts"][:48], out["verdicts"][:48]).save(args.sheet)
        print(f"wrote {args.sheet}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=1)


if __name__ == "__main__":
    main()
