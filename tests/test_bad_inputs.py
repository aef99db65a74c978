"""The bad-input battery of issue 22, kept: each input a careless or hostile user tried, with what it must get.

A refused input must raise the expected error type with the words that make the message useful (what was wrong,
which argument, what to do), and must be refused early: before the UNet or the VAE ran (the spies below count
their calls), and on the command line before the model was built where nothing needs it. An input that is valid
after all (a 16-bit image, a float mask, a pickle under a safetensors name) must give the right result.
The CLI must print ``sdkit <command>: error: ...`` on stderr, exit with 2, and never show a traceback.

What already held and must keep holding is here too: no malicious pickle runs, a failed save replaces nothing,
the same seed gives the same image. ``test_the_battery_size`` counts the inputs the battery covers: 294
(233 through the API, 58 through the CLI, 3 single tests).

Models are tiny-test (random weights, 32×32 images) and tiny-upscaler-test; memory limits are simulated by
patching what the machine has available, never by allocating.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import shutil
import sys
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

import sdkit
from sdkit import checks
from sdkit.checkpoints import CheckpointError, load_model, read_checkpoint, save_compvis, save_diffusers
from sdkit.cli import main
from sdkit.config import ConfigError, load_config
from sdkit.pipelines import img2img, inpaint, outpaint, txt2img, upscale
from sdkit.pipelines.images import mask_tensor
from sdkit.samplers import sample
from sdkit.watermark import detect_watermark

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(steps=1, progress=False)
GB = 2 ** 30


# ============================================================================================ fixtures


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sdkit.load_model("tiny-test")


@pytest.fixture(scope="module")
def upscaler():
    torch.manual_seed(2)
    return sdkit.load_model("tiny-upscaler-test")


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    """Bad (and some valid) files to hand over: images, masks, configs, checkpoints."""
    d = tmp_path_factory.mktemp("battery")
    rgb = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    rgb.save(d / "image.png")
    Image.new("L", (32, 32), 255).save(d / "mask.png")
    Image.new("L", (16, 16), 255).save(d / "mask_small.png")
    (d / "notimage.png").write_text("hello, I am text")
    (d / "image.png").read_bytes()
    (d / "truncated.png").write_bytes((d / "image.png").read_bytes()[:80])
    (d / "folder").mkdir()
    (d / "bad.yaml").write_text("model:\n  target: [1,\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "text.yaml").write_text("hello world\n")
    (d / "nodata.yaml").write_text("model:\n  target: sdkit.training.clip.SmallCLIP\n")
    (d / "baddata.yaml").write_text("data:\n  params:\n    train:\n      - target: sdkit.data.shapes.ShapesDataset\n"
                                    "        params: {length: 20, size: 64, split: trian}\n")
    (d / "empty.ckpt").write_bytes(b"")
    (d / "junk.ckpt").write_bytes(os.urandom(4096))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_compvis(state, d / "good.safetensors")
    (d / "truncated.safetensors").write_bytes((d / "good.safetensors").read_bytes()[:5000])
    nan_state = dict(state)
    key = "model.diffusion_model.out.2.weight"
    nan_state[key] = nan_state[key].clone().fill_(float("nan"))
    save_compvis(nan_state, d / "nan.safetensors")
    torch.save({"state_dict": state}, d / "pickle.safetensors")      # a pickle under a safetensors name
    with open(d / "evil.ckpt", "wb") as f:                             # runs `touch pwned` when unpickled
        pickle.dump(Evil(str(d / "pwned")), f)
    with open(d / "evil0.ckpt", "wb") as f:
        pickle.dump(Evil(str(d / "pwned")), f, protocol=0)
    torch.save({"state_dict": state, "x": Evil(str(d / "pwned"))}, d / "evil_zip.ckpt")
    save_diffusers(model, d / "diffusers")
    config = json.loads((d / "diffusers" / "unet" / "config.json").read_text())
    del config["block_out_channels"]
    shutil.copytree(d / "diffusers", d / "diffusers_nokey")
    (d / "diffusers_nokey" / "unet" / "config.json").write_text(json.dumps(config))
    shutil.copytree(d / "diffusers", d / "diffusers_badjson")
    (d / "diffusers_badjson" / "vae" / "config.json").write_text("{not json")
    return d


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclasses.dataclass
class Ctx:
    model: Any
    upscaler: Any
    files: Any
    tmp: Any
    monkeypatch: Any
    capsys: Any
    ran: dict

    def memory(self, gigabytes: float) -> None:
        """Pretend the machine has this much memory available (CPU and accelerator)."""
        self.monkeypatch.setattr(checks, "available_memory", lambda device="cpu": int(gigabytes * GB))
        self.monkeypatch.setattr("sdkit.pipelines.memory.available_memory",
                                 lambda device="cpu": int(gigabytes * GB))


def spy(monkeypatch, obj, name: str, counter: dict, key: str) -> None:
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        counter[key] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(obj, name, counted)


@pytest.fixture
def ctx(model, upscaler, files, tmp_path, monkeypatch, capsys):
    ran = {"unet": 0, "vae": 0}
    for m in (model, upscaler):
        spy(monkeypatch, m, "apply_model", ran, "unet")
        spy(monkeypatch, m.first_stage_model, "encode", ran, "vae")
        spy(monkeypatch, m.first_stage_model, "decode", ran, "vae")
    return Ctx(model, upscaler, files, tmp_path, monkeypatch, capsys, ran)


# ============================================================================================ the battery

@dataclasses.dataclass
class Bad:
    """``run(ctx)`` must raise ``error`` whose message contains every one of ``words``; ``early``: before the
    UNet or the VAE ran."""
    name: str
    run: Callable[[Ctx], Any]
    error: type | tuple
    words: tuple = ()
    early: bool = True


@dataclasses.dataclass
class Ok:
    """A valid input that used to go wrong: ``run(ctx)`` returns, and ``check(ctx, result)`` holds."""
    name: str
    run: Callable[[Ctx], Any]
    check: Callable[[Ctx, Any], None]


def gray16(value: int = 1000, size: int = 32) -> Image.Image:
    im = Image.fromarray(np.full((size, size), value, np.uint16))
    assert im.mode.startswith("I;16")
    return im


def img(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def i2i(c: Ctx, image, **kw):
    return img2img(c.model, image, "a", **{**FAST, **kw})


def inp(c: Ctx, mask, image=None, **kw):
    return inpaint(c.model, img() if image is None else image, mask, "a", **{**FAST, **kw})


def t2i(c: Ctx, prompt="a", **kw):
    return txt2img(c.model, prompt, **{**FAST, **kw})


def mean_pixel(result) -> float:
    return float(np.asarray(result.images[0], dtype=np.float64).mean())


def fixed_mask(c: Ctx, mask):
    return mask_tensor(mask, (32, 32))


AC = sdkit.schedules.sd_v1_alphas_cumprod() if hasattr(sdkit.schedules, "sd_v1_alphas_cumprod") else None


def run_sample(alphas=None, x=None, sampler="ddim", steps=4, eps=None, **options):
    ac = AC if alphas is None else alphas
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) if x is None else x
    return sample(eps or (lambda x, t: torch.zeros_like(x)), x, ac, sampler=sampler, steps=steps, progress=False,
                  **options)


def with_index(ac: torch.Tensor, i: int, value: float) -> torch.Tensor:
    ac = ac.clone()
    ac[i] = value
    return ac


IMAGES = [
    # 16-bit and float images are read at their range, not clipped to white (defect 1)
    Ok("I;16 image, img2img strength 0", lambda c: i2i(c, gray16(1000), strength=0.0),
       lambda c, r: abs(mean_pixel(r) - 1000 / 65535 * 255) < 1),
    Ok("I;16 image, img2img", lambda c: i2i(c, gray16(30000)), lambda c, r: r.images[0].size == (32, 32)),
    Ok("I;16B (big-endian) image", lambda c: i2i(c, Image.fromarray(np.full((32, 32), 20000, ">u2")), strength=0.0),
       lambda c, r: abs(mean_pixel(r) - 20000 / 65535 * 255) < 1),
    Ok("mode I image (16-bit PNG as older PIL opens it)",
       lambda c: i2i(c, gray16(40000).convert("I"), strength=0.0), lambda c, r: abs(mean_pixel(r) - 155.7) < 1),
    Ok("mode F image in [0, 1]", lambda c: i2i(c, Image.fromarray(np.full((32, 32), 0.25, np.float32)), strength=0.0),
       lambda c, r: abs(mean_pixel(r) - 0.25 * 255) < 1),
    Ok("I;16 image, inpaint", lambda c: inp(c, np.ones((32, 32)), image=gray16(5000), strength=0.0),
       lambda c, r: abs(mean_pixel(r) - 5000 / 65535 * 255) < 1),
    Ok("I;16 image, upscale", lambda c: upscale(c.upscaler, gray16(3000, 16), **FAST),
       lambda c, r: r.images[0].size == (64, 64)),
    Ok("RGBA image: transparency on white", lambda c: i2i(c, Image.new("RGBA", (32, 32), (0, 0, 0, 0)), strength=0.0),
       lambda c, r: mean_pixel(r) == 255),
    Ok("P image with transparency", lambda c: i2i(c, Image.new("RGBA", (32, 32), (0, 0, 0, 0)).convert("P"),
                                                   strength=0.0), lambda c, r: len(r.images) == 1),
    Ok("CMYK image", lambda c: i2i(c, Image.new("CMYK", (32, 32)), strength=0.0), lambda c, r: len(r.images) == 1),
    Ok("La image", lambda c: i2i(c, Image.new("La", (32, 32)), strength=0.0), lambda c, r: len(r.images) == 1),
    Bad("mode I image above 16 bits", lambda c: i2i(c, Image.new("I", (32, 32), 70000)), ValueError,
        ("mode I", "0..65535")),
    Bad("mode I image with negative values", lambda c: i2i(c, Image.new("I", (32, 32), -5)), ValueError,
        ("mode I", "0..65535")),
    Bad("mode F image in 0..255", lambda c: i2i(c, Image.fromarray(np.full((32, 32), 200.0, np.float32))),
        ValueError, ("mode F", "0..1")),
    Bad("mode F image with NaN", lambda c: i2i(c, Image.fromarray(np.full((32, 32), np.nan, np.float32))),
        ValueError, ("init_image", "NaN")),
    # tensors outside [-1, 1] are refused, not clamped (defect 3)
    Bad("tensor in 0..255", lambda c: i2i(c, torch.rand(3, 32, 32) * 255), ValueError, ("init_image", "x / 127.5 - 1")),
    Bad("tensor in 0..2", lambda c: i2i(c, torch.rand(3, 32, 32) * 2), ValueError, ("[-1, 1]",)),
    Bad("tensor with NaN", lambda c: i2i(c, torch.full((3, 32, 32), float("nan"))), ValueError,
        ("init_image", "NaN")),
    Bad("tensor with inf", lambda c: i2i(c, torch.full((3, 32, 32), float("inf"))), ValueError, ("init_image", "inf")),
    Bad("integer tensor", lambda c: i2i(c, torch.zeros(3, 32, 32, dtype=torch.int64)), ValueError, ("float",)),
    Bad("4-channel tensor", lambda c: i2i(c, torch.zeros(4, 32, 32)), ValueError, ("[3, H, W]",)),
    Bad("batch of 2 tensor", lambda c: i2i(c, torch.zeros(2, 3, 32, 32)), ValueError, ("[1, 3, H, W]",)),
    Bad("empty tensor", lambda c: i2i(c, torch.zeros(3, 0, 0)), ValueError, ("empty",)),
    Bad("float array", lambda c: i2i(c, np.random.rand(32, 32, 3)), ValueError, ("uint8", "(x * 255)")),
    Bad("uint16 array", lambda c: i2i(c, np.zeros((32, 32, 3), np.uint16)), ValueError, ("uint8", "16-bit")),
    Bad("grayscale array", lambda c: i2i(c, np.zeros((32, 32), np.uint8)), ValueError, ("Image.fromarray",)),
    Bad("a list", lambda c: i2i(c, [[0, 0, 0]]), TypeError, ("init_image", "PIL image")),
    Bad("None image", lambda c: i2i(c, None), TypeError, ("init_image",)),
    Bad("missing file", lambda c: i2i(c, str(c.files / "nope.png")), FileNotFoundError, ("init_image", "no such file")),
    Bad("a folder", lambda c: i2i(c, str(c.files / "folder")), IsADirectoryError, ("folder",)),
    Bad("text file named .png", lambda c: i2i(c, c.files / "notimage.png"), ValueError, ("not an image file",)),
    Bad("truncated PNG", lambda c: i2i(c, c.files / "truncated.png"), ValueError, ("truncated",)),
    Bad("1x1 image (0x0 latents)", lambda c: i2i(c, Image.new("RGB", (1, 1))), ValueError, ("1×1", "at least 2×2")),
    Bad("inpaint: 1x1 image", lambda c: inp(c, np.ones((1, 1)), image=Image.new("RGB", (1, 1))), ValueError,
        ("at least",)),
    Bad("upscale: text file", lambda c: upscale(c.upscaler, c.files / "notimage.png", **FAST), ValueError,
        ("low_res_image", "not an image")),
    Bad("upscale: tensor in 0..255", lambda c: upscale(c.upscaler, torch.rand(3, 16, 16) * 255, **FAST), ValueError,
        ("low_res_image",)),
]

MASKS = [
    # float and 16-bit masks are read at their range (defect 2)
    Ok("mode F mask of 1.0 (0..1)", lambda c: fixed_mask(c, Image.fromarray(np.ones((32, 32), np.float32))),
       lambda c, m: bool((m == 1).all())),
    Ok("I;16 mask of 65535", lambda c: fixed_mask(c, gray16(65535)), lambda c, m: bool((m == 1).all())),
    Ok("mode I mask of 32768", lambda c: fixed_mask(c, gray16(32768).convert("I")),
       lambda c, m: abs(float(m.mean()) - 0.5) < 1e-3),
    Ok("bool mask", lambda c: fixed_mask(c, np.ones((32, 32), bool)), lambda c, m: bool((m == 1).all())),
    Ok("uint8 mask 0..255", lambda c: fixed_mask(c, np.full((32, 32), 255, np.uint8)),
       lambda c, m: bool((m == 1).all())),
    Ok("mode F mask: inpaint repaints", lambda c: inp(c, Image.fromarray(np.ones((32, 32), np.float32))),
       lambda c, r: c.ran["unet"] > 0),
    Bad("mode F mask in 0..255", lambda c: inp(c, Image.fromarray(np.full((32, 32), 255.0, np.float32))), ValueError,
        ("mode F", "0..1")),
    Bad("mode I mask above 16 bits", lambda c: inp(c, Image.new("I", (32, 32), 100000)), ValueError, ("0..65535",)),
    Bad("float mask above 1", lambda c: inp(c, np.full((32, 32), 2.0)), ValueError, ("[0, 1]", "1 = repaint")),
    Bad("negative mask", lambda c: inp(c, np.full((32, 32), -1.0)), ValueError, ("[0, 1]",)),
    Bad("int64 mask of 255", lambda c: inp(c, np.full((32, 32), 255, np.int64)), ValueError, ("uint8 0..255",)),
    Bad("mask with NaN", lambda c: inp(c, np.full((32, 32), np.nan)), ValueError, ("mask", "NaN")),
    Bad("mask tensor with inf", lambda c: inp(c, torch.full((32, 32), float("inf"))), ValueError, ("mask", "inf")),
    Bad("RGB mask image", lambda c: inp(c, Image.new("RGB", (32, 32))), ValueError,
        ("single-channel", "convert('L')")),
    Bad("LA mask image", lambda c: inp(c, Image.new("LA", (32, 32))), ValueError, ("single-channel",)),
    Bad("mask of another size", lambda c: inp(c, np.ones((16, 16))), ValueError, ("same size", "mask.resize")),
    Bad("mask [3, H, W]", lambda c: inp(c, torch.ones(3, 32, 32)), ValueError, ("single-channel", "mean(0")),
    Bad("mask [H, W, 3]", lambda c: inp(c, np.ones((32, 32, 3))), ValueError, ("single-channel",)),
    Bad("mask of strings", lambda c: inp(c, np.full((32, 32), "x")), TypeError, ("numbers",)),
    Bad("mask None", lambda c: inp(c, None), TypeError, ("mask", "grayscale")),
    Bad("mask missing file", lambda c: inp(c, str(c.files / "nope.png")), FileNotFoundError, ("mask", "no such file")),
    Bad("mask text file", lambda c: inp(c, c.files / "notimage.png"), ValueError, ("mask", "not an image file")),
    # mask_blur and mask_resize (defect 15)
    Bad("mask_blur NaN", lambda c: inp(c, np.ones((32, 32)), mask_blur=float("nan")), ValueError, ("mask_blur",)),
    Bad("mask_blur negative", lambda c: inp(c, np.ones((32, 32)), mask_blur=-3), ValueError, ("mask_blur", "from 0")),
    Bad("mask_blur inf", lambda c: inp(c, np.ones((32, 32)), mask_blur=float("inf")), ValueError, ("mask_blur",)),
    Bad("mask_blur wider than the image (a hang before)", lambda c: inp(c, np.ones((32, 32)), mask_blur=1e6),
        ValueError, ("mask_blur", "fit inside the 32×32 image")),
    Bad("mask_blur a string", lambda c: inp(c, np.ones((32, 32)), mask_blur="3"), ValueError, ("mask_blur",)),
    Bad("mask_resize unknown", lambda c: inp(c, np.ones((32, 32)), mask_resize="bilinear"), ValueError,
        ("mask_resize", "nearest")),
    Ok("mask_blur 2 (valid)", lambda c: inp(c, np.ones((32, 32)), mask_blur=2), lambda c, r: len(r.images) == 1),
]

OUTPAINT = [
    Bad("extend with a fraction", lambda c: outpaint(c.model, img(), (8.7, 0, 0, 0), "a", **FAST), ValueError,
        ("extend", "whole pixel counts")),
    Bad("negative extend", lambda c: outpaint(c.model, img(), (-8, 0, 0, 0), "a", **FAST), ValueError, ("≥ 0",)),
    Bad("extend all zero", lambda c: outpaint(c.model, img(), (0, 0, 0, 0), "a", **FAST), ValueError, ("not all 0",)),
    Bad("extend of 3 numbers", lambda c: outpaint(c.model, img(), (8, 8, 8), "a", **FAST), ValueError, ("4 whole",)),
    Bad("extend a string", lambda c: outpaint(c.model, img(), "8888", "a", **FAST), ValueError, ("extend",)),
    Bad("overlap negative", lambda c: outpaint(c.model, img(), (8, 0, 0, 0), "a", overlap=-2, **FAST), ValueError,
        ("overlap", "from 0 to 15")),
    Bad("overlap larger than the image", lambda c: outpaint(c.model, img(), (8, 0, 0, 0), "a", overlap=40, **FAST),
        ValueError, ("overlap", "32×32 original")),
    Bad("overlap a fraction", lambda c: outpaint(c.model, img(), (8, 0, 0, 0), "a", overlap=2.5, **FAST), ValueError,
        ("overlap",)),
    Bad("fill unknown", lambda c: outpaint(c.model, img(), (8, 0, 0, 0), "a", fill="black", **FAST), ValueError,
        ("fill",)),
    Bad("outpaint by 10,000 px, 4 GB available",
        lambda c: (c.memory(4), outpaint(c.model, img(), (10000, 10000, 10000, 10000), "a", **FAST)),
        MemoryError, ("outpaint", "GB", "available", "smaller image")),
    Ok("outpaint 8 px with overlap 4", lambda c: outpaint(c.model, img(), (8, 0, 0, 0), "a", overlap=4, **FAST),
       lambda c, r: r.images[0].size == (40, 32)),
]

SIZES = [
    # no request is let through that needs more memory than the machine has (defect 4)
    Bad("65536x65536 txt2img", lambda c: t2i(c, height=65536, width=65536), MemoryError,
        ("65536×65536", "TB", "available", "smaller image")),
    Bad("65536x65536, 64 GB available", lambda c: (c.memory(64), t2i(c, height=65536, width=65536)), MemoryError,
        ("VAE decode", "at most about")),
    Bad("a billion images", lambda c: t2i(c, num_images=10 ** 9), MemoryError,
        ("1000000000 image(s)", "per call")),
    Bad("ten million images", lambda c: t2i(c, num_images=10 ** 7), MemoryError, ("10000000 image(s)",)),
    Bad("1000 images in one batch, 5 GB available", lambda c: (c.memory(5), t2i(c, num_images=1000, height=256,
                                                                             width=256)),
        MemoryError, ("one image per batch (batch_size=1)",)),
    Bad("1000 images, 1 GB available", lambda c: (c.memory(1), t2i(c, num_images=1000, height=256, width=256)),
        MemoryError, ("image(s) per call (num_images=", "batch_size=1)")),
    Bad("4096x4096 txt2img, 1 GB available", lambda c: (c.memory(1), t2i(c, height=4096, width=4096)), MemoryError,
        ("UNet", "smaller image (at most about")),
    Bad("upscale to 4096x4096 without tiles, 6 GB available",
        lambda c: (c.memory(6), upscale(c.upscaler, torch.zeros(3, 1024, 1024), decode_tile=0, **FAST)), MemoryError,
        ("decoding in tiles (decode_tile=64",)),
    Bad("img2img 4096x4096, 0.5 GB available",
        lambda c: (c.memory(0.5), i2i(c, torch.zeros(3, 4096, 4096))), MemoryError, ("img2img", "VAE encode")),
    Bad("upscale 2048x2048, 0.2 GB available",
        lambda c: (c.memory(0.2), upscale(c.upscaler, torch.zeros(3, 2048, 2048), **FAST)), MemoryError,
        ("upscale", "8192×8192")),
    Bad("inpaint 4096x4096, 0.5 GB available",
        lambda c: (c.memory(0.5), inp(c, torch.ones(4096, 4096), image=torch.zeros(3, 4096, 4096))), MemoryError,
        ("inpaint",)),
    Bad("height not a multiple of the factor", lambda c: t2i(c, height=33), ValueError, ("height=33", "multiples of 2")),
    Bad("height 0", lambda c: t2i(c, height=0), ValueError, ("height=0",)),
    Bad("width negative", lambda c: t2i(c, width=-64), ValueError, ("width=-64",)),
    Bad("height a float", lambda c: t2i(c, height=32.0), ValueError, ("height=32.0",)),
    Bad("height True", lambda c: t2i(c, height=True), ValueError, ("height=True",)),
    Bad("num_images 0", lambda c: t2i(c, num_images=0), ValueError, ("num_images", "positive integer")),
    Bad("num_images -1", lambda c: t2i(c, num_images=-1), ValueError, ("num_images",)),
    Bad("num_images 1.5", lambda c: t2i(c, num_images=1.5), ValueError, ("num_images",)),
    Bad("num_images True", lambda c: t2i(c, num_images=True), ValueError, ("num_images",)),
    Bad("batch_size 0", lambda c: t2i(c, batch_size=0), ValueError, ("batch_size", "positive integer")),
    Bad("batch_size 2.0", lambda c: t2i(c, batch_size=2.0), ValueError, ("batch_size",)),
    Bad("steps 0", lambda c: t2i(c, steps=0), ValueError, ("steps", "positive integer")),
    Bad("steps 2.5", lambda c: t2i(c, steps=2.5), ValueError, ("steps",)),
    Bad("steps past the schedule", lambda c: t2i(c, steps=10 ** 6), ValueError, ("training timesteps",)),
    # decode_tile is checked before sampling, and any tile size works (defects 6, 15)
    Bad("decode_tile -1", lambda c: t2i(c, decode_tile=-1), ValueError, ("decode_tile", "≥ 0")),
    Bad("decode_tile 2.5", lambda c: t2i(c, decode_tile=2.5), ValueError, ("decode_tile",)),
    Ok("decode_tile 1 (below the default overlap)", lambda c: t2i(c, decode_tile=1),
       lambda c, r: r.images[0].size == (32, 32)),
    Ok("decode_tile 4", lambda c: t2i(c, decode_tile=4, height=64, width=64), lambda c, r: r.images[0].size == (64, 64)),
    Bad("upscale tile_overlap -1", lambda c: upscale(c.upscaler, img(16), tile_overlap=-1, **FAST), ValueError,
        ("tile_overlap",)),
]

SEEDS = [  # defect 8
    Bad("seed 2**64", lambda c: t2i(c, seed=2 ** 64), ValueError, ("seed", "2**64 − 1")),
    Bad("seed + i past 2**64 − 1", lambda c: t2i(c, seed=2 ** 64 - 1, num_images=2), ValueError,
        ("seed", "2**64 − 1", "use a seed ≤")),
    Bad("seed -1", lambda c: t2i(c, seed=-1), ValueError, ("seed", "pass None")),
    Bad("seed 1.5", lambda c: t2i(c, seed=1.5), ValueError, ("seed must be None, an int",)),
    Bad("seed True", lambda c: t2i(c, seed=True), ValueError, ("seed must be None, an int",)),
    Bad("seed '42'", lambda c: t2i(c, seed="42"), ValueError, ("seed must be None, an int",)),
    Bad("seed list too short", lambda c: t2i(c, seed=[1], num_images=2), ValueError, ("list of 2 ints",)),
    Bad("seed list with 2**64", lambda c: t2i(c, seed=[1, 2 ** 64], num_images=2), ValueError, ("seed[1]",)),
    Bad("seed list with a float", lambda c: t2i(c, seed=[1, 2.0], num_images=2), ValueError, ("seed[1]",)),
    Ok("seed 2**64 − 1", lambda c: t2i(c, seed=2 ** 64 - 1), lambda c, r: r.seeds == [2 ** 64 - 1]),
    Ok("numpy seed", lambda c: t2i(c, seed=np.int64(7)), lambda c, r: r.seeds == [7]),
]

PROMPTS = [  # defect 12
    Bad("prompt None", lambda c: t2i(c, None), TypeError, ("prompt", 'use ""')),
    Bad("prompt 123", lambda c: t2i(c, 123), TypeError, ("prompt must be a string", "int")),
    Bad("prompt bytes", lambda c: t2i(c, b"a cat"), TypeError, ("bytes", "decode")),
    Bad("prompt with a lone surrogate", lambda c: t2i(c, "a \udc80 cat"), ValueError, ("lone surrogate", "position 2")),
    Bad("prompt list of ints", lambda c: t2i(c, [1, 2]), TypeError, ("prompt[0]",)),
    Bad("prompt list with None", lambda c: t2i(c, ["a", None]), TypeError, ("prompt[1]",)),
    Bad("prompt list of the wrong length", lambda c: t2i(c, ["a", "b"], num_images=3), ValueError, ("list of 3 strings",)),
    Bad("prompt a dict", lambda c: t2i(c, {"a": 1}), TypeError, ("list of 1 strings", "dict")),
    Bad("prompt a generator", lambda c: t2i(c, (p for p in ["a"])), TypeError, ("generator",)),
    Bad("negative_prompt 5", lambda c: t2i(c, negative_prompt=5), TypeError, ("negative_prompt",)),
    Bad("negative_prompt bytes", lambda c: t2i(c, negative_prompt=b"x"), TypeError, ("negative_prompt", "bytes")),
    Bad("img2img prompt None", lambda c: img2img(c.model, img(), None, **FAST), TypeError, ("prompt",)),
    Bad("upscale prompt for a text-less upscaler", lambda c: upscale(c.upscaler, img(16), "a cat", **FAST), ValueError,
        ("no text conditioning", "leave out --prompt")),
    Ok("negative_prompt None", lambda c: t2i(c, negative_prompt=None), lambda c, r: len(r.images) == 1),
    Ok("empty prompt", lambda c: t2i(c, ""), lambda c, r: len(r.images) == 1),
]

OPTIONS = [  # defects 9, 13 and the sampler options
    Bad("sampler unknown", lambda c: t2i(c, sampler="k_euler"), ValueError, ("unknown sampler", "dpmpp_2m")),
    Bad("sampler None", lambda c: t2i(c, sampler=None), ValueError, ("unknown sampler",)),
    Bad("eta -1", lambda c: t2i(c, sampler="ddim", eta=-1), ValueError, ("eta", "≥ 0")),
    Bad("ddim eta 5", lambda c: t2i(c, sampler="ddim", eta=5), ValueError, ("eta", "≤ 1")),
    Bad("eta inf", lambda c: t2i(c, sampler="euler_a", eta=float("inf")), ValueError, ("eta",)),
    Bad("eta NaN", lambda c: t2i(c, sampler="euler_a", eta=float("nan")), ValueError, ("eta",)),
    Bad("eta a string", lambda c: t2i(c, sampler="ddim", eta="0.5"), ValueError, ("eta",)),
    Bad("plms eta 0.5", lambda c: t2i(c, sampler="plms", eta=0.5), ValueError, ("deterministic", "ddim, euler_a")),
    Bad("heun eta 0.5", lambda c: t2i(c, sampler="heun", eta=0.5), ValueError, ("no eta option",)),
    Bad("guidance NaN", lambda c: t2i(c, guidance_scale=float("nan")), ValueError, ("guidance_scale",)),
    Bad("guidance inf", lambda c: t2i(c, guidance_scale=float("inf")), ValueError, ("guidance_scale",)),
    Bad("guidance 1e30", lambda c: t2i(c, guidance_scale=1e30), ValueError, ("guidance_scale", "1 to 20")),
    Bad("guidance a string", lambda c: t2i(c, guidance_scale="7.5"), ValueError, ("guidance_scale",)),
    Bad("spacing unknown", lambda c: t2i(c, spacing="quadratic"), ValueError, ("unknown spacing",)),
    Bad("karras for ddim", lambda c: t2i(c, sampler="ddim", karras=True), ValueError, ("karras",)),
    Bad("unknown sampler option", lambda c: t2i(c, warp=3), ValueError, ("does not take", "warp")),
    Bad("an option the pipeline sets", lambda c: t2i(c, mask=torch.ones(1)), ValueError, ("sets", "mask")),
    Bad("callback not callable", lambda c: t2i(c, callback=3), TypeError, ("callback",)),
    Bad("strength 1.5", lambda c: i2i(c, img(), strength=1.5), ValueError, ("strength", "from 0 to 1")),
    Bad("strength NaN", lambda c: i2i(c, img(), strength=float("nan")), ValueError, ("strength",)),
    Bad("strength a string", lambda c: i2i(c, img(), strength="0.5"), ValueError, ("strength",)),
    # NaN inputs are named as such, not as a float16 overflow (defect 13)
    Bad("x_T NaN", lambda c: t2i(c, x_T=torch.full((1, 4, 16, 16), float("nan"))), ValueError, ("x_T", "NaN")),
    Bad("x_T of the wrong shape", lambda c: t2i(c, x_T=torch.zeros(1, 4, 8, 8)), ValueError, ("x_T", "shape")),
    Bad("x_T integer", lambda c: t2i(c, x_T=torch.zeros(1, 4, 16, 16, dtype=torch.long)), TypeError, ("x_T", "float")),
    Bad("x_T a list", lambda c: t2i(c, x_T=[0.0]), TypeError, ("x_T",)),
    Bad("img2img noise inf", lambda c: i2i(c, img(), noise=torch.full((1, 4, 16, 16), float("inf"))), ValueError,
        ("noise", "inf")),
]

WATERMARKS = [  # defect 10: a payload is non-empty text or bytes, checked before anything is generated
    Bad("watermark an int", lambda c: t2i(c, watermark=123), TypeError, ("watermark payload", "int 123", "str(value)")),
    Bad("watermark 0", lambda c: t2i(c, watermark=0), TypeError, ("watermark payload", "int 0")),
    Bad("watermark a float", lambda c: t2i(c, watermark=1.5), TypeError, ("watermark payload", "float 1.5")),
    Bad("watermark True", lambda c: t2i(c, watermark=True), TypeError, ("watermark payload", "bool")),
    Bad("watermark a list", lambda c: t2i(c, watermark=["sdkit"]), TypeError, ("watermark payload", "list")),
    Bad("watermark empty text", lambda c: t2i(c, watermark=""), ValueError, ("payload is empty", "None")),
    Bad("watermark empty bytes", lambda c: t2i(c, watermark=b""), ValueError, ("payload is empty",)),
    Bad("watermark with a lone surrogate", lambda c: t2i(c, watermark="a\udc80"), ValueError,
        ("not valid text", "position 1")),
    Bad("img2img watermark an int", lambda c: i2i(c, img(), watermark=7), TypeError, ("watermark payload",)),
    Bad("inpaint watermark a float", lambda c: inp(c, np.ones((32, 32)), watermark=0.5), TypeError,
        ("watermark payload",)),
    Bad("upscale watermark an int", lambda c: upscale(c.upscaler, img(16), watermark=1, **FAST), TypeError,
        ("watermark payload",)),
    Ok("watermark False: no mark", lambda c: t2i(c, watermark=False),
       lambda c, r: "sdkit-watermark" not in r.images[0].info),
    Ok("watermark bytes", lambda c: t2i(c, watermark=b"sdkit", height=64, width=64),
       lambda c, r: detect_watermark(r.images[0], "sdkit").found),
]

SAMPLER_API = [  # samplers.sample on any ε-function (defect 7)
    Bad("reversed schedule", lambda c: run_sample(AC.flip(0)), ValueError, ("decrease", "flip(0)")),
    Bad("schedule above 1", lambda c: run_sample(AC + 1), ValueError, ("strictly between 0 and 1",)),
    Bad("negative schedule", lambda c: run_sample(-AC), ValueError, ("strictly between 0 and 1",)),
    Bad("constant schedule", lambda c: run_sample(torch.full_like(AC, 0.5)), ValueError, ("decrease strictly",)),
    Bad("integer schedule", lambda c: run_sample((AC * 10).long()), ValueError, ("floating-point",)),
    Bad("zero in the schedule", lambda c: run_sample(with_index(AC, 999, 0.0)), ValueError,
        ("ᾱ[999] = 0", "zero-terminal-SNR")),
    Bad("NaN off the grid", lambda c: run_sample(with_index(AC, 500, float("nan"))), ValueError,
        ("NaN", "timestep 500")),
    Bad("schedule 2-D", lambda c: run_sample(AC[None]), ValueError, ("1-D",)),
    Bad("schedule of one value", lambda c: run_sample(AC[:1]), ValueError, ("1-D",)),
    Bad("schedule a list", lambda c: run_sample(AC.tolist()), ValueError, ("1-D tensor",)),
    Bad("x_T NaN", lambda c: run_sample(x=torch.full((1, 4, 8, 8), float("nan"))), ValueError, ("x_T", "NaN")),
    Bad("x_T integer", lambda c: run_sample(x=torch.zeros(1, 4, 8, 8, dtype=torch.long)), TypeError, ("x_T",)),
    Bad("steps past the schedule", lambda c: run_sample(steps=5000), ValueError, ("training timesteps",)),
    Bad("ddim eta 5", lambda c: run_sample(eta=5.0), ValueError, ("eta", "≤ 1")),
    Bad("mask above 1", lambda c: run_sample(mask=torch.full((1, 1, 8, 8), 2.0), known=torch.zeros(1, 4, 8, 8)),
        ValueError, ("mask values", "[0, 1]")),
    Bad("mask NaN", lambda c: run_sample(mask=torch.full((1, 1, 8, 8), float("nan")), known=torch.zeros(1, 4, 8, 8)),
        ValueError, ("mask", "NaN")),
    Bad("known NaN", lambda c: run_sample(mask=torch.ones(1, 1, 8, 8), known=torch.full((1, 4, 8, 8), float("nan"))),
        ValueError, ("known", "NaN")),
    Bad("mask without known", lambda c: run_sample(mask=torch.ones(1, 1, 8, 8)), ValueError, ("both mask and known",)),
    Bad("mask of another size", lambda c: run_sample(mask=torch.ones(1, 1, 4, 4), known=torch.zeros(1, 4, 8, 8)),
        ValueError, ("mask", "does not broadcast")),
    Bad("eps_fn of the wrong shape", lambda c: run_sample(eps=lambda x, t: x[:, :2]), ValueError, ("same shape",)),
    Bad("eps_fn returning NaN, float32", lambda c: run_sample(eps=lambda x, t: x * float("nan")), FloatingPointError,
        ("step 1 of", "eps_fn returned NaN/inf"), early=False),
]


def nan_weights_model(c: Ctx):
    """tiny-test with one NaN in the UNet's last layer, loaded around the check (as an in-memory edit would)."""
    broken = sdkit.load_model("tiny-test")
    with torch.no_grad():
        broken.model.diffusion_model.out[2].weight[0, 0, 0, 0] = float("nan")
    return broken


