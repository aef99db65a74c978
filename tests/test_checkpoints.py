"""Checkpoint I/O: CompVis <-> diffusers key maps against diffusers' own converter and models, round trips,
EMA extraction, the human error messages, and atomic writes."""
import argparse
import hashlib
import os
import warnings
from pathlib import Path

import pytest
import torch

from sdkit import checkpoints
from sdkit.checkpoints import keys as ck
from sdkit.checkpoints import write_diffusers
from sdkit.checkpoints import (CheckpointError, check_fits, extract_ema, load_model, load_weights, read_checkpoint,
                               save_compvis, save_diffusers)
from sdkit.config import load_config

FIXTURE = Path(__file__).parent / "fixtures" / "sd_v1_checkpoint_keys.txt"
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def sd_v1_shapes() -> dict:
    """key -> shape of every tensor in an SD v1 checkpoint (v1-inference), from the fixture file."""
    shapes = {}
    for line in FIXTURE.read_text().splitlines():
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def fake_state(shapes: dict, seed: int = 0) -> dict:
    """Random tensors with the given shapes, cheap enough for the 1.07e9-parameter SD v1 key set: tensors up to
    2^20 elements are fully random; larger ones get one random value per output row, broadcast (a stride-0
    view), so every key still holds distinct values and any swap of keys or rows shows up."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        numel = torch.Size(shape).numel()
        if numel <= 2**20:
            out[key] = torch.randn(shape, generator=gen)
        else:
            out[key] = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=gen).expand(shape)
    return out


def meta_state(shapes: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def sd_v1_params():
    params = ck.as_plain(load_config("sd-v1-inference"))
    return params, params["model"]["params"]["unet_config"]["params"], \
        params["model"]["params"]["first_stage_config"]["params"]["ddconfig"]


def reinit_(module: torch.nn.Module, seed: int) -> None:
    """Seeded random values everywhere, so zero-initialised output layers do not hide mapping mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), f"key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# ====================================================================== (a) key maps against diffusers


