"""Build a `tokenizers.Tokenizer` from the tokenizer a GGUF file describes in its metadata.

A GGUF carries no tokenizer.json: llama.cpp's converter stores the vocabulary (`tokenizer.ggml.tokens`),
each token's kind (`token_type`), the BPE merges or the sentencepiece scores, the special token ids,
and a name for the pre-tokenizer (`tokenizer.ggml.pre`). This module turns that back into the
tokenizer the model was trained with:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE from tokens + merges. The pre-tokenizer (how text
  is cut into words before BPE) is not stored, only its name, so it comes from a table below that
  mirrors the regexes llama.cpp and the models' own tokenizer.json files use.
- `tokenizer.ggml.model == "llama"`: sentencepiece-style BPE with byte fallback; its merges are
  implied by the scores (a pair merges if the joined piece is in the vocabulary; higher score first).

Tokens typed control (3) become special added tokens and user-defined ones (4) plain added tokens,
so they are matched whole in text instead of being cut into pieces. Token ids are the file's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import ModelFileError, UnsupportedModelError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPIECE_SPACE = "\u2581"  # "▁", sentencepiece's spelling of a space
# Sentencepiece pieces are at most 16 characters by default; longer tokens are user-defined
# ones, never built by merging. The cap keeps deriving merges linear in the vocabulary size.
MAX_MERGED_PIECE_CHARS = 64

# Word-splitting regexes, applied before BPE. GPT-2's is the one `pre_tokenizers.ByteLevel` applies
# by itself (use_regex=True); the others replace it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _BPEStyle:
    """How a byte-level BPE vocabulary cuts text before merging, named by `tokenizer.ggml.pre`."""

    split: str | None = None      # regex replacing GPT-2's; None keeps GPT-2's
    digits: bool = False          # put every digit on its own before the GPT-2 split (StarCoder family)
    nfc: bool = False             # NFC-normalise first (Qwen2's tokenizer.json does)
    ignore_merges: bool = False   # a word that is itself a token is taken whole (Llama 3)
    add_bos: bool = False         # llama.cpp's default when the file has no add_bos_token flag


_GPT2 = _BPEStyle()
_LLAMA3 = _BPEStyle(split=LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_QWEN2 = _BPEStyle(split=QWEN2_SPLIT, nfc=True)
_DIGITS_THEN_GPT2 = _BPEStyle(digits=True)

# Only names whose splitting is known exactly; any other name is refused rather than guessed,
# because a wrong split gives plausible-looking but different token ids.
BPE_PRE_TOKENIZERS: dict[str, _BPEStyle] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "pixtral": _LLAMA3,
    "dbrx": _BPEStyle(split=LLAMA3_SPLIT),
    "smaug-bpe": _BPEStyle(split=LLAMA3_SPLIT),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
}


@dataclass
class GGUFTokenizer:
    tokenizer: Tokenizer
    config: dict  # tokenizer_config.json fields: special token strings, add_bos/eos, chat_template


def build_tokenizer(metadata: Mapping[str, Any], path: str | os.PathLike) -> GGUFTokenizer:
    """The tokenizer described by a GGUF file's `tokenizer.*` metadata (plain Python values)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelFileError(path, "has no tokenizer: metadata key 'tokenizer.ggml.model' is missing")
    tokens = _string_list(metadata, "tokenizer.ggml.tokens", path, required=True)
    token_types = _int_list(metadata, "tokenizer.ggml.token_type", path, len(tokens))
    special_ids = {
        name: _token_id(metadata, f"tokenizer.ggml.{key}", len(tokens), path)
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("unk", "unknown_token_id"), ("pad", "padding_token_id"))
    }
    add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix")

    if kind == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        style = BPE_PRE_TOKENIZERS.get(pre) if isinstance(pre, str) else None
        if style is None:
            raise UnsupportedModelError(
                f"{os.fspath(path)}: byte-level BPE tokenizer with pre-tokenizer '{pre}' is not supported "
                f"(supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))})"
            )
        merges = _merges(metadata, path)
        if merges is None:
            raise ModelFileError(path, "byte-level BPE tokenizer has no 'tokenizer.ggml.merges'")
        tokenizer = _byte_level_bpe(tokens, merges, style, bool(add_space_prefix), path)
        default_add_bos = style.add_bos
    elif kind == "llama":
        merges = _merges(metadata, path)
        if merges is None:
            scores = _float_list(metadata, "tokenizer.ggml.scores", path, len(tokens))
            if scores is None:
                raise ModelFileError(
                    path, "sentencepiece tokenizer has neither 'tokenizer.ggml.merges' nor 'tokenizer.ggml.scores'"
                )
            merges = merges_from_scores(tokens, scores, token_types)
        unk_id = special_ids["unk"]
        tokenizer = _sentencepiece_bpe(
            tokens, merges, tokens[unk_id] if unk_id is not None else None,
            True if add_space_prefix is None else bool(add_space_prefix), path,
        )
        default_add_bos = True  # llama.cpp adds BOS to a sentencepiece vocabulary unless told otherwise
    else:
        raise UnsupportedModelError(
            f"{os.fspath(path)}: tokenizer model '{kind}' is not supported (supported: gpt2, llama)")

    _add_typed_tokens(tokenizer, tokens, token_types, special_ids)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and special_ids[name] is None:
            raise ModelFileError(path, f"tokenizer asks to add a {name.upper()} token but defines no {name} token id")
    tokenizer.post_processor = _post_processor(tokens, special_ids, add_bos, add_eos, byte_level=kind == "gpt2")

    config: dict[str, Any] = {
        f"{name}_token": tokens[token_id] if token_id is not None else None for name, token_id in special_ids.items()
    }
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = add_eos
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise ModelFileError(path, "metadata 'tokenizer.chat_template' is not a string")
        config["chat_template"] = chat_template
    return GGUFTokenizer(tokenizer=tokenizer, config=config)


