"""The text-generation-webui extension, called exactly as webui calls it.

The extension is installed by `trimtab install-webui-extension` into a fake webui checkout and
its script.py loaded by file path (as current webui does); its hooks get state dicts shaped like
webui's (every key webui sends, with its defaults). Stopping is checked causally: the engine's
decode step is gated so the test decides when each token may be made.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
import types
from pathlib import Path

import pytest
import yaml

from tiny_models import write_tiny_model_dir
from trimtab.backend import generation
from trimtab.backend.guard import load_policy
from trimtab.backend.presets import VETTED_PRESETS, load_preset
from trimtab.plugin.cli import main
from trimtab.plugin.webui import extension as ext
from trimtab.plugin.webui.request import webui_request

pytest.importorskip("transformers")

PROMPT = "w5 w6 w7"

# the keys and values of webui's default preset (modules/presets.py `default_preset`, current)
WEBUI_DEFAULT_PRESET = {
    "temperature": 1, "dynatemp_low": 1, "dynatemp_high": 1, "dynatemp_exponent": 1, "smoothing_factor": 0,
    "smoothing_curve": 1, "min_p": 0, "top_p": 1, "top_k": 0, "typical_p": 1, "xtc_threshold": 0.1,
    "xtc_probability": 0, "epsilon_cutoff": 0, "eta_cutoff": 0, "tfs": 1, "top_a": 0, "top_n_sigma": 0,
    "adaptive_target": -1, "adaptive_decay": 0.9, "dry_multiplier": 0, "dry_allowed_length": 2, "dry_base": 1.75,
    "repetition_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0, "encoder_repetition_penalty": 1,
    "no_repeat_ngram_size": 0, "repetition_penalty_range": 1024, "penalty_alpha": 0, "guidance_scale": 1,
    "mirostat_mode": 0, "mirostat_tau": 5, "mirostat_eta": 0.1, "do_sample": True, "dynamic_temperature": False,
    "temperature_last": False,
    "sampler_priority": "repetition_penalty\npresence_penalty\nfrequency_penalty\ndry\ntop_n_sigma\ntemperature\n"
                        "dynamic_temperature\nquadratic_sampling\ntop_k\ntop_p\ntypical_p\nepsilon_cutoff\n"
                        "eta_cutoff\ntfs\ntop_a\nmin_p\nmirostat\nxtc\nencoder_repetition_penalty\nno_repeat_ngram",
    "dry_sequence_breakers": '"\\n", ":", "\\"", "*"',
}


def webui_state(**changes) -> dict:
    """A generation state as current webui builds it (modules/ui.py `list_interface_input_elements`,
    defaults from modules/shared.py `settings`), with `changes` applied."""
    state = {
        **WEBUI_DEFAULT_PRESET, "top_p": 0.95,
        # the Parameters tab beyond the preset
        "max_new_tokens": 512, "prompt_lookup_num_tokens": 0, "max_tokens_second": 0, "auto_max_new_tokens": True,
        "ban_eos_token": False, "add_bos_token": True, "enable_thinking": True, "reasoning_effort": "medium",
        "skip_special_tokens": True, "stream": True, "static_cache": False, "truncation_length": 8192, "seed": -1,
        "custom_stopping_strings": "", "custom_token_bans": "", "negative_prompt": "", "grammar_string": "",
        "navigate_message_index": -1, "navigate_direction": "", "navigate_message_role": "",
        "edit_message_index": -1, "edit_message_text": "", "edit_message_role": "", "branch_index": -1,
        "enable_web_search": False, "web_search_pages": 3,
        # the chat tab
        "history": {"internal": [["hi", "hello"]], "visible": [["hi", "hello"]], "metadata": {}},
        "search_chat": "", "unique_id": "20250101-00-00-00", "textbox": {"text": "w5", "files": []},
        "start_with": "", "mode": "instruct", "chat_style": "cai-chat",
        "chat-instruct_command": 'Continue the chat dialogue below. Write a single reply for "<|character|>".',
        "character_menu": "Assistant", "name2": "AI", "context": "The following is a conversation with an AI.",
        "greeting": "How can I help you today?", "name1": "You", "user_bio": "", "custom_system_message": "",
        "instruction_template_str": "{%- for message in messages %}{{ message['content'] }}{%- endfor -%}",
        "chat_template_str": "{%- for message in messages %}{{ message['content'] }}{%- endfor -%}",
        # the notebook and default tabs
        "textbox-default": "", "textbox-notebook": "", "prompt_menu-default": "QA", "prompt_menu-notebook": "QA",
        "output_textbox": "",
        # the model tab
        "filter_by_loader": "All", "loader": "llama.cpp", "cpu_memory": 0, "gpu_layers": -1, "threads": 0,
        "threads_batch": 0, "batch_size": 1024, "ctx_size": 8192, "cache_type": "fp16", "tensor_split": "",
        "extra_flags": "", "streaming_llm": False, "gpu_split": "", "compute_dtype": "float16", "quant_type": "nf4",
        "load_in_8bit": False, "load_in_4bit": False, "cpu": False, "disk": False, "no_kv_offload": False,
        "no_mmap": False, "mlock": False, "numa": False, "use_double_quant": False, "bf16": False, "autosplit": False,
        "enable_tp": False, "cfg_cache": False, "trust_remote_code": False, "no_use_fast": False,
        "model_draft": "None", "draft_max": 4, "gpu_layers_draft": 256, "device_draft": "", "ctx_size_draft": 0,
        "paste_to_attachment": False,
    }
    state.update(changes)
    return state


# what a sampled reply needs to be reproducible and to run to its length
SAMPLED = dict(temperature=0.25, top_p=0.8, seed=1234, max_new_tokens=12, auto_max_new_tokens=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    write_tiny_model_dir("llama", directory)
    return directory


@pytest.fixture(autouse=True)
def fresh_extension():
    ext.reset()
    yield
    ext.reset()


@pytest.fixture
def loaded(tiny_dir):
    assert ext.load_model(str(tiny_dir), "cpu").startswith("loaded")
    return ext.engine().model


@pytest.fixture
def webui_dir(tmp_path):
    (tmp_path / "webui" / "user_data").mkdir(parents=True)
    return tmp_path / "webui"


def load_script(path: Path, name="user_data.extensions.trimtab.script"):
    """Load an extension's script.py by its file path, as current webui does."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script(webui_dir):
    assert main(["install-webui-extension", str(webui_dir)]) == 0
    return load_script(webui_dir / "user_data" / "extensions" / "trimtab" / "script.py")


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- the hooks, as webui sees them ---------------------------------------------------------------