def test_sd_v1_maps_equal_diffusers_converter():
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    config, unet_params, ddconfig = sd_v1_params()
    state = fake_state(sd_v1_shapes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates image_size=, not its meaning
        ref_unet_config = create_unet_diffusers_config_from_ldm(config, state, image_size=512)
        ref_vae_config = create_vae_diffusers_config_from_ldm(config, state, image_size=512)
    ref_unet = convert_ldm_unet_checkpoint(state, ref_unet_config)
    ref_vae = convert_ldm_vae_checkpoint(state, ref_vae_config)

    parts = ck.split_compvis(state)
    unet = ck.unet_to_diffusers(parts["unet"], unet_params)
    vae = ck.vae_to_diffusers(parts["vae"], ddconfig)
    assert len(unet) == 686 and len(vae) == 248
    assert_same_tensors(unet, ref_unet)
    assert_same_tensors(vae, ref_vae)
    assert vae["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)  # conv 1x1 -> Linear

    # The reverse maps are the exact inverse (keys, shapes, values), including Linear -> 1x1 conv.
    assert_same_tensors(ck.unet_from_diffusers(unet, unet_params), parts["unet"])
    assert_same_tensors(ck.vae_from_diffusers(vae, ddconfig), parts["vae"])
    assert_same_tensors(ck.text_from_transformers(ck.text_to_transformers(parts["text"])),
                        {k: v for k, v in parts["text"].items() if not k.endswith("position_ids")})

    # config.json dicts agree with diffusers' own config builders on every field those set
    mine_unet = ck.unet_diffusers_config(unet_params, sample_size=64)
    mine_vae = ck.vae_diffusers_config(ddconfig, 4, 0.18215, sample_size=512)
    assert {k: mine_unet[k] for k in ref_unet_config} == ref_unet_config
    assert {k: mine_vae[k] for k in ref_vae_config} == ref_vae_config
    # ... and the way back gives the CompVis parameters again
    back = ck.unet_params_from_diffusers(mine_unet)
    fields = ("in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
              "channel_mult", "num_heads", "context_dim", "transformer_depth")
    assert {k: back[k] for k in fields} == {k: unet_params[k] for k in fields} | {"attention_resolutions": [1, 2, 4]}
    assert ck.ddconfig_from_diffusers(mine_vae)[1:] == (4, 0.18215)


def test_diffusers_converter_ema_matches_extract_ema():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config, unet_params, _ = sd_v1_params()
    shapes = {k: s for k, s in sd_v1_shapes().items() if k.startswith(UNET)}
    raw, ema = fake_state(shapes, seed=1), fake_state(shapes, seed=2)
    state = dict(raw)
    state.update({checkpoints.ema_key(k): v for k, v in ema.items()})
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref_config = create_unet_diffusers_config_from_ldm(config, state, image_size=512)
    ref = convert_ldm_unet_checkpoint(state, ref_config, extract_ema=True)
    picked = extract_ema(state)
    assert not any(k.startswith("model_ema.") for k in picked)
    assert_same_tensors(ck.unet_to_diffusers(ck.split_compvis(picked)["unet"], unet_params), ref)
    # raw weights on request
    assert_same_tensors(checkpoints.drop_ema(state), raw)


# Architectures beyond SD v1 that diffusers can express: the map must give exactly diffusers' key set and shapes,
# and the converted weights must compute the same function.
UNET_VARIANTS = {
    "tiny-test": None,
    "deeper": dict(image_size=8, in_channels=4, out_channels=3, model_channels=32, attention_resolutions=[2, 4],
                   num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=16, use_spatial_transformer=True,
                   transformer_depth=2, context_dim=24, use_scale_shift_norm=True, legacy=False),
}
VAE_VARIANT = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                   num_res_blocks=2, attn_resolutions=[16], dropout=0.0)


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_unet_map_computes_same_function_as_diffusers(variant):
    from diffusers import UNet2DConditionModel

    from sdkit.nn.unet import UNetModel

    params = UNET_VARIANTS[variant] or ck.as_plain(load_config("tiny-test"))["model"]["params"]["unet_config"][
        "params"]
    ours = UNetModel(**params).eval()
    reinit_(ours, seed=3)
    config = {k: v for k, v in ck.unet_diffusers_config(params).items() if not k.startswith("_")}
    theirs = UNet2DConditionModel(**config).eval()
    converted = ck.unet_to_diffusers(ours.state_dict(), params)
    expected = theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    theirs.load_state_dict(converted, strict=True)
    assert_same_tensors(ck.unet_from_diffusers(theirs.state_dict(), params), ours.state_dict())

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, params["in_channels"], 8, 8, generator=gen)
    t = torch.tensor([3.0, 971.0])
    ctx = torch.randn(2, 5, params["context_dim"], generator=gen)
    with torch.no_grad():
        a = ours(x, t, context=ctx)
        b = theirs(x, t, encoder_hidden_states=ctx).sample
    assert (a - b).abs().max() < 1e-4 * b.abs().max()