def nan_unet_output(c: Ctx, half: bool):
    m = sdkit.load_model("tiny-test")
    if half:
        m.model.half()
    c.monkeypatch.setattr(m, "apply_model", lambda x, t, cond: torch.full_like(x, float("nan")))
    return txt2img(m, "a", **FAST)


NAN_DIAGNOSIS = [
    Bad("UNet weights with NaN (edited in memory)", lambda c: txt2img(nan_weights_model(c), "a", **FAST),
        FloatingPointError, ("weights contain NaN", "out.2.weight"), early=False),
    Bad("float32 model returning NaN: no float16 hint", lambda c: nan_unet_output(c, half=False), FloatingPointError,
        ("float32", "overflow inside the model"), early=False),
    Bad("float16 model returning NaN: the float16 hint", lambda c: nan_unet_output(c, half=True), FloatingPointError,
        ("float16", "run it in float32"), early=False),
]

LOADING = [  # defect 14, and the checks of load_model before the (slow) build
    Bad("config None", lambda c: load_model(None), TypeError, ("config must be", "got NoneType")),
    Bad("config 42", lambda c: load_model(42), TypeError, ("config must be",)),
    Bad("config name misspelt", lambda c: load_model("tiny-tset"), FileNotFoundError, ("did you mean", "tiny-test")),
    Bad("config: YAML syntax error", lambda c: load_model(str(c.files / "bad.yaml")), ConfigError,
        ("not valid YAML", "line")),
    Bad("config: a YAML list", lambda c: load_model(str(c.files / "list.yaml")), ConfigError, ("holds a list",)),
    Bad("config: plain text", lambda c: load_model(str(c.files / "text.yaml")), ConfigError,
        ("no 'model:' section", "target")),
    Bad("config: a checkpoint", lambda c: load_model(str(c.files / "good.safetensors")), ConfigError,
        ("binary file", "ckpt=")),
    Bad("config: a folder", lambda c: load_model(str(c.files / "folder")), IsADirectoryError, ("folder",)),
    Bad("config: target misspelt", lambda c: load_model({"model": {"target": "sdkit.diffusion.LatentDifusion"}}),
        ImportError, ("LatentDifusion",)),
    Bad("config: unknown param", lambda c: load_model(
        {"model": {"target": "sdkit.nn.autoencoder.Upsample", "params": {"in_channel": 3, "with_conv": True}}}),
        ConfigError, ("unknown parameter", "'in_channel' (did you mean 'in_channels'?)")),
    Bad("config: params a list", lambda c: load_model({"model": {"target": "sdkit.nn.autoencoder.Upsample",
                                                               "params": [1, 2]}}), ConfigError, ("mapping",)),
    Bad("config: override not key=value", lambda c: load_config("tiny-test", ["=5"]), ConfigError, ("key=value",)),
    Bad("dtype 'float17'", lambda c: load_model("tiny-test", dtype="float17"), ValueError, ("dtype", "'float16'")),
    Bad("dtype torch.int8", lambda c: load_model("tiny-test", dtype=torch.int8), ValueError, ("floating-point",)),
    Ok("dtype 'bfloat16' as a string", lambda c: load_model("tiny-test", dtype="bfloat16"),
       lambda c, m: next(m.model.parameters()).dtype == torch.bfloat16),
    Bad("device 'gpu'", lambda c: load_model("tiny-test", device="gpu"), ValueError, ("not a torch device", "'cpu'")),
    Bad("device 'cuda:99'", lambda c: load_model("tiny-test", device="cuda:99"), ValueError, ("cuda:99",)),
    Bad("ckpt missing", lambda c: load_model("tiny-test", str(c.files / "typo.ckpt")), FileNotFoundError,
        ("typo.ckpt", "does not exist")),
    Bad("ckpt a Hub id", lambda c: load_model("tiny-test", "runwayml/stable-diffusion-v1-5"), FileNotFoundError,
        ("never downloads",)),
    Bad("ckpt a number", lambda c: load_model("tiny-test", 5), TypeError, ("ckpt must be",)),
    Bad("ckpt empty", lambda c: load_model("tiny-test", str(c.files / "empty.ckpt")), CheckpointError,
        ("empty (0 bytes)", "Download it again")),
    Bad("ckpt random bytes", lambda c: load_model("tiny-test", str(c.files / "junk.ckpt")), CheckpointError,
        ("neither a safetensors file nor a PyTorch checkpoint",)),
    Bad("ckpt truncated safetensors", lambda c: load_model("tiny-test", str(c.files / "truncated.safetensors")),
        CheckpointError, ("truncated or corrupt",)),
    Bad("ckpt with NaN weights", lambda c: load_model("tiny-test", str(c.files / "nan.safetensors")), CheckpointError,
        ("NaN/inf", "model.diffusion_model.out.2.weight", "diverged")),
    Bad("ckpt for another config", lambda c: load_model("tiny-upscaler-test", str(c.files / "good.safetensors")),
        CheckpointError, ("config",)),
    Bad("malicious pickle: refused, and it did not run", lambda c: load_model("tiny-test", str(c.files / "evil.ckpt")),
        CheckpointError, ("weights_only=True", "unsafe_pickle=True")),
    Bad("malicious protocol-0 pickle", lambda c: load_model("tiny-test", str(c.files / "evil0.ckpt")),
        CheckpointError, ("neither a safetensors file nor a PyTorch checkpoint",)),
    Bad("malicious pickle in a zip .ckpt", lambda c: load_model("tiny-test", str(c.files / "evil_zip.ckpt")),
        CheckpointError, ("posix.system", "weights_only=True")),
    Bad("diffusers config.json without a key", lambda c: read_checkpoint(c.files / "diffusers_nokey"), CheckpointError,
        ("lacks the key 'block_out_channels'", "config.json")),
    Bad("diffusers config.json not JSON", lambda c: read_checkpoint(c.files / "diffusers_badjson"), CheckpointError,
        ("not valid JSON",)),
    Ok("a pickle named .safetensors: read as the pickle it is",
       lambda c: warnings_caught(lambda: load_model("tiny-test", str(c.files / "pickle.safetensors"))),
       lambda c, r: "is a PyTorch pickle" in r[1] and torch.equal(
           r[0].model.diffusion_model.out[2].weight, c.model.model.diffusion_model.out[2].weight)),
]


