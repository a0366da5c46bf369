"""The standalone chat app (`trimtab webui`), driven over loopback with gradio_client as users
would drive it: concurrent chats, Stop, preset import and the guard's report, model loading,
and the command line's bind and auth rules. No timings are asserted: waiting is causal (see
test_chat_engine.py for the ENDLESS reply that only a cancel can end early)."""
from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio", reason="the chat app needs the optional extra trimtab[app]")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError, AuthenticationError  # noqa: E402

from app_helpers import ENDLESS, GREEDY, free_port, user, wait_until, write_long_tiny_model  # noqa: E402
from trimtab.backend.errors import TrimtabError  # noqa: E402
from trimtab.backend.presets import write_preset  # noqa: E402
from trimtab.plugin import app_cli, gradio_app  # noqa: E402
from trimtab.plugin.app_session import ChatSession, message_text  # noqa: E402
from trimtab.plugin.chat_engine import ChatEngine, ReplyUpdate  # noqa: E402
from trimtab.plugin.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UNSAFE = REPO / "presets" / "unsafe" / "seed-unsafe.yaml"
GREEDY_CHOICE = "greedy.yaml (from the command line)"
ENDLESS_CHOICE = "endless.yaml (imported)"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on 127.0.0.1 over a loaded tiny model, opening on the greedy preset."""
    root = tmp_path_factory.mktemp("app")
    model_dir = write_long_tiny_model(root / "model")
    greedy = write_preset(GREEDY, root / "greedy.yaml")
    endless = write_preset(ENDLESS, root / "endless.yaml")
    engine = ChatEngine()
    engine.load(str(model_dir))
    demo = gradio_app.launch(engine, port=free_port(), prevent_thread_lock=True, quiet=True, preset=str(greedy))
    yield SimpleNamespace(url=demo.local_url, demo=demo, engine=engine, model_dir=model_dir, greedy=greedy,
                          endless=endless, root=root)
    demo.close()


def expected(app, text: str) -> str:
    """The model's own greedy answer, asked directly (not through the app or the engine)."""
    return app.engine.model.chat(user(text), preset=str(app.greedy)).text


def answer_of(history: list) -> str:
    assert history[-1]["role"] == "assistant"
    return message_text(history[-1]["content"])


def start_endless(app) -> tuple[Client, object]:
    """A session whose ENDLESS reply (guard off) holds the engine; → (its client, its job)."""
    client = Client(app.url, verbose=False)
    choices, _ = client.predict(handle_file(str(app.endless)), "enforce", api_name="/import_preset")
    assert choices["value"] == ENDLESS_CHOICE
    job = client.submit("w5 w6", [], ENDLESS_CHOICE, "off", api_name="/chat")
    wait_until(lambda: any(len(out[1]) == 2 and answer_of(out[1]) for out in job.outputs()),
               "the endless reply to start streaming")
    return client, job


def stopped_tokens(status: str) -> int:
    found = re.match(r"stopped: cancelled, (\d+) tokens?", status)
    assert found, status
    return int(found.group(1))


def test_binds_loopback_by_default(app):
    assert app.demo.server_name == "127.0.0.1"
    assert app.url.startswith("http://127.0.0.1:")


def test_eight_concurrent_chats_wait_on_the_engine_and_each_gets_its_own_reply(app):
    prompts = [f"w{10 + i} w{50 + 3 * i}" for i in range(8)]
    answers = [expected(app, p) for p in prompts]
    holder, held = start_endless(app)  # while it runs, the eight can only queue up

    def chat(prompt):
        client = Client(app.url, verbose=False)  # one session per user
        return client.predict(prompt, [], GREEDY_CHOICE, "enforce", api_name="/chat")

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(chat, p) for p in prompts]
        wait_until(lambda: app.engine.pending() == len(prompts), "all eight chats to wait on the engine at once")
        holder.predict(api_name="/stop")
        results = [f.result(timeout=120) for f in futures]
    for prompt, answer, (box, history, status) in zip(prompts, answers, results):
        assert box == ""
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert message_text(history[0]["content"]) == prompt
        assert answer_of(history) == answer
        assert status.startswith("finished: ")
    assert stopped_tokens(held.result(timeout=60)[2]) < ENDLESS["max_new_tokens"]