@pytest.mark.parametrize("ddconfig", ["tiny-test", "with-attention"])
def test_vae_map_computes_same_function_as_diffusers(ddconfig):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from sdkit.nn.autoencoder import AutoencoderKL

    if ddconfig == "tiny-test":
        dd = ck.as_plain(load_config("tiny-test"))["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    else:
        dd = VAE_VARIANT
    ours = AutoencoderKL(ddconfig=dd, embed_dim=dd["z_channels"], lossconfig={"target": "torch.nn.Identity"}).eval()
    reinit_(ours, seed=4)
    config = {k: v for k, v in ck.vae_diffusers_config(dd, dd["z_channels"]).items() if not k.startswith("_")}
    theirs = DiffusersAutoencoderKL(**config).eval()
    converted = ck.vae_to_diffusers(ours.state_dict(), dd)
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(converted, strict=True)
    assert_same_tensors(ck.vae_from_diffusers(theirs.state_dict(), dd), ours.state_dict())
    assert ck.infer_ddconfig(ours.state_dict(), resolution=dd["resolution"])[0] == dd

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    z = torch.randn(1, dd["z_channels"], 8, 8, generator=gen)
    with torch.no_grad():
        mean_a, mean_b = ours.encode(x).mean, theirs.encode(x).latent_dist.mean
        dec_a, dec_b = ours.decode(z), theirs.decode(z).sample
    assert (mean_a - mean_b).abs().max() < 1e-4 * mean_b.abs().max()
    assert (dec_a - dec_b).abs().max() < 1e-4 * dec_b.abs().max()


def test_unexpressible_configs_are_refused_in_words():
    params = dict(UNET_VARIANTS["deeper"], resblock_updown=True)
    with pytest.raises(ck.NotExpressibleError, match="resblock_updown"):
        ck.unet_diffusers_config(params)
    with pytest.raises(ck.NotExpressibleError, match="embed_dim"):
        ck.vae_diffusers_config(VAE_VARIANT, embed_dim=3)
    with pytest.raises(KeyError, match="different config"):
        ck.unet_to_diffusers({"input_blocks.99.0.in_layers.0.weight": torch.zeros(1)}, UNET_VARIANTS["deeper"])


# ====================================================================== (b) round trips through files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-test model with seeded random weights everywhere, saved as .ckpt, .safetensors and diffusers."""
    model = load_model("tiny-test")
    reinit_(model, seed=5)
    folder = tmp_path_factory.mktemp("tiny")
    save_compvis(model, folder / "tiny.ckpt")
    save_compvis(model, folder / "tiny.safetensors")
    save_diffusers(model, folder / "tiny-diffusers")
    return model, folder


@pytest.mark.parametrize("source", ["tiny.ckpt", "tiny.safetensors"])
def test_round_trip_compvis_file_to_diffusers_and_back(tiny, source, tmp_path):
    model, folder = tiny
    reference = model.state_dict()
    loaded = load_model("tiny-test", folder / source)
    assert_same_tensors(loaded.state_dict(), reference)
    assert not loaded.training
    save_diffusers(loaded, tmp_path / "diffusers")
    again = load_model("tiny-test", tmp_path / "diffusers")
    assert_same_tensors(again.state_dict(), reference)
    # the file itself holds exactly the CompVis keys
    state, meta = read_checkpoint(folder / source)
    assert_same_tensors(state, reference)
    assert meta["format"] == ("safetensors" if source.endswith("safetensors") else "ckpt")


def test_diffusers_pipeline_loads_our_folder_and_agrees(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    model, folder = tiny
    path = folder / "tiny-diffusers"
    assert {p.name for p in path.iterdir()} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                "model_index.json"}
    pipe = StableDiffusionPipeline.from_pretrained(path)
    unet, vae, text, tokenizer = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert torch.allclose(pipe.scheduler.betas.double(), model.betas.double(), rtol=1e-6, atol=0)

    prompt = "a photograph of an astronaut riding a horse"
    ids = torch.tensor([tokenizer(prompt, padding="max_length", max_length=77).input_ids])
    assert torch.equal(ids, model.cond_stage_model.tokenizer(prompt)["input_ids"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([500.0])
    with torch.no_grad():
        ctx = model.get_learned_conditioning([prompt])
        ctx_ref = text(ids).last_hidden_state
        eps = model.apply_model(x, t, ctx)
        eps_ref = unet(x, t, encoder_hidden_states=ctx).sample
        img = model.decode_first_stage(x)
        img_ref = vae.decode(x / vae.config.scaling_factor).sample
    for a, b in ((ctx, ctx_ref), (eps, eps_ref), (img, img_ref)):
        assert (a - b).abs().max() < 1e-4 * b.abs().max()

    # A folder written by diffusers/transformers themselves (transformers 5 drops the text_model. prefix) reads
    # back to the same CompVis weights; the schedule buffers are not part of a diffusers folder.
    pipe.save_pretrained(tmp_path / "resaved")
    state, meta = read_checkpoint(tmp_path / "resaved")
    expected = {k: v for k, v in model.state_dict().items()
                if k.startswith((UNET, VAE, TEXT)) and not k.endswith("position_ids")}
    assert_same_tensors(state, expected)
    assert meta["format"] == "diffusers" and meta["scale_factor"] == pytest.approx(0.18215)


def test_old_diffusers_vae_attention_names_are_read():
    dd = VAE_VARIANT
    shapes = {"mid_block.attentions.0.to_q.weight": (64, 64), "mid_block.attentions.0.to_out.0.bias": (64,)}
    new = {f"{part}.{k}": torch.randn(s) for part in ("encoder", "decoder") for k, s in shapes.items()}
    old = {k.replace("to_q", "query").replace("to_out.0", "proj_attn"): v for k, v in new.items()}
    assert_same_tensors(ck.vae_from_diffusers(old, dd), ck.vae_from_diffusers(new, dd))
    assert ck.vae_from_diffusers(new, dd)["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


def fingerprints(state: dict) -> dict:
    """An exact per-tensor digest, so a 1e9-parameter model can be compared without a second copy in memory."""
    return {k: hashlib.blake2b(v.detach().contiguous().view(-1).view(torch.uint8).numpy(), digest_size=16).digest()
            for k, v in state.items()}


@pytest.mark.slow
def test_round_trip_full_size_sd_v1(tmp_path):
    # float16 halves the memory of this test; the key layout and the shapes are the point here
    model = load_model("sd-v1-inference", dtype=torch.float16)
    reference = fingerprints(model.state_dict())
    assert len(reference) == 1143

    def scramble():
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    save_compvis(model, tmp_path / "sd.safetensors")
    scramble()
    load_weights(model, tmp_path / "sd.safetensors")
    assert fingerprints(model.state_dict()) == reference
    save_diffusers(model, tmp_path / "sd-diffusers")
    (tmp_path / "sd.safetensors").unlink()
    scramble()
    load_weights(model, tmp_path / "sd-diffusers")
    assert fingerprints(model.state_dict()) == reference


# ====================================================================== (c) EMA


def test_extract_ema_uses_flattened_names():
    raw, ema = torch.zeros(2), torch.ones(2)
    state = {"model.diffusion_model.input_blocks.0.0.weight": raw,
             "model_ema.diffusion_modelinput_blocks00weight": ema,
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3),
             "first_stage_model.conv.weight": raw}
    assert extract_ema(state) == {"model.diffusion_model.input_blocks.0.0.weight": ema,
                                  "first_stage_model.conv.weight": raw}


def _ema_checkpoint(model, seed_raw, seed_ema):
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    gen = torch.Generator().manual_seed(seed_raw)
    unet_keys = [k for k in state if k.startswith(UNET)]
    for k in unet_keys:
        state[k] = torch.randn(state[k].shape, generator=gen)
    gen = torch.Generator().manual_seed(seed_ema)
    ema = {k: torch.randn(state[k].shape, generator=gen) for k in unet_keys}
    state.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ema.items()})
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(42,
                                                                                                  dtype=torch.int)})
    raw = {k: state[k] for k in unet_keys}
    return state, raw, ema