def warnings_caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, " ".join(str(w.message) for w in caught)


def full_disk(c: Ctx):
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    c.monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 6, 10 ** 6, 1000))
    save_compvis(c.model, c.tmp / "model.ckpt")


def failing_torch_save(c: Ctx):
    save_compvis(c.model, c.tmp / "model.ckpt")
    before = (c.tmp / "model.ckpt").read_bytes()

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    c.monkeypatch.setattr(torch, "save", full)
    try:
        save_compvis(c.model, c.tmp / "model.ckpt")
    finally:
        assert (c.tmp / "model.ckpt").read_bytes() == before          # nothing was replaced
        assert not [p for p in c.tmp.iterdir() if p.name.endswith(".tmp")]


def read_only_target(c: Ctx):
    save_compvis(c.model, c.tmp / "model.safetensors")
    os.chmod(c.tmp / "model.safetensors", 0o444)
    try:
        save_compvis(c.model, c.tmp / "model.safetensors")
    finally:
        assert (c.tmp / "model.safetensors").stat().st_mode & 0o777 == 0o444   # left read-only
        os.chmod(c.tmp / "model.safetensors", 0o644)


SAVING = [  # defects 14, 17
    Bad("save_compvis to a read-only file", read_only_target, PermissionError, ("read-only", "chmod")),
    Bad("save_compvis with a full disk", full_disk, OSError, ("not enough space", "MB")),
    Bad("save_compvis when torch.save fails mid-write", failing_torch_save, OSError, ("nothing was replaced",)),
    Bad("save_compvis to a .txt", lambda c: save_compvis(c.model, c.tmp / "model.txt"), ValueError, (".safetensors",)),
    Bad("save_compvis dtype 'half-ish'", lambda c: save_compvis(c.model, c.tmp / "m.ckpt", dtype="half-ish"),
        ValueError, ("dtype",)),
    Bad("PipelineResult.save over an existing file", lambda c: [t2i(c, seed=1).save(c.tmp) for _ in range(2)],
        FileExistsError, ("would overwrite",), early=False),
]