def merges_from_scores(tokens: list[str], scores: list[float], token_types: list[int] | None) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges the pair whose joined piece scores highest; as ranked BPE merges that
    is every split of a vocabulary piece into two vocabulary pieces, best joined score first.
    Only normal tokens take part: control, byte and user-defined tokens are never built by merging."""
    normal = [
        index for index in range(len(tokens))
        if token_types is None or token_types[index] == NORMAL
    ]
    pieces = {}
    for index in normal:
        pieces.setdefault(tokens[index], index)
    ranked = []
    for index in normal:
        token = tokens[index]
        if pieces[token] != index or len(token) > MAX_MERGED_PIECE_CHARS:
            continue  # a duplicate spelling (the first one is the token), or too long to be a merge
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in pieces and right in pieces:
                ranked.append((-scores[index], index, pieces[left], (left, right)))
    ranked.sort()
    return [merge for *_, merge in ranked]


def _byte_level_bpe(tokens, merges, style: _BPEStyle, add_space_prefix: bool, path) -> Tokenizer:
    bpe = _bpe_model(path, vocab=_vocab(tokens), merges=merges, ignore_merges=style.ignore_merges)
    tokenizer = Tokenizer(bpe)
    steps = []
    if style.nfc:
        steps.append(normalizers.NFC())
    split_first = style.split is not None or style.digits
    if add_space_prefix and split_first:
        # ByteLevel's own add_prefix_space would add a space to every piece of an earlier split.
        steps.append(normalizers.Prepend(" "))
    if steps:
        tokenizer.normalizer = steps[0] if len(steps) == 1 else normalizers.Sequence(steps)
    if style.split is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(style.split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_space_prefix and not split_first, use_regex=True)
        tokenizer.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if style.digits else byte_level
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens, merges, unk_token: str | None, add_space_prefix: bool, path) -> Tokenizer:
    bpe = _bpe_model(path, vocab=_vocab(tokens), merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    # Spaces are spelled "▁"; like llama.cpp, every stretch of text between special tokens gets a
    # leading one when add_space_prefix is on (normalizers run on each such stretch separately).
    spaces = normalizers.Replace(" ", SPIECE_SPACE)
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), spaces]) if add_space_prefix else spaces
    )
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _bpe_model(path, **kwargs) -> models.BPE:
    try:
        return models.BPE(**kwargs)
    except Exception as error:  # tokenizers raises plain Exception for a merge outside the vocabulary
        raise ModelFileError(path, f"cannot build the BPE tokenizer from its tokens and merges: {error}") from None


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a repeated spelling keeps its first id
    return vocab


def _add_typed_tokens(tokenizer: Tokenizer, tokens, token_types, special_ids) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens:
    both are then matched whole in the raw text, as llama.cpp does. A file without token types
    gets its declared special tokens (bos, eos, unk, pad) treated as control."""
    user_defined = []
    if token_types is None:
        special = {token_id for token_id in special_ids.values() if token_id is not None}
    else:
        special = set()
        for index, token_type in enumerate(token_types):
            if token_type in (CONTROL, UNKNOWN):
                special.add(index)
            elif token_type == USER_DEFINED:
                user_defined.append(index)
    vocab = tokenizer.get_vocab()
    # Added tokens must reuse the file's ids: only spellings the vocabulary maps to that same id.
    tokenizer.add_special_tokens([
        AddedToken(tokens[index], special=True, normalized=False)
        for index in sorted(special) if tokens[index] and vocab.get(tokens[index]) == index
    ])
    tokenizer.add_tokens([
        AddedToken(tokens[index], special=False, normalized=False)
        for index in user_defined if tokens[index] and vocab.get(tokens[index]) == index
    ])


def _post_processor(tokens, special_ids, add_bos: bool, add_eos: bool, *, byte_level: bool):
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    specials, bos, eos = [], [], []
    for name, on, pieces in (("bos", add_bos, bos), ("eos", add_eos, eos)):
        if on:
            token = tokens[special_ids[name]]
            # A template names a special token by a key that must not hold ':' or start with '$'.
            key = token if ":" not in token and not token.startswith("$") else name.upper()
            specials.append({"id": key, "ids": [special_ids[name]], "tokens": [token]})
            pieces.append(key)
    single = [*bos, "$A:0", *eos]
    pair = [*single, *(f"{key}:1" for key in bos), "$B:1", *(f"{key}:1" for key in eos)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _merges(metadata, path) -> list[tuple[str, str]] | None:
    merges = _string_list(metadata, "tokenizer.ggml.merges", path, required=False)
    if merges is None:
        return None
    pairs = []
    for number, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ModelFileError(path, f"tokenizer merge #{number} {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _string_list(metadata, key, path, *, required: bool) -> list[str] | None:
    value = metadata.get(key)
    if value is None:
        if required:
            raise ModelFileError(path, f"missing required metadata key '{key}'")
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ModelFileError(path, f"metadata '{key}' is not an array of strings")
    if required and not value:
        raise ModelFileError(path, f"metadata '{key}' is empty")
    return value


def _int_list(metadata, key, path, length: int) -> list[int] | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, int) for v in value):
        raise ModelFileError(path, f"metadata '{key}' is not an array of {length} integers (one per token)")
    return value


def _float_list(metadata, key, path, length: int) -> list[float] | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, (int, float)) for v in value):
        raise ModelFileError(path, f"metadata '{key}' is not an array of {length} numbers (one per token)")
    return value


def _token_id(metadata, key, vocab_size: int, path) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ModelFileError(path, f"metadata '{key}' = {value!r} is not a token id below the vocabulary "
                                   f"size {vocab_size}")
    return value
