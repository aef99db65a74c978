"""Where each word of a prompt sits among the text encoder's tokens, and how two prompts' tokens line up.

Attention maps are per *token*: a word may be several tokens (CLIP's BPE cuts "triangles" into "tri" + "angles"),
and position 0 is the start token. Both of the kit's tokenizers (CLIP BPE for SD v1, WordPiece for the MiniLM
encoder of the small model) split text into words before cutting them into pieces, so a word's pieces are found
by tokenizing it alone, and a prompt's words (split at whitespace) take consecutive positions from 1 on.

:func:`token_alignment` lines up a source and an edited prompt for prompt-to-prompt (Hertz et al. 2022): words
the two share keep their place, a word swapped for another takes the replaced word's attention, and words only
the edited prompt has keep their own.
"""
from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass

import torch

# tokenizer -> {word: number of tokens}; weak keys, so a freed tokenizer's counts go with it
_PIECE_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Word:
    """One whitespace-separated word of a prompt and the token positions of its pieces."""
    text: str
    tokens: tuple[int, ...]


def _encoder(model):
    encoder = getattr(model, "cond_stage_model", model)
    if not hasattr(encoder, "tokenizer") or not hasattr(encoder, "max_length"):
        raise TypeError(f"{type(encoder).__name__} has no tokenizer: word maps need a text-conditioned model "
                        "(its cond_stage_model with .tokenizer and .max_length, e.g. CLIP or MiniLM)")
    return encoder


def piece_count(tokenizer, word: str) -> int:
    """How many tokens ``word`` becomes on its own (less the start and end tokens)."""
    counts = _PIECE_COUNTS.setdefault(tokenizer, {})
    if word not in counts:
        mask = tokenizer([word], max_length=1024, truncation=True, padding="longest",
                         return_tensors="pt")["attention_mask"][0]
        counts[word] = int(mask.sum()) - 2
    return counts[word]


def prompt_words(model, prompt: str) -> list[Word]:
    """The words of ``prompt`` with their token positions in the encoder's sequence (``model``: a LatentDiffusion
    or its text encoder). A prompt longer than the encoder takes is refused: its last words would have no maps."""
    encoder = _encoder(model)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    words, position = [], 1                                          # position 0: the start token
    for text in prompt.split():
        n = piece_count(encoder.tokenizer, text)
        words.append(Word(text, tuple(range(position, position + n))))
        position += n
    if position >= encoder.max_length:                               # the end token must fit too
        raise ValueError(f"the prompt {prompt!r} is {position + 1} tokens long, but the text encoder takes "
                         f"{encoder.max_length}; shorten it")
    return words


@dataclass(frozen=True)
class TokenAlignment:
    """How the edited prompt's token maps come from the source's: edited token n takes Σ_w A_src[w]·mapper[w, n]
    where ``taken[n]`` is 1, and keeps its own map where it is 0 (a word only the edited prompt has). A swapped
    word's tokens share the replaced word's total attention."""
    mapper: torch.Tensor     # [tokens, tokens] source token -> edited token
    taken: torch.Tensor      # [tokens] 1 where the edited token's map comes from the source


def _link(mapper: torch.Tensor, taken: torch.Tensor, source: tuple[int, ...], edited: tuple[int, ...]) -> None:
    """Edited tokens ``edited`` take the attention of source tokens ``source``: pairwise when the counts agree,
    else each source token spreads its attention evenly over the edited word's tokens."""
    if not source or not edited:
        return
    if len(source) == len(edited):
        for s, e in zip(source, edited):
            mapper[s, e] = 1.0
    else:
        for s in source:
            mapper[s, list(edited)] = 1.0 / len(edited)
    taken[list(edited)] = 1.0


def token_alignment(model, source: str, edited: str) -> TokenAlignment:
    """Align ``edited`` to ``source`` word by word (difflib's longest matching blocks):

    - equal words, and the start token, take the source's maps token for token;
    - a run of swapped words of the same length (word swap: "red" → "blue") takes the replaced words' maps;
    - inserted words, or a run replaced by a run of another length (refinement), keep their own maps;
    - the tokens after the last word (end token and padding) take the source's tokens after its last word, in
      order (the last source position once those run out).
    """
    length = _encoder(model).max_length
    src, dst = prompt_words(model, source), prompt_words(model, edited)
    mapper, taken = torch.zeros(length, length), torch.zeros(length)
    _link(mapper, taken, (0,), (0,))
    matcher = difflib.SequenceMatcher(a=[w.text.lower() for w in src], b=[w.text.lower() for w in dst],
                                      autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and a1 - a0 == b1 - b0):
            for s, e in zip(src[a0:a1], dst[b0:b1]):
                _link(mapper, taken, s.tokens, e.tokens)
    src_end = 1 + sum(len(w.tokens) for w in src)
    dst_end = 1 + sum(len(w.tokens) for w in dst)
    for k, e in enumerate(range(dst_end, length)):
        _link(mapper, taken, (min(src_end + k, length - 1),), (e,))
    return TokenAlignment(mapper, taken)


__all__ = ["TokenAlignment", "Word", "piece_count", "prompt_words", "token_alignment"]