# --------------------------------------------------------------------------------------------- the CLI

@dataclasses.dataclass
class Cli:
    """``sdkit ARGV`` must exit with 2 and print ``sdkit <command>: error:`` with ``words`` on stderr, no
    traceback. ``model``: "never" = refused before the model is built; "shared" = the model is the tiny-test
    fixture (the check comes after loading); "real" = load it for real."""
    name: str
    argv: Callable[[Ctx], list]
    words: tuple = ()
    model: str = "never"


def cli_image(c: Ctx) -> str:
    return str(c.files / "image.png")


CLI = [
    Cli("generate --out is a file", lambda c: ["generate", "a", "--out", str(c.files / "image.png")],
        ("--out", "is a file")),
    Cli("generate --device nope", lambda c: ["generate", "a", "--device", "nope"], ("not a torch device",)),
    Cli("generate --ckpt typo.ckpt: refused before the model is built",
        lambda c: ["generate", "a", "--config", "tiny-test", "--ckpt", "typo.ckpt", "--out", str(c.tmp)],
        ("--ckpt 'typo.ckpt'", "no such file")),
    Cli("generate --config missing", lambda c: ["generate", "a", "--config", "nope.yaml", "--out", str(c.tmp)],
        ("no config 'nope.yaml'",), model="real"),
    Cli("generate --config a bad YAML", lambda c: ["generate", "a", "--config", str(c.files / "bad.yaml"),
                                                   "--out", str(c.tmp)], ("not valid YAML",), model="real"),
    Cli("generate --seed -1", lambda c: ["generate", "a", "--seed", "-1", "--out", str(c.tmp)], ("seed", "2**64 − 1"),
        model="shared"),
    Cli("generate --seed 2**64", lambda c: ["generate", "a", "--seed", str(2 ** 64), "--out", str(c.tmp)],
        ("2**64 − 1",), model="shared"),
    Cli("generate --steps 0", lambda c: ["generate", "a", "--steps", "0", "--out", str(c.tmp)], ("steps",),
        model="shared"),
    Cli("generate --n 0", lambda c: ["generate", "a", "--n", "0", "--out", str(c.tmp)], ("num_images",),
        model="shared"),
    Cli("generate --n 10**9", lambda c: ["generate", "a", "--n", str(10 ** 9), "--out", str(c.tmp)],
        ("1000000000 image(s)", "per call"), model="shared"),
    Cli("generate --height 65536", lambda c: ["generate", "a", "--height", "65536", "--width", "65536",
                                              "--out", str(c.tmp)], ("available", "smaller image"), model="shared"),
    Cli("generate --height 33", lambda c: ["generate", "a", "--height", "33", "--out", str(c.tmp)], ("height=33",),
        model="shared"),
    Cli("generate --sampler nope", lambda c: ["generate", "a", "--sampler", "nope", "--out", str(c.tmp)],
        ("unknown sampler",), model="shared"),
    Cli("generate --eta -1", lambda c: ["generate", "a", "--sampler", "ddim", "--eta", "-1", "--out", str(c.tmp)],
        ("eta",), model="shared"),
    Cli("generate --guidance nan", lambda c: ["generate", "a", "--guidance", "nan", "--out", str(c.tmp)],
        ("guidance_scale",), model="shared"),
    Cli("generate --spacing nope", lambda c: ["generate", "a", "--spacing", "nope", "--out", str(c.tmp)],
        ("unknown spacing",), model="shared"),
    Cli("generate --batch-size 0", lambda c: ["generate", "a", "--batch-size", "0", "--out", str(c.tmp)],
        ("batch_size",), model="shared"),
    Cli("generate --watermark not UTF-8 (an undecodable argv byte)",
        lambda c: ["generate", "a", "--watermark", "\udcff", "--out", str(c.tmp)], ("watermark payload",
                                                                                      "not valid text")),
    Cli("img2img of a text file", lambda c: ["img2img", str(c.files / "notimage.png"), "a", "--out", str(c.tmp)],
        ("not an image file",), model="shared"),
    Cli("img2img of a missing file", lambda c: ["img2img", "nope.png", "a", "--out", str(c.tmp)],
        ("image 'nope.png'", "no such file")),
    Cli("img2img of a folder", lambda c: ["img2img", str(c.files / "folder"), "a", "--out", str(c.tmp)],
        ("is a folder",)),
    Cli("img2img --strength 2", lambda c: ["img2img", cli_image(c), "a", "--strength", "2", "--out", str(c.tmp)],
        ("strength",), model="shared"),
    Cli("inpaint with a text file as mask", lambda c: ["inpaint", cli_image(c), str(c.files / "notimage.png"), "a",
                                                     "--out", str(c.tmp)], ("mask", "not an image file"),
        model="shared"),
    Cli("inpaint with a mask of another size", lambda c: ["inpaint", cli_image(c), str(c.files / "mask_small.png"),
                                                        "a", "--out", str(c.tmp)], ("same size",), model="shared"),
    Cli("inpaint with an RGB mask", lambda c: ["inpaint", cli_image(c), cli_image(c), "a", "--out", str(c.tmp)],
        ("single-channel",), model="shared"),
    Cli("inpaint --mask-blur -1", lambda c: ["inpaint", cli_image(c), str(c.files / "mask.png"), "a",
                                           "--mask-blur", "-1", "--out", str(c.tmp)], ("mask_blur",), model="shared"),
    Cli("upscale --prompt on a text-less upscaler", lambda c: ["upscale", cli_image(c), "--prompt", "a cat",
                                                             "--out", str(c.tmp)], ("leave out --prompt",),
        model="shared-upscaler"),
    Cli("upscale --tile -1", lambda c: ["upscale", cli_image(c), "--tile", "-1", "--out", str(c.tmp)],
        ("decode_tile",), model="shared-upscaler"),
    Cli("upscale of a text file", lambda c: ["upscale", str(c.files / "notimage.png"), "--out", str(c.tmp)],
        ("not an image file",), model="shared-upscaler"),
    # sdkit convert (defect 5: all its error cases were tracebacks)
    Cli("convert a missing checkpoint", lambda c: ["convert", "missing.ckpt", str(c.tmp / "o.safetensors"),
                                                   "--to", "compvis"], ("no checkpoint 'missing.ckpt'",)),
    Cli("convert to a .txt", lambda c: ["convert", str(c.files / "good.safetensors"), str(c.tmp / "o.txt"),
                                        "--to", "compvis"], ("has none of these suffixes",)),
    Cli("convert --half to diffusers", lambda c: ["convert", str(c.files / "good.safetensors"), str(c.tmp / "d"),
                                                  "--to", "diffusers", "--half"], ("--half",)),
    Cli("convert into a missing folder", lambda c: ["convert", str(c.files / "good.safetensors"),
                                                    str(c.tmp / "no" / "o.ckpt"), "--to", "compvis"],
        ("does not exist", "create it first")),
    Cli("convert to diffusers over a file", lambda c: ["convert", str(c.files / "good.safetensors"),
                                                       str(c.files / "image.png"), "--to", "diffusers"],
        ("is a file",)),
    Cli("convert to compvis onto a folder", lambda c: ["convert", str(c.files / "good.safetensors"),
                                                       str(c.files / "folder"), "--to", "compvis"], ("is a folder",)),
    Cli("convert with a missing config", lambda c: ["convert", str(c.files / "good.safetensors"),
                                                    str(c.tmp / "o.ckpt"), "--to", "compvis", "--config", "nope"],
        ("no config 'nope'",), model="real"),
    Cli("convert random bytes", lambda c: ["convert", str(c.files / "junk.ckpt"), str(c.tmp / "o.ckpt"),
                                           "--to", "compvis", "--config", "tiny-test"], ("neither a safetensors",),
        model="real"),
    Cli("convert with the wrong config", lambda c: ["convert", str(c.files / "good.safetensors"), str(c.tmp / "o.ckpt"),
                                                    "--to", "compvis", "--config", "tiny-upscaler-test"],
        ("config",), model="real"),
    Cli("convert a malicious pickle", lambda c: ["convert", str(c.files / "evil.ckpt"), str(c.tmp / "o.ckpt"),
                                                 "--to", "compvis", "--config", "tiny-test"],
        ("weights_only=True",), model="real"),
    Cli("convert with NaN weights", lambda c: ["convert", str(c.files / "nan.safetensors"), str(c.tmp / "o.ckpt"),
                                               "--to", "compvis", "--config", "tiny-test"], ("NaN",), model="real"),
    # sdkit train (defects 5, 11): refused before anything is built, and no run folder is left behind
    Cli("train -b a missing file", lambda c: ["train", "-b", "missing.yaml", "-l", str(c.tmp / "logs")],
        ("no config 'missing.yaml'",)),
    Cli("train -b a YAML syntax error", lambda c: ["train", "-b", str(c.files / "bad.yaml"), "-l", str(c.tmp / "logs")],
        ("not valid YAML",)),
    Cli("train -b an image", lambda c: ["train", "-b", str(c.files / "image.png"), "-l", str(c.tmp / "logs")],
        ("binary file",)),
    Cli("train -b a config without data", lambda c: ["train", "-b", str(c.files / "nodata.yaml"),
                                                     "-l", str(c.tmp / "logs")], ("no 'data' section",)),
    Cli("train: a mistyped Trainer key", lambda c: ["train", "-b", "train-tiny-clip", "lightning.trainer.max_stepz=5",
                                                    "-l", str(c.tmp / "logs")], ("max_stepz", "did you mean 'max_steps'")),
    Cli("train: override '=5'", lambda c: ["train", "-b", "train-tiny-clip", "=5", "-l", str(c.tmp / "logs")],
        ("'=5'", "key=value")),
    Cli("train: override without '='", lambda c: ["train", "-b", "train-tiny-clip", "-l", str(c.tmp / "logs"),
                                                  "max_steps"], ("'max_steps'", "key=value")),
    Cli("train: override that does not parse", lambda c: ["train", "-b", "train-tiny-clip", "-l", str(c.tmp / "logs"),
                                                          "data.params.batch_size=[1,"], ("not valid YAML",)),
    Cli("train: an unknown callback name", lambda c: ["train", "-b", "train-tiny-clip", "-l", str(c.tmp / "logs"),
                                                      "lightning.callbacks.image_loger.params.batch_frequency=5"],
        ("image_loger", "did you mean 'image_logger'")),
    Cli("train: batch_size=0", lambda c: ["train", "-b", "train-tiny-clip", "-l", str(c.tmp / "logs"),
                                          "data.params.batch_size=0"], ("batch_size", "positive integer")),
    Cli("train: learning rate 'abc'", lambda c: ["train", "-b", "train-tiny-clip", "-l", str(c.tmp / "logs"),
                                                 "model.base_learning_rate=abc"], ("base_learning_rate",)),
    Cli("train: a mistyped model param", lambda c: ["train", "-b", "train-tiny-clip", "-l", str(c.tmp / "logs"),
                                                    "model.params.embed_dimm=8"],
        ("'embed_dimm' (did you mean 'embed_dim'?)",)),
    Cli("train: a mistyped target", lambda c: ["train", "-b", "train-tiny-clip", "-l", str(c.tmp / "logs"),
                                               "model.target=sdkit.training.clip.SmallClip"], ("SmallClip",)),
    Cli("train: an override into a list", lambda c: ["train", "-b", "train-tiny-clip", "-l", str(c.tmp / "logs"),
                                                     "data.params.train.params.length=5"], ("do not merge",)),
    Cli("train: a dataset failing when built", lambda c: ["train", "-b", "train-tiny-clip", "-b",
                                                          str(c.files / "baddata.yaml"), "-l", str(c.tmp / "logs")],
        ("unknown split 'trian'",)),
    Cli("train --resume a missing folder", lambda c: ["train", "--resume", "missing", "-l", str(c.tmp / "logs")],
        ("no such run folder",)),
    Cli("train --resume a folder that is not a run", lambda c: ["train", "--resume", str(c.files / "folder"),
                                                                "-l", str(c.tmp / "logs")], ("no checkpoints/last.ckpt",)),
    Cli("train --resume a file that is not a checkpoint", lambda c: ["train", "--resume", str(c.files / "image.png"),
                                                                     "-l", str(c.tmp / "logs")],
        ("not a complete checkpoint",)),
]