def test_load_model_uses_ema_unless_asked(tiny, tmp_path):
    model, _ = tiny
    state, raw, ema = _ema_checkpoint(model, 6, 7)
    save_compvis(state, tmp_path / "full.ckpt")

    with_ema = load_model("tiny-test", tmp_path / "full.ckpt")
    assert_same_tensors({k: v for k, v in with_ema.state_dict().items() if k.startswith(UNET)}, ema)
    without = load_model("tiny-test", tmp_path / "full.ckpt", use_ema=False)
    assert_same_tensors({k: v for k, v in without.state_dict().items() if k.startswith(UNET)}, raw)

    # A model that keeps its own EMA (use_ema: True) gets the file's EMA in model_ema when the raw weights are
    # kept, and a copy of the loaded weights otherwise.
    cfg = load_config("tiny-test", ["model.params.use_ema=True"])
    kept = load_model(cfg, tmp_path / "full.ckpt", use_ema=False).state_dict()
    assert all(torch.equal(kept["model_ema." + k[len("model."):].replace(".", "")], ema[k]) for k in ema)
    assert all(torch.equal(kept[k], raw[k]) for k in raw)
    assert int(kept["model_ema.num_updates"]) == 42
    swapped = load_model(cfg, tmp_path / "full.ckpt").state_dict()
    assert all(torch.equal(swapped["model_ema." + k[len("model."):].replace(".", "")], ema[k]) for k in ema)
    assert all(torch.equal(swapped[k], ema[k]) for k in ema)


