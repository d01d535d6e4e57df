"""A Ctrl-C that Python swallowed is raised again at the next progress tick, never lost.

Python runs a SIGINT handler between bytecodes, wherever they are: when that is inside a finalizer
(a `__del__` or weakref callback, e.g. while a model is freed) the KeyboardInterrupt is printed as
"Exception ignored in ..." and dropped, and the program runs on to the end as if Ctrl-C never came.
`catching_interrupts()` (the CLI wraps each command in it) installs a handler that also latches the
interrupt; `raise_if_interrupted()` (called by every progress tick) raises it again until someone
has seen it. Outside the context, or off the main thread, nothing changes.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_pending = threading.Event()


def _on_sigint(signum, frame):
    _pending.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came and was not yet delivered (see the module docstring)."""
    if _pending.is_set():
        _pending.clear()
        raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a Ctrl-C came since `catching_interrupts()` began and has not been raised again since."""
    return _pending.is_set()


def acknowledge() -> None:
    """The caller has handled the interrupt (caught the KeyboardInterrupt): stop re-raising it."""
    _pending.clear()


@contextlib.contextmanager
def catching_interrupts():
    """Latch Ctrl-C for the duration (main thread, default handler only; a shell's ignored SIGINT stays ignored)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pending.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