def run_cli(c: Ctx, case: Cli) -> None:
    import logging
    c.monkeypatch.setattr(logging, "raiseExceptions", False)  # Lightning's log handler may hold a closed capture
    built = []
    if case.model == "never":
        c.monkeypatch.setattr("sdkit.checkpoints.load_model", lambda *a, **k: built.append(1) or c.model)
    elif case.model.startswith("shared"):
        shared = c.upscaler if case.model == "shared-upscaler" else c.model
        c.monkeypatch.setattr("sdkit.checkpoints.load_model", lambda *a, **k: shared)
    argv = case.argv(c)
    if argv[0] in ("generate", "img2img", "inpaint", "upscale"):
        argv = [*argv, "--no-progress", "--steps", "1"] if "--steps" not in argv else [*argv, "--no-progress"]
    c.capsys.readouterr()
    code = main(argv)
    err = c.capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert f"sdkit {argv[0]}: error:" in err and "Traceback" not in err, err
    for word in case.words:
        assert word in err, f"{word!r} not in: {err}"
    assert not built, "the model was built before the input was refused"
    if argv[0] == "train":  # a failed launch leaves no run folder behind
        logs = c.tmp / "logs"
        assert not logs.exists() or not any(logs.iterdir()), list(logs.iterdir())


