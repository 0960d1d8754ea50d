"""Let a stopped trial's process end quietly instead of aborting with "Fatal Python error: Aborted".

Tune runs a trial's function in a daemon thread of the trial actor and, when it stops the trial
(ASHA, a budget, the end of the search), asks the actor to exit. If that thread is still inside
native code at that moment (a torch op or a Ray wait, both with the GIL released), Python's
finalisation makes it call ``pthread_exit`` when it next takes the GIL; the forced unwind meets
a C++ ``noexcept`` frame, ``std::terminate`` aborts the process, and Ray's faulthandler prints
a "Fatal Python error: Aborted" stack dump for what was a normal, requested stop.

:func:`guard_current_thread` registers the calling (training) thread. At interpreter exit,
before daemon threads are torn down, an ``atexit`` handler (Ray runs them on ``exit_actor``)
gives such threads a moment to finish and otherwise ends the process with ``os._exit(0)``, so
no thread is unwound through native code. Nothing is lost: Tune has already taken the trial's
last result and checkpoint when it asks the actor to exit.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref

GRACE_S = 2.0  # how long exiting waits for registered threads that are still running

_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def guard_current_thread() -> None:
    """Make sure the process never finalises while this thread runs (see the module doc)."""
    global _registered
    with _lock:
        _threads.add(threading.current_thread())
        if not _registered:
            atexit.register(exit_if_threads_running)
            _registered = True


def running_threads() -> list[threading.Thread]:
    """Registered threads, other than the caller, that have not finished."""
    me = threading.current_thread()
    return [t for t in list(_threads) if t is not me and t.is_alive()]


def exit_if_threads_running(grace_s: float = GRACE_S) -> None:
    """atexit: wait up to ``grace_s`` for registered threads; if any still runs, ``os._exit(0)``."""
    deadline = time.monotonic() + grace_s
    for thread in running_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    if not running_threads():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream at exit: nothing left to flush
            pass
    os._exit(0)
