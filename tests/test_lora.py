"""LoRA (sdkit.lora): applying, scaling, merging, the two file layouts, and interoperability with diffusers/PEFT.

Oracles: diffusers' ``load_lora_weights`` into a ``StableDiffusionPipeline`` and PEFT's own LoRA layers (``LoraConfig``
injected into diffusers' UNet and transformers' CLIP text model) holding the same random weights as the sdkit
model; weights merged by hand (W + s·α/r·B·A) for the closed-form checks; float rounding bounds for unmerge.
The interoperability tests run on the small tiny-test model and, marked slow, on full-size SD v1 (random weights).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import sdkit
from sdkit.checkpoints import keys as ck
from sdkit.lora import LoRAError, applied_loras, create_lora, load_lora, read_lora

ROOT = Path(__file__).resolve().parents[1]
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(size: str):
    """A LatentDiffusion with random weights everywhere (no zero-initialised output layers hiding mistakes):
    the bundled tiny-test model, or SD v1 (sd-v1-inference's UNet and CLIP text encoder; the tiny-test autoencoder,
    which no LoRA touches, keeps memory down)."""
    tiny = OmegaConf.load(ROOT / "sdkit" / "configs" / "tiny-test.yaml")
    if size == "sd-v1":
        config = sdkit.load_config("sd-v1-inference")
        config.model.params.first_stage_config = tiny.model.params.first_stage_config
    else:
        config = tiny
    torch.manual_seed(0)
    model = sdkit.instantiate_from_config(config.model).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.model.diffusion_model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 25.0
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
    return model


@pytest.fixture(scope="module", params=["tiny-test", pytest.param("sd-v1", marks=pytest.mark.slow)])
def model(request):
    return build(request.param)


@pytest.fixture(scope="module")
def small():
    return build("tiny-test")


def randomise(lora, seed: int = 5) -> None:
    """Non-zero updates of a moderate size: A ~ N(0, 1/in), B ~ N(0, 0.04/r), so α/r·B·A·x changes outputs by
    several percent (far above the test tolerances) without swamping them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.down.copy_(torch.randn(layer.down.shape, generator=generator) / math.sqrt(layer.down.shape[1]))
            layer.up.copy_(torch.randn(layer.up.shape, generator=generator) * 0.2 / math.sqrt(layer.rank))


def inputs(model, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([3.0, 971.0])
    context = torch.randn(2, 5, unet.context_dim, generator=generator)
    text = getattr(model.cond_stage_model, "transformer", None)
    ids = None if text is None else torch.randint(0, text.config.vocab_size, (2, 9), generator=generator)
    return x, t, context, ids


@torch.no_grad()
def outputs(model, x, t, context, ids):
    """(ε of the UNet, last hidden states of the CLIP text encoder; the text conditioning of a prompt for
    other text encoders)."""
    if ids is None:
        return model.apply_model(x, t, context), model.get_learned_conditioning(["a red circle"])
    return model.apply_model(x, t, context), model.cond_stage_model.transformer(input_ids=ids).last_hidden_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_twins(model):
    """diffusers' StableDiffusionPipeline around a UNet2DConditionModel and a transformers CLIPTextModel that
    hold the sdkit model's weights (the UNet shares their storage: no second copy of SD v1's 3.4 GB)."""
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = model.model.diffusion_model
    params = ck.as_plain(model.unet_config)["params"]
    config = {k: v for k, v in ck.unet_diffusers_config(params).items() if not k.startswith("_")}
    with torch.device("meta"):
        their_unet = UNet2DConditionModel(**config)
    their_unet.load_state_dict(ck.unet_to_diffusers(unet.state_dict(), params), assign=True, strict=True)
    ours = model.cond_stage_model.transformer
    c = ours.config
    their_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps))
    names = set(their_text.state_dict())   # transformers 5 names them without "text_model."
    state = {(k if k in names else k.removeprefix("text_model.")): v for k, v in ours.state_dict().items()}
    their_text.load_state_dict({k: v for k, v in state.items() if k in names}, strict=True)
    return StableDiffusionPipeline(vae=None, text_encoder=their_text.eval(), tokenizer=None, unet=their_unet.eval(),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def their_outputs(pipe, x, t, context, ids):
    return pipe.unet(x, t, encoder_hidden_states=context).sample, pipe.text_encoder(input_ids=ids).last_hidden_state


# Tolerance of the interop tests: sdkit and diffusers/transformers compute the same float32 sums in other orders
# (fused vs processor attention, GEGLU split, conv-as-matmul), each op rounding at 2^-24 relative; over SD v1's
# ~70 layers the measured max difference is ~1e-6 of the output's largest value. 1e-4 (the bound) leaves
# two orders of margin on any x86-64 CPU and thread count. A LoRA changes the outputs by > 1e-2 (checked), so a
# LoRA that one side silently dropped could not pass.
TOLERANCE = 1e-4


# ====================================================================================== interop with diffusers


def test_an_sdkit_kohya_file_gives_diffusers_the_same_model(model, tmp_path):
    x, t, context, ids = inputs(model)
    base_eps, base_text = outputs(model, x, t, context, ids)
    lora = create_lora(model, rank=4, alpha=2.0, layers=UNET_LAYERS, text_encoder_layers=TEXT_LAYERS)
    randomise(lora)
    try:
        eps, text = outputs(model, x, t, context, ids)
        path = lora.save(tmp_path / "sdkit-lora.safetensors")          # kohya layout by default
        lora.save(tmp_path / "sdkit-diffusers.safetensors", layout="diffusers")
    finally:
        lora.remove()
    assert rel(eps, base_eps) > 1e-2 and rel(text, base_text) > 1e-2
    keys = load_file(path)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha") for k in keys)
    pipe = diffusers_twins(model)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="sdkit")
    their_eps, their_text = their_outputs(pipe, x, t, context, ids)
    assert rel(eps, their_eps) <= TOLERANCE
    assert rel(text, their_text) <= TOLERANCE
    # the same LoRA written in the diffusers/PEFT layout (α/r folded into lora_B)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path), weight_name="sdkit-diffusers.safetensors", adapter_name="sdkit2")
    their_eps, their_text = their_outputs(pipe, x, t, context, ids)
    assert rel(eps, their_eps) <= TOLERANCE
    assert rel(text, their_text) <= TOLERANCE


