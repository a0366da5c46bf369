"""The standalone chat app (`trimtab webui`): Gradio Blocks over one `ChatEngine`.

Gradio is the optional extra `app` (`pip install 'trimtab[app]'`): it is imported here, inside
the functions that need it, and nowhere else, so core trimtab imports without it.

What is on the page (elem_id → component) and the events behind it (api_name, what
`gradio_client` calls; the per-session state is never a parameter):

    model-path      Dropdown: "default", the models named at start, or any path typed in
    load-button     /load_model (model path) → model-status, preset-report
    unload-button   /unload_model → model-status, preset-report
    model-status    what is loaded, on which device
    preset-choice   Dropdown: the vetted presets, then the presets this session imported;
                    choosing one → /preset_report
    preset-import   File: a text-generation-webui preset (YAML or JSON) → /import_preset (file)
                    → preset-choice (the import, selected), preset-report
    guard-mode      Radio: enforce, warn, off; choosing one → /preset_report
    preset-report   what the guard keeps, changes (and why) or ignores in the chosen preset
    chatbot         the conversation (messages format); each session keeps its own
    message         the text to send; Enter sends it
    send-button     /chat (message, history, preset choice, guard mode) → message (cleared),
                    chatbot (the reply growing as it streams), reply-info
    stop-button     /stop: cancels this session's reply; the engine moves on at the next token
                    (closing the tab does the same)
    reply-info      the reply's status (waiting, writing, finished or stopped, tokens) and
                    what the guard changed in its settings

Mistakes a user can make (a bad preset file, a model path that is not a model, sending with
no model loaded) show as a one-line message in the page, never a traceback.
"""
import functools
import ipaddress
import os
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import GUARD_MODES
from trimtab.backend.presets import DEFAULT_PRESET, VETTED_PRESETS, load_preset
from trimtab.plugin.app_report import preset_report, reply_status
from trimtab.plugin.app_session import ChatSession, conversation
from trimtab.plugin.chat_engine import ChatEngine, ReplyUpdate

if TYPE_CHECKING:
    import gradio

DEFAULT_HOST = "127.0.0.1"
# chats that may wait on the engine at once (it answers one at a time, in order); each waiting
# chat holds one of Gradio's worker threads (40 by default), so keep this below that
CHAT_CONCURRENCY = 32
# a fast model writes hundreds of tokens a second; redrawing the chat for each would swamp the
# browser (and its Stop button), so a streaming reply is sent at most this often
UPDATE_INTERVAL_S = 0.05
IMPORTED = " (imported)"
FROM_COMMAND_LINE = " (from the command line)"
NEEDS_GRADIO = "the chat app needs Gradio, which is not installed: pip install 'trimtab[app]'"