def test_stop_frees_the_engine_for_the_next_request_at_once(app):
    answer = expected(app, "w21 w22")
    holder, held = start_endless(app)
    waiting = Client(app.url, verbose=False).submit("w21 w22", [], GREEDY_CHOICE, "enforce", api_name="/chat")
    wait_until(lambda: app.engine.pending() == 1, "the second chat to queue behind the endless one")
    assert not waiting.done()
    holder.predict(api_name="/stop")
    _, history, status = waiting.result(timeout=120)  # runs only once the endless reply has ended
    assert answer_of(history) == answer and status.startswith("finished: ")
    _, held_history, held_status = held.result(timeout=60)
    assert 0 < stopped_tokens(held_status) < ENDLESS["max_new_tokens"]  # it ended by Stop, not by itself
    assert answer_of(held_history)  # the partial reply stays in the chat


def test_a_streaming_reply_is_sent_to_the_browser_at_a_bounded_rate_and_always_ends():
    updates = [ReplyUpdate("w5"), ReplyUpdate("w5 w6"), ReplyUpdate("w5 w6 w7"),
               ReplyUpdate("w5 w6 w7", finish_reason="cancelled")]
    assert list(gradio_app.coalesced(updates, min_interval_s=3600)) == [updates[0], updates[-1]]
    assert list(gradio_app.coalesced(updates, min_interval_s=0)) == updates


def test_stop_pressed_before_the_reply_reaches_the_engine_still_cancels_it(app):
    session = ChatSession()
    assert not session.stop()  # nothing running: nothing to stop, and the next turn is unaffected
    session.begin()
    with pytest.raises(TrimtabError, match="still being written"):
        session.begin()
    session.stop()
    reply = app.engine.submit(user("w23"), preset=str(app.greedy))
    session.attach(reply)
    assert reply.wait().finish_reason == "cancelled"
    session.finish()
    session.begin()
    reply = app.engine.submit(user("w23"), preset=str(app.greedy))
    session.attach(reply)
    assert reply.wait().text == expected(app, "w23")


def test_importing_an_unsafe_preset_shows_the_guards_report(app):
    client = Client(app.url, verbose=False)
    choices, report = client.predict(handle_file(str(UNSAFE)), "enforce", api_name="/import_preset")
    assert choices["value"] == "seed-unsafe.yaml (imported)"
    assert "repetition_penalty: 1.15: changed to 1.01 because" in report
    assert "ban_eos_token: true: changed to false because" in report
    assert "temperature: 0.1: kept" in report
    assert report.endswith("The guard is on (enforce): the changes above are made.")
    warned = client.predict("seed-unsafe.yaml (imported)", "warn", api_name="/preset_report")
    assert "only reported" in warned
    # chatting with it: the reply says what the guard changed
    _, _, status = client.predict("w30", [], "seed-unsafe.yaml (imported)", "enforce", api_name="/chat")
    assert "\nguard:\n" in status
    assert "repetition_penalty: 1.15: changed to 1.01" in status and "ban_eos_token: true: changed to false" in status
    # another session never sees this session's import
    with pytest.raises(AppError):
        Client(app.url, verbose=False).predict("w30", [], "seed-unsafe.yaml (imported)", "enforce", api_name="/chat")


@pytest.mark.parametrize("name, text, problem", [
    ("broken.yaml", "temperature: [1,\n", "broken.yaml: line 2: invalid YAML"),
    ("typo.json", '{"temprature": 0.2}', "typo.json: unknown setting 'temprature' (did you mean temperature?)"),
    ("list.yaml", "- temperature\n", "list.yaml: a preset maps setting names to values"),
])
def test_importing_a_malformed_preset_shows_a_clear_error(app, name, text, problem):
    path = app.root / name
    path.write_text(text)
    choice, report = Client(app.url, verbose=False).predict(handle_file(str(path)), "enforce",
                                                            api_name="/import_preset")
    assert report.startswith(f"error: {problem}")
    assert "Traceback" not in report and "/tmp" not in report  # names the file the user chose, not the upload copy
    assert "value" not in choice  # the preset choice is left as it was