# ====================================================================== (d) errors for people


def test_sd2_checkpoint_is_recognised():
    model = meta_state(sd_v1_shapes())
    wide = dict(model)
    for k in wide:
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            wide[k] = torch.empty(wide[k].shape[0], 1024, device="meta")
    with pytest.raises(CheckpointError, match="Stable Diffusion 2.x checkpoint.*supports SD v1"):
        check_fits(wide, model, "config 'sd-v1-inference'")
    openclip = {k: v for k, v in model.items() if not k.startswith(TEXT)}
    openclip["cond_stage_model.model.token_embedding.weight"] = torch.empty(49408, 1024, device="meta")
    with pytest.raises(CheckpointError, match="Stable Diffusion 2.x"):
        check_fits(openclip, model)


def test_inpainting_checkpoint_into_txt2img_config_and_back():
    model = meta_state(sd_v1_shapes())
    inpaint = dict(model)
    inpaint[UNET + "input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    with pytest.raises(CheckpointError, match="inpainting checkpoint.*use config 'sd-v1-inpainting'"):
        check_fits(inpaint, model, "config 'sd-v1-inference'")
    with pytest.raises(CheckpointError, match="text-to-image checkpoint.*'sd-v1-inference'"):
        check_fits(model, inpaint, "config 'sd-v1-inpainting'")


def test_inpainting_checkpoint_through_load_model(tiny):
    model, _ = tiny
    state = dict(model.state_dict())
    state[UNET + "input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    with pytest.raises(CheckpointError, match="inpainting"):
        load_model("tiny-test", state)


def test_missing_parts_and_standalone_files_are_named():
    model = meta_state(sd_v1_shapes())
    no_vae = {k: v for k, v in model.items() if not k.startswith(VAE)}
    with pytest.raises(CheckpointError, match=r"no weights for the autoencoder \(VAE\)"):
        check_fits(no_vae, model)
    with pytest.warns(UserWarning, match="autoencoder"):
        kept = check_fits(no_vae, model, strict=False)
    assert set(kept) == set(no_vae)
    vae_file = {k[len(VAE):]: v for k, v in model.items() if k.startswith(VAE)}
    with pytest.raises(CheckpointError, match="standalone autoencoder"):
        check_fits(vae_file, model)


def test_other_shape_mismatches_are_summarised():
    model = meta_state(sd_v1_shapes())
    other = dict(model)
    bigger = [k for k in model if k.startswith(UNET) and k.endswith(".bias")][:5]
    for k in bigger:
        other[k] = torch.empty(model[k].shape[0] + 1, device="meta")
    with pytest.raises(CheckpointError) as info:
        check_fits(other, model, "config 'sd-v1-inference'")
    message = str(info.value)
    assert message.startswith("5 weight(s)") and "(2 more)" in message
    assert sum(k in message for k in bigger) == 3 and len(message) < 1000


def test_unexpected_keys_harmless_or_reported():
    model = meta_state(sd_v1_shapes())
    model.pop(TEXT + "text_model.embeddings.position_ids")  # as in newer transformers
    state = dict(model)
    harmless = {TEXT + "text_model.embeddings.position_ids": torch.empty(1, 77, device="meta"),
                "model_ema.decay": torch.empty((), device="meta"), "lvlb_weights": torch.empty(1000, device="meta"),
                VAE + "loss.logvar": torch.empty((), device="meta")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = check_fits({**state, **harmless}, model)
    assert set(kept) == set(model)
    with pytest.warns(UserWarning, match="1 checkpoint key.*lora_unet_down"):
        check_fits({**state, "lora_unet_down.weight": torch.empty(1, device="meta")}, model)


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["cut.safetensors", "cut.ckpt", "cut-legacy.ckpt", "empty.ckpt"])
def test_truncated_files_say_so(tiny, tmp_path, name):
    model, _ = tiny
    path = tmp_path / name
    if name == "cut-legacy.ckpt":  # the pre-1.6 torch.save format (plain pickle, no zip)
        torch.save({"state_dict": model.state_dict()}, path, _use_new_zipfile_serialization=False)
    else:
        save_compvis(model, path)
    _truncate(path, 0.0 if name.startswith("empty") else 0.6)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert ("truncated or corrupt" in message or "empty" in message) and "download it again" in message.lower()
    assert info.value.__cause__ is not None or name.startswith("empty")


def test_pickle_that_needs_full_unpickling(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "lightning.ckpt"
    hyper = argparse.Namespace(lr=1e-4)  # like the hyper_parameters some Lightning checkpoints pickle
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hyper, "global_step": 470000}, path)
    with pytest.raises(CheckpointError, match=r"argparse.Namespace.*unsafe_pickle=True") as info:
        read_checkpoint(path)
    assert "trust" in str(info.value)
    state, meta = read_checkpoint(path, unsafe_pickle=True)
    assert_same_tensors(state, model.state_dict())
    assert meta["global_step"] == 470000


# ====================================================================== (e) atomic writes


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_failed_write_keeps_previous_file(tiny, tmp_path, monkeypatch, suffix):
    model, _ = tiny
    path = tmp_path / f"model{suffix}"
    save_compvis(model, path)
    before = _listing(tmp_path)

    def half_write_then_crash(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"partial data")
        raise OSError("No space left on device")

    if suffix == ".safetensors":
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "save_file", half_write_then_crash)
    else:
        monkeypatch.setattr(torch, "save", half_write_then_crash)
    with pytest.raises(OSError, match="No space"):
        save_compvis({k: v * 2 for k, v in model.state_dict().items()}, path)
    assert _listing(tmp_path) == before  # old file intact, no temporary files left
    assert_same_tensors(read_checkpoint(path)[0], model.state_dict())