def test_a_diffusers_peft_file_gives_sdkit_the_same_model(model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    x, t, context, ids = inputs(model)
    pipe = diffusers_twins(model)
    # init_lora_weights=False: B random too (PEFT's default starts B at zero, an update of nothing)
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=list(UNET_LAYERS),
                             alpha_pattern={"to_k": 2})
    text_config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=list(TEXT_LAYERS))
    torch.manual_seed(11)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    their_eps, their_text = their_outputs(pipe, x, t, context, ids)
    base_eps, base_text = outputs(model, x, t, context, ids)
    assert rel(their_eps, base_eps) > 1e-2 and rel(their_text, base_text) > 1e-2
    lora = load_lora(model, tmp_path / "pytorch_lora_weights.safetensors")
    try:
        eps, text = outputs(model, x, t, context, ids)
    finally:
        lora.remove()
    assert rel(eps, their_eps) <= TOLERANCE
    assert rel(text, their_text) <= TOLERANCE


def test_merge_then_unmerge_restores_the_weights(model):
    x, t, context, ids = inputs(model)
    lora = create_lora(model, rank=4, alpha=8.0, layers=UNET_LAYERS, text_encoder_layers=TEXT_LAYERS)
    randomise(lora)
    lora.scale = 0.7
    try:
        hooked = outputs(model, x, t, context, ids)
        weights = {n: target.module.weight.detach().clone() for n, target in lora.targets.items()}
        lora.merge()
        merged = outputs(model, x, t, context, ids)
        lora.unmerge()
        for n, target in lora.targets.items():
            before, after = weights[n], target.module.weight.detach()
            update = (0.7 * lora.layer(n).delta_weight()).view(before.shape)
            # merge rounds W + Δ once (≤ u|W + Δ|), unmerge rounds (W + Δ) - Δ once (≤ u|W|): u = 2^-24
            bound = 2.0**-24 * (2 * before.abs() + update.abs())
            assert bool(((after - before).abs() <= bound).all()), n
            assert (after - before).abs().max().item() <= 1e-6
    finally:
        lora.remove()
    for ours, theirs in zip(merged, hooked):
        assert rel(ours, theirs) <= TOLERANCE       # a merged LoRA computes what the hooks did


# ====================================================================================== the contract, closed form


