"""The CLIP byte-level BPE tokenizer that feeds the Stable Diffusion v1 text encoder.

A re-implementation of OpenAI CLIP's `SimpleTokenizer` (the tokenizer behind openai/clip-vit-large-patch14):

1. clean the text: ftfy.fix_text, HTML unescape (twice), collapse runs of whitespace, lowercase;
2. split it into words with CLIP's regex (letters runs, single digits, punctuation runs, 's 't 're ... );
3. map each word's UTF-8 bytes to printable characters (`bytes_to_unicode`) and apply the BPE merges from
   `sdkit/assets/bpe_simple_vocab_16e6.txt.gz` (48,894 merges; the last piece of a word ends in "</w>").

Ids: 0-255 single bytes, 256-511 single bytes ending a word, then one id per merge, then
<|startoftext|> = 49406 and <|endoftext|> = 49407: 49,408 ids in all. A prompt becomes
[BOS, ids..., EOS] padded with EOS (49407) to 77, exactly what Hugging Face's CLIPTokenizer for SD v1 returns.
Unlike CompVis (silent truncation), a prompt over the limit raises a `PromptTruncatedWarning` that quotes the cut words.
"""

from __future__ import annotations

import functools
import gzip
import html
import warnings
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_PATH = Path(__file__).resolve().parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
PAD_ID = EOS_ID  # SD v1's tokenizer (openai/clip-vit-large-patch14) pads with <|endoftext|>, not 0 like clip.tokenize
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # CLIP uses the first 48,894 merges of the file

# CLIP's word pattern: special tokens, English contractions, runs of letters, one digit, runs of other symbols.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")
_CACHE_LIMIT = 200_000  # distinct words kept in the BPE cache before it is emptied


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; its end was dropped."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable character, so BPE never sees spaces or control bytes.

    Printable Latin-1 bytes map to themselves; the other 68 get the characters from U+0100 on, in byte order.
    The dict order (printable bytes first, then the others) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """CLIP's text normalisation: fix mojibake, unescape HTML entities, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return WHITESPACE.sub(" ", text.strip()).strip().lower()


@functools.lru_cache(maxsize=4)
def _load_vocab(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Read the merges file once per process; return (piece -> id, merge pair -> rank)."""
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"The CLIP BPE vocabulary {path} is missing. It ships inside sdkit (sdkit/assets); reinstall sdkit, "
            "or pass vocab_path= pointing at a copy of bpe_simple_vocab_16e6.txt.gz."
        ) from None
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    pieces = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {piece: i for i, piece in enumerate(pieces)}
    ranks = {pair: i for i, pair in enumerate(merges)}
    return encoder, ranks


class CLIPTokenizer:
    """OpenAI CLIP BPE tokenizer; `tok(["a cat"])["input_ids"]` is the [B, 77] tensor SD v1 feeds its text encoder.

    encode(text) -> ids without BOS/EOS; decode(ids) -> text (word ends become spaces, as in CLIP).
    transformers' CLIPTokenizer gives the same ids except on rare text: version 5 skips ftfy and HTML unescaping
    (mojibake, "&amp;"); 4.x unescapes only through ftfy, which leaves entities alone in text with a literal "<".
    """

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = PAD_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, vocab_path: str | Path | None = None, max_length: int = 77):
        self.encoder, self.bpe_ranks = _load_vocab(str(vocab_path or VOCAB_PATH))
        self.decoder = {i: piece for piece, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.max_length = max_length
        self._cache: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return VOCAB_SIZE

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-split word (given as byte characters), merging the lowest-ranked pair first."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if word in ("<|startoftext|>", "<|endoftext|>"):  # typed special tokens stay special, as in CLIP
            return (self.encoder[word],)
        parts = [*word[:-1], word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(parts) > 1:
            best, best_rank = None, N_MERGES
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair, N_MERGES)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence, left to right, without overlaps
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = tuple(self.encoder[p] for p in parts)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <|startoftext|>/<|endoftext|>."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode takes a str, got {type(text).__name__}.")
        ids: list[int] = []
        byte_encoder = self.byte_encoder
        for word in WORD_PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids("".join(byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids) -> str:
        """Text of `ids` (list or 1-D tensor); each word is followed by a space, special tokens are kept."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        try:
            chars = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as err:
            raise ValueError(f"Token id {err.args[0]} is outside the CLIP vocabulary (0..{VOCAB_SIZE - 1}).") from None
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(
        self,
        texts: str | list[str],
        max_length: int | None = None,
        padding: str = "max_length",
        truncation: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        """Batch-encode prompts as [BOS, ids..., EOS, PAD...].

        Returns {"input_ids": LongTensor [B, L], "attention_mask": LongTensor [B, L]} with L = max_length
        (padding="max_length") or the longest prompt (padding="longest"). The mask is 1 from BOS to EOS.
        A prompt over max_length keeps BOS, its first max_length-2 tokens and EOS, and warns with the cut words;
        with truncation=False it raises instead.
        """
        if isinstance(texts, str):
            texts = [texts]
        max_length = self.max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for <|startoftext|> and <|endoftext|>.")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding={padding!r}: use 'max_length' (SD v1) or 'longest'.")
        if return_tensors != "pt":
            raise ValueError("Only return_tensors='pt' is supported.")
        rows = []
        for text in texts:  # a plain loop keeps the warning's stacklevel right on every Python version
            rows.append(self._with_specials(text, max_length, truncation))
        width = max_length if padding == "max_length" else max((len(r) for r in rows), default=2)
        input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _with_specials(self, text: str, max_length: int, truncation: bool) -> list[int]:
        ids = [BOS_ID, *self.encode(text), EOS_ID]
        if len(ids) <= max_length:
            return ids
        cut = self.decode(ids[max_length - 1 : -1]).strip()
        message = f'Prompt is {len(ids)} tokens, over the {max_length}-token limit; the end was cut: "{cut}"'
        if not truncation:
            raise ValueError(message.replace("the end was cut", "shorten it by") + ".")
        warnings.warn(message, PromptTruncatedWarning, stacklevel=3)
        return ids[: max_length - 1] + [EOS_ID]
