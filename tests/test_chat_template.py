"""Chat templates: real templates rendered like transformers does, and hostile ones that must fail safely."""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
import time

import pytest

from trimtab.backend.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate
from trimtab.backend.errors import ChatTemplateError, TrimtabError

# -- templates ---------------------------------------------------------------------------------

# SmolLM2-135M-Instruct's template, as stored in the embedded default model's GGUF.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# In the style of Llama 3.1: BOS from bos_token, tools as JSON in the system turn, one tool call per turn.
LLAMA3_TOOLS = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "1 Jan 2025" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "Call a function by answering with JSON: {\\"name\\": ..., \\"parameters\\": {...}}.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role in ['user', 'system', 'assistant'] and not message.tool_calls %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.tool_calls %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception("This template supports one tool call per message.") }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# In the style of Mistral's first instruct models: roles must alternate, enforced with raise_exception.
MISTRAL = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# ChatML with content given as a list of parts, tool calls and a tools section, as multimodal and
# tool-using Qwen-style templates do.
CHATML_PARTS = """\
{%- if tools %}
<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
<|im_start|>{{ message.role }}
{% if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}{% if part.type == 'text' %}{{ part.text }}{% elif part.type == 'image' %}<image>{% endif %}{% endfor %}{% endif %}
{%- if message.tool_calls is defined %}{% for call in message.tool_calls %}
<tool_call>{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>
{%- endfor %}{% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# A grab bag of the Jinja features chat templates use.
FEATURES = """\
{%- set ns = namespace(count=0, last_user=-1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' %}{% set ns.count = ns.count + 1 %}{% set ns.last_user = loop.index0 %}{% endif -%}
{%- endfor -%}
users={{ ns.count }} last={{ ns.last_user }}
{% for m in messages|selectattr('role', 'equalto', 'user')|list %}{{ loop.index }}:{{ m.content|upper|replace('O', '0') }}{{ ', ' if not loop.last }}{% endfor %}
{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% if loop.index > 4 %}{% break %}{% endif %}{% generation %}[{{ m.role|title }}]{% endgeneration %}{% endfor %}
{{ dict(b=[1, 2], a=1) | tojson(sort_keys=True, separators=(',', ':')) }}
{{ (messages|map(attribute='content')|join(' | '))|truncate(40) }}
{% macro show(m) %}<{{ m.role }}:{{ m.content|length }}>{% endmacro %}{% for m in messages %}{{ show(m) }}{% endfor %}
{{ messages|length }} {{ '%s-%03d'|format('x', 7) }} {{ '{}+{}'.format(1, 2) }} {{ "é ✓ 😀"|tojson }} {{ [1, 2, 3]|sum }} {{ 'a' ~ 1 ~ none }}
{{ messages[::-1][0].content|wordwrap(20) }} {{ 'x' * 3 }} {{ 2 ** 8 }} {{ 7 % 3 }} {{ [1] + [2] }}
{%- if tools %}
{{ tools|tojson(indent=2) }}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — with non-ASCII: Zürich, 東京",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}

CHAT = [
    {"role": "user", "content": "Hello there! Who are you?"},
    {"role": "assistant", "content": "I am a small model."},
    {"role": "user", "content": "Tell me about Zürich and 東京 😀"},
]
CHAT_WITH_SYSTEM = [{"role": "system", "content": "  You are terse.  "}, *CHAT]
TOOL_CHAT = [
    {"role": "system", "content": "You may call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}],
    },
    {"role": "tool", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"},
    {"role": "user", "content": "Thanks"},
]
PARTS_CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]},
    {
        "role": "assistant",
        "content": "Let me look it up.",
        "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"q": "cat", "n": 3}}}],
    },
    {"role": "user", "content": [{"type": "text", "text": "ok"}]},
]


# -- transformers as the oracle ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_render():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(["hello world"] * 4, trainer)

    def render(template: str, messages, *, bos_token="<s>", eos_token="</s>", **kwargs) -> str:
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos_token, eos_token=eos_token)
        return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)

    return render