def test_applied_loras_keep_the_state_dict_and_add_up_exactly(small):
    model = small
    x, t, context, ids = inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = outputs(model, x, t, context, ids)
    first = create_lora(model, rank=3, alpha=6.0, layers=("attn2.to_k", "to_out.0", "proj_in", "proj_out"),
                        text_encoder_layers=("q_proj", "fc2"), name="first")
    second = create_lora(model, rank=2, layers=("to_q", "ff.net.0.proj", "proj_out"), name="second")
    randomise(first, 1)
    randomise(second, 2)
    first.scale, second.scale = 0.5, 1.5
    assert applied_loras(model) == [first, second]
    # while applied, the model's state dict is the same keys and the same values
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
    eps, text = outputs(model, x, t, context, ids)
    # the oracle: a copy of the model with W + s·α/r·B·A written into its weights by hand
    merged_by_hand = build("tiny-test")
    merged_by_hand.load_state_dict(before)
    with torch.no_grad():
        for lora in (first, second):
            for n, target in lora.targets.items():
                layer = lora.layer(n)
                root = model.model.diffusion_model if target.part == "unet" else model.cond_stage_model.transformer
                other = (merged_by_hand.model.diffusion_model if target.part == "unet"
                         else merged_by_hand.cond_stage_model.transformer)
                assert root.get_submodule(target.path) is target.module
                weight = other.get_submodule(target.path).weight
                weight += (lora.scale * layer.alpha / layer.rank * layer.up @ layer.down).view(weight.shape)
    expected_eps, expected_text = outputs(merged_by_hand, x, t, context, ids)
    # float32 sums in another order (x·(W+Δ) vs x·W + (x·A)·B): a few ulps of the largest value
    assert rel(eps, expected_eps) <= 1e-5 and rel(text, expected_text) <= 1e-5
    assert rel(eps, base[0]) > 1e-2 and rel(text, base[1]) > 1e-2
    # scale 0 is the base model exactly; removed, too
    first.scale = second.scale = 0.0
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x, t, context, ids), base))
    first.scale = 1.0
    first.remove()
    second.remove()
    assert applied_loras(model) == []
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x, t, context, ids), base))


def test_files_in_both_layouts_read_back_to_the_same_model(small, tmp_path):
    model = small
    x, t, context, ids = inputs(model)
    lora = create_lora(model, rank=4, alpha=1.0, layers=UNET_LAYERS, text_encoder_layers=TEXT_LAYERS)
    randomise(lora)
    expected = outputs(model, x, t, context, ids)
    kohya = lora.save(tmp_path / "kohya.safetensors")
    diffusers = lora.save(tmp_path / "diffusers.safetensors", layout="diffusers")
    lora.remove()
    state = load_file(kohya)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[f"{name}.lora_down.weight"].shape == (4, 32) and state[f"{name}.alpha"].item() == 1.0
    assert state["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].ndim == 4      # a 1x1 conv
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in load_file(diffusers)
    # kohya names with the CompVis (LDM) paths, as some trainers write them, name the same layers
    compvis = {k.replace("lora_unet_down_blocks_0_attentions_0_", "lora_unet_input_blocks_1_1_"): v
               for k, v in state.items()}
    save_file(compvis, tmp_path / "compvis.safetensors")
    for path in (kohya, diffusers, tmp_path / "compvis.safetensors"):
        loaded = load_lora(model, path)
        got = outputs(model, x, t, context, ids)
        loaded.remove()
        assert all(rel(a, b) <= 1e-6 for a, b in zip(got, expected)), path
    assert read_lora(kohya).layout == "kohya" and read_lora(diffusers).layout == "diffusers"


# ====================================================================================== files that do not fit


def refused(model, path, *words):
    """Loading ``path`` raises a LoRAError whose message has ``words``, and leaves the model untouched."""
    x, t, context, ids = inputs(model)
    base = outputs(model, x, t, context, ids)
    with pytest.raises(LoRAError) as error:
        load_lora(model, path)
    message = str(error.value)
    for word in words:
        assert word in message, message
    assert applied_loras(model) == []
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x, t, context, ids), base))
    return message