def test_installed_script_has_webui_hooks_with_webui_signatures(script):
    assert script.params["display_name"] == "trimtab" and script.params["is_tab"] is True
    generate = inspect.signature(script.custom_generate_reply).parameters
    assert list(generate) == ["question", "original_question", "state", "stopping_strings", "is_chat"]
    assert generate["is_chat"].default is False
    assert all(p.default is inspect.Parameter.empty for name, p in generate.items() if name != "is_chat")
    assert len(inspect.signature(script.state_modifier).parameters) == 1
    assert not inspect.signature(script.setup).parameters and not inspect.signature(script.ui).parameters
    assert inspect.isgeneratorfunction(script.custom_generate_reply)


def test_installed_script_loads_under_the_older_package_name(webui_dir):
    (webui_dir / "user_data").rmdir()
    (webui_dir / "extensions").mkdir()
    assert main(["install-webui-extension", str(webui_dir)]) == 0
    module = load_script(webui_dir / "extensions" / "trimtab" / "script.py", name="extensions.trimtab.script")
    assert module.state_modifier is ext.state_modifier and module.params is ext.params


def test_installed_script_says_how_to_fix_a_missing_trimtab(webui_dir, monkeypatch):
    main(["install-webui-extension", str(webui_dir)])
    monkeypatch.setitem(sys.modules, "trimtab.plugin.webui.extension", None)  # as if trimtab were not installed
    with pytest.raises(ModuleNotFoundError, match="needs the trimtab package") as caught:
        load_script(webui_dir / "user_data" / "extensions" / "trimtab" / "script.py")
    assert sys.executable in str(caught.value)


def test_setup_and_ui_build_inside_gradio_blocks(script):
    gr = pytest.importorskip("gradio")
    script.setup()
    with gr.Blocks():
        script.ui()


# -- state_modifier: the guard on webui's state ------------------------------------------------

