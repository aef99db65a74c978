"""Pipelines (txt2img, img2img, inpaint/outpaint, upscale), the CLI, and the sampler options they rest on
(``start_step``, the ``mask``/``x0`` blend for every sampler, per-image generators).

Models are the tiny random-weight configs (tiny-test: latents 4 × H/2 × W/2; tiny-upscaler-test: factor 4), so
every test checks wiring and numbers against something computed independently (spies on the UNet input,
closed-form noise levels, the same computation done by hand), never image quality.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdkit
from sdkit.cli import main
from sdkit.config import load_config
from sdkit.nn.tokenizer import PromptTruncatedWarning
from sdkit.safety import ConceptChecker
from sdkit.watermark import WatermarkSkipped
from sdkit.pipelines import (decode_tiled, img2img, inpaint, is_inpainting_model, latent_preview, outpaint, txt2img,
                             upscale)
from sdkit.samplers import SAMPLERS, noise_levels, sample
from sdkit.samplers.grids import ddim_timesteps
from sdkit.schedules import sd_v1_alphas_cumprod

FAST = dict(steps=4, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sdkit.load_model("tiny-test")


@pytest.fixture(scope="module")
def inpaint_model():
    """tiny-test turned into the runway inpainting layout: LatentInpaintDiffusion, hybrid, UNet in_channels 9."""
    cfg = load_config("tiny-test")
    cfg.model.target = "sdkit.diffusion.LatentInpaintDiffusion"
    cfg.model.params.conditioning_key = "hybrid"
    cfg.model.params.unet_config.params.in_channels = 9
    torch.manual_seed(1)
    return sdkit.load_model(cfg)


@pytest.fixture(scope="module")
def upscaler():
    torch.manual_seed(2)
    return sdkit.load_model("tiny-upscaler-test")


def random_image(h=32, w=32, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def pixels(image):
    return np.asarray(image, dtype=np.int16)


class UNetSpy:
    """Records what the UNet receives (input x with any concatenated channels, t, context), then runs it."""

    def __init__(self, monkeypatch, model):
        self.calls, unet = [], model.model.diffusion_model
        original = unet.forward

        def forward(x, timesteps=None, context=None, **kw):
            self.calls.append((x.detach().clone(), timesteps.detach().clone(),
                               None if context is None else context.detach().clone()))
            return original(x, timesteps, context=context, **kw)
        monkeypatch.setattr(unet, "forward", forward)


def alpha_at(t: float, ac: torch.Tensor) -> float:
    """ᾱ at a (possibly fractional) model time, log-linear in between, as the samplers' grids define it."""
    lo = min(int(math.floor(t)), len(ac) - 2)
    frac = t - lo
    return math.exp((1 - frac) * math.log(float(ac[lo])) + frac * math.log(float(ac[lo + 1])))


# ------------------------------------------------------------------------------------ sampler options
AC = sd_v1_alphas_cumprod()


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("start_step", [0, 3])
def test_start_step_starts_at_the_level_noise_levels_reports(name, start_step):
    """The first model call of a sampler started at step k sees exactly the x it was given, at a t whose ᾱ is
    noise_levels(…)[k]: the latent was noised to the level the first denoising step works at (no off-by-one)."""
    calls = []

    def eps_fn(x, t):
        calls.append((x.clone(), float(t[0])))
        return torch.zeros_like(x)

    levels = noise_levels(name, AC, 10)
    a = float(levels[start_step])
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 1, 4, 4, 4, generator=gen)
    x_start = math.sqrt(a) * z0 + math.sqrt(1 - a) * eps
    sample(eps_fn, x_start, AC, sampler=name, steps=10, start_step=start_step, progress=False)
    x, t = calls[0]
    # σ-samplers scale x by √(1+σ²) and back: two roundings of at most u·|x| each (u = 2⁻²⁴), so 4u·max|x|
    assert torch.allclose(x, x_start, rtol=0, atol=4 * 2.0 ** -24 * float(x_start.abs().max()))
    assert alpha_at(t, AC) == pytest.approx(a, rel=1e-6)
    assert len(levels) == 10 and bool((levels[1:] > levels[:-1]).all())


