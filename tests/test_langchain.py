"""The LangChain front end: chains, streaming, callbacks, stop, async cancellation, timeouts and
the guard on the embedded default model; tool calling and structured output on a tiny model
whose chat template supports tools and whose replies are scripted (the plumbing is what is
tested there: a 135M model is not expected to call tools well)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Annotated

import pytest

pytest.importorskip("langchain_core")
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.exceptions import OutputParserException  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_json_schema  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from typing_extensions import TypedDict  # noqa: E402

from trimtab.backend.completion import Completion, Usage  # noqa: E402
from trimtab.backend.errors import TrimtabError  # noqa: E402
from trimtab.plugin import model_registry  # noqa: E402
from trimtab.plugin.langchain import (ChatTrimtab, ToolCallSplitter, ToolCallingUnsupported,  # noqa: E402
                                      TrimtabLLM, parse_tool_calls, to_chat_messages)

ROOT = Path(__file__).resolve().parents[1]
STORY = "Write a long story about a dragon who learns to fly."


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return "It's sunny."


class Joke(BaseModel):
    """Joke to tell user."""
    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


class JokeDict(TypedDict):
    """Joke to tell user."""
    setup: Annotated[str, ..., "question to set up a joke"]
    punchline: Annotated[str, ..., "answer to resolve the joke"]


class Tokens(BaseCallbackHandler):
    """Every token a callback sees, and the options each chat model run started with."""

    def __init__(self):
        self.tokens: list[str] = []
        self.options: list[dict] = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)

    def on_chat_model_start(self, serialized, messages, *, options=None, **kwargs):
        self.options.append(options)


# -- the embedded default model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat():
    return ChatTrimtab(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm():
    return TrimtabLLM(temperature=0, max_tokens=16)


@pytest.fixture
def engine_streams(monkeypatch):
    """The engine streams the default model hands out during a test."""
    model = model_registry.get_model("default")
    streams, real = [], model.stream

    def spy(*args, **kwargs):
        streams.append(real(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(model, "stream", spy)
    return streams


def test_llm_chain_with_a_prompt_template_and_str_parser(llm):
    chain = PromptTemplate.from_template("The capital of {country} is") | llm | StrOutputParser()
    answer = chain.invoke({"country": "France"})
    assert isinstance(answer, str) and "Paris" in answer


def test_chat_chain_streams_the_same_text_it_invokes(chat):
    chain = ChatPromptTemplate.from_messages([("system", "You are brief."), ("human", "{question}")]) \
        | chat | StrOutputParser()
    question = {"question": "What is the capital of France?"}
    pieces = list(chain.stream(question))
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == chain.invoke(question)


def test_batch_answers_each_input_in_order(chat):
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | chat | StrOutputParser()
    answers = chain.batch([{"question": "Hello"}, {"question": "What is the capital of France?"}])
    assert len(answers) == 2 and all(a.strip() for a in answers)


def test_callbacks_receive_every_token(chat, llm):
    handler = Tokens()
    reply = chat.invoke("Hello", config={"callbacks": [handler]})
    assert len([t for t in handler.tokens if t]) > 1
    assert "".join(handler.tokens) == reply.content

    handler = Tokens()
    text = "".join(llm.stream("The capital of France is", config={"callbacks": [handler]}))
    assert len([t for t in handler.tokens if t]) > 1
    assert "".join(handler.tokens) == text


def _cut_point(text: str) -> str:
    """A word from the middle of text, to stop at."""
    words = [w for w in text.split() if len(w) >= 3]
    assert len(words) >= 3, text
    return words[len(words) // 2]


def test_stop_cuts_the_chat_reply_exactly(chat):
    question = "Tell me about the moon."
    full = chat.invoke(question).content
    stop = _cut_point(full)
    reply = chat.invoke(question, stop=[stop])
    assert reply.content == full[:full.index(stop)]
    assert reply.response_metadata["finish_reason"] == "stop_string"
    streamed = "".join(chunk.content for chunk in chat.stream(question, stop=[stop]))
    assert streamed == reply.content


def test_stop_cuts_the_llm_continuation_exactly(llm):
    prompt = "The moon is"
    full = llm.invoke(prompt)
    stop = _cut_point(full)
    assert TrimtabLLM(temperature=0, max_tokens=16, stop=[stop]).invoke(prompt) == full[:full.index(stop)]


async def test_ainvoke_leaves_the_event_loop_free(chat):
    task = asyncio.create_task(chat.ainvoke(STORY, max_tokens=40))
    await asyncio.sleep(0.05)   # returns while the model is still decoding: nothing blocks the loop
    assert not task.done()
    assert (await task).content


async def test_cancelled_astream_stops_the_engine_and_frees_it(chat, engine_streams):
    first_chunk = asyncio.Event()

    async def consume():
        async for _ in chat.astream(STORY, max_tokens=300):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), timeout=120)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the engine was told to stop, and the worker had ended by the time the task raised
    assert engine_streams[0].completion.finish_reason == "cancelled"
    assert engine_streams[0].completion.usage.completion_tokens < 300
    assert not [t for t in threading.enumerate() if t.name == "trimtab-langchain"]
    reply = await chat.ainvoke("Hello")
    assert reply.content and reply.response_metadata["finish_reason"] in ("eos", "length")


def test_timeout_stops_the_engine_and_raises(engine_streams):
    slow = ChatTrimtab(temperature=0, max_tokens=400, timeout=0.5)
    with pytest.raises(TimeoutError, match="0.5 s"):
        slow.invoke(STORY)
    assert engine_streams[-1].completion.finish_reason == "cancelled"


async def test_timeout_applies_to_async_calls_too(engine_streams):
    slow = ChatTrimtab(temperature=0, max_tokens=400)
    with pytest.raises(TimeoutError):
        await slow.ainvoke(STORY, timeout=0.5)
    assert engine_streams[-1].completion.finish_reason == "cancelled"


def test_unsafe_settings_are_corrected_and_reported(chat):
    eos = model_registry.get_model("default").tokenizer.eos_token_ids[0]
    unsafe = ChatTrimtab(temperature=0, max_tokens=24, repetition_penalty=1.15, disallowed_tokens=[eos],
                         logit_bias={eos: -100})
    reply = unsafe.invoke("Hello")
    overrides = {o["field"]: o for o in reply.response_metadata["overrides"]}
    assert set(overrides) == {"repetition_penalty", "custom_token_bans", "logit_bias"}
    assert overrides["repetition_penalty"]["asked"] == 1.15
    assert overrides["repetition_penalty"]["applied"] == 1.01
    assert overrides["custom_token_bans"]["applied"] == []
    assert overrides["logit_bias"]["applied"] == {}
    assert all(o["reason"] for o in overrides.values())
    assert reply.response_metadata["finish_reason"] == "eos"   # the model could end its answer

    # the same through per-call parameters, while streaming: the last chunk carries them
    last = list(chat.stream("Hello", repetition_penalty=1.15))[-1]
    assert [o["field"] for o in last.response_metadata["overrides"]] == ["repetition_penalty"]


def test_warn_mode_reports_without_changing():
    reply = ChatTrimtab(temperature=0, max_tokens=4, guard="warn", repetition_penalty=1.15).invoke("Hello")
    (override,) = reply.response_metadata["overrides"]
    assert override["applied"] == 1.15 and override["reason"].startswith("warning:")


def test_llm_reports_overrides_usage_and_model(llm):
    result = llm.generate(["The sky is"], repetition_penalty=1.15)
    info = result.generations[0][0].generation_info
    assert [o["field"] for o in info["overrides"]] == ["repetition_penalty"]
    assert info["model_name"] == "default" and info["finish_reason"] in ("eos", "length", "stop_string")
    usage = result.llm_output["token_usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_usage_counts_come_from_the_model_tokenizer(chat):
    tokenizer = model_registry.get_model("default").tokenizer
    reply = chat.invoke([HumanMessage("Hello")])
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert reply.usage_metadata["input_tokens"] == len(prompt_ids)
    assert reply.usage_metadata["output_tokens"] == len(tokenizer.encode(reply.content, add_special_tokens=False))
    assert reply.response_metadata["model_name"] == "default"


def test_token_counts_use_the_model_tokenizer(chat, llm):
    tokenizer = model_registry.get_model("default").tokenizer
    text = "Tokenizers differ: antidisestablishmentarianism."
    assert llm.get_num_tokens(text) == len(tokenizer.encode(text, add_special_tokens=False))
    assert chat.get_token_ids(text) == tokenizer.encode(text, add_special_tokens=False)
    messages = [SystemMessage("Be brief."), HumanMessage("Hi")]
    assert chat.get_num_tokens_from_messages(messages) == len(tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=False))


def test_default_model_refuses_tools_clearly(chat):
    with pytest.raises(ToolCallingUnsupported, match="default: this model's chat template has no tool support"):
        chat.bind_tools([magic_function]).invoke("What is magic_function(3)?")
    with pytest.raises(ToolCallingUnsupported):
        chat.with_structured_output(Joke, method="function_calling").invoke("Tell me a joke.")


# -- parameters, sharing, packaging --------------------------------------------------------------

def test_objects_naming_one_model_share_it(chat, llm):
    assert chat._engine() is llm._engine() is ChatTrimtab(model="default")._engine()
    assert model_registry.get_model("default", "auto") is model_registry.get_model("default", "cpu")


def test_concurrent_first_use_loads_once(monkeypatch, tmp_path):
    loads = []

    def slow_load(path, device):
        loads.append(path)
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(model_registry, "load", slow_load)
    path = str(tmp_path / "model")
    got = []
    threads = [threading.Thread(target=lambda: got.append(model_registry.get_model(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(loads) == 1 and len(got) == 8 and all(g is got[0] for g in got)
    finally:
        model_registry.forget(path)


def test_parameters_map_to_trimtab_settings():
    chat = ChatTrimtab(max_new_tokens=7, custom_token_bans=[5], typical_p=0.95, temperature=0)
    assert chat.max_tokens == 7 and chat.disallowed_tokens == [5] and chat.settings == {"typical_p": 0.95}
    assert chat._identifying_params["model_name"] == "default"
    ls = chat._get_ls_params(stop=["x"], model="other")
    assert ls["ls_provider"] == "trimtab" and ls["ls_model_name"] == "other" and ls["ls_stop"] == ["x"]
    assert TrimtabLLM()._llm_type == "trimtab" and "model_name" in TrimtabLLM()._identifying_params


@pytest.mark.parametrize("kwargs, message", [
    ({"temprature": 0.2}, "did you mean temperature"),
    ({"api_key": "sk-test"}, "does not apply"),
    ({"max_tokens": 5, "max_new_tokens": 6}, "given twice"),
    ({"temperature": -1}, "temperature"),
    ({"guard": "sometimes"}, "guard must be one of"),
    ({"preset": "reckless"}, "reckless"),
    ({"model": "/no/such/model"}, "/no/such/model"),
])
def test_bad_parameters_fail_at_construction(kwargs, message):
    with pytest.raises(TrimtabError, match=message):
        ChatTrimtab(**kwargs)


def test_unknown_call_parameter_is_an_error(chat):
    with pytest.raises(TrimtabError, match="unknown setting 'frobnicate'"):
        chat.invoke("Hello", frobnicate=1)


def test_core_does_not_import_langchain():
    code = ("import sys, trimtab, trimtab.backend.api, trimtab.plugin.cli, trimtab.plugin.model_registry; "
            "sys.exit(any(m.split('.')[0].startswith('langchain') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "langchain" in d]
    assert any(d.startswith("langchain-core") for d in project["optional-dependencies"]["langchain"])


def test_messages_become_hf_chat_dicts():
    messages = to_chat_messages([
        SystemMessage("Be brief."),
        HumanMessage([{"type": "text", "text": "What is "}, "1 + 2?"], name="ann"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "abc", "type": "tool_call"}]),
        ToolMessage('{"result": 3}', tool_call_id="abc"),
    ])
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 2?", "name": "ann"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "id": "abc", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": '{"result": 3}', "tool_call_id": "abc"},
    ]
    with pytest.raises(TrimtabError, match="text only"):
        to_chat_messages([HumanMessage([{"type": "image", "url": "https://example.com/cat.png"}])])


# -- tool-call parsing ---------------------------------------------------------------------------

CALL = {"name": "magic_function", "args": '{"input": 3}'}


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "magic_function", "arguments": {"input": 3}}\n</tool_call>', "", [CALL]),
    ('Sure. <tool_call>{"name": "magic_function", "arguments": "{\\"input\\": 3}"}</tool_call> Done.',
     "Sure.  Done.", [CALL]),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": "é"}}',
     "", [{"name": "a", "args": "{}"}, {"name": "b", "args": '{"x": "é"}'}]),
    ('{"name": "magic_function", "parameters": {"input": 3}}', "", [CALL]),                  # Llama 3
    ('<|python_tag|>{"name": "magic_function", "parameters": {"input": 3}}', "", [CALL]),
    ('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}', "",
     [{"name": "a", "args": "{}"}, {"name": "b", "args": "{}"}]),
    ('[TOOL_CALLS][{"name": "magic_function", "arguments": {"input": 3}}]', "", [CALL]),      # Mistral
    ('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"y": 1}}]', "",
     [{"name": "a", "args": "{}"}, {"name": "b", "args": '{"y": 1}'}]),
    ("The answer is 5.", "The answer is 5.", []),
    ('{"setup": "a joke", "punchline": "ha"}', '{"setup": "a joke", "punchline": "ha"}', []),  # JSON, no call
    ("<tool_call>not json</tool_call>", "", [{"name": None, "args": "not json"}]),
    ("[TOOL_CALLS]oops", "", [{"name": None, "args": "oops"}]),
])
def test_tool_calls_are_parsed_from_the_common_formats(text, content, calls):
    assert parse_tool_calls(text) == (content, calls)


@pytest.mark.parametrize("text", [
    'Let me check. <tool_call>{"name": "f", "arguments": {}}</tool_call>',
    "Plain text with a < sign and [brackets] but no call.",
    '  {"name": "f", "parameters": {}}',
    'Sure [TOOL_CALLS][{"name": "f", "arguments": {}}]',
])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_splitter_holds_back_exactly_the_tool_call(text, size):
    splitter = ToolCallSplitter()
    shown = "".join(splitter.push(text[i:i + size]) for i in range(0, len(text), size))
    held = splitter.finish()
    assert shown + held == text
    starts = [text.find(o) for o in ("<tool_call>", "[TOOL_CALLS]") if o in text]
    if starts:
        assert shown == text[:min(starts)]
    elif text.lstrip().startswith("{"):
        assert shown == ""
    else:
        assert shown == text


# -- a tiny model with a tool-using chat template and scripted replies -------------------------

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% elif m.role == 'tool' %}(call {{ m.tool_call_id }}) {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_models import write_tiny_model_dir

    directory = tmp_path_factory.mktemp("tool-model")
    write_tiny_model_dir("llama", directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": TOOL_TEMPLATE}))
    return str(directory)


class ScriptedStream:
    """Stands in for an engine stream: the reply is a fixed text, handed out 3 characters at a time."""

    def __init__(self, real, reply: str, prompt_tokens: int):
        self.overrides = real.overrides
        self.completion = None
        self._reply, self._prompt_tokens = reply, prompt_tokens
        self._cancel = threading.Event()

    def __iter__(self):
        shown = []
        for i in range(0, len(self._reply), 3):
            if self._cancel.is_set():
                break
            shown.append(self._reply[i:i + 3])
            yield shown[-1]
        self.completion = Completion("".join(shown), "cancelled" if self._cancel.is_set() else "eos",
                                     Usage(self._prompt_tokens, len(shown)), overrides=list(self.overrides))

    def cancel(self):
        self._cancel.set()


class Script:
    """Replaces a model's stream. The real stream is still made, so the chat template, the
    tokenizer and the guard all run (and raise) as usual; only the decoding is scripted."""

    def __init__(self, model):
        self.model, self.real_stream = model, model.stream
        self.replies: list[str] = []
        self.prompts: list[str] = []

    def stream(self, prompt_or_messages, *, tools=None, **kwargs):
        real = self.real_stream(prompt_or_messages, tools=tools, **kwargs)
        tokenizer = self.model.tokenizer
        prompt = (prompt_or_messages if isinstance(prompt_or_messages, str)
                  else tokenizer.render_chat(prompt_or_messages, tools=tools))
        self.prompts.append(prompt)
        return ScriptedStream(real, self.replies.pop(0), len(tokenizer.encode(prompt)))


@pytest.fixture
def script(tool_model, monkeypatch):
    model = model_registry.get_model(tool_model)
    script = Script(model)
    monkeypatch.setattr(model, "stream", script.stream)
    return script


@pytest.fixture
def tool_chat(tool_model, script):
    return ChatTrimtab(model=tool_model, temperature=0)


HERMES_CALL = '<tool_call>\n{"name": "magic_function", "arguments": {"input": 3}}\n</tool_call>'


def test_tool_calls_come_back_in_tool_calls(tool_chat, script):
    script.replies = [HERMES_CALL]
    reply = tool_chat.bind_tools([magic_function]).invoke("What is magic_function(3)?")
    assert reply.content == ""
    (call,) = reply.tool_calls
    assert call["name"] == "magic_function" and call["args"] == {"input": 3} and call["id"]
    assert call["type"] == "tool_call"
    assert '"name": "magic_function"' in script.prompts[0]       # the schema went through the template
    assert reply.response_metadata["finish_reason"] == "eos"


def test_streamed_tool_call_is_held_back_and_matches_invoke(tool_chat, script):
    reply = "Let me check. " + HERMES_CALL
    script.replies = [reply, reply]
    bound = tool_chat.bind_tools([magic_function])
    chunks = list(bound.stream("What is magic_function(3)?"))
    assert all("<tool" not in c.content for c in chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == "Let me check. "
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("magic_function", {"input": 3})]
    invoked = bound.invoke("What is magic_function(3)?")
    assert invoked.content == full.content and invoked.tool_calls[0]["args"] == {"input": 3}


def test_tool_choice_writes_the_call_opening_into_the_prompt(tool_chat, script):
    script.replies = ['{"input": 3}}\n</tool_call>', 'get_weather", "arguments": {"location": "Paris"}}</tool_call>']
    forced = tool_chat.bind_tools([magic_function, get_weather], tool_choice="magic_function").invoke("Hello!")
    assert script.prompts[0].endswith('<|im_start|>assistant\n<tool_call>\n{"name": "magic_function", "arguments": ')
    assert [(c["name"], c["args"]) for c in forced.tool_calls] == [("magic_function", {"input": 3})]

    any_tool = tool_chat.bind_tools([magic_function, get_weather], tool_choice="any").invoke("Weather in Paris?")
    assert script.prompts[1].endswith('<tool_call>\n{"name": "')
    assert [(c["name"], c["args"]) for c in any_tool.tool_calls] == [("get_weather", {"location": "Paris"})]


def test_tool_choice_none_shows_no_tools(tool_chat, script):
    script.replies = ["Hi there."]
    reply = tool_chat.bind_tools([magic_function], tool_choice="none").invoke("Hello!")
    assert "Tools:" not in script.prompts[0] and reply.content == "Hi there." and not reply.tool_calls


def test_parallel_tool_calls_false_keeps_the_first_call(tool_chat, script):
    script.replies = [HERMES_CALL + HERMES_CALL, HERMES_CALL + HERMES_CALL]
    assert len(tool_chat.bind_tools([magic_function]).invoke("Twice?").tool_calls) == 2
    assert len(tool_chat.bind_tools([magic_function], parallel_tool_calls=False).invoke("Twice?").tool_calls) == 1


def test_a_path_names_the_same_shared_model(tool_model, tool_chat):
    assert ChatTrimtab(model=Path(tool_model))._engine() is tool_chat._engine() is model_registry.get_model(tool_model)


def test_unknown_tool_choice_fails_at_bind(tool_chat):
    with pytest.raises(TrimtabError, match="tool_choice"):
        tool_chat.bind_tools([magic_function], tool_choice="no_such_tool")


def test_malformed_tool_call_is_an_invalid_tool_call(tool_chat, script):
    script.replies = ["<tool_call>not json</tool_call>"]
    reply = tool_chat.bind_tools([magic_function]).invoke("What is magic_function(3)?")
    assert not reply.tool_calls
    assert reply.invalid_tool_calls[0]["args"] == "not json"


def test_tool_history_renders_through_the_template(tool_chat, script):
    script.replies = ["The sum is 3."]
    reply = tool_chat.bind_tools([magic_function]).invoke([
        HumanMessage("What is 1 + 2?"),
        AIMessage("", tool_calls=[{"name": "my_adder", "args": {"a": 1, "b": 2}, "id": "abc123", "type": "tool_call"}]),
        ToolMessage(json.dumps({"result": 3}), tool_call_id="abc123"),
    ])
    prompt = script.prompts[0]
    assert '<|im_start|>assistant\n<tool_call>{"name": "my_adder", "arguments": {"a": 1, "b": 2}}</tool_call>' in prompt
    assert '<|im_start|>tool\n(call abc123) {"result": 3}<|im_end|>' in prompt
    assert reply.content == "The sum is 3."


async def test_async_tool_calls(tool_chat, script):
    script.replies = [HERMES_CALL]
    reply = await tool_chat.bind_tools([magic_function]).ainvoke("What is magic_function(3)?")
    assert reply.tool_calls[0]["args"] == {"input": 3}


# -- structured output ---------------------------------------------------------------------------

JOKE_REST = '"setup": "Why did the cat sit on the computer?", "punchline": "To keep an eye on the mouse."}\nEnjoy!'
JOKE = Joke(setup="Why did the cat sit on the computer?", punchline="To keep an eye on the mouse.")


def test_json_schema_output_shows_the_schema_and_parses_the_reply(tool_chat, script):
    script.replies = [JOKE_REST]
    handler = Tokens()
    joke = tool_chat.with_structured_output(Joke).invoke("Tell me a joke about cats.", config={"callbacks": [handler]})
    assert joke == JOKE
    prompt = script.prompts[0]
    assert prompt.startswith("<|im_start|>system\nReply with one JSON object that follows this JSON schema")
    assert json.dumps(convert_to_json_schema(Joke)) in prompt
    assert prompt.endswith("<|im_start|>assistant\n{")               # the reply starts as a JSON object
    assert handler.options[0]["ls_structured_output_format"]["schema"] == convert_to_json_schema(Joke)


@pytest.mark.parametrize("schema", [JokeDict, Joke.model_json_schema()])
def test_json_schema_output_for_dict_schemas(tool_chat, script, schema):
    script.replies = [JOKE_REST]
    assert tool_chat.with_structured_output(schema).invoke("Tell me a joke about cats.") == JOKE.model_dump()


def test_structured_output_streams_the_finished_object(tool_chat, script):
    script.replies = [JOKE_REST, JOKE_REST]
    assert list(tool_chat.with_structured_output(Joke).stream("Tell me a joke."))[-1] == JOKE
    partials = list(tool_chat.with_structured_output(JokeDict).stream("Tell me a joke."))
    assert len(partials) > 1 and partials[-1] == JOKE.model_dump()


def test_json_mode_asks_for_any_json_object(tool_chat, script):
    script.replies = [JOKE_REST]
    result = tool_chat.with_structured_output(None, method="json_mode").invoke("A joke as JSON, please.")
    assert result == JOKE.model_dump()
    assert "Reply with one JSON object, and nothing else." in script.prompts[0]


def test_unparseable_structured_output(tool_chat, script):
    script.replies = ["not JSON at all", "not JSON at all"]
    with pytest.raises(OutputParserException, match="no complete JSON object"):
        tool_chat.with_structured_output(Joke).invoke("Tell me a joke.")
    result = tool_chat.with_structured_output(Joke, include_raw=True).invoke("Tell me a joke.")
    assert result["parsed"] is None and isinstance(result["parsing_error"], OutputParserException)
    assert result["raw"].content == "{not JSON at all"


def test_function_calling_output_forces_the_schema_tool(tool_chat, script):
    script.replies = ['{"setup": "a", "punchline": "b"}}</tool_call>']
    joke = tool_chat.with_structured_output(Joke, method="function_calling").invoke("Tell me a joke.")
    assert joke == Joke(setup="a", punchline="b")
    assert script.prompts[0].endswith('<tool_call>\n{"name": "Joke", "arguments": ')


async def test_async_structured_output(tool_chat, script):
    script.replies = [JOKE_REST]
    assert await tool_chat.with_structured_output(Joke).ainvoke("Tell me a joke.") == JOKE