CASES = [
    ("smollm2", SMOLLM2, CHAT, {}),
    ("smollm2-system", SMOLLM2, CHAT_WITH_SYSTEM, {}),
    ("llama3", LLAMA3_TOOLS, CHAT_WITH_SYSTEM, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    ("llama3-tools", LLAMA3_TOOLS, TOOL_CHAT, {"bos_token": "<|begin_of_text|>", "tools": [WEATHER_TOOL]}),
    ("llama3-date", LLAMA3_TOOLS, CHAT, {"bos_token": "<|begin_of_text|>", "date_string": "26 Jul 2024"}),
    ("mistral", MISTRAL, CHAT, {}),
    ("mistral-system", MISTRAL, CHAT_WITH_SYSTEM, {}),
    ("chatml-parts", CHATML_PARTS, PARTS_CHAT, {"tools": [WEATHER_TOOL]}),
    ("features", FEATURES, CHAT_WITH_SYSTEM, {"tools": [WEATHER_TOOL]}),
    ("features-no-tools", FEATURES, CHAT, {}),
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name, template, messages, kwargs", CASES, ids=[case[0] for case in CASES])
def test_renders_like_transformers(hf_render, name, template, messages, kwargs, add_generation_prompt):
    kwargs = {"bos_token": "<s>", "eos_token": "</s>", **kwargs}  # what transformers takes from the tokenizer
    expected = hf_render(template, messages, add_generation_prompt=add_generation_prompt, **kwargs)
    ours = ChatTemplate(template, origin=name).render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    assert ours == expected


def test_smollm2_default_system_prompt():
    text = ChatTemplate(SMOLLM2).render([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = ChatTemplate(SMOLLM2).render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert "SmolLM" not in custom and custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_raise_exception_carries_the_template_message(hf_render):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate") as hf_error:
        hf_render(MISTRAL, bad)
    assert "TemplateError" in type(hf_error.value).__name__
    with pytest.raises(ChatTemplateError, match="conversation roles must alternate") as ours:
        ChatTemplate(MISTRAL, origin="mistral/tokenizer_config.json").render(bad)
    assert str(ours.value).startswith("mistral/tokenizer_config.json: ")
    with pytest.raises(ChatTemplateError, match="one tool call per message"):
        two_calls = [{"role": "assistant", "tool_calls": [TOOL_CHAT[2]["tool_calls"][0]] * 2}]
        ChatTemplate(LLAMA3_TOOLS).render(two_calls)


def test_supports_tools():
    assert ChatTemplate(LLAMA3_TOOLS).supports_tools
    assert ChatTemplate(CHATML_PARTS).supports_tools
    assert not ChatTemplate(SMOLLM2).supports_tools
    assert not ChatTemplate("{{ 'tools' }}{# tools #}").supports_tools


def test_messages_pass_through_unchanged():
    template = ChatTemplate("{{ messages | tojson }}")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]
    assert json.loads(template.render(messages)) == messages


def test_inputs_are_plain_data():
    class Image:
        def save(self, path):  # a method the sandbox would not know is dangerous
            raise AssertionError("the template reached the object")

    template = ChatTemplate("{% for part in messages[0].content %}{{ part.image }}{% endfor %}")
    assert template.render([{"role": "user", "content": [{"type": "image", "image": Image()}]}]) == "<Image>"
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages[0].content[0].image.save('x') }}").render(
            [{"role": "user", "content": [{"type": "image", "image": Image()}]}]
        )


def test_strftime_now():
    text = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert text == str(datetime.datetime.now().year)


