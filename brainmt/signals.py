"""Signal handlers that are put in place for a while and then given back (main thread only, as Python requires)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

Handler = Callable[[int, Any], None]
# the exit status of a command that stopped at a safe point on a signal (SIGTERM, SIGUSR2, Ctrl-C) and can be resumed
INTERRUPTED_EXIT = 3


def install(signals: Iterable[int], handler: Handler) -> dict[int, Any]:
    """Route ``signals`` to ``handler``; returns the previous handlers (none changed outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers ``install`` returned."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextmanager
def handled(signals: Iterable[int], handler: Handler) -> Iterator[None]:
    """``signals`` go to ``handler`` inside the block; the previous handlers come back after it."""
    previous = install(signals, handler)
    try:
        yield
    finally:
        restore(previous)
