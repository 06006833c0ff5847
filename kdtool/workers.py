"""Worker processes that never outlive kdtool: they die with their parent, and a stopped pool stops now.

`kdtool toy` trains in a pool of spawned worker processes (kdtool/toy/sweep.py). Killed with -9,
a parent cannot stop its workers, and SIGTERM or Ctrl-C used to leave them running their chunks
(then blocked forever on a pipe nobody reads). So each worker calls `die_with_parent` first, and
the parent calls `stop_pool` when it is interrupted or a chunk fails.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

#: prctl(2) option: the signal this process gets when its parent dies (linux/prctl.h)
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Make this worker exit when `parent` does, however it dies; and ignore the terminal's Ctrl-C.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) has the kernel kill this process when its parent dies.
    Everywhere (and for the moment before prctl ran): a thread checks once a second that the parent is
    still ours (an orphan is re-parented, so getppid changes) and exits the process if not. Ctrl-C
    reaches the whole process group; the parent decides, and stops its workers itself.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the watch below still works
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="kdtool-parent-watch", daemon=True).start()


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now (interrupted or failed): cancel what has not started, kill what runs, then join.

    shutdown(wait=False) alone leaves running chunks to finish, and the interpreter joins the pool's
    threads at exit: minutes of work after a Ctrl-C, and a second Ctrl-C's traceback. The pool's
    `_processes` is private but stable (CPython 3.8-3.13); without it only the cancel happens.
    """
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)
