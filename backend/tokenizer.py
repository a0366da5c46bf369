"""The tokenizer: Hugging Face ``tokenizers`` plus the model's special tokens and chat template.

Special tokens come from ``tokenizer_config.json`` (falling back to ``special_tokens_map.json``)
and ``generation_config.json``. Whether ``encode`` adds BOS follows the config's
``add_bos_token`` where it says, else what tokenizer.json's post-processor does; either way BOS
is never added in front of text that already starts with it. Other post-processor tokens (a
BERT-style ``[SEP]``) are not added: this is a tokenizer for causal language models.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import tokenizers
from tokenizers.decoders import DecodeStream

from .chat_template import ChatTemplate
from .errors import ChatTemplateError, ModelFileError

NO_CHAT_TEMPLATE = "this model has no chat template; use generate() with a plain prompt"


class Tokenizer:
    """A model's tokenizer. Build it with ``from_dir`` (a Hugging Face model directory) or
    ``from_parts`` (tokenizer.json text and config dicts, e.g. rebuilt from a GGUF file)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        origin: str,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None,
        unk_token: str | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
        add_eos: bool,
        chat_templates: dict[str, ChatTemplate],
    ):
        self.backend = backend
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_ids = eos_token_ids
        self.pad_token = pad_token
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token is not None else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.add_bos = add_bos and self.bos_token_id is not None
        self.add_eos = add_eos and bool(eos_token_ids)
        self.chat_templates = chat_templates
        self._ids_containing: dict[tuple[str, ...], list[int]] = {}
        self.chat_template: ChatTemplate | None = chat_templates.get("default") or next(iter(chat_templates.values()), None)

    # -- loading ------------------------------------------------------------------------------

    # every file from_dir reads (a converter copies these)
    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "chat_template.jinja", "chat_template.json")

    @classmethod
    def from_dir(cls, model_dir) -> Tokenizer:
        model_dir = os.fspath(model_dir)
        tokenizer_path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(tokenizer_path):
            raise ModelFileError(model_dir, "tokenizer.json is missing; trimtab needs the fast-tokenizer file tokenizer.json")
        tokenizer_json = _read_text(tokenizer_path)
        config = _read_json_object(os.path.join(model_dir, "tokenizer_config.json")) or {}
        special_tokens_map = _read_json_object(os.path.join(model_dir, "special_tokens_map.json")) or {}
        generation_config = _read_json_object(os.path.join(model_dir, "generation_config.json"))

        # A chat template may live in its own file; newer files take precedence, as in transformers.
        template_origin = f"{os.path.join(model_dir, 'tokenizer_config.json')} (chat_template)"
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        json_path = os.path.join(model_dir, "chat_template.json")
        if os.path.isfile(jinja_path):
            config = {**config, "chat_template": _read_text(jinja_path)}
            template_origin = jinja_path
        elif os.path.isfile(json_path):
            template_file = _read_json_object(json_path)
            if "chat_template" not in template_file:
                raise ModelFileError(json_path, "has no 'chat_template' key")
            config = {**config, "chat_template": template_file["chat_template"]}
            template_origin = json_path

        specials = {key: value for key, value in special_tokens_map.items() if value is not None}
        specials.update((key, value) for key, value in config.items() if value is not None)
        return cls._create(
            tokenizer_json,
            specials,
            generation_config,
            origin=tokenizer_path,
            template_origin=template_origin,
            generation_origin=os.path.join(model_dir, "generation_config.json"),
        )

    @classmethod
    def from_parts(
        cls,
        tokenizer_json: str,
        tokenizer_config: dict,
        generation_config: dict | None = None,
        *,
        origin: str,
    ) -> Tokenizer:
        return cls._create(
            tokenizer_json,
            dict(tokenizer_config or {}),
            generation_config,
            origin=origin,
            template_origin=f"{origin} (chat_template)",
            generation_origin=f"{origin} (generation_config)",
        )

    @classmethod
    def _create(
        cls,
        tokenizer_json: str,
        config: dict,
        generation_config: dict | None,
        *,
        origin: str,
        template_origin: str,
        generation_origin: str,
    ) -> Tokenizer:
        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as error:  # the tokenizers library raises plain Exceptions
            try:
                json.loads(tokenizer_json)
            except json.JSONDecodeError as json_error:
                raise ModelFileError(origin, f"malformed JSON: {json_error}") from None
            raise ModelFileError(origin, f"not a tokenizer the tokenizers library can read: {error}") from None
        generation_config = generation_config or {}

        bos_token = _token_text(config.get("bos_token"))
        if bos_token is None or backend.token_to_id(bos_token) is None:
            bos_token = _id_to_token(backend, generation_config.get("bos_token_id"), generation_origin, "bos_token_id")

        eos_ids: list[int] = []
        eos_token = _token_text(config.get("eos_token"))
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos_ids.append(backend.token_to_id(eos_token))
        for token_id in _as_id_list(generation_config.get("eos_token_id"), generation_origin, "eos_token_id"):
            if token_id not in eos_ids:
                eos_ids.append(token_id)
        if eos_ids and (eos_token is None or backend.token_to_id(eos_token) is None):
            eos_token = backend.id_to_token(eos_ids[0])

        pad_token = _token_text(config.get("pad_token"))
        if pad_token is None or backend.token_to_id(pad_token) is None:
            pad_token = _id_to_token(backend, generation_config.get("pad_token_id"), generation_origin, "pad_token_id")

        prefix, suffix = _post_processor_tokens(backend)
        bos_id = backend.token_to_id(bos_token) if bos_token is not None else None
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_id is not None and bos_id in prefix
        add_eos = config.get("add_eos_token")
        if not isinstance(add_eos, bool):
            add_eos = bool(eos_ids) and eos_ids[0] in suffix

        return cls(
            backend,
            origin=origin,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=_token_text(config.get("unk_token")),
            eos_token_ids=tuple(eos_ids),
            add_bos=add_bos,
            add_eos=add_eos,
            chat_templates=_chat_templates(config.get("chat_template"), template_origin),
        )

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = self._with_bos(ids)
            if self.add_eos and not (ids and ids[-1] == self.eos_token_ids[0]):
                ids.append(self.eos_token_ids[0])
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(token_id) for token_id in ids], skip_special_tokens=skip_special_tokens)

    def ids_containing(self, strings: tuple[str, ...]) -> list[int]:
        """The ids of every token whose own text contains one of `strings` (DRY's sequence
        breakers). Decoding the whole vocabulary takes a moment, so the answer is kept."""
        if strings not in self._ids_containing:
            texts = self.backend.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
            self._ids_containing[strings] = [i for i, text in enumerate(texts) if any(s in text for s in strings)]
        return self._ids_containing[strings]

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self.backend, skip_special_tokens=skip_special_tokens)

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and not (ids and ids[0] == self.bos_token_id):
            return [self.bos_token_id, *ids]
        return ids

    # -- chat ---------------------------------------------------------------------------------

    def render_chat(self, messages, *, add_generation_prompt: bool = True, tools=None, documents=None, **extra) -> str:
        template = self.chat_templates.get("tool_use") if tools else None
        template = template or self.chat_template
        if template is None:
            raise ChatTemplateError(f"{self.origin}: {NO_CHAT_TEMPLATE}")
        special_tokens = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "unk_token": self.unk_token or "",
            "pad_token": self.pad_token or "",
        }
        return template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **{**special_tokens, **extra},
        )

    def encode_chat(self, messages, *, add_generation_prompt: bool = True, tools=None, documents=None, **extra) -> list[int]:
        """The rendered chat as ids, special tokens in the text parsed as such. BOS is added only where
        the model wants it and the template did not already write it; EOS never (the reply follows)."""
        text = self.render_chat(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents, **extra
        )
        return self._with_bos(self.backend.encode(text, add_special_tokens=False).ids)