@pytest.mark.parametrize(
    "messages, where",
    [
        ("hello", "messages must be a list"),
        ([{"role": "user", "content": "a"}, "oops"], "messages[1]"),
        ([{"content": "a"}], "messages[0] needs a string 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], "messages[1]"),
    ],
)
def test_bad_messages_name_the_index(messages, where):
    with pytest.raises(TrimtabError) as error:
        ChatTemplate(SMOLLM2).render(messages)
    assert where in str(error.value)


def test_long_input_raises_the_caps():
    long_text = "word " * 600_000  # 3 MB: past the 1 MB base output cap, but it is the input
    text = ChatTemplate(SMOLLM2).render([{"role": "user", "content": long_text}])
    assert long_text in text


def test_renders_from_many_threads():
    template = ChatTemplate(FEATURES)
    expected = template.render(CHAT_WITH_SYSTEM)
    results = []

    def work():
        results.extend(template.render(CHAT_WITH_SYSTEM) for _ in range(20))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 160


def test_jinja_power_is_left_associative():
    # Jinja reads 10**10**10 as (10**10)**10 = 10**100: harmless, so it renders.
    assert ChatTemplate("{{ 10**10**10 }}").render([]) == "1" + "0" * 100


# -- hostile templates -------------------------------------------------------------------------

HOSTILE = [
    ("dunder-mro", "{{ ''.__class__.__mro__ }}", "unsafe"),
    ("subclasses", "{{ messages.__class__.__subclasses__() }}", "unsafe"),
    ("globals", "{{ cycler.__init__.__globals__ }}", "unsafe"),
    ("dunder-print", "{{ ''.__class__ }}", "unsafe"),
    ("format-escape", "{{ '{0.__class__}'.format('') }}", "unsafe"),
    ("namespace-underscore", "{% set ns = namespace(_Namespace__attrs=1) %}", "unsafe"),
    ("mutate-list", "{% set x = [] %}{{ x.append(1) }}", "unsafe"),
    ("busy-loop", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "time cap"),
    ("recursive-macro", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion cap"),
    ("exponential-macro", "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}", "cap"),
    ("repeat-string", "{{ 'a' * 10**9 }}", "size cap"),
    ("repeat-list", "{{ [0] * 1000000000 }}", "size cap"),
    ("huge-power", "{{ 10**(10**10) }}", "size cap"),
    ("huge-product", "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}", "size cap"),
    ("doubling-concat", "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}", "size cap"),
    ("doubling-plus", "{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}", "size cap"),
    ("center", "{{ 'a'|center(1000000000) }}", "size cap"),
    ("ljust", "{{ 'a'.ljust(1000000000) }}", "size cap"),
    ("indent", "{{ ('\\n' * 999999)|indent(999999) }}", "size cap"),
    ("replace", "{{ ('a' * 999999).replace('', 'b' * 999999) }}", "size cap"),
    ("join", "{% set x = 'a' * 999999 %}{{ x.join(x) }}", "size cap"),
    ("escape-growth", "{% set e = ('&' * 999999)|e %}{{ e.upper() }}", "size cap"),
    ("str-format-width", "{{ '{:>999999999}'.format(1) }}", "size cap"),
    ("printf-width", "{{ '%999999999d' % 1 }}", "size cap"),
    ("format-filter", "{{ '%.999999999f'|format(1.0) }}", "size cap"),
    ("tojson-indent", "{% set ns = namespace(x=[]) %}{% for i in range(500) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x|tojson(indent=99999) }}", "size cap"),
    ("many-medium-values", "{{ range(100000)|map('center', 999999)|join }}", "allocation cap"),
    ("literal-list", "{% set x = 'a' * 999999 %}{{ [x, x, x, x, x, x, x, x, x, x] }}", "output cap"),
    ("endless-output", "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}", "output cap"),
    ("filter-block", "{% filter upper %}{% for i in range(100000) %}{% for j in range(100000) %}xxxx{% endfor %}{% endfor %}{% endfilter %}", "size cap"),
    ("macro-output", "{% macro m() %}{% for i in range(100000) %}{% for j in range(100000) %}xxxx{% endfor %}{% endfor %}{% endmacro %}{{ m() }}", "size cap"),
    ("big-range", "{{ range(10**8)|list }}", "range"),
    ("include", "{% include 'other.jinja' %}", "no loader"),
    ("syntax-error", "{% for m in messages %}\n{{ m.content }}\n{% endfor\n", "syntax error on line 3"),
    ("unknown-filter", "line one\n{{ x|nonesuch }}", "syntax error on line 2"),
]


@pytest.mark.parametrize("name, source, expected", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_template_fails_safely(name, source, expected):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as error:
        ChatTemplate(source, origin=f"{name}.jinja").render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 10  # the time cap is 2 s; this only catches a hang
    message = str(error.value)
    assert message.startswith(f"{name}.jinja"), message
    assert expected in message, message
    # The process carries on: a normal template still renders.
    assert ChatTemplate(SMOLLM2).render([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_huge_template_source_is_refused():
    with pytest.raises(ChatTemplateError, match="over the 200,000-character limit") as error:
        ChatTemplate("x" * (MAX_TEMPLATE_CHARS + 1), origin="big.jinja")
    assert str(error.value).startswith("big.jinja")


def test_time_cap_is_configurable_and_stops_the_worker():
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"time cap \(0.3 s\)"):
        ChatTemplate(source, time_limit=0.3).render([])
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + 5
    while any(thread.name == "trimtab-chat-template" for thread in threading.enumerate()):
        assert time.monotonic() < deadline, "the render thread kept running after its deadline"
        time.sleep(0.01)


def test_output_cap_is_configurable():
    template = ChatTemplate("{% for i in range(1000) %}xxxxxxxxxx{% endfor %}", max_output_chars=5_000)
    with pytest.raises(ChatTemplateError, match=r"output cap \(5,\d\d\d characters\)"):
        template.render([])
    assert len(ChatTemplate("{% for i in range(1000) %}xxxxxxxxxx{% endfor %}").render([])) == 10_000


def test_process_exits_after_a_runaway_render():
    script = (
        "from trimtab.backend.chat_template import ChatTemplate\n"
        "from trimtab.backend.errors import ChatTemplateError\n"
        "t = ChatTemplate('{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}', time_limit=0.2)\n"
        "try:\n    t.render([])\nexcept ChatTemplateError as e:\n    print('stopped:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "stopped:" in result.stdout and "time cap" in result.stdout
    assert "Traceback" not in result.stderr
