"""Run a callable in a worker thread and stop it when its time limit passes.

``run_with_deadline(work, time_limit)`` starts ``work()`` in a daemon thread and waits for it. If
the limit passes first, it injects ``DeadlinePassed`` into the worker with CPython's
``PyThreadState_SetAsyncExc`` and raises ``DeadlinePassed`` in the caller.

How the injection works: the exception is only recorded on the worker's thread state; the
interpreter raises it the next time that thread checks for pending events, which it does at
bytecode boundaries such as the backward jump of every loop iteration and entry into a Python
function. So a loop that makes no calls and produces nothing is still stopped, without the work
having to poll for cancellation.

Limits:

- CPython only (``ctypes.pythonapi``).
- A worker inside one long C call (a huge ``str.replace``, a regular expression, ``sorted`` of a
  big list) notices the exception only when that call returns. The caller waits for it at most
  ``STOP_GRACE_S`` more and then raises anyway; the worker, a daemon thread, then runs on in the
  background until the call ends, and does not keep the process from exiting.
- ``DeadlinePassed`` is a ``BaseException``, so code that catches ``Exception`` lets it through,
  but work that catches ``BaseException`` and carries on is not stopped.
- The work is abandoned wherever it happens to be (its ``finally`` clauses do run), so it must
  not leave state shared with other threads half-updated.
"""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

STOP_GRACE_S = 1.0  # how long a timed-out worker may take to notice the injected exception

_Result = TypeVar("_Result")


class DeadlinePassed(BaseException):
    """The time limit passed. A BaseException, so `except Exception` in the interrupted work lets it through."""


def run_with_deadline(
    work: Callable[[], _Result], time_limit: float, *, thread_name: str = "deadline-worker"
) -> _Result:
    """Return work() or raise its exception; raise DeadlinePassed if it runs longer than time_limit
    seconds, after injecting DeadlinePassed into the worker thread to stop it. If the caller is
    interrupted while waiting (KeyboardInterrupt), the worker is stopped the same way."""
    lock = threading.Lock()
    state = {}  # "started", "done", "cancelled", "result", "error"; the flags are written under lock

    def worker():
        try:
            with lock:
                if state.get("cancelled"):
                    return
                state["started"] = True
            try:
                state["result"] = work()
            except BaseException as error:  # noqa: BLE001 - handed over to the caller's thread
                state["error"] = error
            with lock:
                state["done"] = True
            _deliver_pending_exception()
        except DeadlinePassed:
            pass  # it arrived after work() had ended; the caller has already reported the timeout

    thread = threading.Thread(target=worker, name=thread_name, daemon=True)
    thread.start()
    try:
        thread.join(time_limit)
    finally:  # also when the caller is interrupted: never leave the worker running
        with lock:
            timed_out = not state.get("done")
            if timed_out:
                state["cancelled"] = True  # a worker that has not started yet never calls work()
                if state.get("started"):
                    _inject(thread, DeadlinePassed)
    if timed_out:
        thread.join(STOP_GRACE_S)
        raise DeadlinePassed()
    if "error" in state:
        raise state["error"]
    return state["result"]


def _deliver_pending_exception() -> None:
    """Does nothing, but entering a Python function is a point where CPython raises a pending
    asynchronous exception: one injected just as work() finished arrives here, inside the worker's
    try, rather than in the threading module's code after the worker returns (which would print a
    traceback)."""


def _inject(thread: threading.Thread, exception: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception))
