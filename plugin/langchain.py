"""LangChain front end: `TrimtabLLM` (a completion LLM) and `ChatTrimtab` (a chat model).

    from trimtab.plugin.langchain import ChatTrimtab
    chat = ChatTrimtab(model="default", preset="balanced", temperature=0, max_tokens=200)

Both are thin adapters over `trimtab.Model.stream`: every parameter, LangChain's names and
text-generation-webui's alike, goes through the guard; stop strings are cut by the engine;
`timeout` cancels the engine's stream; the async methods run the engine in a worker thread and
cancel it when their task is cancelled. Objects naming the same model share one loaded model
(plugin/model_registry.py). Tool calls are offered through the chat template's `tools` support
and parsed from the reply; structured output prompts with a JSON schema and parses the reply.

LangChain is an optional extra (`pip install "trimtab[langchain]"`); nothing else in trimtab
imports this module.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Mapping, Sequence

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.exceptions import OutputParserException
    from langchain_core.language_models import BaseChatModel, LanguageModelInput, LLM
    from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
    from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage,
                                         FunctionMessage, HumanMessage, SystemMessage, ToolMessage)
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.messages.tool import tool_call_chunk
    from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticToolsParser
    from langchain_core.outputs import ChatGenerationChunk, ChatResult, Generation, GenerationChunk, LLMResult
    from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
    from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
    from langchain_core.utils.json import parse_partial_json
    from langchain_core.utils.pydantic import is_basemodel_subclass
    from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
    from pydantic.v1 import ValidationError as ValidationErrorV1
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"trimtab's LangChain integration needs langchain-core ({error}); "
                      "install it with: pip install 'trimtab[langchain]'") from error

from trimtab.backend.api import Model, Stream
from trimtab.backend.completion import Completion
from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import GUARD_MODES
from trimtab.backend.presets import canonical_settings, load_preset
from trimtab.backend.settings import canonical_name
from trimtab.plugin import model_registry
from trimtab.plugin.tool_calls import (ToolCallSplitter, forced_call_prefix, parse_tool_calls,
                                       tool_support)

__all__ = ["ChatTrimtab", "TrimtabLLM", "ToolCallingUnsupported"]


class ToolCallingUnsupported(TrimtabError):
    """Tools were offered to a model whose chat template cannot show them to the model."""


# -- parameters ----------------------------------------------------------------------------------

# LangChain's parameter fields → trimtab's settings (text-generation-webui's names)
FIELD_SETTINGS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "max_tokens": "max_new_tokens",
    "stop": "stop", "logit_bias": "logit_bias", "disallowed_tokens": "custom_token_bans",
}
SETTING_FIELDS = {setting: name for name, setting in FIELD_SETTINGS.items()}
# other front ends' names for trimtab settings, beyond those backend/settings.py knows
LANGCHAIN_ALIASES = {"max_completion_tokens": "max_new_tokens", "disallowed_tokens": "custom_token_bans"}
# parameters of hosted APIs that mean nothing to a model running in this process
REMOTE_ONLY = ("api_key", "base_url", "organization", "api_base", "openai_api_key", "n")
# per-call options of ChatTrimtab that are not generation settings
CHAT_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


def setting_name(key: str, *, source: str) -> str:
    """A LangChain or webui parameter name → trimtab's setting name; TrimtabError if unknown."""
    if key in REMOTE_ONLY:
        raise TrimtabError(f"{source}: {key!r} does not apply: trimtab runs the model in this process, "
                           "with no API, key or server")
    return canonical_name(LANGCHAIN_ALIASES.get(key, key), source=source)