def cli_disk_full(c: Ctx):
    """A disk that fills after the first image: the CLI says what was saved, exits 2, no traceback."""
    from sdkit.pipelines import commands
    c.monkeypatch.setattr("sdkit.checkpoints.load_model", lambda *a, **k: c.model)
    original, calls = commands.write_png, []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)
    c.monkeypatch.setattr(commands, "write_png", write)
    code = main(["generate", "a", "--n", "3", "--seed", "5", "--steps", "1", "--no-progress", "--out", str(c.tmp)])
    err = c.capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


SPECIAL = [
    Ok("CLI: the disk fills after the first image", cli_disk_full,
       lambda c, err: "1 of 3 image(s) were saved" in err and "--seed 5" in err and "No space left" in err),
]

BATTERY = IMAGES + MASKS + OUTPAINT + SIZES + SEEDS + PROMPTS + OPTIONS + WATERMARKS + SAMPLER_API + NAN_DIAGNOSIS \
    + LOADING + SAVING + SPECIAL


@pytest.mark.parametrize("case", BATTERY, ids=[c.name for c in BATTERY])
def test_battery(case, ctx):
    if isinstance(case, Ok):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = case.run(ctx)
        assert case.check(ctx, result) is not False
        return
    with pytest.raises(case.error) as info:
        case.run(ctx)
    message = str(info.value)
    for word in case.words:
        assert word in message, f"{word!r} not in: {message}"
    if case.early:
        assert ctx.ran == {"unet": 0, "vae": 0}, f"refused too late: {ctx.ran}"