def test_state_modifier_writes_safe_values_back_and_reports_the_rest():
    state = webui_state(repetition_penalty=1.15, ban_eos_token=True, tfs=0.9, mirostat_mode=2,
                        add_bos_token=False, a_setting_from_a_newer_webui=3)
    safe = ext.state_modifier(state)
    assert safe["repetition_penalty"] == 1.01 and safe["ban_eos_token"] is False
    assert safe["temperature"] == 0.3 and safe["top_p"] == 0.9
    assert safe["dry_multiplier"] == load_policy().loops.dry_multiplier  # DRY takes over from the lowered repetition penalty
    assert state["repetition_penalty"] == 1.15  # the caller's dict is left as it was
    report = ext.last_report()
    for key in ("repetition_penalty", "ban_eos_token", "tfs", "mirostat_mode", "add_bos_token",
                "a_setting_from_a_newer_webui"):
        assert f"{key}:" in report
    for key in ("history", "name1", "loader", "stream", "sampler_priority", "xtc_threshold"):
        assert f"{key}:" not in report


def test_state_modifier_in_warn_mode_keeps_the_values_and_warns():
    ext.params["guard"] = "warn"
    safe = ext.state_modifier(webui_state(repetition_penalty=1.15, ban_eos_token=True))
    assert safe["repetition_penalty"] == 1.15 and safe["ban_eos_token"] is True
    assert "warn mode" in ext.last_report()


def test_a_vetted_preset_replaces_webuis_preset_parameters():
    ext.params["preset"] = "precise"
    safe = ext.state_modifier(webui_state(temperature=1.5, min_p=0.5, mirostat_mode=2, ban_eos_token=True))
    precise = load_preset("precise")
    assert safe["temperature"] == precise["temperature"] and safe["top_p"] == precise["top_p"]
    assert safe["min_p"] == 0 and safe["mirostat_mode"] == 0   # webui's preset values are replaced
    assert safe["ban_eos_token"] is False                      # not a preset parameter: still guarded
    assert "mirostat_mode" not in ext.last_report()


def test_webuis_default_state_has_no_key_trimtab_would_report():
    request = webui_request(webui_state())
    assert request.ignored == ()
    ext.state_modifier(webui_state())
    assert "not supported" not in ext.last_report() and "does not know" not in ext.last_report()
    assert {o.field for o in webui_request(webui_state(brand_new=1)).ignored} == {"brand_new"}


def test_a_bad_stop_string_is_one_line_in_the_report_and_the_state_is_kept():
    state = webui_state(custom_stopping_strings='"unclosed')
    assert ext.state_modifier(state) is state
    assert ext.last_report().startswith("error: custom_stopping_strings: cannot read")


def test_the_reply_budget_follows_auto_max_new_tokens_and_truncation_length():
    def budget(**changes):
        return webui_request(webui_state(**changes), prompt_tokens=10, context_length=64).settings["max_new_tokens"]

    assert budget(auto_max_new_tokens=True) == 54                         # fills the model's context
    assert budget(auto_max_new_tokens=True, truncation_length=32) == 22   # ... or webui's truncation length
    assert budget(auto_max_new_tokens=False, max_new_tokens=100) == 54    # never more than fits
    assert budget(auto_max_new_tokens=False, max_new_tokens=7) == 7


# -- custom_generate_reply ---------------------------------------------------------------------

def replies(state, stopping_strings=(), is_chat=False):
    state = ext.state_modifier(state)  # webui runs it first
    return list(ext.custom_generate_reply(PROMPT, PROMPT, state, list(stopping_strings), is_chat=is_chat))


def test_reply_is_cumulative_and_equals_the_engines_reply_for_the_same_settings(loaded):
    texts = replies(webui_state(**SAMPLED))
    assert len(texts) > 3
    assert all(after.startswith(before) and after != before for before, after in zip(texts, texts[1:]))
    expected = loaded.generate(
        PROMPT, temperature=0.25, top_p=0.8, top_k=0, min_p=0, typical_p=1, repetition_penalty=1,
        repetition_penalty_range=1024, presence_penalty=0, frequency_penalty=0, dry_multiplier=0,
        seed=1234, max_new_tokens=12)
    assert texts[-1] == expected.text
    assert "finished" in ext.last_report()


def test_stop_strings_from_the_call_and_the_state_are_honoured(loaded):
    full = replies(webui_state(**SAMPLED))[-1]
    stop = full.split()[4]
    texts = replies(webui_state(**SAMPLED, custom_stopping_strings=f'"{stop}", "never said"'),
                    stopping_strings=["\nYou:"], is_chat=True)
    expected = loaded.generate(PROMPT, temperature=0.25, top_p=0.8, repetition_penalty_range=1024, dry_multiplier=0,
                               seed=1234, max_new_tokens=12, stop=[stop])
    assert texts[-1] == expected.text and stop not in texts[-1]


