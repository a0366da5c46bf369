"""Shared by the chat engine's and the chat app's tests: a tiny model that can talk for minutes,
the presets the tests chat with, and waiting on a condition without timing anything."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Callable

from tiny_models import write_tiny_model_dir

LONG_CONTEXT = 65536
# greedy, so the app's reply can be compared with the model's own for the same prompt
GREEDY = {"temperature": 0, "seed": 11, "max_new_tokens": 16}
# with the guard off this reply cannot end by itself for minutes (EOS banned, ~60k tokens of
# room): it ends early only if it is cancelled, which is what the cancel tests rely on
ENDLESS = {"temperature": 0, "ban_eos_token": True, "max_new_tokens": 60000}


def write_long_tiny_model(directory: Path) -> Path:
    """The tiny random Llama of tiny_models.py (ChatML template, word-level tokenizer) with a
    context long enough for ENDLESS."""
    write_tiny_model_dir("llama", directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    config_path.write_text(json.dumps(config))
    return directory


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def record_streams(model, monkeypatch) -> list[tuple[str, object]]:
    """From now on (for this test), each `model.stream` call appends (its last message's text,
    the Stream it returned): the order the engine asked the model for replies, and how each ended."""
    calls = []
    real_stream = model.stream

    def recording_stream(prompt, **kwargs):
        calls.append((prompt[-1]["content"], real_stream(prompt, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(model, "stream", recording_stream)
    return calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Poll `condition`; the limit only keeps a broken build from hanging the suite."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)
