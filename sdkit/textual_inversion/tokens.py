"""New words for a text encoder: a placeholder name becomes N new tokens whose embeddings are learned vectors.

Installed into one of the kit's text encoders (sdkit's CLIP for SD v1, the frozen MiniLM of the small model), a
prompt naming a placeholder gets N new token ids where the name was, and those ids embed to the N vectors; every
other token goes through the encoder as before. Two small pieces do it, so neither the encoder's code nor its
checkpoint keys change:

- :class:`PlaceholderTokenizer` wraps the encoder's tokenizer. A prompt without placeholders goes to the original
  tokenizer untouched; a prompt with some is tokenized piece by piece around them, each placeholder giving its ids
  (from the vocabulary size V on), in the encoder's layout (start, tokens, end, padding) and length limit.
- :class:`AddedTokenEmbedding` takes the place of the token-embedding module and shares its weight, so the state-dict
  key stays ``...token_embedding.weight``: ids below V embed as before, ids from V on are the added vectors.

The vectors live in an :class:`AddedTokens` module, one Parameter per placeholder, outside the encoder's state
dict. Only they train (``sdkit.training.textual_inversion``): the embedding table is never written.

A placeholder is matched in a prompt regardless of case (both tokenizers lowercase text), and where it starts or
ends with a letter or digit, only as a whole word ("<hexagon>" in "two <hexagon>s" matches; "hex" in "hexagon"
does not).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.tokenizer import PromptTruncatedWarning


class AddedTokens(nn.Module):
    """The added vectors of one text encoder: for each placeholder name, a Parameter [N, width].

    Ids: the vocabulary size V, then V + 1, ... in the order the names were added (removing one renumbers the
    later ones; ids are made afresh at every tokenization)."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.vocab_size, self.width = int(vocab_size), int(width)
        self.names: list[str] = []
        self.vectors = nn.ParameterList()
        self._pattern: re.Pattern | None = None

    def __len__(self) -> int:
        return sum(int(v.shape[0]) for v in self.vectors)

    def add(self, name: str, vectors: torch.Tensor, trainable: bool = False) -> nn.Parameter:
        param = nn.Parameter(vectors.detach().clone(), requires_grad=trainable)
        self.names.append(name)
        self.vectors.append(param)
        self._pattern = None
        return param

    def remove(self, name: str) -> None:
        k = self.index(name)
        kept = [v for i, v in enumerate(self.vectors) if i != k]
        self.names.pop(k)
        self.vectors = nn.ParameterList(kept)
        self._pattern = None

    def index(self, name: str) -> int:
        lowered = [n.lower() for n in self.names]
        if name.lower() not in lowered:
            raise KeyError(f"no embedding named {name!r} is loaded; loaded: {self.names}")
        return lowered.index(name.lower())

    def ids(self, name: str) -> list[int]:
        k = self.index(name)
        start = self.vocab_size + sum(int(v.shape[0]) for v in list(self.vectors)[:k])
        return list(range(start, start + int(self.vectors[k].shape[0])))

    def table(self) -> torch.Tensor:
        """All added vectors, [len(self), width], row i for id V + i."""
        return torch.cat(list(self.vectors)) if len(self.vectors) else torch.zeros(0, self.width)

    def name_of(self, token_id: int) -> tuple[str, int]:
        """(placeholder, which of its vectors) of an added id."""
        offset = int(token_id) - self.vocab_size
        for name, v in zip(self.names, self.vectors):
            if offset < v.shape[0]:
                return name, offset
            offset -= int(v.shape[0])
        raise IndexError(f"token id {token_id} is not an added token (they are {self.vocab_size}.."
                         f"{self.vocab_size + len(self) - 1})")

    def pattern(self) -> re.Pattern | None:
        """A regex matching any placeholder (longest first, whole words where the name starts/ends with one)."""
        if self._pattern is None and self.names:
            def one(name: str) -> str:
                before = r"(?<!\w)" if re.match(r"\w", name[0]) else ""
                after = r"(?!\w)" if re.match(r"\w", name[-1]) else ""
                return before + re.escape(name) + after
            names = sorted(self.names, key=len, reverse=True)
            self._pattern = re.compile("|".join(one(n) for n in names), re.IGNORECASE)
        return self._pattern

    def find(self, text) -> bool:
        pattern = self.pattern()
        return pattern is not None and isinstance(text, str) and pattern.search(text) is not None


class AddedTokenEmbedding(nn.Embedding):
    """A token embedding that also embeds the added ids (V and up) to the added vectors.

    It shares the original module's ``weight`` Parameter (same key, same storage, never written) and holds the
    :class:`AddedTokens` as a plain attribute, so they stay out of the encoder's state dict but follow ``.to()``."""

    def __init__(self, base: nn.Embedding, added: AddedTokens):
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                     "sparse"):
            setattr(self, attr, getattr(base, attr))
        self.weight = base.weight
        object.__setattr__(self, "added", added)     # not a child module: see the class docstring

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.added._apply(fn, *args, **kwargs)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_added = ids >= self.num_embeddings
        if not bool(is_added.any()):
            return super().forward(ids)
        if int(ids.max()) >= self.num_embeddings + len(self.added):
            raise IndexError(f"token id {int(ids.max())} is past the {len(self.added)} added tokens")
        base = super().forward(ids.masked_fill(is_added, 0))
        rows = (ids - self.num_embeddings).clamp(min=0)
        extra = F.embedding(rows, self.added.table().to(base.dtype))
        return torch.where(is_added.unsqueeze(-1), extra, base)   # gradient reaches only the added rows used

    def plain(self) -> nn.Embedding:
        """A plain nn.Embedding sharing this one's weight (to put back when no token is added any more)."""
        module = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm,
                              self.norm_type, self.scale_grad_by_freq, self.sparse, _weight=self.weight.data)
        module.weight = self.weight
        return module

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, added={len(self.added)} ({', '.join(self.added.names)})"