def test_no_model_loaded_is_a_clear_report_not_a_traceback(caplog):
    assert replies(webui_state()) == []
    assert "no trimtab model is loaded" in ext.last_report()
    assert [r.levelname for r in caplog.records if "no trimtab model" in r.getMessage()] == ["ERROR"]


class StopWebui:
    """webui's two ways of asking a reply to stop."""

    def __init__(self, how: str, monkeypatch, state: dict):
        self.how = how
        if how == "stop_everything":
            self.shared = types.ModuleType("modules.shared")
            self.shared.stop_everything = False  # webui clears it before each generation
            monkeypatch.setitem(sys.modules, "modules.shared", self.shared)
        else:
            state["stop_event"] = self.event = threading.Event()

    def press(self) -> None:
        if self.how == "stop_everything":
            self.shared.stop_everything = True
        else:
            self.event.set()


@pytest.mark.parametrize("how", ["stop_everything", "stop_event"])
def test_stop_ends_the_reply_at_the_next_token(loaded, monkeypatch, how):
    decodes, gate = [], threading.Semaphore(0)
    real_decode = generation.decode_one_token

    def gated_decode(*args, **kwargs):  # each token waits until the test lets it be made
        decodes.append(1)
        gate.acquire(timeout=10)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(generation, "decode_one_token", gated_decode)
    ext.params["guard"] = "warn"  # keep the EOS ban, so that only the stop can end the reply early
    state = ext.state_modifier(webui_state(temperature=0, ban_eos_token=True, max_new_tokens=40,
                                           custom_token_bans="0, 1, 2, 3",  # every token is then a word
                                           auto_max_new_tokens=False))
    stopper = StopWebui(how, monkeypatch, state)
    texts, decodes_at_stop = [], None
    for text in ext.custom_generate_reply(PROMPT, PROMPT, state, [], is_chat=False):
        texts.append(text)
        if len(text.split()) == 3:
            stopper.press()
            decodes_at_stop = len(decodes)
        gate.release()  # the next token may be made
    gate.release(100)
    ext.engine().submit("w5", settings={"max_new_tokens": 1}).wait()  # replies run in order: the stopped one is over
    assert len(texts[-1].split()) == 3  # nothing was yielded once stop was asked
    assert len(decodes) <= decodes_at_stop + 2 < 39  # the engine stopped within a token or two, not at 40
    assert ext.last_report().splitlines()[1] == ext.STOPPED


# -- the tab: Gradio 4.37 and current Gradio ---------------------------------------------------

# Read from Gradio 4.37.2's source (the PyPI wheel: gradio/components/*.py and gradio/layouts/*.py
# `__init__` parameters, gradio/events.py `event_trigger`, each component's EVENTS): what the tab
# may use. Current Gradio has all of these too (the test builds the tab with it).
GRADIO_437 = {
    "Markdown": ({"value", "label", "every", "show_label", "rtl", "latex_delimiters", "visible", "elem_id",
                  "elem_classes", "render", "key", "sanitize_html", "line_breaks", "header_links", "height"}, ["value"]),
    "Row": ({"variant", "visible", "elem_id", "elem_classes", "render", "equal_height", "show_progress"}, []),
    "Column": ({"scale", "min_width", "variant", "visible", "elem_id", "elem_classes", "render", "show_progress"}, []),
    "Dropdown": ({"choices", "value", "type", "multiselect", "allow_custom_value", "max_choices", "filterable",
                  "label", "info", "every", "show_label", "container", "scale", "min_width", "interactive",
                  "visible", "elem_id", "elem_classes", "render", "key"}, ["choices"]),
    "Radio": ({"choices", "value", "type", "label", "info", "every", "show_label", "container", "scale",
               "min_width", "interactive", "visible", "elem_id", "elem_classes", "render", "key"}, ["choices"]),
    "Button": ({"value", "every", "variant", "size", "icon", "link", "visible", "interactive", "elem_id",
                "elem_classes", "render", "key", "scale", "min_width"}, ["value"]),
    "Textbox": ({"value", "lines", "max_lines", "placeholder", "label", "info", "every", "show_label", "container",
                 "scale", "min_width", "interactive", "visible", "elem_id", "autofocus", "autoscroll",
                 "elem_classes", "render", "key", "type", "text_align", "rtl", "show_copy_button"}, ["value"]),
}
GRADIO_437_EVENTS = {"Dropdown": {"change", "input", "select", "focus", "blur", "key_up"},
                     "Radio": {"select", "change", "input"}, "Button": {"click"},
                     "Textbox": {"change", "input", "select", "submit", "focus", "blur"}}
