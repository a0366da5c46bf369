"""One model served to many chat requests, one reply at a time, first come first served.

The Gradio app and the text-generation-webui extension stream replies from one loaded model
that several browser tabs may talk to at once. On a CPU one reply at a time uses the cores
best (two at once only fight over them), so a `ChatEngine` runs replies on one worker thread,
in arrival order. A request asks with `submit`, which returns a `Reply` to iterate: each update
holds the whole reply so far (what both webui and Gradio want to show). A reply ends early when
it is cancelled - `Reply.cancel()`, its `should_stop` callback turning true, or its consumer
leaving (closing the iterator) - at the next token, or before it starts if it is still queued,
so the next request gets the engine at once. A reply cancelled while still queued also ends at
once for its consumer (finish_reason "cancelled", no completion), without waiting for its turn.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from trimtab.backend.api import Model, Stream
from trimtab.backend.completion import Completion
from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import Override
from trimtab.plugin import model_registry

# how often a consumer waiting for the next piece looks at its should_stop callback (seconds)
POLL_SECONDS = 0.05
NO_MODEL = "no model is loaded: load one first"


@dataclass(frozen=True)
class ReplyUpdate:
    text: str                               # the whole reply so far
    overrides: tuple[Override, ...] = ()    # what the guard changed (known before the first piece)
    completion: Completion | None = None    # on the last update of a reply that ran
    finish_reason: str | None = None        # on the last update: eos, stop_string, length, cancelled, ...


@dataclass
class _Job:
    prompt: str | list[dict]
    preset: Any
    guard: str
    settings: Mapping[str, Any]
    updates: queue.Queue = field(default_factory=queue.Queue)    # (kind, value) from the worker
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False                   # the worker has taken it (set under `lock`)
    stream: Stream | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # orders `started`/`stream` against `cancel`

    def cancel(self) -> None:
        with self.lock:
            self.cancelled.set()
            if self.stream is not None:
                self.stream.cancel()

    def dropped_while_queued(self) -> bool:
        """Cancelled before the worker took it: the worker will skip it, nobody need wait."""
        with self.lock:
            return self.cancelled.is_set() and not self.started


class Reply:
    """One request's reply: iterate for `ReplyUpdate`s (cumulative text); `cancel()` from any thread."""

    def __init__(self, job: _Job, should_stop: Callable[[], bool] | None):
        self._job = job
        self._should_stop = should_stop
        self.overrides: tuple[Override, ...] = ()
        self.completion: Completion | None = None
        self.finish_reason: str | None = None
        self.text = ""

    def cancel(self) -> None:
        self._job.cancel()

    def __iter__(self) -> Iterator[ReplyUpdate]:
        try:
            while True:
                try:
                    kind, value = self._job.updates.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if self._should_stop is not None and self._should_stop():
                        self.cancel()
                    if self._job.dropped_while_queued():  # end now, not when the worker reaches it
                        self.finish_reason = "cancelled"
                        yield ReplyUpdate(self.text, self.overrides, None, self.finish_reason)
                        return
                    continue
                if kind == "error":
                    raise value
                if kind == "overrides":
                    self.overrides = tuple(value)
                    yield ReplyUpdate(self.text, self.overrides)
                elif kind == "piece":
                    self.text += value
                    if self._should_stop is not None and self._should_stop():
                        self.cancel()
                    yield ReplyUpdate(self.text, self.overrides)
                else:  # "done": a Completion, or None when the reply was cancelled before it began
                    self.completion = value
                    self.finish_reason = value.finish_reason if value is not None else "cancelled"
                    yield ReplyUpdate(self.text, self.overrides, value, self.finish_reason)
                    return
        finally:
            if self.finish_reason is None:  # the consumer left early: free the engine
                self.cancel()
                self.finish_reason = "cancelled"

    def wait(self) -> ReplyUpdate:
        """Run to the end; → the last update."""
        last = ReplyUpdate("")
        for last in self:
            pass
        return last


class ChatEngine:
    """A loaded model (or none) and the one worker thread that answers with it."""

    def __init__(self):
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._model: Model | None = None
        self._model_name: str | None = None
        self._device = "cpu"
        self._state_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="trimtab-chat-engine", daemon=True)
        self._worker.start()

    # -- the model ----------------------------------------------------------------------------

    @property
    def model(self) -> Model | None:
        return self._model

    @property
    def model_name(self) -> str | None:
        """"default" or the path it was loaded from; None when nothing is loaded."""
        return self._model_name

    def load(self, model: str | os.PathLike = "default", device: str = "cpu") -> Model:
        """Load (or reuse, from the process-wide registry) a model; replies queued after this use it."""
        loaded = model_registry.get_model(model, device)
        with self._state_lock:
            self._model, self._device = loaded, device
            self._model_name = model_registry.model_key(model, device)[0]
        return loaded

    def unload(self) -> None:
        """Drop the model (replies already running finish with it; its memory goes once they end)."""
        with self._state_lock:
            if self._model_name is not None:
                model_registry.forget(self._model_name, self._device)
            self._model, self._model_name = None, None

    # -- replies ------------------------------------------------------------------------------

    def submit(self, prompt_or_messages: str | list[dict], *, preset=None, guard: str = "enforce",
               settings: Mapping[str, Any] | None = None,
               should_stop: Callable[[], bool] | None = None) -> Reply:
        """Queue a reply to a plain prompt (str) or a conversation (list of messages)."""
        if self._model is None:
            raise TrimtabError(NO_MODEL)
        job = _Job(prompt_or_messages, preset, guard, dict(settings or {}))
        self._jobs.put(job)
        return Reply(job, should_stop)

    def pending(self) -> int:
        """Requests waiting for the worker (not counting the one it is answering)."""
        return self._jobs.qsize()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                self._answer(job)
            except BaseException as e:  # noqa: BLE001 - every failure goes to the request that caused it
                job.updates.put(("error", e))

    def _answer(self, job: _Job) -> None:
        with job.lock:
            if job.cancelled.is_set():
                job.updates.put(("done", None))
                return
            job.started = True
        model = self._model
        if model is None:
            raise TrimtabError(NO_MODEL)
        stream = model.stream(job.prompt, preset=job.preset, guard=job.guard, **job.settings)
        with job.lock:
            job.stream = stream
            if job.cancelled.is_set():
                stream.cancel()
        job.updates.put(("overrides", list(stream.overrides)))
        for piece in stream:
            job.updates.put(("piece", piece))
        job.updates.put(("done", stream.completion))
