"""The text-generation-webui extension's hooks; the installed script.py re-exports them.

webui calls, by these names (its modules/extensions.py):
- `params` — `display_name` and `is_tab` (the extension gets its own tab); webui also restores
  `trimtab-<key>` entries of its settings.yaml into it, so the model, device, guard mode and
  preset chosen here persist with webui's "Save settings";
- `setup()` — once, when the extension loads;
- `ui()` — inside the extension's tab: model and device, load/unload, guard mode, preset, and
  the last guard report (trimtab.plugin.webui.ui);
- `state_modifier(state)` — before each generation; what it returns replaces the state. The
  guard runs here and safe values are written back into the state;
- `custom_generate_reply(question, original_question, state, stopping_strings, is_chat=False)` —
  replaces webui's own generation while the extension is on; `question` is the prompt webui
  has already built with its template, so it is continued as plain text. It yields the whole
  reply so far, and ends at the next token once webui asks it to stop
  (`modules.shared.stop_everything`, or `state['stop_event']` in newer webui).

Replies come from one `ChatEngine` (one model, one reply at a time, in arrival order).
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Iterator, Mapping

from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import ModelTraits, resolve_settings, show_value
from trimtab.backend.presets import VETTED_PRESETS
from trimtab.plugin.app_report import ASSUMED_TRAITS, override_line, reply_status
from trimtab.plugin.chat_engine import ChatEngine, ReplyUpdate
from trimtab.plugin.webui.request import WebuiRequest, safe_state, webui_request

log = logging.getLogger("trimtab.webui")

WEBUI_PRESET = "webui"  # the preset choice that keeps the values of webui's Parameters tab
params: dict[str, Any] = {
    "display_name": "trimtab",
    "is_tab": True,
    "model": "default",        # "default" (the embedded model), or a model dir / .gguf path
    "device": "cpu",           # cpu, cuda or auto
    "guard": "enforce",        # enforce, warn or off
    "preset": WEBUI_PRESET,    # "webui", or a vetted preset: precise, balanced, creative
    "load_on_start": False,    # load `model` when webui starts (set trimtab-load_on_start in settings.yaml)
}
_DEFAULT_PARAMS = dict(params)
NO_MODEL = ("no trimtab model is loaded: load one in the trimtab tab (while the extension is on, "
            "replies come from trimtab, not from webui's Model tab)")
NO_REPLY_YET = "no reply yet"
STOPPED = "stopped: webui asked the reply to stop"

_engine: ChatEngine | None = None
_engine_lock = threading.Lock()
_report = NO_REPLY_YET


def engine() -> ChatEngine:
    """The extension's one engine (made on first use; its worker thread lives with the process)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = ChatEngine()
        return _engine


def reset() -> None:
    """Back to a fresh start: no model, no report, default params (for tests and a clean reload)."""
    global _report
    engine().unload()
    params.clear()
    params.update(_DEFAULT_PARAMS)
    _report = NO_REPLY_YET


# -- the hooks ---------------------------------------------------------------------------------

def setup() -> None:
    """Start the engine; load the model now if settings.yaml says `trimtab-load_on_start: true`."""
    engine()
    if params.get("load_on_start"):
        log.info("trimtab: %s", load_model(params["model"], params["device"]))


def ui() -> None:
    """The trimtab tab (webui has opened it, as `params["is_tab"]` asks)."""
    import gradio

    from trimtab.plugin.webui.ui import build

    build(gradio)


def state_modifier(state: dict) -> dict:
    """The state with the guard applied (in enforce mode, safe values written back, so whatever
    reads the state next gets them); the guard's report is kept for the tab."""
    try:
        request = webui_request(state, preset=chosen_preset())
        settings, overrides = resolve_settings(request.preset, request.settings, model_traits(), params["guard"])
    except TrimtabError as e:
        _report_error(e)
        return state
    _set_report(report_text(overrides, request))
    return safe_state(state, settings, overrides, request.preset)


def custom_generate_reply(question: str, original_question: str, state: dict, stopping_strings,
                          is_chat: bool = False) -> Iterator[str]:
    """Yield the reply so far (each yield extends the one before) until it ends or webui asks it
    to stop. A mistake (no model loaded, a bad setting) is logged in one line and reported in
    the tab; the reply is then empty."""
    current = engine()
    model = current.model
    if model is None:
        _report_error(NO_MODEL)
        return
    try:
        request = webui_request(state, preset=chosen_preset(), stopping_strings=stopping_strings,
                                prompt_tokens=len(model.tokenizer.encode(question)),
                                context_length=model.context_length)
        reply = current.submit(question, preset=request.preset, guard=params["guard"], settings=request.settings,
                               should_stop=lambda: stop_requested(state))
    except TrimtabError as e:
        _report_error(e)
        return
    shown, update, status = None, None, STOPPED
    try:
        for update in reply:
            if stop_requested(state):
                break
            if update.text != shown:
                shown = update.text
                yield shown
            if update.finish_reason is not None:
                status = reply_status(ReplyUpdate(update.text, (), update.completion, update.finish_reason))
    except TrimtabError as e:
        _report_error(e)
        return
    finally:
        reply.cancel()  # frees the engine at once if webui stopped or left early; nothing if it finished
    _set_report(report_text(update.overrides if update is not None else (), request, status))


# -- what the hooks share with the tab ---------------------------------------------------------

def stop_requested(state: Mapping[str, Any]) -> bool:
    """webui's stop button: `modules.shared.stop_everything` (only inside webui, where its modules
    are already imported), or the request's own `stop_event` (newer webui, its API)."""
    shared = sys.modules.get("modules.shared")
    if shared is not None and getattr(shared, "stop_everything", False):
        return True
    event = state.get("stop_event")
    return event is not None and event.is_set()


def chosen_preset() -> str | None:
    return params["preset"] if params.get("preset") in VETTED_PRESETS else None


def model_traits() -> ModelTraits:
    model = engine().model
    return model.traits if model is not None else ASSUMED_TRAITS


def load_model(model: str, device: str) -> str:
    """Load a model for the replies; → the status line (a mistake is the line, not an exception)."""
    model = (model or "default").strip()
    try:
        engine().load(model, device)
    except TrimtabError as e:
        return f"error: {e}"
    params["model"], params["device"] = model, device
    return model_status()


def unload_model() -> str:
    engine().unload()
    return model_status()


def model_status() -> str:
    current = engine()
    if current.model is None:
        return "no model loaded"
    return f"loaded {current.model_name} on {current.model.transformer.device}"


def last_report() -> str:
    return _report


def report_text(overrides, request: WebuiRequest, status: str | None = None) -> str:
    """What the guard and the webui mapping did to a reply's settings, line by line, after the
    reply's status (finished or stopped) once it has one."""
    choice = request.preset or "webui's own (Parameters tab)"
    head = [f"guard: {params['guard']}; preset: {choice}", *([status] if status else [])]
    lines = [override_line(o) for o in (*overrides, *request.adjusted)]
    lines += [f"{o.field}: {show_value(o.asked)}: {o.reason}" for o in request.ignored]
    return "\n".join(head + (lines or ["nothing changed: every setting is within trimtab's vetted ranges"]))


def _set_report(text: str) -> None:
    global _report
    _report = text
    log.info("trimtab: %s", text.replace("\n", "; "))


def _report_error(problem) -> None:
    """A mistake the user can fix: one line in webui's log and in the tab, no traceback."""
    global _report
    _report = f"error: {problem}"
    log.error("trimtab: %s", problem)