# event arguments both have (4.37's `show_api` and `every` are gone from current Gradio)
EVENT_ARGUMENTS = {"fn", "inputs", "outputs", "api_name", "scroll_to_output", "show_progress", "queue", "batch",
                   "max_batch_size", "preprocess", "postprocess", "cancels", "trigger_mode", "js",
                   "concurrency_limit", "concurrency_id"}
BUTTON_VARIANTS_437 = {"primary", "secondary", "stop"}


class RecordingGradio:
    """Stands in for the gradio module: lets through only what Gradio 4.37 has, records each use."""

    def __init__(self, gr):
        self.gr, self.calls, self.events = gr, [], []

    def __getattr__(self, name):
        if name == "update":
            return self._update
        assert name in GRADIO_437, f"gr.{name} is not one of the Gradio 4.37 components the tab may use"
        allowed, positional = GRADIO_437[name]

        def make(*args, **kwargs):
            assert len(args) <= len(positional), f"gr.{name}: too many positional arguments"
            used = set(kwargs) | set(positional[:len(args)])
            assert used <= allowed, f"gr.{name} in Gradio 4.37 has no {sorted(used - allowed)}"
            if name == "Button":
                assert kwargs.get("variant", "secondary") in BUTTON_VARIANTS_437
            self.calls.append((name, used))
            block = getattr(self.gr, name)(*args, **kwargs)
            for event in GRADIO_437_EVENTS.get(name, ()):
                setattr(block, event, self._listener(name, event, getattr(block, event)))
            return block

        return make

    def _listener(self, component, event, real):
        def listen(*args, **kwargs):  # the one positional argument both versions take is fn
            assert len(args) <= 1 and set(kwargs) <= EVENT_ARGUMENTS, f"{component}.{event}({sorted(kwargs)})"
            kwargs.update(zip(["fn"], args))
            self.events.append((component, event, kwargs))
            return real(**kwargs)
        return listen

    def _update(self, **props):
        self.calls.append(("update", set(props)))
        return self.gr.update(**props)


def test_the_tab_uses_only_what_gradio_437_has_and_its_handlers_work(tmp_path):
    gr = pytest.importorskip("gradio")
    from trimtab.plugin.webui.ui import build

    recording = RecordingGradio(gr)
    with gr.Blocks():
        build(recording)
    assert {name for name, _ in recording.calls} >= {"Dropdown", "Radio", "Button", "Textbox"}
    clicks = {kwargs["fn"]: kwargs for component, event, kwargs in recording.events if event == "click"}
    assert {ext.load_model, ext.unload_model, ext.last_report} < set(clicks) and len(recording.events) == 6
    refresh = next(fn for fn in clicks if fn not in (ext.load_model, ext.unload_model, ext.last_report))
    assert refresh()["choices"][0][1] == "default"  # the refresh button's gr.update, which 4.37 has too
    assert recording.calls[-1] == ("update", {"choices"})
    assert ext.load_model(str(tmp_path / "no such model"), "cpu").startswith("error: ")  # one line, no raise
    guard_change = next(kwargs["fn"] for c, e, kwargs in recording.events if c == "Radio")
    guard_change("warn")
    assert ext.params["guard"] == "warn"


def test_the_model_menu_lists_webuis_models_folder(tmp_path, monkeypatch, tiny_dir):
    from trimtab.plugin.webui.ui import model_choices

    models = tmp_path / "models"
    (models / "tiny-llama").mkdir(parents=True)
    (models / "tiny-llama" / "config.json").write_text((tiny_dir / "config.json").read_text())
    (models / "small.Q4_K_M.gguf").write_bytes(b"GGUF")
    (models / "mmproj-small.gguf").write_bytes(b"GGUF")        # a vision projector, not a model
    (models / "in-a-folder").mkdir()
    (models / "in-a-folder" / "big.Q6_K.gguf").write_bytes(b"GGUF")
    (models / "notes.txt").write_text("not a model")
    shared = types.ModuleType("modules.shared")
    shared.args = types.SimpleNamespace(model_dir=str(models))
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    assert model_choices() == [
        ("default (embedded SmolLM2-135M-Instruct)", "default"),
        ("in-a-folder/big.Q6_K.gguf (GGUF)", str(models / "in-a-folder" / "big.Q6_K.gguf")),
        ("small.Q4_K_M.gguf (GGUF)", str(models / "small.Q4_K_M.gguf")),
        ("tiny-llama (Hugging Face)", str(models / "tiny-llama")),
    ]