def require_gradio():
    """→ the gradio module, with analytics off (the app never calls home); TrimtabError if missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_RUN_HISTORY", "False")  # chats are not kept in the browser's run history
    try:
        import gradio
    except ImportError:
        raise TrimtabError(NEEDS_GRADIO) from None
    return gradio


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_bind(host: str, auth: Sequence[tuple[str, str]] | None) -> None:
    """Only this machine may use an app without a password: TrimtabError for any other bind."""
    if not is_loopback(host) and not auth:
        raise TrimtabError(f"listening on {host} (--listen, or a --host other than {DEFAULT_HOST}) needs --auth "
                           "USER:PASS or --auth FILE: without it anyone who can reach this machine can use the model")


def build_app(engine: ChatEngine, *, preset: str | os.PathLike = DEFAULT_PRESET, guard: str = "enforce",
              device: str = "cpu", models: Sequence[str] = ()) -> "gradio.Blocks":
    """The chat app over `engine`, queued so that CHAT_CONCURRENCY chats can wait on it at once.

    preset: the preset chosen when a page opens: a vetted preset's name or a preset file (which
    every session then offers, labelled "NAME (from the command line)"). guard: the guard mode
    chosen when a page opens. device: where Load puts a model. models: paths the model dropdown
    offers besides "default" and whatever the engine has loaded."""
    gr = require_gradio()
    if guard not in GUARD_MODES:
        raise TrimtabError(f"guard mode must be one of {', '.join(GUARD_MODES)}, got {guard!r}")
    start_presets = {}
    if os.fspath(preset) in VETTED_PRESETS:
        start_choice = os.fspath(preset)
    else:
        start_choice = Path(preset).name + FROM_COMMAND_LINE
        start_presets[start_choice] = load_preset(preset)

    def traits():
        model = engine.model
        return model.traits if model is not None else None

    def model_status() -> str:
        if engine.model_name is None:
            return "no model loaded: pick one and press Load"
        return f"loaded: {engine.model_name} ({device})"

    def report(choice: str, mode: str, session: ChatSession) -> str:
        source = f"vetted preset {choice}" if choice in VETTED_PRESETS else choice
        try:
            return preset_report(load_preset(session.preset_for(choice)), source, traits(), mode)
        except TrimtabError as e:
            return f"error: {e}"

    def on_page_load(choice, mode, session):
        return model_status(), report(choice, mode, session)

    def load_model(path, choice, mode, session):
        try:
            engine.load((path or "default").strip(), device)
        except TrimtabError as e:
            gr.Warning(str(e))
            return f"error: {e}", gr.update()
        return model_status(), report(choice, mode, session)

    def unload_model(choice, mode, session):
        engine.unload()
        return model_status(), report(choice, mode, session)

    def import_preset(file, mode, session):
        if not file:  # the file was cleared
            return gr.update(), gr.update()
        path = Path(file)
        label = path.name + IMPORTED
        try:
            values = load_preset(path)
            text = preset_report(values, label, traits(), mode)
        except TrimtabError as e:  # name the file as the user knows it, not Gradio's upload copy
            message = str(e).replace(str(path), path.name)
            gr.Warning(message)
            return gr.update(), f"error: {message}"
        session.presets[label] = values
        return gr.update(choices=[*VETTED_PRESETS, *session.presets], value=label), text

    open_sessions = weakref.WeakValueDictionary()  # session hash → its ChatSession, for tab_closed

    def chat(message: str, history: list, choice: str, mode: str, session: ChatSession,
             request: gr.Request) -> Iterator[tuple]:
        """→ (message box, chatbot, reply-info) as the reply streams."""
        if request is not None:
            open_sessions[request.session_hash] = session
        if not message or not message.strip():
            gr.Warning("Type a message first.")
            yield gr.update(), gr.update(), gr.update()
            return
        history = list(history or [])
        try:
            session.begin()
        except TrimtabError as e:
            raise gr.Error(str(e)) from None
        try:
            asked = {"role": "user", "content": message}
            try:
                reply = engine.submit(conversation(history) + [asked], preset=session.preset_for(choice), guard=mode)
            except TrimtabError as e:
                raise gr.Error(str(e)) from None
            session.attach(reply)
            yield "", [*history, asked], reply_status(None)
            try:
                for update in coalesced(reply):
                    answer = [{"role": "assistant", "content": update.text}] if update.text else []
                    yield "", [*history, asked, *answer], reply_status(update)
            except TrimtabError as e:  # e.g. a prompt longer than the model's context: give the message back
                yield message, history, f"error: {e}"
                raise gr.Error(str(e)) from None
        finally:
            session.finish()

    def stop_reply(session: ChatSession) -> None:
        session.stop()

    def tab_closed(request: gr.Request) -> None:  # nobody is reading the reply any more: free the engine
        session = open_sessions.get(request.session_hash) if request is not None else None
        if session is not None:
            session.stop()

    model_choices = list(dict.fromkeys(["default", *map(str, models), *filter(None, [engine.model_name])]))
    with gr.Blocks(title="trimtab chat", analytics_enabled=False) as demo:
        session = gr.State(functools.partial(ChatSession, start_presets))
        gr.Markdown("## trimtab chat")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=460, **_messages_format(gr))
                message = gr.Textbox(show_label=False, placeholder="Type a message; Enter sends it",
                                     elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send-button")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop-button")
                reply_info = gr.Textbox(label="This reply", interactive=False, lines=2, elem_id="reply-info")
            with gr.Column(scale=2):
                model_path = gr.Dropdown(model_choices, value=lambda: engine.model_name or "default",
                                         allow_custom_value=True, label="Model: default, or a model dir or .gguf path",
                                         elem_id="model-path")
                with gr.Row():
                    load = gr.Button("Load", elem_id="load-button")
                    unload = gr.Button("Unload", elem_id="unload-button")
                status = gr.Textbox(label="Model", interactive=False, elem_id="model-status")
                preset_choice = gr.Dropdown([*VETTED_PRESETS, *start_presets], value=start_choice, label="Preset",
                                            elem_id="preset-choice")
                preset_file = gr.File(label="Import a preset (text-generation-webui YAML or JSON)",
                                      file_types=[".yaml", ".yml", ".json"], elem_id="preset-import")
                guard_mode = gr.Radio(list(GUARD_MODES), value=guard, label="Guard", elem_id="guard-mode")
                preset_text = gr.Textbox(label="What the guard does with this preset", interactive=False, lines=8,
                                         elem_id="preset-report")

        demo.load(on_page_load, [preset_choice, guard_mode, session], [status, preset_text])
        load.click(load_model, [model_path, preset_choice, guard_mode, session], [status, preset_text],
                   api_name="load_model", concurrency_id="model", concurrency_limit=1)
        unload.click(unload_model, [preset_choice, guard_mode, session], [status, preset_text],
                     api_name="unload_model", concurrency_id="model", concurrency_limit=1)
        preset_file.upload(import_preset, [preset_file, guard_mode, session], [preset_choice, preset_text],
                           api_name="import_preset")
        gr.on([preset_choice.input, guard_mode.input], report, [preset_choice, guard_mode, session], [preset_text],
              api_name="preset_report")
        gr.on([send.click, message.submit], chat, [message, chatbot, preset_choice, guard_mode, session],
              [message, chatbot, reply_info], api_name="chat", show_progress="hidden")
        stop.click(stop_reply, [session], None, api_name="stop", concurrency_limit=None, show_progress="hidden")
        demo.unload(tab_closed)
    demo.queue(default_concurrency_limit=CHAT_CONCURRENCY)
    return demo


def coalesced(updates: Iterable[ReplyUpdate], min_interval_s: float = UPDATE_INTERVAL_S
              ) -> Iterator[ReplyUpdate]:
    """The updates worth sending to a browser: at most one per interval while a reply streams
    (each holds the whole text so far, so skipping one loses nothing), and always the last."""
    sent_at = None
    for update in updates:
        now = time.monotonic()
        if update.finish_reason is None and sent_at is not None and now - sent_at < min_interval_s:
            continue
        sent_at = now
        yield update


def _messages_format(gr) -> dict[str, Any]:
    """Gradio 4 and 5 take the messages format as an option (their default is tuples); 6 has only it."""
    import inspect

    return {"type": "messages"} if "type" in inspect.signature(gr.Chatbot.__init__).parameters else {}


def launch(engine: ChatEngine, *, host: str = DEFAULT_HOST, port: int | None = None,
           auth: Sequence[tuple[str, str]] | None = None, prevent_thread_lock: bool = False, quiet: bool = False,
           **app_options) -> "gradio.Blocks":
    """Build the app (`app_options` go to `build_app`) and serve it on host:port (port None: the
    first free one from 7860). Any host but loopback needs `auth` [(user, password), ...].
    Blocks until the server stops unless `prevent_thread_lock`; → the running Blocks (`.close()`)."""
    check_bind(host, auth)
    demo = build_app(engine, **app_options)
    try:
        demo.launch(server_name=host, server_port=port, auth=list(auth) if auth else None, share=False,
                    inbrowser=False, show_error=False, quiet=quiet, prevent_thread_lock=prevent_thread_lock)
    except OSError as e:
        where = f"{host}:{port}" if port else host
        raise TrimtabError(f"cannot serve the app on {where}: {e}") from None
    return demo