def test_start_step_errors():
    with pytest.raises(ValueError, match="start_step must be an integer from 0 to 9"):
        sample(lambda x, t: x, torch.zeros(1, 1), AC, sampler="euler", steps=10, start_step=10)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_a", "lms", "dpmpp_2m", "unipc", "dpm_solver++"])
def test_mask_blend_sets_the_known_region_to_x0_noised_to_each_level(name):
    """With mask = 1 (repaint) on the right half, every model call (one per step for these samplers) sees on the
    kept left half the known latent noised to exactly that call's level: (x − √ᾱ known)/√(1−ᾱ) is fresh unit
    noise, and known is far from it (known = 3)."""
    calls = []

    def eps_fn(x, t):
        calls.append((x.clone(), float(t[0])))
        return 0.1 * x

    shape = (1, 4, 64, 64)
    mask = torch.zeros(shape)
    mask[..., 32:] = 1
    known = torch.full(shape, 3.0)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sample(eps_fn, x_T, AC, sampler=name, steps=5, mask=mask, known=known, generator=torch.Generator().manual_seed(2),
           progress=False)
    assert len(calls) == 5
    for x, t in calls:
        a = alpha_at(t, AC)
        z = (x[..., :32] - math.sqrt(a) * 3.0) / math.sqrt(1 - a)
        assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05, (t, float(z.mean()), float(z.std()))


# ------------------------------------------------------------------------------------ txt2img
def test_same_seed_same_image_and_callback(model):
    steps = []
    a = txt2img(model, "a red circle", seed=7, callback=lambda i, n, x, x0: steps.append((i, n, tuple(x0.shape))),
                **FAST)
    b = txt2img(model, "a red circle", seed=7, **FAST)
    c = txt2img(model, "a red circle", seed=8, **FAST)
    assert torch.equal(a.latents, b.latents) and np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert not torch.equal(a.latents, c.latents)
    assert a.images[0].size == (32, 32) and a.seeds == [7] and a.nsfw == [False]
    assert steps == [(i, 4, (1, 4, 16, 16)) for i in range(4)]
    preview = latent_preview(model, a.latents)[0]
    assert preview.size == (16, 16)
    assert latent_preview(model, a.latents, method="vae")[0].size == (32, 32)


def test_per_image_seeds_are_batch_invariant(model):
    """Image i draws its starting noise and the ancestral sampler's noise from its own generator, so it is the same
    alone, in a batch of 3, or in batches of 2 (latents to float tolerance of batched matmuls)."""
    opts = dict(sampler="euler_a", guidance_scale=3.0, **FAST)
    batch = txt2img(model, "a blue square", num_images=3, seed=[10, 11, 12], **opts)
    alone = txt2img(model, "a blue square", seed=11, **opts)
    pairs = txt2img(model, "a blue square", num_images=3, seed=10, batch_size=2, **opts)
    assert batch.seeds == pairs.seeds == [10, 11, 12]
    assert torch.allclose(batch.latents[1:2], alone.latents, atol=1e-5)
    assert torch.allclose(batch.latents, pairs.latents, atol=1e-5)
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 1


def test_guidance_one_skips_the_unconditional_pass(model, monkeypatch):
    spy = UNetSpy(monkeypatch, model)
    txt2img(model, "a red circle", num_images=2, guidance_scale=1.0, seed=0, sampler="ddim", **FAST)
    assert [c[0].shape[0] for c in spy.calls] == [2] * 4
    spy.calls.clear()
    txt2img(model, "a red circle", num_images=2, guidance_scale=7.5, seed=0, sampler="ddim", **FAST)
    assert [c[0].shape[0] for c in spy.calls] == [4] * 4


