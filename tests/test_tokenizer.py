"""The tokenizer wrapper: loading, special tokens, BOS policy, chat encoding and stream decoding."""
from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, processors, trainers

from trimtab.backend.errors import ChatTemplateError, ModelFileError, TrimtabError
from trimtab.backend.tokenizer import Tokenizer

CORPUS = [
    "Hello world, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; models read the pieces.",
    "user assistant system tool call function weather Paris",
] * 20

# Multi-byte UTF-8 the tokenizers never saw while training, so each character spans several tokens.
UNICODE_TEXTS = [
    "Hello 😀 world",
    "你好，世界！東京",
    "flags 🇫🇷 family 👩‍👩‍👧 accents ñ é ü",
    "😀😀😀",
    "mixed: The fox 狐狸 jumps 🦊 over",
]

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
INST_TEMPLATE = "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"


def byte_level_backend() -> Backend:
    """GPT-2 / Llama-3 style: byte-level BPE, a post-processor that puts BOS first."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return backend


def byte_fallback_backend() -> Backend:
    """SentencePiece style (Llama 2, Mistral): '▁' for spaces, unknown characters as <0xNN> byte tokens."""
    trainee = Backend(models.BPE(unk_token="<unk>"))
    trainee.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainee.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trainee.train_from_iterator(CORPUS, trainer)
    spec = json.loads(trainee.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    backend = Backend.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(token, special=True) for token in ["<unk>", "<s>", "</s>"]])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return backend


def chatml_backend() -> Backend:
    """SmolLM2 / Qwen style: byte-level BPE, no BOS added."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return backend


@pytest.fixture(scope="module")
def llama3_backend():
    return byte_level_backend()


@pytest.fixture(scope="module")
def spm_backend():
    return byte_fallback_backend()