@pytest.mark.parametrize("case", CLI, ids=[c.name for c in CLI])
def test_cli_battery(case, ctx):
    run_cli(ctx, case)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_build_is_refused_before_loading(ctx):
    with pytest.raises(ValueError, match="no CUDA|no CUDA GPU is visible"):
        load_model("tiny-test", device="cuda")
    run_cli(ctx, Cli("--device cuda", lambda c: ["generate", "a", "--device", "cuda"], ("device 'cuda'", "cpu")))


def test_the_malicious_pickle_did_not_run(ctx):
    for name in ("evil.ckpt", "evil0.ckpt", "evil_zip.ckpt"):
        with pytest.raises(CheckpointError):
            load_model("tiny-test", str(ctx.files / name))
    assert main(["convert", str(ctx.files / "evil_zip.ckpt"), str(ctx.tmp / "o.ckpt"), "--to", "compvis",
                 "--config", "tiny-test"]) == 2
    assert not (ctx.files / "pwned").exists()


def test_tensor_in_0_1_is_warned_about(ctx):
    with pytest.warns(UserWarning, match=r"≥ 0.*x \* 2 - 1"):
        i2i(ctx, torch.rand(3, 32, 32), strength=0.0)


def test_bugs_keep_their_traceback(ctx, monkeypatch):
    """A user error prints one line; anything else (a bug) still raises, so it can be seen and fixed."""
    monkeypatch.setattr("sdkit.checkpoints.load_model", lambda *a, **k: ctx.model)

    def bug(*args, **kwargs):
        raise KeyError("an internal bug")
    monkeypatch.setattr("sdkit.pipelines.txt2img", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["generate", "a", "--out", str(ctx.tmp), "--no-progress"])