def test_chat_without_a_model_is_a_clear_error_and_load_brings_one_back(app):
    client = Client(app.url, verbose=False)
    status, _ = client.predict(GREEDY_CHOICE, "enforce", api_name="/unload_model")
    assert status.startswith("no model loaded")
    with pytest.raises(AppError, match="no model is loaded"):
        client.predict("w40", [], GREEDY_CHOICE, "enforce", api_name="/chat")
    status, _ = client.predict(str(app.root / "missing"), GREEDY_CHOICE, "enforce", api_name="/load_model")
    assert status.startswith("error: ") and "missing: no such file or directory" in status
    status, report = client.predict(str(app.model_dir), GREEDY_CHOICE, "enforce", api_name="/load_model")
    assert status.startswith("loaded: ")
    assert "checked for the loaded model" in report
    _, history, _ = client.predict("w40", [], GREEDY_CHOICE, "enforce", api_name="/chat")
    assert answer_of(history) == expected(app, "w40")


def test_auth_is_required_when_set(app):
    demo = gradio_app.launch(app.engine, port=free_port(), prevent_thread_lock=True, quiet=True,
                             auth=[("alice", "s3cret")])
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(demo.local_url + "config")
        assert refused.value.code == 401
        with pytest.raises(AuthenticationError):
            Client(demo.local_url, verbose=False)
        client = Client(demo.local_url, auth=("alice", "s3cret"), verbose=False)
        _, history, _ = client.predict("w41", [], "precise", "enforce", api_name="/chat")
        assert history[-1]["role"] == "assistant"
    finally:
        demo.close()


# -- the command line -----------------------------------------------------------------------

@pytest.mark.parametrize("where", [["--listen"], ["--host", "0.0.0.0"], ["--host", "example.org"]])
def test_listening_beyond_this_machine_needs_auth(where, capsys):
    assert main(["webui", *where]) == 1
    err = capsys.readouterr().err
    assert "needs --auth" in err and "Traceback" not in err
    with pytest.raises(TrimtabError, match="needs --auth"):
        gradio_app.check_bind(where[-1] if where[0] == "--host" else app_cli.LISTEN_ALL, None)


@pytest.fixture
def launched(monkeypatch):
    """Run `trimtab webui` up to the launch, which records its arguments instead of serving."""
    calls = []
    monkeypatch.setattr(gradio_app, "launch", lambda engine, **kwargs: calls.append((engine, kwargs)))
    return calls


def test_webui_command_binds_loopback_without_auth_by_default(app, launched):
    assert main(["webui", "-m", str(app.model_dir)]) == 0
    (engine, kwargs), = launched
    assert kwargs["host"] == "127.0.0.1" and kwargs["auth"] is None
    assert kwargs["preset"] == "balanced" and kwargs["guard"] == "enforce"
    assert engine.model_name == str(app.model_dir.resolve())


def test_webui_command_listens_with_auth_from_a_file(app, launched, tmp_path):
    auth = tmp_path / "users"
    auth.write_text("# who may use the app\nalice:s3cret:with:colons\n\nbob:hunter2\n")
    assert main(["webui", "-m", str(app.model_dir), "--listen", "--auth", str(auth), "--port", "7999",
                 "--preset", str(app.greedy), "--guard", "warn"]) == 0
    (_, kwargs), = launched
    assert kwargs["host"] == "0.0.0.0" and kwargs["port"] == 7999
    assert kwargs["auth"] == [("alice", "s3cret:with:colons"), ("bob", "hunter2")]
    assert kwargs["preset"] == str(app.greedy) and kwargs["guard"] == "warn"


@pytest.mark.parametrize("value", ["alice-no-password", "alice:", ":s3cret"])
def test_bad_auth_is_a_clear_error_that_does_not_echo_it(value, launched, capsys):
    assert main(["webui", "--listen", "--auth", value]) == 1
    err = capsys.readouterr().err
    assert "expected USER:PASS" in err and value not in err
    assert not launched


def test_bad_preset_fails_before_the_model_loads(launched, capsys):
    assert main(["webui", "-m", "/no/such/model", "--preset", "balancd"]) == 1
    assert "did you mean balanced?" in capsys.readouterr().err


def test_missing_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(TrimtabError, match=r"pip install 'trimtab\[app\]'"):
        gradio_app.require_gradio()
    assert main(["webui"]) == 1
    assert "pip install 'trimtab[app]'" in capsys.readouterr().err


def test_core_trimtab_imports_without_gradio():
    code = ("import sys; sys.modules['gradio'] = None\n"
            "import trimtab.plugin.cli as cli, trimtab.plugin.app_session, trimtab.plugin.app_report\n"
            "cli.build_parser().parse_args(['webui'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
