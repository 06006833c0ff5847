"""Ctrl-C and SIGTERM, the same for every command: one message, exit 128 + signal, a state --resume continues.

`guarded` (kdtool/cli/main.py) runs every command inside `interruptible()`, which installs one
handler for SIGINT and SIGTERM (SIGTERM used to kill a command silently, exit -15). The first
signal raises kdtool.errors.Interrupted (a KeyboardInterrupt) in the main thread, so the command
unwinds through its own cleanup: the shard writer thread drains, the toy's worker pool is stopped
(kdtool/workers.py), the output's lock is released; files are whole or absent, as after any exit.
`guarded` then prints one line and exits 130 (SIGINT) or 143 (SIGTERM).

A second signal while that cleanup runs ends the process at once (os._exit, no traceback, no
waiting for threads): a user pressing Ctrl-C twice wants out now. What it cuts short is what a
kill -9 would: temporary files the next run removes, and a lock the kernel releases.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from kdtool.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def describe(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(signum)


@contextlib.contextmanager
def interruptible(name: str) -> Iterator[None]:
    """Run the block with kdtool's SIGINT/SIGTERM handler (outside the main thread: as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, frame) -> None:
        if received:  # the second: out now (os.write: the main thread may be inside a print)
            os.write(2, f"kdtool {name}: {describe(signum)} again: stopping now\n".encode())
            os._exit(exit_code(signum))
        received.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        if not received:  # after a signal the handler stays: a second one during shutdown exits at once
            for s, h in previous.items():
                signal.signal(s, h)
