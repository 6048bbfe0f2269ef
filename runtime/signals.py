"""SIGTERM as an exception, and cleanups that a second signal cannot cut short.

Python dies on SIGTERM without running a single `finally` or `__exit__`: a board's process group,
a cgroup with a process still in it, a tracker would all outlive an edgetvm command stopped by
`kill`. Inside `sigterm_raises()` it raises `Terminated` instead, a KeyboardInterrupt, so every
cleanup written for Ctrl-C runs for it too, and the command exits with 143 (130 for Ctrl-C), as a
shell reports a process killed by that signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so that code cleaning up after Ctrl-C cleans up after it."""


def exception_for(signum: int) -> KeyboardInterrupt:
    """What a stop signal raises: Terminated for SIGTERM, KeyboardInterrupt for SIGINT."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, what a shell reports for a process that signal killed."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def _raise_terminated(signum, _frame):
    raise Terminated


def _in_main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and only it may install them.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises():
    """Within: SIGTERM raises Terminated in the main thread (a no-op when entered in another thread)."""
    if not _in_main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def deferred():
    """Within: SIGINT and SIGTERM are held back and delivered at the end, to whatever handles them then.

    For creating and removing system resources: a signal between the mkdir of a cgroup and the line
    that records it, or a second Ctrl-C while a board's process group is being killed, would leave the
    resource behind. (Blocking the signals with pthread_sigmask would not do: the kernel hands them to
    any thread that does not block them, TVM's pool threads for one.)
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
