"""Kilde's thread names, given to the operating system too.

Python 3.11 names its threads for Python only; `top -H`, `ps -L` and /proc show every thread
of the server as "python". Kilde starts its threads as `NamedThread`, so an operator (and
bench/ingest.py) can tell the writer, the identity engine and its profile refreshes apart from
the event loop and DuckDB's own threads.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading

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


class NamedThread(threading.Thread):
    """A thread that gives itself its name in the OS before it runs its target."""

    def run(self) -> None:
        name_os_thread()
        super().run()
