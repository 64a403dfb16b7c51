"""Kilde's thread names, given to the operating system too.

Python 3.11 names its threads for Python only; `top -H`, `ps -L` and /proc show every thread
of the server as "python". Kilde starts its threads as `NamedThread`, so an operator (and
bench/ingest.py) can tell the writer, the identity engine and its profile refreshes apart from
the event loop and DuckDB's own threads.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from typing import Any

_PR_SET_NAME = 15  # prctl(2)
_LINUX_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one the terminating NUL


@functools.cache
def _process_symbols() -> ctypes.CDLL:
    # The symbols already loaded in the process, libc's among them; no search for the library
    # file (ctypes.util.find_library runs ldconfig in a subprocess).
    return ctypes.CDLL(None, use_errno=True)


def name_os_thread() -> None:
    """Give the calling thread its Python name in the OS (Linux only; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    name = threading.current_thread().name.encode("utf-8", "replace")[:_LINUX_NAME_BYTES]
    _process_symbols().prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


# The OS scheduling priority of background threads (nice(1) steps; 0 is normal, 19 lowest).
# Python holds one lock while it runs Python code, so collection is one serial path; on two
# cores, identity resolution's DuckDB work running beside it slowed every acknowledgement.
# At this priority the kernel gives a core to the collecting threads first.
BACKGROUND_NICENESS = 10


def lower_os_priority() -> None:
    """Make the calling thread yield the CPU to Kilde's other threads (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICENESS
        )
    except OSError:  # a sandbox may refuse; the thread then runs at normal priority
        pass


class NamedThread(threading.Thread):
    """A thread that gives itself its name in the OS before it runs its target; with
    `background=True`, also a lower OS priority (see BACKGROUND_NICENESS)."""

    def __init__(self, *args: Any, background: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.background = background

    def run(self) -> None:
        name_os_thread()
        if self.background:
            lower_os_priority()
        super().run()