def write_model(directory, backend: Backend, **files) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (directory / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return str(directory)


@pytest.fixture
def llama3(tmp_path, llama3_backend):
    eot = llama3_backend.token_to_id("<|eot_id|>")
    end = llama3_backend.token_to_id("<|end_of_text|>")
    model_dir = write_model(
        tmp_path / "llama3",
        llama3_backend,
        tokenizer_config__json={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE},
        generation_config__json={"bos_token_id": llama3_backend.token_to_id("<|begin_of_text|>"), "eos_token_id": [end, eot]},
    )
    return Tokenizer.from_dir(model_dir)


@pytest.fixture
def spm(tmp_path, spm_backend):
    model_dir = write_model(
        tmp_path / "spm",
        spm_backend,
        tokenizer_config__json={
            "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "chat_template": INST_TEMPLATE,
        },
    )
    return Tokenizer.from_dir(model_dir)


# -- special tokens ----------------------------------------------------------------------------


def test_special_tokens_from_configs(llama3, llama3_backend):
    ids = llama3_backend.token_to_id
    assert llama3.bos_token == "<|begin_of_text|>" and llama3.bos_token_id == ids("<|begin_of_text|>")
    # tokenizer_config's eos first, then generation_config's list, each once
    assert llama3.eos_token_ids == (ids("<|eot_id|>"), ids("<|end_of_text|>"))
    assert llama3.eos_token == "<|eot_id|>"
    assert llama3.pad_token_id is None
    assert llama3.vocab_size == llama3_backend.get_vocab_size(with_added_tokens=True)


def test_eos_only_in_generation_config(tmp_path, spm_backend):
    model_dir = write_model(tmp_path, spm_backend, generation_config__json={"eos_token_id": 2, "pad_token_id": 0})
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.eos_token == spm_backend.id_to_token(2)
    assert tokenizer.pad_token_id == 0


def test_special_tokens_map_fills_gaps(tmp_path, spm_backend):
    model_dir = write_model(
        tmp_path,
        spm_backend,
        tokenizer_config__json={"eos_token": "</s>"},
        special_tokens_map__json={"bos_token": "<s>", "eos_token": "<unk>", "pad_token": {"content": "<unk>"}},
    )
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.eos_token == "</s>"  # tokenizer_config wins
    assert tokenizer.pad_token_id == spm_backend.token_to_id("<unk>")


def test_from_parts(llama3_backend):
    tokenizer = Tokenizer.from_parts(
        llama3_backend.to_str(),
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        {"eos_token_id": llama3_backend.token_to_id("<|eot_id|>")},
        origin="model.gguf",
    )
    assert tokenizer.eos_token_ids == (llama3_backend.token_to_id("<|end_of_text|>"), llama3_backend.token_to_id("<|eot_id|>"))
    assert tokenizer.chat_template is None


# -- encode / decode ---------------------------------------------------------------------------


def test_bos_follows_the_post_processor_and_is_never_doubled(llama3):
    bos = llama3.bos_token_id
    ids = llama3.encode("Hello world")
    assert ids[0] == bos and bos not in ids[1:]
    assert llama3.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert llama3.encode("<|begin_of_text|>Hello world") == ids  # already there: not added again
    assert llama3.decode(ids) == "Hello world"
    assert llama3.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>Hello world"


def test_encode_matches_transformers(tmp_path, llama3_backend):
    transformers = pytest.importorskip("transformers")
    model_dir = write_model(
        tmp_path,
        llama3_backend,
        tokenizer_config__json={
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    ours = Tokenizer.from_dir(model_dir)
    for text in ["Hello world, how are you?", *UNICODE_TEXTS, "<|start_header_id|>user<|end_header_id|>"]:
        assert ours.encode(text) == hf.encode(text)
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_add_bos_token_false_overrides_the_post_processor(tmp_path, llama3_backend):
    model_dir = write_model(
        tmp_path, llama3_backend, tokenizer_config__json={"bos_token": "<|begin_of_text|>", "add_bos_token": False}
    )
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.bos_token_id is not None
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", add_special_tokens=False)


def test_no_bos_for_chatml_models(tmp_path):
    backend = chatml_backend()
    model_dir = write_model(tmp_path, backend, tokenizer_config__json={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.encode("Hello") == backend.encode("Hello").ids


def test_byte_fallback_round_trip(spm, spm_backend):
    bos = spm.bos_token_id
    for text in ["Hello world", *UNICODE_TEXTS]:
        ids = spm.encode(text)
        assert ids[0] == bos and bos not in ids[1:]
        assert spm.decode(ids) == text
    byte_tokens = [spm_backend.id_to_token(i) for i in spm.encode("😀")]
    assert byte_tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


# -- chat --------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]


def test_encode_chat_does_not_double_bos(llama3):
    text = llama3.render_chat(CHAT)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    ids = llama3.encode_chat(CHAT)
    assert ids.count(llama3.bos_token_id) == 1 and ids[0] == llama3.bos_token_id
    assert llama3.decode(ids, skip_special_tokens=False) == text
    assert llama3.backend.token_to_id("<|eot_id|>") in ids  # special tokens in the text are parsed as such


def test_encode_chat_adds_bos_the_template_left_out(spm):
    chat = [{"role": "user", "content": "Hello"}]
    assert spm.render_chat(chat) == "[INST] Hello [/INST]"
    ids = spm.encode_chat(chat)
    assert ids[0] == spm.bos_token_id and ids.count(spm.bos_token_id) == 1
    assert spm.decode(ids) == "[INST] Hello [/INST]"


def test_no_chat_template(tmp_path, spm_backend):
    tokenizer = Tokenizer.from_dir(write_model(tmp_path, spm_backend, tokenizer_config__json={}))
    with pytest.raises(ChatTemplateError, match="no chat template; use generate"):
        tokenizer.render_chat(CHAT)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.encode_chat(CHAT)


def test_bad_message_names_its_index(llama3):
    with pytest.raises(TrimtabError, match=r"messages\[1\]"):
        llama3.render_chat([{"role": "user", "content": "ok"}, {"role": "user", "content": 3}])


def test_chat_template_file_wins(tmp_path, spm_backend):
    model_dir = write_model(
        tmp_path,
        spm_backend,
        tokenizer_config__json={"chat_template": "from config"},
        chat_template__jinja="from jinja file {{ messages | length }}",
        chat_template__json={"chat_template": "from json file"},
    )
    assert Tokenizer.from_dir(model_dir).render_chat(CHAT) == "from jinja file 2"
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer.from_dir(model_dir).render_chat(CHAT) == "from json file"


def test_named_chat_templates(tmp_path, spm_backend):
    templates = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools: {{ tools | length }}"}]
    tokenizer = Tokenizer.from_dir(write_model(tmp_path, spm_backend, tokenizer_config__json={"chat_template": templates}))
    assert tokenizer.render_chat(CHAT) == "plain"
    assert tokenizer.render_chat(CHAT, tools=[{"type": "function", "function": {"name": "f"}}]) == "tools: 1"


def test_broken_template_names_its_file(tmp_path, spm_backend):
    model_dir = write_model(tmp_path, spm_backend, chat_template__jinja="line one\n{% if %}")
    with pytest.raises(ChatTemplateError) as error:
        Tokenizer.from_dir(model_dir)
    assert str(tmp_path / "chat_template.jinja") in str(error.value)
    assert "syntax error on line 2" in str(error.value)


# -- loading errors ----------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelFileError) as error:
        Tokenizer.from_dir(tmp_path)
    assert error.value.path == str(tmp_path)
    assert "tokenizer.json is missing" in str(error.value)


def test_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ModelFileError, match="malformed JSON") as error:
        Tokenizer.from_dir(tmp_path)
    assert error.value.path == str(tmp_path / "tokenizer.json")


def test_tokenizer_json_that_is_not_a_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"hello": "world"}')
    with pytest.raises(ModelFileError, match="not a tokenizer") as error:
        Tokenizer.from_dir(tmp_path)
    assert error.value.path == str(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "special_tokens_map.json"])
def test_malformed_config_names_the_file(tmp_path, spm_backend, name):
    write_model(tmp_path, spm_backend)
    (tmp_path / name).write_text('{"eos_token": "</s>",')
    with pytest.raises(ModelFileError, match="malformed JSON") as error:
        Tokenizer.from_dir(tmp_path)
    assert error.value.path == str(tmp_path / name)


def test_bad_eos_id_names_generation_config(tmp_path, spm_backend):
    write_model(tmp_path, spm_backend, generation_config__json={"eos_token_id": "two"})
    with pytest.raises(ModelFileError, match="eos_token_id") as error:
        Tokenizer.from_dir(tmp_path)
    assert error.value.path == str(tmp_path / "generation_config.json")


# -- stream decoding ---------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids, *, skip_special_tokens=True):
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(token_id) for token_id in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("which", ["llama3", "spm"])
@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_stream_decoder_waits_for_whole_characters(request, which, text):
    tokenizer = request.getfixturevalue(which)
    ids = tokenizer.encode(text)
    pieces, rest = stream(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces), pieces
    assert "" in pieces[1:]  # some character did span tokens, and was held back
    assert rest == ""
    assert "".join(pieces) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("which", ["llama3", "spm"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_decoder_with_special_tokens(request, which, skip_special_tokens):
    tokenizer = request.getfixturevalue(which)
    eos = tokenizer.eos_token_ids[0]
    ids = tokenizer.encode("The fox 狐狸 jumps") + [eos] + tokenizer.encode("again 😀", add_special_tokens=False)
    pieces, rest = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("which", ["llama3", "spm"])
def test_stream_decoder_flushes_an_unfinished_character(request, which):
    tokenizer = request.getfixturevalue(which)
    ids = tokenizer.encode("ok 😀")[:-1]  # the emoji's last byte never comes
    pieces, rest = stream(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + rest == tokenizer.decode(ids)
    assert rest.endswith("\ufffd")
    decoder = tokenizer.stream_decoder()
    decoder.push(ids[-1])
    decoder.flush()
    assert "".join(decoder.push(token_id) for token_id in tokenizer.encode("Hello", add_special_tokens=False)) == "Hello"


def test_ids_containing_finds_every_token_with_the_text(llama3):
    ids = llama3.ids_containing(("\n", ","))
    texts = {i: llama3.backend.decode([i], skip_special_tokens=False) for i in range(llama3.vocab_size)}
    assert ids == [i for i, t in texts.items() if "\n" in t or "," in t] and ids
    assert llama3.ids_containing(("\n", ",")) is ids          # decoded once, then kept
    assert llama3.ids_containing(()) == []
