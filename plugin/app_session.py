"""One browser session of the chat app (`trimtab webui`): its running reply, its Stop, its presets.

Every browser tab (or `gradio_client.Client`) gets its own `ChatSession` through Gradio's
per-session state, so concurrent users never share a reply or an imported preset; the chat
history itself lives in each session's Chatbot value. Gradio-free: the app module wires it up.

Stop is ours, not Gradio's: `stop()` cancels the session's `Reply`, so the engine moves on to
the next request at the next token (or skips the reply if it is still queued). A Stop pressed
after Send but before the reply reached the engine still counts: `attach` cancels it at once.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

from trimtab.backend.errors import TrimtabError
from trimtab.backend.presets import VETTED_PRESETS
from trimtab.plugin.chat_engine import Reply

BUSY = "a reply is still being written in this chat: wait for it or press Stop"
CHAT_ROLES = ("system", "user", "assistant")


class ChatSession:
    """The per-session state: at most one reply at a time, and the presets this session imported."""

    def __init__(self, presets: Mapping[str, Mapping[str, Any]] | None = None):
        self._lock = threading.Lock()
        self._busy = False              # between begin() and finish()
        self._stop_asked = False        # Stop pressed during this turn
        self._reply: Reply | None = None
        self.presets: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (presets or {}).items()}

    def __deepcopy__(self, memo) -> ChatSession:
        # Gradio deep-copies a state's initial value for each new session: a copy is a fresh
        # session with the same presets, never the running reply (nor its lock)
        return ChatSession(self.presets)

    def begin(self) -> None:
        """A message was sent; TrimtabError if this session's previous reply is still running."""
        with self._lock:
            if self._busy:
                raise TrimtabError(BUSY)
            self._busy, self._stop_asked, self._reply = True, False, None

    def attach(self, reply: Reply) -> None:
        """The turn's reply from the engine (cancelled at once if Stop came first)."""
        with self._lock:
            self._reply = reply
            if self._stop_asked:
                reply.cancel()

    def finish(self) -> None:
        """The turn is over (finished, failed, or its consumer left): a reply still running is cancelled."""
        with self._lock:
            reply, self._reply, self._busy = self._reply, None, False
        if reply is not None and reply.finish_reason is None:
            reply.cancel()

    def stop(self) -> bool:
        """Stop pressed: cancel this turn's reply; → whether there was a turn to stop."""
        with self._lock:
            if not self._busy:
                return False
            self._stop_asked = True
            reply = self._reply
        if reply is not None:
            reply.cancel()
        return True

    def preset_for(self, choice: str) -> str | dict[str, Any]:
        """The preset dropdown's choice → what `ChatEngine.submit(preset=)` takes."""
        if choice in VETTED_PRESETS:
            return choice
        if choice in self.presets:
            return self.presets[choice]
        raise TrimtabError(f"unknown preset {choice!r}: pick a vetted one or import a preset file")


def message_text(content: Any) -> str:
    """A Chatbot message's content → its text: a plain string (Gradio 4) or a list of parts
    ({"type": "text", "text": ...}, Gradio 5+); files and other parts carry no text for the model."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        content = [content]
    if isinstance(content, (list, tuple)):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, Mapping) and part.get("type", "text") == "text")
    return ""


def conversation(history: list[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The Chatbot's messages → the engine's [{"role", "content"}] (other roles are dropped)."""
    return [{"role": m["role"], "content": message_text(m.get("content"))}
            for m in history if m.get("role") in CHAT_ROLES]
