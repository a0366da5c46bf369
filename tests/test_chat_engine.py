"""ChatEngine: one worker answers replies in arrival order; a cancel frees it at once; errors
reach the request that caused them. The causal checks use an ENDLESS reply (EOS banned, guard
off, ~60k tokens): it can only end early by being cancelled, so a request queued behind it that
completes proves the cancel freed the engine. No timings are asserted."""
from __future__ import annotations

import threading

import pytest

from app_helpers import ENDLESS, GREEDY, record_streams, user, write_long_tiny_model
from trimtab.backend.errors import TrimtabError
from trimtab.plugin.chat_engine import ChatEngine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_long_tiny_model(tmp_path_factory.mktemp("tiny-long"))


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = ChatEngine()
    engine.load(str(model_dir))
    return engine


@pytest.fixture
def started(engine, monkeypatch):
    return record_streams(engine.model, monkeypatch)


def expected(engine, text: str) -> str:
    """The model's own greedy answer, asked directly (not through the engine)."""
    return engine.model.chat(user(text), preset=dict(GREEDY)).text


def start_endless(engine, **kwargs):
    """An ENDLESS reply that has begun streaming; → (reply, its iterator)."""
    reply = engine.submit(user("w5 w6"), preset=dict(ENDLESS), guard="off", **kwargs)
    updates = iter(reply)
    while not next(updates).text:
        pass
    return reply, updates


def finish(updates):
    last = None
    for last in updates:
        pass
    return last


def test_no_model_loaded_is_a_clear_error(model_dir):
    engine = ChatEngine()
    with pytest.raises(TrimtabError, match="no model is loaded"):
        engine.submit(user("w7"))
    engine.load(str(model_dir))
    engine.unload()
    assert engine.model is None and engine.model_name is None
    with pytest.raises(TrimtabError, match="no model is loaded"):
        engine.submit(user("w7"))


def test_a_request_queued_when_the_model_is_unloaded_gets_the_error(model_dir):
    engine = ChatEngine()
    engine.load(str(model_dir))
    blocker, updates = start_endless(engine)
    queued = engine.submit(user("w7"), preset=dict(GREEDY))
    engine.unload()
    blocker.cancel()
    assert finish(updates).finish_reason == "cancelled"  # a running reply keeps its model to the end
    with pytest.raises(TrimtabError, match="no model is loaded"):
        queued.wait()


def test_replies_are_answered_in_arrival_order(engine, started):
    prompts = ["w10 w11", "w12", "w13 w14 w15", "w16"]
    answers = {p: expected(engine, p) for p in prompts}
    started.clear()
    blocker, updates = start_endless(engine)  # holds the worker while the others queue up
    replies = [engine.submit(user(p), preset=dict(GREEDY)) for p in prompts]
    assert engine.pending() == len(prompts)
    blocker.cancel()
    assert finish(updates).finish_reason == "cancelled"
    results = {p: r.wait() for p, r in reversed(list(zip(prompts, replies)))}  # consumers read in reverse
    assert [prompt for prompt, _ in started] == ["w5 w6", *prompts]
    for p in prompts:
        assert results[p].text == answers[p]
        assert results[p].finish_reason in ("eos", "length")


def test_cancel_while_queued_ends_that_reply_at_once_and_it_never_runs(engine, started):
    answer = expected(engine, "w21")
    started.clear()
    blocker, updates = start_endless(engine)
    queued = engine.submit(user("w20"), preset=dict(GREEDY))
    queued.cancel()
    last = queued.wait()  # returns while the blocker still runs: it ends only when cancelled, below
    assert (last.finish_reason, last.completion, last.text) == ("cancelled", None, "")
    blocker.cancel()
    assert finish(updates).finish_reason == "cancelled"
    assert engine.submit(user("w21"), preset=dict(GREEDY)).wait().text == answer
    assert [prompt for prompt, _ in started] == ["w5 w6", "w21"]  # w20 never reached the model


def test_cancel_mid_reply_frees_the_engine_for_the_next_request(engine):
    answer = expected(engine, "w30 w31")
    blocker, updates = start_endless(engine)
    following = engine.submit(user("w30 w31"), preset=dict(GREEDY))
    blocker.cancel()
    last = finish(updates)
    assert last.finish_reason == "cancelled"
    assert 0 < last.completion.usage.completion_tokens < ENDLESS["max_new_tokens"]
    assert last.completion.text == last.text
    done = following.wait()
    assert done.text == answer and done.finish_reason in ("eos", "length")


def test_a_consumer_that_leaves_cancels_its_reply(engine, started):
    answer = expected(engine, "w32")
    started.clear()
    _, updates = start_endless(engine)
    following = engine.submit(user("w32"), preset=dict(GREEDY))
    updates.close()  # e.g. the browser went away
    assert following.wait().text == answer
    (_, endless_stream), _ = started
    assert endless_stream.completion.finish_reason == "cancelled"


def test_should_stop_turning_true_cancels(engine):
    stop = threading.Event()
    _, updates = start_endless(engine, should_stop=stop.is_set)
    stop.set()
    last = finish(updates)
    assert last.finish_reason == "cancelled"
    assert last.completion.usage.completion_tokens < ENDLESS["max_new_tokens"]


def test_errors_reach_the_request_that_caused_them(engine):
    answer = expected(engine, "w40")
    bad_preset = engine.submit(user("w41"), preset="no-such-preset")
    good = engine.submit(user("w40"), preset=dict(GREEDY))
    bad_value = engine.submit(user("w42"), preset=dict(GREEDY), settings={"temperature": "hot"})
    with pytest.raises(TrimtabError, match="no-such-preset"):
        bad_preset.wait()
    with pytest.raises(TrimtabError, match="temperature"):
        bad_value.wait()
    assert good.wait().text == answer
    assert engine.submit(user("w40"), preset=dict(GREEDY)).wait().text == answer  # the worker lives on