def test_negative_prompt_reaches_the_unconditional_branch(model, monkeypatch):
    spy = UNetSpy(monkeypatch, model)
    txt2img(model, "a red circle", negative_prompt="a blurry photo", guidance_scale=5.0, seed=0, **FAST)
    with torch.no_grad():
        neg, pos, empty = (model.get_learned_conditioning([p]) for p in ("a blurry photo", "a red circle", ""))
    context = spy.calls[0][2]
    assert torch.equal(context[:1], neg) and torch.equal(context[1:], pos) and not torch.equal(neg, empty)


def test_fixed_start_noise_and_sizes_that_need_padding(model):
    """x_T fixes the start; height 34 is not a multiple of 4 (tiny-test: factor 2 × UNet 2), so the latent is
    sampled at 18x20 and its 17x20 part decoded."""
    x_T = torch.randn(1, 4, 18, 20, generator=torch.Generator().manual_seed(3))
    a = txt2img(model, "x", height=34, width=40, x_T=x_T, sampler="ddim", seed=1, **FAST)
    b = txt2img(model, "x", height=34, width=40, x_T=x_T, sampler="ddim", seed=2, **FAST)
    assert a.images[0].size == (40, 34) and a.latents.shape == (1, 4, 17, 20)
    assert torch.equal(a.latents, b.latents)  # deterministic sampler: only x_T matters


class FlagEverything(ConceptChecker):
    """A stand-in safety checker (the real one needs CLIP ViT-L weights): every image embeds onto concept 0."""

    def __init__(self, flag: bool):
        super().__init__(projection_dim=2, n_concepts=1, n_special=1)
        self.flag = flag
        self.concept_embeds.data = torch.tensor([[1.0, 0.0]])
        self.special_care_embeds.data = torch.tensor([[0.0, 1.0]])
        self.concept_embeds_weights.data = torch.tensor([0.5])
        self.special_care_embeds_weights.data = torch.tensor([2.0])

    def embed(self, images):
        return torch.tensor([[1.0, 0.0] if self.flag else [0.0, 1.0]]).expand(len(images), 2)


def test_safety_checker_and_watermark_are_applied(model):
    plain = txt2img(model, "x", num_images=2, seed=0, **FAST)
    flagged = txt2img(model, "x", num_images=2, seed=0, safety_checker=FlagEverything(True), **FAST)
    passed = txt2img(model, "x", num_images=2, seed=0, safety_checker=FlagEverything(False), **FAST)
    assert plain.nsfw == passed.nsfw == [False, False] and flagged.nsfw == [True, True]
    assert all(pixels(im).max() == 0 for im in flagged.images)  # black placeholder, never a picture
    assert np.array_equal(pixels(passed.images[1]), pixels(plain.images[1])) and passed.safety.checked
    with pytest.warns(WatermarkSkipped):  # 32x32 cannot carry it; the decision is recorded on the image
        marked = txt2img(model, "x", seed=0, watermark="sdkit", **FAST)
    assert marked.images[0].info["sdkit-watermark"].startswith("skipped")


# ------------------------------------------------------------------------------------ img2img
def test_img2img_strength_zero_returns_the_input_exactly(model, monkeypatch):
    spy = UNetSpy(monkeypatch, model)
    image = random_image(30, 22)  # not a multiple of anything
    result = img2img(model, image, "x", strength=0.0, num_images=2, **FAST)
    assert all(np.array_equal(pixels(im), pixels(image)) for im in result.images)
    assert result.latents is None and spy.calls == []


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_strength_one_equals_txt2img_from_the_noised_latent(model, sampler):
    """strength 1 runs the whole grid from z0 noised to the first level: exactly txt2img from that x_T."""
    eps = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    opts = dict(sampler=sampler, guidance_scale=3.0, seed=4, **FAST)
    i2i = img2img(model, random_image(), "a red circle", strength=1.0, noise=eps, **opts)
    a = float(noise_levels(sampler, model.alphas_cumprod, 4)[0])
    x_T = math.sqrt(a) * i2i.init_latents + math.sqrt(1 - a) * eps
    t2i = txt2img(model, "a red circle", x_T=x_T, **opts)
    assert torch.allclose(i2i.latents, t2i.latents, atol=1e-6)
    assert np.array_equal(pixels(i2i.images[0]), pixels(t2i.images[0]))