class _TrimtabParams(BaseModel):
    """The parameters TrimtabLLM and ChatTrimtab share. Settings left at None are not set: the
    preset's value applies. Any other text-generation-webui setting can be given by name
    (`typical_p=0.95`); it lands in `settings`."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = "default"
    """"default" (the embedded SmolLM2-135M-Instruct), a model directory or a .gguf file."""
    device: str = "cpu"
    preset: str | dict[str, Any] | None = None
    """A vetted preset's name ("precise", "balanced", "creative"), a preset file or a dict."""
    guard: str = "enforce"
    """"enforce" replaces unsafe settings, "warn" only reports them, "off" lets them through."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    logit_bias: dict[int, float] | None = None
    disallowed_tokens: list[int] | None = None
    """Token ids never to generate (webui's custom_token_bans)."""
    settings: dict[str, Any] = {}
    """Further webui settings by their canonical names."""
    timeout: float | None = None
    """Seconds a call may take; past it the engine stops and the call raises TimeoutError."""
    max_retries: int | None = None
    """Accepted for compatibility; a model in this process has no transient failures to retry."""
    streaming: bool = False
    """Whether invoke() decodes through the streaming path (callbacks see tokens either way)."""

    @model_validator(mode="before")
    @classmethod
    def _collect_settings(cls, values: Any) -> Any:
        """Unknown keyword arguments are webui settings (checked now); those with a field of
        their own (max_new_tokens → max_tokens) go to the field."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for path_field in ("model", "preset"):   # paths may come as pathlib.Path
            if isinstance(values.get(path_field), os.PathLike):
                values[path_field] = os.fspath(values[path_field])
        given = [*(values.pop("settings", None) or {}).items(),
                 *[(key, values.pop(key)) for key in [k for k in values if k not in cls.model_fields]]]
        settings = {}
        for key, value in given:
            name = setting_name(key, source=cls.__name__)
            where = SETTING_FIELDS.get(name)
            if (where in values) if where else (name in settings):
                raise TrimtabError(f"{cls.__name__}: {name} is given twice (as {where or name} and as {key})")
            if where:
                values[where] = value
            else:
                settings[name] = value
        values["settings"] = settings
        return values

    @model_validator(mode="after")
    def _check(self):
        source = type(self).__name__
        if self.guard not in GUARD_MODES:
            raise TrimtabError(f"{source}: guard must be one of {', '.join(GUARD_MODES)}, got {self.guard!r}")
        canonical_settings(self._instance_settings(), source=source)
        if self.preset is not None:
            load_preset(self.preset)
        model_registry.get_model(self.model, self.device)  # load (or share) it now: errors show here
        return self

    # -- shared by both front ends ---------------------------------------------------------------

    def _instance_settings(self) -> dict[str, Any]:
        values = {setting: getattr(self, field) for field, setting in FIELD_SETTINGS.items()
                  if getattr(self, field) is not None}
        return {**values, **self.settings}

    def _options(self, stop: list[str] | None, kwargs: Mapping[str, Any], extra: Sequence[str] = ()) -> _Options:
        """One call's options: its keyword arguments over the instance's. Those named in `extra`
        are handed back as they are; every other name must be a setting."""
        options = dict(kwargs)
        extras = {name: options.pop(name) for name in extra if name in options}
        model_name = options.pop("model", None) or self.model
        preset, guard = options.pop("preset", self.preset), options.pop("guard", self.guard)
        timeout = options.pop("timeout", self.timeout)
        options.pop("max_retries", None)
        settings = self._instance_settings()
        for key, value in options.items():
            settings[setting_name(key, source=type(self).__name__)] = value
        if stop is not None:
            settings["stop"] = stop
        return _Options(model_name, preset, guard, timeout, settings, extras)

    def _stream_for(self, options: _Options, prompt_or_messages, **chat) -> Stream:
        """The engine stream for a call, through the guard."""
        return self._engine(options.model_name).stream(prompt_or_messages, preset=options.preset,
                                                       guard=options.guard, **chat, **options.settings)

    def _engine(self, model: str | None = None) -> Model:
        return model_registry.get_model(model or self.model, self.device)

    def _standard_ls_params(self, model_type: str, stop: list[str] | None, kwargs: Mapping[str, Any]) -> dict:
        params = {"ls_provider": "trimtab", "ls_model_type": model_type,
                  "ls_model_name": kwargs.get("model") or self.model}
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stop = stop if stop is not None else self.stop
        if stop:
            params["ls_stop"] = list(stop)
        return params

    # -- streaming, shared by both front ends: `inputs` is the prompt (LLM) or the messages (chat
    # model), which each subclass's `_chunks` turns into chunks of its own kind

    def _stream(self, inputs, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator:
        for chunk in self._chunks(inputs, stop, kwargs, _Cancel()):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, inputs, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator:
        async with aclosing(_iterate_in_thread(functools.partial(self._chunks, inputs, stop, kwargs))) as chunks:
            async for chunk in chunks:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model, "device": self.device, "preset": self.preset, "guard": self.guard,
                **self._instance_settings()}

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of text by the model's own tokenizer (no BOS/EOS added)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self._engine().tokenizer.encode(text, add_special_tokens=False)


# -- one call on the engine ----------------------------------------------------------------------

@dataclass
class _Options:
    model_name: str
    preset: Any
    guard: str
    timeout: float | None
    settings: dict[str, Any]
    extras: dict[str, Any]


class _Cancel:
    """Cancels a call from another thread, whether or not its engine stream has started yet."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stream: Stream | None = None
        self._set = False

    def attach(self, stream: Stream) -> None:
        with self._lock:
            self._stream = stream
            if self._set:
                stream.cancel()

    def set(self) -> None:
        with self._lock:
            self._set = True
            if self._stream is not None:
                self._stream.cancel()


@dataclass
class _Call:
    """One generation: the engine's stream, a reply prefix the prompt already holds (a forced tool
    call's opening, a JSON object's "{"), and a timeout that stops the engine."""

    stream: Stream
    model_name: str
    prefix: str = ""
    timeout: float | None = None
    timed_out: bool = False

    def pieces(self) -> Iterator[str]:
        timer = None
        if self.timeout is not None:
            timer = threading.Timer(self.timeout, self._time_out)
            timer.daemon = True
            timer.start()
        finished = False
        try:
            if self.prefix:
                yield self.prefix
            yield from self.stream
            finished = True
        finally:
            if timer is not None:
                timer.cancel()
            if not finished:      # the caller stopped early: stop the engine too
                self.stream.cancel()
        if self.timed_out and self.completion.finish_reason == "cancelled":
            raise TimeoutError(f"{self.model_name}: no complete reply within the {self.timeout:g} s timeout; "
                               "generation was stopped")

    def _time_out(self) -> None:
        self.timed_out = True
        self.stream.cancel()

    @property
    def completion(self) -> Completion:
        return self.stream.completion

    def metadata(self) -> dict[str, Any]:
        """What response_metadata / generation_info carry: the model, why the reply ended, and
        what the guard changed."""
        completion = self.completion
        return {"model_name": self.model_name, "finish_reason": completion.finish_reason,
                "overrides": [{"field": o.field, "asked": _plain(o.asked), "applied": _plain(o.applied),
                               "reason": o.reason} for o in completion.overrides]}

    def usage(self) -> UsageMetadata:
        usage = self.completion.usage
        return UsageMetadata(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                             total_tokens=usage.total_tokens)


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


async def _iterate_in_thread(produce: Callable[[_Cancel], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in a worker thread and hand its items to the event loop. When the
    consumer stops (a cancelled task, an early break), the engine is cancelled and the worker
    waited for, so the model is free for the next call once this returns or raises."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = _Cancel()
    worker_done = loop.create_future()

    def post(kind: str, value: Any = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            cancel.set()

    def finish() -> None:
        if not worker_done.done():
            worker_done.set_result(None)

    def work() -> None:
        try:
            for item in produce(cancel):
                post("item", item)
            post("end")
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            post("error", error)
        finally:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:
                pass

    worker = threading.Thread(target=work, name="trimtab-langchain", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        cancel.set()                              # a no-op once the engine has finished
        await asyncio.shield(worker_done)
        worker.join()                             # it has posted its last word: this is immediate


# -- messages ------------------------------------------------------------------------------------

def _text(content: str | list | None, *, role: str) -> str:
    """A message's content as the plain text a chat template takes."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") in ("tool_use", "tool_call", "reasoning", "thinking", "redacted_thinking"):
            continue  # tool calls travel in tool_calls; reasoning is not shown to the model again
        else:
            raise TrimtabError(f"a {role} message holds a {block.get('type')!r} block; trimtab's models "
                               "take text only")
    return "".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages → the dicts Hugging Face chat templates take (tool calls in HF's
    {"type": "function", "function": {"name", "arguments"}} form)."""
    out = []
    for message in messages:
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
        elif isinstance(message, (ToolMessage, FunctionMessage)):
            role = "tool"
        elif isinstance(message, ChatMessage):
            role = message.role
        else:
            raise TrimtabError(f"cannot render a {type(message).__name__} with a chat template")
        entry: dict[str, Any] = {"role": role, "content": _text(message.content, role=role)}
        if isinstance(message, AIMessage) and message.tool_calls:
            entry["tool_calls"] = [{"type": "function", "id": call.get("id"),
                                    "function": {"name": call["name"], "arguments": call["args"]}}
                                   for call in message.tool_calls]
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def _with_system_note(messages: list[dict], note: str) -> list[dict]:
    """The conversation with a note added to its system message (a new one if it has none)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{note}" if first["content"] else note}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _forced_tool(tool_choice: Any, tools: list[dict]) -> str | None:
    """None: the model decides whether to call a tool; "": it must call one; a name: that one."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice in (None, "auto", False):
        return None
    if tool_choice in ("any", "required", True):
        return names[0] if len(names) == 1 else ""
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    raise TrimtabError(f"tool_choice must be 'auto', 'any', 'required', 'none' or a bound tool's name "
                       f"({', '.join(names)}), got {tool_choice!r}")


# -- structured output ---------------------------------------------------------------------------

def _first_json_object(text: str, *, partial: bool) -> dict | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        value = parse_partial_json(text[start:]) if partial else None
    return value if isinstance(value, dict) else None


class JsonReplyParser(JsonOutputParser):
    """The first JSON object in a reply (text around it, code fences and all, is ignored),
    validated into `schema_class` (a Pydantic model, v1 or v2) when one is given. Streaming yields
    growing partial dicts, or only the complete object for a Pydantic schema."""

    schema_class: Any = None

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        text = result[0].text
        value = _first_json_object(text, partial=partial)
        if value is None:
            if partial:
                return None
            raise OutputParserException(f"the model's reply holds no complete JSON object: {text[:300]!r}",
                                        llm_output=text)
        if self.schema_class is None:
            return value
        try:
            if hasattr(self.schema_class, "model_validate"):
                return self.schema_class.model_validate(value)
            return self.schema_class.parse_obj(value)
        except (ValidationError, ValidationErrorV1) as error:
            if partial:
                return None
            raise OutputParserException(f"the model's JSON does not fit {self.schema_class.__name__}: {error}",
                                        llm_output=text) from error


def _json_note(response_format: Mapping[str, Any]) -> str:
    if response_format.get("type") == "json_schema":
        schema = response_format["json_schema"]["schema"]
        return ("Reply with one JSON object that follows this JSON schema, and nothing else:\n"
                + json.dumps(schema, ensure_ascii=False))
    if response_format.get("type") == "json_object":
        return "Reply with one JSON object, and nothing else."
    raise TrimtabError(f"response_format type must be 'json_schema' or 'json_object', got {response_format!r}")


# -- the LLM -------------------------------------------------------------------------------------

class TrimtabLLM(_TrimtabParams, LLM):
    """A trimtab model as a LangChain completion LLM: the prompt is continued as plain text."""

    @property
    def _llm_type(self) -> str:
        return "trimtab"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        return self._standard_ls_params("llm", stop, kwargs)

    def _start(self, prompt: str, stop: list[str] | None, kwargs: dict, cancel: _Cancel) -> _Call:
        options = self._options(stop, kwargs)
        stream = self._stream_for(options, prompt)
        cancel.attach(stream)
        return _Call(stream, options.model_name, timeout=options.timeout)

    def _chunks(self, prompt: str, stop, kwargs: dict, cancel: _Cancel) -> Iterator[GenerationChunk]:
        call = self._start(prompt, stop, kwargs, cancel)
        for piece in call.pieces():
            yield GenerationChunk(text=piece)
        yield GenerationChunk(text="", generation_info={**call.metadata(), "usage": dict(call.usage())})

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return "".join([chunk.text async for chunk in self._astream(prompt, stop, run_manager, **kwargs)])

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        return _llm_result([_merge(self._stream(p, stop, run_manager, **kwargs)) for p in prompts])

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        results = []
        for prompt in prompts:
            results.append(_merge([c async for c in self._astream(prompt, stop, run_manager, **kwargs)]))
        return _llm_result(results)

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))


def _merge(chunks) -> GenerationChunk:
    merged = None
    for chunk in chunks:
        merged = chunk if merged is None else merged + chunk
    return merged


def _llm_result(generations: list[GenerationChunk]) -> LLMResult:
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for generation in generations:
        for key, name in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens"),
                          ("total_tokens", "total_tokens")):
            usage[key] += generation.generation_info["usage"][name]
    model_name = generations[0].generation_info["model_name"] if generations else None
    return LLMResult(generations=[[Generation(text=g.text, generation_info=g.generation_info)] for g in generations],
                     llm_output={"token_usage": usage, "model_name": model_name})


# -- the chat model ------------------------------------------------------------------------------

class ChatTrimtab(_TrimtabParams, BaseChatModel):
    """A trimtab model as a LangChain chat model: messages are rendered with the model's own chat
    template; tool calling goes through the template's `tools` support."""

    @property
    def _llm_type(self) -> str:
        return "trimtab-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        return self._standard_ls_params("chat", stop, kwargs)

    # -- one call --------------------------------------------------------------------------------

    def _start(self, messages: list[BaseMessage], stop, kwargs: dict, cancel: _Cancel) -> tuple[_Call, int | None]:
        """→ the running call, and how many tool calls to take from its reply (0: the reply is
        not searched for calls; None: all of them)."""
        options = self._options(stop, kwargs, CHAT_OPTIONS)
        tools, tool_choice = options.extras.get("tools") or None, options.extras.get("tool_choice")
        response_format = options.extras.get("response_format")
        model_name, model = options.model_name, self._engine(options.model_name)
        chat = to_chat_messages(messages)

        prefix = ""
        if tool_choice == "none":
            tools = None
        if tools and response_format:
            raise TrimtabError("tools and response_format cannot be combined in one call")
        if tools:
            supported, call_format = tool_support(model)
            if not supported:
                raise ToolCallingUnsupported(
                    f"{model_name}: this model's chat template has no tool support (it never reads `tools`), "
                    "so tools cannot be shown to the model; use a model whose template supports tools "
                    "(Qwen2.5, Llama 3.1+, Mistral, Hermes), or with_structured_output(method='json_schema')")
            forced = _forced_tool(tool_choice, tools)
            if forced is not None:
                if call_format is None:
                    raise TrimtabError(f"{model_name}: tool_choice={tool_choice!r} needs the template's tool-call "
                                       "format, and trimtab does not recognise this template's (it knows Hermes/Qwen "
                                       "<tool_call>, Mistral [TOOL_CALLS] and Llama 3 JSON); use tool_choice='auto'")
                prefix = forced_call_prefix(call_format, forced or None)
        if response_format:
            chat = _with_system_note(chat, _json_note(response_format))
            prefix = "{"

        if prefix:  # the reply starts inside the prompt: render it, then write the prefix after it
            prompt = model.tokenizer.render_chat(chat, add_generation_prompt=True, tools=tools) + prefix
            stream = self._stream_for(options, prompt)
        else:
            stream = self._stream_for(options, chat, tools=tools)
        cancel.attach(stream)
        max_calls = 0 if not tools else 1 if options.extras.get("parallel_tool_calls") is False else None
        return _Call(stream, model_name, prefix=prefix, timeout=options.timeout), max_calls

    def _chunks(self, messages: list[BaseMessage], stop, kwargs: dict,
                cancel: _Cancel) -> Iterator[ChatGenerationChunk]:
        call, max_calls = self._start(messages, stop, kwargs, cancel)
        splitter = ToolCallSplitter() if max_calls != 0 else None
        for piece in call.pieces():
            text = splitter.push(piece) if splitter else piece
            if text:
                yield ChatGenerationChunk(message=AIMessageChunk(content=text))
        text, calls = parse_tool_calls(splitter.finish()) if splitter else ("", [])
        calls = calls[:max_calls]
        metadata = call.metadata()
        message = AIMessageChunk(
            content=text, usage_metadata=call.usage(), response_metadata=metadata, chunk_position="last",
            tool_call_chunks=[tool_call_chunk(name=c["name"], args=c["args"], id=f"call_{uuid.uuid4().hex[:24]}",
                                              index=i) for i, c in enumerate(calls)])
        yield ChatGenerationChunk(message=message, generation_info={"finish_reason": metadata["finish_reason"]})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    # -- tokens ----------------------------------------------------------------------------------

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Tokens of the conversation as the model's chat template renders it."""
        schemas = [convert_to_openai_tool(t) for t in tools] if tools else None
        return len(self._engine().tokenizer.encode_chat(to_chat_messages(messages), add_generation_prompt=False,
                                                        tools=schemas))

    # -- tools and structured output -------------------------------------------------------------

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | Any], *,
                   tool_choice: str | dict | bool | None = None, strict: bool | None = None,
                   parallel_tool_calls: bool | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools (LangChain tools, functions, Pydantic models, JSON schemas) to the model.
        tool_choice: "auto" (default), "none", "any"/"required" (a call is forced by writing its
        opening into the reply) or a tool's name. parallel_tool_calls=False keeps only the first
        call of a reply. Models whose chat template has no tool support raise
        ToolCallingUnsupported when called."""
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        if tool_choice != "none":
            _forced_tool(tool_choice, formatted)  # an unknown name fails here, not at the first call
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type, *,
                               method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
                               include_raw: bool = False, strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Replies parsed into `schema` (a Pydantic model, TypedDict or JSON schema).
        method="json_schema" (default) shows the schema to the model and starts its reply with "{";
        "json_mode" asks for any JSON object (the schema only parses it); "function_calling"
        forces a call to a tool made from the schema (templates with tool support only). Nothing
        constrains the decoding: a small model may still write JSON that does not parse."""
        if kwargs:
            raise ValueError(f"unsupported arguments {kwargs}")
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, strict=strict, ls_structured_output_format={
                "kwargs": {"method": method, "strict": strict}, "schema": schema})
            pydantic_schema = isinstance(schema, type) and is_basemodel_subclass(schema)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic_schema
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                response_format = {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema)}}
            else:
                response_format = {"type": "json_object"}
            traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema} if schema is not None else None
            llm = self.bind(response_format=response_format, ls_structured_output_format=traced)
            pydantic_schema = isinstance(schema, type) and is_basemodel_subclass(schema)
            parser = JsonReplyParser(schema_class=schema if pydantic_schema else None)
        else:
            raise ValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")