def test_same_seed_same_image_and_what_holds_across_batches(model):
    """Defect 16, as documented in sdkit/pipelines/plan.py: the same seed at the same batch size is bit-identical
    with any companions and at any position; alone or in another batch size it agrees to float rounding."""
    opts = dict(steps=3, progress=False, guidance_scale=5.0)
    a = txt2img(model, ["a red circle", "a blue square", "two stars"], seed=[1, 2, 3], **opts)
    b = txt2img(model, ["a cat", "two stars", "a dog"], seed=[9, 3, 7], **opts)
    assert torch.equal(a.latents[2], b.latents[1])
    assert torch.equal(txt2img(model, ["a red circle", "a blue square", "two stars"], seed=[1, 2, 3], **opts).latents,
                       a.latents)
    alone = txt2img(model, "two stars", seed=3, **opts)
    assert torch.allclose(alone.latents[0], a.latents[2], atol=1e-4)
    assert np.abs(np.asarray(alone.images[0], int) - np.asarray(a.images[2], int)).max() <= 1


def test_memory_estimate_is_the_right_size():
    """The estimate against what SD v1's parts measured (float32, CPU, peak above the loaded model: VAE decoder
    3.7 KB per pixel, encoder 3.0 KB, UNet 20 KB per latent pixel per item): from 1× to 2× the measurement."""
    from sdkit.pipelines.memory import estimate
    cfg = load_config("sd-v1-inference")
    with torch.device("meta"):
        sd = sdkit.instantiate_from_config(cfg.model)
    parts = estimate(sd, 1, 1, 512, 512, guided=False)
    assert 1.0 <= parts["decode"] / (3776 * 512 * 512) <= 2.0
    assert 1.0 <= parts["unet"] / (20 * 1024 * 64 * 64) <= 2.0
    assert 1.0 <= estimate(sd, 1, 1, 512, 512, guided=False, encode=True)["encode"] / (3072 * 512 * 512) <= 2.0
    assert estimate(sd, 1, 1, 512, 512, guided=True)["unet"] == 2 * parts["unet"]
    tiled = estimate(sd, 1, 1, 4096, 4096, guided=False, decode_tile=64)
    assert tiled["decode"] < estimate(sd, 1, 1, 4096, 4096, guided=False)["decode"] / 10


def test_the_battery_size():
    """How many bad (or formerly mishandled) inputs this module keeps: the battery, the CLI battery and the three
    inputs of the single tests above (CUDA on a CPU build, from Python and from the CLI; a [0, 1] tensor)."""
    count = len(BATTERY) + len(CLI) + 3
    print(f"bad-input battery: {count} inputs ({len(BATTERY)} API, {len(CLI)} CLI, 3 single tests)")
    assert count >= 294, "the battery lost inputs (the module docstring counts 294)"