def test_img2img_first_step_is_at_the_noise_level_of_the_latent(model, monkeypatch):
    """strength 0.6 of 10 DDIM steps (t = 901, 801, …, 1) runs the last 6: the UNet's first call is at t = 501
    and sees the init latent noised to exactly ᾱ_501 (CompVis noised to the next DDIM level, 601)."""
    spy = UNetSpy(monkeypatch, model)
    eps = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    result = img2img(model, random_image(), "x", strength=0.6, steps=10, sampler="ddim", noise=eps,
                     guidance_scale=1.0, progress=False)
    assert list(ddim_timesteps(10, "compvis", 1000)) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert [int(c[1][0]) for c in spy.calls] == [501, 401, 301, 201, 101, 1]
    a = float(model.alphas_cumprod[501])
    expected = math.sqrt(a) * result.init_latents + math.sqrt(1 - a) * eps
    assert torch.allclose(spy.calls[0][0], expected, atol=1e-6)


def test_img2img_any_size(model):
    result = img2img(model, random_image(30, 22), "x", strength=0.5, seed=0, **FAST)
    assert result.images[0].size == (22, 30)


# ------------------------------------------------------------------------------------ inpainting
def box_mask(h=32, w=32):
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[8:20, 4:24] = 255
    return Image.fromarray(mask, mode="L")


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a"])
def test_inpaint_blend_leaves_the_unmasked_region_exactly_unchanged(model, sampler):
    """Tolerance 0: the final composite is in pixel space, so every kept pixel is the input's, bit for bit."""
    image, mask = random_image(seed=1), box_mask()
    result = inpaint(model, image, mask, "a red circle", sampler=sampler, seed=3, **FAST)
    out, orig, keep = pixels(result.images[0]), pixels(image), np.asarray(mask) == 0
    assert np.array_equal(out[keep], orig[keep])
    assert np.abs(out[~keep] - orig[~keep]).mean() > 5  # the masked region was repainted
    # without the pixel composite, the latent's known region is still exactly the image's own latent
    raw = inpaint(model, image, mask, "a red circle", sampler=sampler, seed=3, composite=False, **FAST)
    keep_latent = F.max_pool2d(torch.from_numpy(np.asarray(mask) / 255.0).float()[None, None], 2) == 0
    assert torch.equal(raw.latents[keep_latent.expand_as(raw.latents)],
                       raw.init_latents[keep_latent.expand_as(raw.init_latents)])


def test_inpainting_unet_receives_latent_mask_and_masked_image_latent_in_order(inpaint_model, monkeypatch):
    """runway sd-v1-5-inpainting: UNet input = [x 4, mask 1, masked-image latent 4]; masked image = image·(mask<0.5)
    encoded (posterior sample × scale); mask nearest-resized; the uncond branch gets the same c_concat."""
    model = inpaint_model
    assert is_inpainting_model(model)
    spy = UNetSpy(monkeypatch, model)
    image, mask = random_image(seed=2), box_mask()
    result = inpaint(model, image, mask, "a hat", seed=9, guidance_scale=4.0, sampler="ddim", **FAST)
    # the same computation by hand, with image 0's generator in the documented order:
    # starting noise, posterior sample of the image, posterior sample of the masked image
    gen = torch.Generator().manual_seed(9)
    noise = torch.randn(1, 4, 16, 16, generator=gen)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    m = torch.from_numpy(np.asarray(mask) / 255.0).float()[None, None]
    with torch.no_grad():
        model.get_first_stage_encoding(model.encode_first_stage(x), generator=gen)
        masked = model.get_first_stage_encoding(model.encode_first_stage(x * (m < 0.5)), generator=gen)
    unet_in = spy.calls[0][0]
    assert unet_in.shape == (2, 9, 16, 16)  # [uncond, cond] × 9 channels
    assert torch.equal(unet_in[0], unet_in[1])  # same x and c_concat in both branches
    assert torch.equal(unet_in[1, :4], noise[0])  # strength 1: pure noise, as runway's script
    assert torch.equal(unet_in[1, 4:5], F.interpolate(m, size=(16, 16), mode="nearest")[0])
    assert torch.allclose(unet_in[1, 5:], masked[0], atol=1e-6)
    keep = np.asarray(mask) == 0
    assert np.array_equal(pixels(result.images[0])[keep], pixels(image)[keep])