def test_files_that_do_not_fit_are_refused_in_words(small, tmp_path):
    model = small
    lora = create_lora(model, rank=2, layers=UNET_LAYERS, text_encoder_layers=TEXT_LAYERS)
    good = load_file(lora.save(tmp_path / "good.safetensors"))
    lora.remove()

    def write(name, state, metadata=None):
        save_file(state, tmp_path / name, metadata=metadata)
        return tmp_path / name

    # an SD 2.x LoRA: its cross-attention keys/values read 1024-wide text states
    sd2 = {k: (torch.zeros(2, 1024) if "attn2_to_k.lora_down" in k or "attn2_to_v.lora_down" in k else v)
           for k, v in good.items()}
    refused(model, write("sd2.safetensors", sd2), "1024", "SD 2.x", "32")
    # a LoRA for a model of another width
    wide = {k: torch.zeros(v.shape[0] * 2, *v.shape[1:]) if "lora_up" in k and "lora_unet" in k else v
            for k, v in good.items()}
    refused(model, write("wide.safetensors", wide), "another size", "[64 x", "[32 x")
    # a full model checkpoint, an embedding, a random file
    refused(model, write("model.safetensors", {f"model.diffusion_model.{k}": v.contiguous()
                                               for k, v in list(model.model.diffusion_model.state_dict().items())[:4]}),
            "full model checkpoint", "load_model")
    refused(model, write("embedding.safetensors", {"emb_params": torch.zeros(1, 32)}), "textual-inversion")
    refused(model, write("other.safetensors", {"weight": torch.zeros(3)}), "not a LoRA file")
    # layers the model does not have: SDXL's second text encoder, ResBlock convs (LoCon)
    sdxl = {**good, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)}
    refused(model, write("sdxl.safetensors", sdxl), "SDXL")
    locon = {**good, "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 32, 3, 3),
             "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    refused(model, write("locon.safetensors", locon), "k×k convs")
    # a damaged file: an up weight without its down weight
    half = {k: v for k, v in good.items() if not k.startswith("lora_te_text_model_encoder_layers_1_mlp_fc2.lora_d")}
    refused(model, write("half.safetensors", half), "incomplete", "lora_te_text_model_encoder_layers_1_mlp_fc2")


def test_a_clip_text_lora_on_a_model_without_clip_is_refused_unless_asked(tmp_path):
    tiny = sdkit.load_model("tiny")              # MiniLM text encoder
    other = build("tiny-test")
    lora = create_lora(other, rank=2, text_encoder_layers=("q_proj",))
    path = lora.save(tmp_path / "clip.safetensors")
    message = refused(tiny, path, "FrozenMiniLMEmbedder", "parts=('unet',)")
    assert "CLIP" in message
    with pytest.raises(LoRAError, match="another size"):          # tiny-test's UNet is not the tiny model's
        load_lora(tiny, path, parts=("unet",))


def test_peft_metadata_alpha_is_read(tmp_path):
    """diffusers keeps PEFT's LoraConfig (lora_alpha, alpha_pattern) in the file's metadata: α/r from there."""
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    state = {f"{name}.to_q.lora_A.weight": down, f"{name}.to_q.lora_B.weight": up,
             f"{name}.to_k.lora_A.weight": down.clone(), f"{name}.to_k.lora_B.weight": up.clone()}
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                     "unet.alpha_pattern": {"to_k": 2}})}
    save_file(state, tmp_path / "peft.safetensors", metadata=metadata)
    layers = read_lora(tmp_path / "peft.safetensors").layers
    assert layers[f"{name}.to_q"].alpha == 8 and layers[f"{name}.to_k"].alpha == 2
    save_file(state, tmp_path / "plain.safetensors")                   # no metadata: α = r, as diffusers reads it
    assert read_lora(tmp_path / "plain.safetensors").layers[f"{name}.to_q"].alpha is None


# ====================================================================================== training and the command line


def test_training_writes_a_lora_file_and_leaves_the_base(tmp_path):
    """``sdkit train`` with the LoRA add-on on the tiny-test model: 2 steps, the file at the end holds the trained
    layers (B moved away from its zero start) and is the add-on's state in the checkpoint; the base is untouched."""
    from sdkit.lora import find_targets
    from sdkit.training import run as run_mod
    from sdkit.training.diffusion import ADDON_STATE_KEY

    torch.manual_seed(1)
    model = build("tiny-test")
    base = model.state_dict()
    expected_layers = {t.kohya_name for t in find_targets(model).values() if t.name.endswith((".to_q", ".proj_out"))}
    torch.save(base, tmp_path / "base.ckpt")
    config = {
        "scale_lr": False,
        "model": {"base_learning_rate": 1.0e-2,
                  "params": {"first_stage_key": "image", "cond_stage_key": "caption", "image_size": 4},
                  "training": {"init_from": str(tmp_path / "base.ckpt"),
                               "addons": {"lora": {"target": "sdkit.lora.training.LoRATraining",
                                                   "params": {"rank": 2, "layers": ["to_q", "proj_out"],
                                                              "dtype": "float32"}}}}},
        "data": {"target": "sdkit.training.DataModule",
                 "params": {"batch_size": 2, "num_workers": 0,
                            "train": {"target": "sdkit.data.shapes.ShapesDataset", "params": {"length": 4, "size": 8}}}},
        "lightning": {"trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False,
                                  "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0},
                      "callbacks": {"image_logger": {"params": {"disabled": True}}}},
    }
    OmegaConf.save(OmegaConf.create(config), tmp_path / "lora.yaml")
    logdir = tmp_path / "logs"
    base_args = ["-b", "tiny-test", "-b", str(tmp_path / "lora.yaml"), "-l", str(logdir)]
    assert run_mod.main([*base_args, "--name", "lora"]) == 0
    (run_dir,) = logdir.iterdir()
    # a run stopped after its first step and resumed trains the same LoRA as the unbroken run
    assert run_mod.main([*base_args, "--name", "first-step", "lightning.trainer.max_steps=1"]) == 0
    (stopped,) = [p for p in logdir.iterdir() if p.name.endswith("first-step")]
    assert run_mod.main(["--resume", str(stopped), "lightning.trainer.max_steps=2"]) == 0
    resumed = load_file(stopped / "lora" / "lora.safetensors")
    unbroken = load_file(run_dir / "lora" / "lora.safetensors")
    assert resumed.keys() == unbroken.keys() and all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)
    lora_file = read_lora(run_dir / "lora" / "lora.safetensors")
    assert lora_file.layout == "kohya" and {w.rank for w in lora_file.layers.values()} == {2}
    assert set(lora_file.layers) == expected_layers     # attn1/attn2 to_q and proj_out of each transformer
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = checkpoint[ADDON_STATE_KEY]
    for name, layer in lora_file.layers.items():
        up = trained[f"addon_modules.lora.{name}.up"]
        assert up.abs().max() > 0 and torch.equal(layer.up, up)
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in base.items() if "num_updates" not in k)


