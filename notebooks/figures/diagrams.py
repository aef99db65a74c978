"""Diagrams for notebook 04, drawn with matplotlib from what sdkit reports, so they cannot drift from the code.

- ``draw_unet(blocks)``: the UNet as a U, one box per block, from a list of (name, kinds, shape) rows that the
  notebook records with forward hooks (input blocks down the left, the middle block at the bottom, output blocks up
  the right, and a skip connection from input block i to output block 11 − i);
- ``draw_data_flow(shapes)``: prompt → image, each arrow's tensor labelled with its shape for two models.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

COLOURS = {"attention": "#f6c28b", "res": "#9ecae1", "resample": "#d9d9d9", "conv": "#c7e9c0", "data": "#ffffff",
           "loop": "#fff7e6"}


def _box(ax, x, y, w, h, text, colour, fontsize=8, **kw):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="#444444", linewidth=0.8, **kw))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, colour="#444444", style="-|>", lw=1.0, ls="-", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=9, color=colour, lw=lw, linestyle=ls,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))


def _kind(kinds: str) -> str:
    if "SpatialTransformer" in kinds:
        return "attention"
    if kinds in ("Downsample", "Conv2d"):
        return "resample" if kinds == "Downsample" else "conv"
    return "res"


def _short(kinds: str) -> str:
    return (kinds.replace("SpatialTransformer", "Transformer").replace("Downsample", "Down")
            .replace("Upsample", "Up").replace("Conv2d", "conv 3×3").replace(" + ", "+"))


def draw_unet(blocks, context="77 × 768", time_dim=1280, title="The SD v1 UNet"):
    """``blocks``: rows (name, kinds, shape) for input_blocks.0-11, middle_block, output_blocks.0-11, in order,
    as notebook 04's trace prints them (shape = (batch, channels, height, width))."""
    rows = {name: (kinds, shape) for name, kinds, shape in blocks}
    n_in = sum(name.startswith("input_blocks") for name in rows)
    fig, ax = plt.subplots(figsize=(12.5, 8.2))
    w, h, left, right = 3.1, 0.62, 3.6, 10.8
    centres = {}
    for i in range(n_in):
        kinds, shape = rows[f"input_blocks.{i}"]
        y = -i
        centres[f"input_blocks.{i}"] = (left, y)
        _box(ax, left, y, w, h, f"in {i}: {_short(kinds)}\n{shape[1]} ch, {shape[2]}×{shape[3]}", COLOURS[_kind(kinds)])
    for j in range(n_in):
        kinds, shape = rows[f"output_blocks.{j}"]
        y = -(n_in - 1 - j)
        centres[f"output_blocks.{j}"] = (right, y)
        _box(ax, right, y, w + 0.5, h, f"out {j}: {_short(kinds)}\n{shape[1]} ch, {shape[2]}×{shape[3]}",
             COLOURS[_kind(kinds)])
    kinds, shape = rows["middle_block"]
    mid = ((left + right) / 2, -n_in - 0.2)
    _box(ax, *mid, 4.4, h, f"middle: {_short(kinds)}\n{shape[1]} ch, {shape[2]}×{shape[3]}", COLOURS["attention"])
    # the data path: down the left, through the middle, up the right
    for i in range(n_in - 1):
        _arrow(ax, (left, -i - h / 2), (left, -i - 1 + h / 2))
        _arrow(ax, (right, -i - 1 + h / 2), (right, -i - h / 2))
    _arrow(ax, (left, -(n_in - 1) - h / 2), (mid[0] - 2.2, mid[1]), rad=0.25)
    _arrow(ax, (mid[0] + 2.2, mid[1]), (right, -(n_in - 1) - h / 2), rad=0.25)
    # skip connections: input block i is concatenated onto output block (n_in - 1 - i)'s input
    for i in range(n_in):
        _arrow(ax, (left + w / 2, -i), (right - (w + 0.5) / 2, -i), colour="#7f7f7f", lw=0.7, ls=(0, (4, 3)))
    ax.text((left + right) / 2, 0.22, "skip connections (concatenated)", ha="center", fontsize=8, color="#555555")
    # input and output
    first = rows["input_blocks.0"][1]
    ax.text(left, 1.05, f"noisy latent $x_t$\n{4} × {first[2]} × {first[3]}", ha="center", fontsize=9)
    _arrow(ax, (left, 0.7), (left, h / 2))
    ax.text(right, 1.05, f"predicted noise $\\hat\\varepsilon$\n4 × {first[2]} × {first[3]}", ha="center",
            fontsize=9)
    _arrow(ax, (right, h / 2), (right, 0.7))
    ax.text(right + 0.15, 0.52, "out: GroupNorm, SiLU, conv 3×3", ha="left", fontsize=7, color="#555555")
    # where the timestep and the text come in
    ax.text(0.55, -1.6, f"timestep $t$\n↓ sinusoidal, 320\n↓ MLP → {time_dim}\n\nadded inside\nevery ResBlock\n"
            "(blue and orange\nboxes)", ha="center", va="top", fontsize=8.5,
            bbox=dict(boxstyle="round", facecolor="#eef5fb", edgecolor="#6baed6"))
    ax.text(14.1, -1.6, f"text states\n{context}\n\nkeys and values of\nthe cross-attention\nin every orange box",
            ha="center", va="top", fontsize=8.5, bbox=dict(boxstyle="round", facecolor="#fdf0e2", edgecolor="#fd8d3c"))
    legend = [("ResBlock(s) only", COLOURS["res"]), ("with SpatialTransformer (self + cross-attention)",
              COLOURS["attention"]), ("Downsample (stride-2 conv)", COLOURS["resample"]),
              ("input conv", COLOURS["conv"])]
    for k, (label, colour) in enumerate(legend):
        ax.add_patch(FancyBboxPatch((13.1, -8.3 - 0.55 * k), 0.35, 0.3, boxstyle="round,pad=0.01",
                                    facecolor=colour, edgecolor="#444444", linewidth=0.6))
        ax.text(13.6, -8.15 - 0.55 * k, label, va="center", fontsize=7.5)
    ax.text(13.1, -7.6, "each box: its output's channels and size", fontsize=7.5, color="#555555")
    ax.set_xlim(-0.6, 17.4)
    ax.set_ylim(-n_in - 0.9, 1.7)
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def draw_data_flow(shapes, models=("SD v1", "tiny"), steps="× steps"):
    """``shapes``: {stage: (shape for models[0], shape for models[1])} for the stages "ids", "text", "noise",
    "unet_in", "eps", "latent" and "image"; each label prints both."""
    def label(key, name):
        a, b = shapes[key]
        return f"{name}\n{models[0]}: {a}\n{models[1]}: {b}"

    fig, ax = plt.subplots(figsize=(13, 5.6))
    y_text, y_loop, y_img = 3.0, 0.9, -1.2
    _box(ax, 0.8, y_text, 1.3, 0.55, '"a red circle"\nand ""', COLOURS["data"], 9)
    _box(ax, 2.9, y_text, 1.6, 0.55, "tokenizer", COLOURS["conv"], 9)
    _box(ax, 5.3, y_text, 2.2, 0.8, label("ids", "token ids"), COLOURS["data"])
    _box(ax, 7.8, y_text, 1.8, 0.55, "text encoder\n(frozen)", COLOURS["conv"], 9)
    _box(ax, 10.5, y_text, 2.6, 0.8, label("text", "text states (cond, uncond)"), COLOURS["data"])
    for a, b in [(1.45, 2.1), (3.7, 4.2), (6.4, 6.9), (8.7, 9.2)]:
        _arrow(ax, (a, y_text), (b, y_text))
    _box(ax, 0.8, y_loop, 1.3, 0.55, "seed", COLOURS["data"], 9)
    _box(ax, 2.9, y_loop, 2.2, 0.8, label("noise", "noise $x_T$ ~ N(0, I)"), COLOURS["data"])
    _arrow(ax, (1.45, y_loop), (1.8, y_loop))
    # the sampler loop
    ax.add_patch(FancyBboxPatch((4.3, y_loop - 1.05), 8.9, 2.1, boxstyle="round,pad=0.05", facecolor=COLOURS["loop"],
                                edgecolor="#d08c2c", linewidth=1.0, linestyle="--"))
    ax.text(4.45, y_loop + 0.85, f"sampler loop, {steps}: t = T … 1", fontsize=8.5, color="#a0620f")
    _box(ax, 5.6, y_loop, 2.1, 0.8, label("unet_in", "UNet input\n$[x_t, x_t]$"), COLOURS["data"], 7.5)
    _box(ax, 7.9, y_loop, 1.6, 1.0, "UNet on a\nbatch of 2:\ntext | empty", COLOURS["attention"], 8)
    _box(ax, 10.0, y_loop, 1.9, 0.8, label("eps", "$\\varepsilon_c,\\ \\varepsilon_\\varnothing$"),
         COLOURS["data"], 7.5)
    _box(ax, 12.25, y_loop, 1.6, 1.0, "combine\n$\\varepsilon_\\varnothing+s(\\varepsilon_c-\\varepsilon_\\varnothing)$"
         "\nthen step\n$x_t\\to x_{t'}$", COLOURS["res"], 7.5)
    _arrow(ax, (4.0, y_loop), (4.55, y_loop))
    _arrow(ax, (6.65, y_loop), (7.1, y_loop))
    _arrow(ax, (8.7, y_loop), (9.05, y_loop))
    _arrow(ax, (10.95, y_loop), (11.45, y_loop))
    _arrow(ax, (12.25, y_loop - 0.5), (5.6, y_loop - 0.4), rad=-0.12, colour="#a0620f")
    ax.text(9.6, y_loop - 0.95, "$x_{t'}$ becomes the next $x_t$", fontsize=8, color="#a0620f", ha="center")
    _arrow(ax, (10.5, y_text - 0.4), (7.9, y_loop + 0.5), colour="#fd8d3c")
    ax.text(9.5, 2.05, "cross-attention", fontsize=8, color="#d9570f", rotation=-18)
    # decode
    _box(ax, 5.6, y_img, 2.2, 0.8, label("latent", "final latent $x_0$"), COLOURS["data"])
    _box(ax, 8.3, y_img, 1.8, 0.55, "VAE decoder", COLOURS["conv"], 9)
    _box(ax, 11.0, y_img, 2.2, 0.8, label("image", "image"), COLOURS["data"])
    _arrow(ax, (5.6, y_loop - 1.1), (5.6, y_img + 0.4))
    ax.text(5.75, -0.5, "after the last step", fontsize=8, color="#555555")
    _arrow(ax, (6.7, y_img), (7.4, y_img))
    _arrow(ax, (9.2, y_img), (9.9, y_img))
    ax.set_xlim(0, 13.4)
    ax.set_ylim(-1.8, 3.6)
    ax.axis("off")
    ax.set_title("From prompt to image (shapes printed by sdkit, batch of one prompt)", fontsize=11)
    fig.tight_layout()
    return fig