def test_failed_folder_write_keeps_previous_folder(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    folder = tmp_path / "out"
    save_diffusers(model, folder)
    before = _listing(tmp_path)
    real_save = write_diffusers.save_safetensors
    calls = []

    def crash_on_second(state, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(state, path, metadata)

    monkeypatch.setattr(write_diffusers, "save_safetensors", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(model, folder)
    assert _listing(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    monkeypatch.setattr(write_diffusers, "save_safetensors", real_save)
    save_diffusers(model, folder)  # replacing an existing diffusers folder works and leaves nothing behind
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_to_replace_a_folder_that_is_not_a_model(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a diffusers model folder"):
        save_diffusers(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_missing_paths_and_hub_ids():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        read_checkpoint("runwayml/stable-diffusion-v1-5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint("/no/such/model.ckpt")


def test_half_precision_files_keep_the_schedule_exact(tmp_path):
    model = load_model("tiny-test")
    path = save_compvis(model, tmp_path / "half.safetensors", dtype=torch.float16)
    state, _ = read_checkpoint(path)
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert state["alphas_cumprod"].dtype == torch.float32
    assert torch.equal(state["alphas_cumprod"], model.alphas_cumprod)
    reloaded = load_model("tiny-test", path)
    assert torch.equal(reloaded.sqrt_recipm1_alphas_cumprod, model.sqrt_recipm1_alphas_cumprod)
