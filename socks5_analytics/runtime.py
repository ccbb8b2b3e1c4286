"""What every component's process does the same way: the event loop (uvloop when it is
installed), the garbage collector's settings, and dying with the `up` command that started it."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["STACK_PARENT_ENV", "follow_stack_parent", "run", "settle_gc"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on the fastest loop available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)


# Collect the youngest generation every 10,000 net allocations rather than 700: a batch of
# events, or a proxied connection, makes objects that mostly die by reference count anyway.
GC_THRESHOLDS = (10_000, 20, 10)


def settle_gc() -> None:
    """Call once start-up is done: leave what it made (modules, configuration, pools) out of
    every later garbage collection, and collect less often. With the defaults, collections
    were 6-10 % of a long-running component's CPU, mostly re-scanning objects that live as
    long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# Set by `socks5-analytics up` for its children: the process id of the `up` that started them.
STACK_PARENT_ENV = "SOCKS5_ANALYTICS_STACK_PARENT"
_PR_SET_PDEATHSIG = 1


def follow_stack_parent() -> None:
    """In a child of `up`, ask Linux for SIGTERM (a clean stop) when `up` dies, even by
    SIGKILL, so that no component outlives the command that owns it. Elsewhere: nothing."""
    parent = os.environ.pop(STACK_PARENT_ENV, None)  # not passed on to our own children
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the parent still stops us on every exit path
    if str(os.getppid()) != parent:  # `up` died before prctl: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)