@dataclass(frozen=True)
class TokenLayout:
    """How a tokenizer lays out one prompt: start id, its tokens, end id, padding id; and its call defaults."""
    start: int
    end: int
    pad: int
    encode: Callable[[str], list[int]]          # text -> ids, without start/end
    token_type_ids: bool                        # BERT-style outputs carry token_type_ids (all 0)
    warns: bool                                 # the tokenizer itself warns about a cut prompt (CLIP's does)
    specials_in_encode: bool                    # encode() adds start/end by default (transformers' tokenizers)
    defaults: dict = field(default_factory=dict)


OPTIONS = ("max_length", "padding", "truncation", "return_tensors")


class PlaceholderTokenizer:
    """The encoder's tokenizer with placeholders expanded to their added ids (see the module docstring).

    Called like the tokenizer it wraps; anything else (``decode`` aside) is the wrapped tokenizer's."""

    def __init__(self, base, added: AddedTokens, layout: TokenLayout):
        self.__dict__.update(base=base, added=added, layout=layout)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["base"], name)

    def __len__(self) -> int:
        return len(self.base) + len(self.added)

    def _plain_ids(self, text: str) -> list[int]:
        ids, last = [], 0
        for match in self.added.pattern().finditer(text):
            ids += self.layout.encode(text[last:match.start()]) + self.added.ids(match.group())
            last = match.end()
        return ids + self.layout.encode(text[last:])

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        if not self.added.find(text):
            return self.base.encode(text, *args, **kwargs)
        ids = self._plain_ids(text)
        if kwargs.get("add_special_tokens", self.layout.specials_in_encode):
            ids = [self.layout.start, *ids, self.layout.end]
        return ids

    def decode(self, ids, *args, **kwargs) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        vocab = self.added.vocab_size
        if all(int(i) < vocab for i in ids):
            return self.base.decode(ids, *args, **kwargs)
        pieces, run = [], []
        for i in map(int, ids):
            if i < vocab:
                run.append(i)
                continue
            if run:
                pieces.append(self.base.decode(run, *args, **kwargs).strip())
                run = []
            name, k = self.added.name_of(i)
            if k == 0:
                pieces.append(name)
        if run:
            pieces.append(self.base.decode(run, *args, **kwargs).strip())
        return " ".join(p for p in pieces if p)

    def __call__(self, texts, *args, **kwargs):
        many = not isinstance(texts, str)
        items = list(texts) if many else [texts]
        if not any(self.added.find(t) for t in items):
            return self.base(texts, *args, **kwargs)                  # no placeholder: exactly the original
        unknown = sorted(set(kwargs) - set(OPTIONS))
        if args or unknown:
            raise TypeError(f"with placeholders in the prompt, the tokenizer takes only the keyword options "
                            f"{list(OPTIONS)}; got {len(args)} positional and {unknown}")
        options = {**self.layout.defaults, **kwargs}
        max_length, padding = options["max_length"], options["padding"]
        rows = [self._row(text, max_length, options["truncation"]) for text in items]
        if padding == "max_length" and max_length is not None:
            width = max_length
        elif padding in ("max_length", "longest", True):
            width = max(len(r) for r in rows)
        else:
            width = None
        masks = [[1] * len(r) + [0] * ((width or len(r)) - len(r)) for r in rows]
        rows = [r + [self.layout.pad] * ((width or len(r)) - len(r)) for r in rows]
        out = {"input_ids": rows, "attention_mask": masks}
        if self.layout.token_type_ids:
            out["token_type_ids"] = [[0] * len(r) for r in rows]
        if options["return_tensors"] == "pt":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("prompts of different lengths cannot make one tensor; pass padding='longest'")
            return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        if options["return_tensors"] is not None:
            raise ValueError(f"return_tensors={options['return_tensors']!r}: only 'pt' or None")
        return out if many else {k: v[0] for k, v in out.items()}

    def _row(self, text: str, max_length: int | None, truncation) -> list[int]:
        ids = [self.layout.start, *self._plain_ids(text), self.layout.end]
        if max_length is None or len(ids) <= max_length:
            return ids
        cut = self.decode(ids[max_length - 1:-1]).strip()
        message = f'Prompt is {len(ids)} tokens, over the {max_length}-token limit; the end was cut: "{cut}"'
        if not truncation or truncation == "do_not_truncate":
            raise ValueError(message.replace("the end was cut", "shorten it by") + ".")
        if self.layout.warns:
            warnings.warn(message, PromptTruncatedWarning, stacklevel=4)
        return ids[:max_length - 1] + [self.layout.end]