# -- install-webui-extension ---------------------------------------------------------------------

def test_install_writes_only_the_script_in_the_current_layout(webui_dir, capsys):
    (webui_dir / "user_data" / "models").mkdir()
    before = files_under(webui_dir)
    assert main(["install-webui-extension", str(webui_dir)]) == 0
    assert files_under(webui_dir) - before == {"user_data/extensions", "user_data/extensions/trimtab",
                                               "user_data/extensions/trimtab/script.py"}
    assert "wrote" in capsys.readouterr().out


def test_install_uses_the_older_layout_when_there_is_no_user_data(tmp_path):
    (tmp_path / "extensions" / "silero_tts").mkdir(parents=True)
    assert main(["install-webui-extension", str(tmp_path)]) == 0
    assert (tmp_path / "extensions" / "trimtab" / "script.py").is_file()
    assert files_under(tmp_path) == {"extensions", "extensions/silero_tts", "extensions/trimtab",
                                     "extensions/trimtab/script.py"}


def test_reinstalling_over_our_own_extension_is_fine(webui_dir, capsys):
    script = webui_dir / "user_data" / "extensions" / "trimtab" / "script.py"
    assert main(["install-webui-extension", str(webui_dir)]) == 0
    script.write_text(script.read_text() + "# an older version\n")
    assert main(["install-webui-extension", str(webui_dir)]) == 0
    assert "updated" in capsys.readouterr().out and "an older version" not in script.read_text()


def test_a_different_extension_named_trimtab_is_left_alone(webui_dir, capsys):
    folder = webui_dir / "user_data" / "extensions" / "trimtab"
    folder.mkdir(parents=True)
    (folder / "script.py").write_text("params = {'display_name': 'someone else'}\n")
    assert main(["install-webui-extension", str(webui_dir)]) == 1
    err = capsys.readouterr().err
    assert "different extension" in err and len(err.strip().splitlines()) == 1
    assert (folder / "script.py").read_text() == "params = {'display_name': 'someone else'}\n"
    assert main(["install-webui-extension", str(webui_dir), "--force"]) == 0
    assert "trimtab.plugin.webui.extension" in (folder / "script.py").read_text()


def test_a_folder_that_is_not_webui_is_a_clear_error(tmp_path, capsys):
    assert main(["install-webui-extension", str(tmp_path)]) == 1
    assert "does not look like a text-generation-webui checkout" in capsys.readouterr().err
    assert main(["install-webui-extension", str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# -- preset export -----------------------------------------------------------------------------

def test_preset_export_writes_valid_webui_presets(webui_dir, capsys):
    assert main(["preset", "export", str(webui_dir)]) == 0
    for name in VETTED_PRESETS:
        path = webui_dir / "user_data" / "presets" / f"trimtab-{name}.yaml"
        data = yaml.safe_load(path.read_text())  # webui reads presets with yaml.safe_load
        assert set(data) <= set(WEBUI_DEFAULT_PRESET)
        assert all(isinstance(value, (int, float, str, bool)) for value in data.values())
        vetted = load_preset(name)
        assert data == {key: value for key, value in vetted.items() if key in WEBUI_DEFAULT_PRESET}
        assert load_preset(path) == data  # and trimtab reads it back the same
    assert capsys.readouterr().out.count("written") == 3
    assert main(["preset", "export", str(webui_dir)]) == 0
    assert capsys.readouterr().out.count("unchanged") == 3


def test_preset_export_never_overwrites_a_users_file_without_force(tmp_path, capsys):
    (tmp_path / "extensions").mkdir()
    (tmp_path / "presets").mkdir()
    mine = tmp_path / "presets" / "trimtab-balanced.yaml"
    mine.write_text("temperature: 0.7\n")
    assert main(["preset", "export", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert mine.read_text() == "temperature: 0.7\n" and not (tmp_path / "presets" / "trimtab-precise.yaml").exists()
    assert main(["preset", "export", str(tmp_path), "--force"]) == 0
    assert yaml.safe_load(mine.read_text())["temperature"] == load_preset("balanced")["temperature"]