class StreamDecoder:
    """Turns token ids into text as they arrive. A character whose UTF-8 bytes are spread over
    several tokens (byte-level BPE, SentencePiece byte fallback) comes out once it is complete,
    never as U+FFFD; the pieces joined equal ``decode`` of all the ids once ``flush`` is called."""

    def __init__(self, backend: tokenizers.Tokenizer, *, skip_special_tokens: bool = True):
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._pieces: list[str] = []

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self._ids.append(token_id)
        piece = self._stream.step(self._backend, token_id) or ""
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """Ends the stream and returns the text still held back: bytes of a character that never
        completed, decoded as the full decode does (U+FFFD). Pushing afterwards starts a new stream."""
        full = self._backend.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        emitted = "".join(self._pieces)
        self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        self._ids, self._pieces = [], []
        return full[len(emitted) :] if full.startswith(emitted) else ""


# -- helpers -----------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as error:
        raise ModelFileError(path, f"not UTF-8 text: {error}") from None
    except OSError as error:
        raise ModelFileError(path, f"cannot read it: {error.strerror or error}") from None


def _read_json_object(path: str) -> dict | None:
    """The JSON object in path, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ModelFileError(path, f"malformed JSON: {error}") from None
    if not isinstance(value, dict):
        raise ModelFileError(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def _token_text(value) -> str | None:
    """A special token as written in a config: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value, origin: str, name: str) -> list[int]:
    """generation_config ids may be an int, a list of ints or absent."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in values):
        raise ModelFileError(origin, f"{name} must be a token id or a list of them, not {value!r}")
    return list(values)


def _id_to_token(backend: tokenizers.Tokenizer, token_id, origin: str, name: str) -> str | None:
    ids = _as_id_list(token_id, origin, name)
    return backend.id_to_token(ids[0]) if ids else None


def _post_processor_tokens(backend: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids tokenizer.json's post-processor puts before and after the text."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def _chat_templates(value, origin: str) -> dict[str, ChatTemplate]:
    """tokenizer_config's chat_template: one template, or a list of named ones ("default", "tool_use", ...)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": ChatTemplate(value, origin=origin)}
    if isinstance(value, list) and all(
        isinstance(item, Mapping) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
        for item in value
    ):
        return {item["name"]: ChatTemplate(item["template"], origin=f"{origin}[{item['name']!r}]") for item in value}
    raise ChatTemplateError(f"{origin}: chat_template must be a string or a list of {{'name', 'template'}} objects")