def test_outpaint_extends_the_canvas_and_keeps_the_original(model):
    image = random_image(24, 20, seed=3)
    result = outpaint(model, image, (4, 0, 8, 6), "sky", seed=0, **FAST)
    assert result.images[0].size == (32, 30)
    assert np.array_equal(pixels(result.images[0])[0:24, 4:24], pixels(image))


# ------------------------------------------------------------------------------------ upscaling
def test_upscale_concatenates_the_low_res_image_to_the_latent(upscaler, monkeypatch):
    spy = UNetSpy(monkeypatch, upscaler)
    lr = random_image(10, 12, seed=4)
    result = upscale(upscaler, lr, steps=3, seed=0, progress=False)
    assert result.images[0].size == (48, 40)  # ×4 (the KL-f4 first stage)
    unet_in = spy.calls[0][0]
    lr_tensor = torch.from_numpy(np.array(lr)).permute(2, 0, 1).float() / 127.5 - 1
    assert unet_in.shape == (1, 7, 10, 12) and torch.allclose(unet_in[0, 4:], lr_tensor)
    with pytest.raises(ValueError, match="not a super-resolution model"):
        upscale(sdkit.load_model("tiny-test"), lr, steps=2, progress=False)


def test_tiled_decode_is_exact_for_a_local_decoder(upscaler, monkeypatch):
    """Feathered blending is a convex combination of tiles: with a decoder that is local (1×1 conv + nearest ×4),
    every tile agrees with the full decode, so the tiled decode equals it to float rounding."""
    weight = torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(upscaler.first_stage_model, "decode",
                        lambda z: F.interpolate(F.conv2d(z, weight), scale_factor=4, mode="nearest"))
    z = torch.randn(2, 4, 21, 30, generator=torch.Generator().manual_seed(1))
    full = upscaler.decode_first_stage(z)
    for tile, overlap in ((8, 2), (8, 5), (16, 4), (10, 0), (40, 8)):
        assert (decode_tiled(upscaler, z, tile, overlap) - full).abs().max() < 1e-5, (tile, overlap)


def test_tiled_decode_is_close_to_plain_decode_for_a_random_vae():
    """A random KL-f4 first stage without attention: tiles differ from the full decode through GroupNorm
    statistics and the receptive field at tile borders, so the tolerance is loose: measured mean |Δ| 0.24, 0.12
    and 0.048 at tile/overlap 8/4, 16/8 and 24/8 of a 32×32 latent (mean |x| 0.32); one tile is exact."""
    cfg = load_config("tiny-upscaler-test")
    cfg.model.params.first_stage_config.params.ddconfig.attn_type = "none"
    torch.manual_seed(0)
    model = sdkit.load_model(cfg)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    full = model.decode_first_stage(z)
    errors = [float((decode_tiled(model, z, tile, overlap) - full).abs().mean()) for tile, overlap in
              ((8, 4), (16, 8), (24, 8))]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.2 * float(full.abs().mean())
    assert torch.equal(decode_tiled(model, z, 32, 8), full)
    with pytest.raises(ValueError, match="overlap < tile"):
        decode_tiled(model, z, 8, 8)