def test_cli_generate_applies_loras(tmp_path):
    """``sdkit generate --lora FILE:SCALE`` (twice) gives the image the Python API gives with the same LoRAs."""
    import numpy as np
    from PIL import Image

    from sdkit.cli import main

    model = sdkit.load_model("tiny")
    files = []
    for seed in (1, 2):
        lora = create_lora(model, rank=2, seed=seed)
        randomise(lora, seed)
        files.append(lora.save(tmp_path / f"lora{seed}.safetensors"))
        lora.remove()
    loras = [load_lora(model, files[0], 0.5), load_lora(model, files[1], 1.5)]
    expected = sdkit.txt2img(model, "a red circle", steps=2, seed=4, guidance_scale=5.0, progress=False).images[0]
    for lora in loras:
        lora.remove()
    plain = sdkit.txt2img(model, "a red circle", steps=2, seed=4, guidance_scale=5.0, progress=False).images[0]
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--steps", "2", "--seed", "4", "--guidance", "5", "--no-watermark",
                 "--no-progress", "--out", str(out), "--lora", f"{files[0]}:0.5", "--lora", f"{files[1]}:1.5"]) == 0
    (png,) = out.iterdir()
    got = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1       # the same computation, 8-bit
    assert np.abs(got - np.asarray(plain, dtype=np.int16)).max() > 8           # and the LoRAs changed the image
    assert main(["generate", "x", "--out", str(out), "--lora", str(tmp_path / "missing.safetensors")]) == 2


def test_the_lora_package_lists_resolvable_names_without_importing_torch():
    import subprocess
    import sys

    import sdkit.lora

    assert sdkit.load_lora is sdkit.lora.load_lora
    for name in sdkit.lora.__all__:
        assert name in dir(sdkit.lora) and getattr(sdkit.lora, name) is not None, name
    code = "import sys, sdkit.lora, sdkit.lora.arguments; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_the_lora_recipe_trains_the_shipped_model():
    """The recipe's model is the shipped tiny model's config (the base the LoRA is made for, from the shipped
    weights), it passes sdkit train's checks, and its LoRA is the documented one: rank 8 on 128 attention
    projections, a float16 kohya file under 1 MB."""
    from sdkit.training.run import check_config

    recipe = sdkit.load_config("recipes/lora/train-tiny-lora")
    check_config(recipe, ["recipes/lora/train-tiny-lora"])
    shipped = sdkit.load_config("tiny").model.params
    params = {k: v for k, v in recipe.model.params.items() if k not in ("ucg_probability", "use_ema")}
    assert OmegaConf.to_container(OmegaConf.create(params)) == OmegaConf.to_container(
        OmegaConf.create({k: v for k, v in shipped.items() if k != "use_ema"}))
    assert recipe.model.training.init_from == "data/tiny.safetensors"
    lora_params = recipe.model.training.addons.lora.params
    model = sdkit.load_model("tiny")
    lora = create_lora(model, lora_params.rank, layers=tuple(lora_params.layers))
    assert len(lora.targets) == 128 and lora.rank == 8
    n_values = sum(p.numel() for p in lora.parameters())
    assert 2 * n_values < 1_000_000          # float16: 2 bytes a value (the file adds a small header)