# ------------------------------------------------------------------------------------ errors
def test_argument_errors_say_what_works(model):
    image = random_image()
    with pytest.raises(ValueError, match="unknown sampler 'k_euler'; choose one of: ddpm, ddim, plms"):
        txt2img(model, "x", sampler="k_euler")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        txt2img(model, "x", steps=0)
    for strength in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength must be a number from 0 to 1"):
            img2img(model, image, "x", strength=strength)
    with pytest.raises(ValueError, match="height=33 does not fit.*multiples of 2.*multiples of 4 run without"):
        txt2img(model, "x", height=33)
    with pytest.raises(ValueError, match="has no eta option"):
        txt2img(model, "x", sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="seed must be None, an int, or a list of 2 ints"):
        txt2img(model, "x", num_images=2, seed=[1])


def test_mask_errors_say_how_to_fix_the_mask(model):
    image = random_image()
    with pytest.raises(ValueError, match=r"mask is 16x32 .* image is 32x32.*mask.resize\(image.size"):
        inpaint(model, image, np.zeros((32, 16), dtype=np.uint8), "x", **FAST)
    with pytest.raises(ValueError, match=r"single-channel.*convert\('L'\)"):
        inpaint(model, image, random_image(), "x", **FAST)
    with pytest.raises(ValueError, match=r"single-channel.*mask.mean\(0, keepdim=True\)"):
        inpaint(model, image, torch.zeros(3, 32, 32), "x", **FAST)
    with pytest.raises(ValueError, match="needs the 9-channel inpainting model"):
        inpaint(model, image, box_mask(), "x", use_inpainting_unet=True, **FAST)


def test_long_prompt_warns_once_with_the_cut_words(model):
    prompt = "a photo of a cat " * 20 + "WITH A HAT"
    with pytest.warns(PromptTruncatedWarning) as record:
        txt2img(model, prompt, num_images=3, seed=0, guidance_scale=1.0, **FAST)
    messages = [str(w.message) for w in record if w.category is PromptTruncatedWarning]
    assert len(messages) == 1 and "with a hat" in messages[0] and "77-token limit" in messages[0]


def test_nan_in_sampling_names_the_stage_and_suggests_float32(model, monkeypatch):
    monkeypatch.setattr(model, "apply_model", lambda x, t, c: torch.full_like(x, float("nan")))
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step 1 of 4.*float32"):
        txt2img(model, "x", seed=0, **FAST)


def test_nan_in_decoding_and_encoding_names_the_vae(model, monkeypatch):
    vae = model.first_stage_model
    decode, encoder = vae.decode, vae.encoder.forward
    monkeypatch.setattr(vae, "decode", lambda z: torch.full((z.shape[0], 3, 32, 32), float("nan")))
    with pytest.raises(FloatingPointError, match=r"decoded image.*VAE.*float32"):
        txt2img(model, "x", seed=0, **FAST)
    monkeypatch.setattr(vae, "decode", decode)
    monkeypatch.setattr(vae.encoder, "forward", lambda x: torch.full_like(encoder(x), float("inf")))
    with pytest.raises(FloatingPointError, match=r"encoded image latents \(VAE encoder.*float32"):
        img2img(model, random_image(), "x", strength=0.5, **FAST)


# ------------------------------------------------------------------------------------ CLI
def test_cli_generate_writes_pngs(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="without the invisible watermark"):  # 32x32 is too small to carry it
        rc = main(["generate", "a red circle", "--config", "tiny-test", "--n", "2", "--seed", "3", "--steps", "2",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-3.png", "00001-4.png"]  # no temp files left behind
    with Image.open(out / "00000-3.png") as im:
        assert im.size == (32, 32) and "sdkit-watermark" in im.info
    assert "random weights" in capsys.readouterr().err
    assert main(["generate", "x", "--config", "tiny-test", "--sampler", "nope", "--out", str(out)]) == 2
    assert "unknown sampler 'nope'" in capsys.readouterr().err


def test_cli_uses_the_shipped_model_by_default(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    (png,) = out.iterdir()
    with Image.open(png) as im:   # 64x64 carries the kit's robust mark (the SD v1 dwtDct one needs 256)
        assert im.size == (64, 64) and im.info["sdkit-watermark"].startswith("spread payload='sdkit'")
    assert "random weights" not in capsys.readouterr().err


def test_cli_says_where_the_shipped_weights_should_be(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDKIT_DATA", str(tmp_path))          # a folder without data/tiny.safetensors
    assert main(["generate", "x", "--out", str(tmp_path / "out")]) == 2
    assert "SDKIT_DATA" in capsys.readouterr().err


def test_generated_pngs_carry_a_watermark_that_decodes(tmp_path, capsys):
    """From a pipeline's output written by the CLI to the CLI's decoder: the kit's payload survives the PNG on
    disk (a 4x upscale of a 64x64 image gives 256x256, large enough to carry it)."""
    source = tmp_path / "small.png"
    random_image(64, 64, seed=5).save(source)
    for flags, folder in ((["--watermark", "sdkit"], "marked"), (["--no-watermark"], "plain")):
        assert main(["upscale", str(source), "--config", "tiny-upscaler-test", "--seed", "1", "--steps", "2",
                     "--out", str(tmp_path / folder), "--no-progress", *flags]) == 0
    (marked,), (plain,) = (tmp_path / "marked").iterdir(), (tmp_path / "plain").iterdir()
    assert Image.open(marked).size == (256, 256)
    capsys.readouterr()
    assert main(["watermark", "decode", str(marked)]) == 0
    assert "sdkit" in capsys.readouterr().out
    assert main(["watermark", "decode", str(plain)]) != 0


def test_a_list_of_prompts_gives_one_image_each(model):
    result = txt2img(model, ["a", "b", "c"], seed=0, **FAST)
    assert len(result.images) == 3 and result.seeds == [0, 1, 2]
    alone = txt2img(model, "b", seed=1, **FAST)
    assert torch.equal(result.latents[1], alone.latents[0])
    with pytest.raises(ValueError, match="list of 2 strings"):
        txt2img(model, ["a", "b", "c"], num_images=2, **FAST)


def test_eta_defaults_to_the_samplers_own(model):
    """Without eta, each sampler runs as k-diffusion and diffusers define it: euler_a and dpmpp_2m_sde with their
    ancestral noise (eta 1), ddim deterministic (eta 0). A pipeline default of 0 once made euler_a plain Euler."""
    from sdkit.samplers import sample
    from sdkit.samplers.denoisers import cfg_eps_fn

    euler = txt2img(model, "a red circle", seed=5, sampler="euler", **FAST)
    ancestral = txt2img(model, "a red circle", seed=5, sampler="euler_a", **FAST)
    assert ancestral.parameters[0]["eta"] == 1.0 and euler.parameters[0]["eta"] == 0.0
    assert not torch.allclose(ancestral.latents, euler.latents, atol=1e-3)
    assert torch.equal(txt2img(model, "a red circle", seed=5, sampler="euler_a", eta=0.0, **FAST).latents,
                       euler.latents)
    # the pipeline's euler_a is the sampler called with its defaults on the same noise and generator
    with torch.no_grad():
        eps_fn = cfg_eps_fn(model.apply_model, model.get_learned_conditioning(["a red circle"]),
                            model.get_learned_conditioning([""]), 7.5)
        generator = torch.Generator().manual_seed(5)     # one generator per seed: x_T first, then the noise
        x_T = torch.randn(ancestral.latents.shape, generator=generator)
        direct = sample(eps_fn, x_T, model.alphas_cumprod, sampler="euler_a", steps=4, progress=False,
                        generator=generator)
    # the same kernels on the same batch; 1e-5 (latents of scale ~1) covers float reordering
    torch.testing.assert_close(ancestral.latents, direct, rtol=0, atol=1e-5)
