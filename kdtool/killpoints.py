"""A hook for the kill matrix: kill this process just before its Nth file rename, as `kill -9` would.

kdtool's promise is that a file is complete or absent and that a killed job resumes exactly. The
moments that test it are the renames that publish a file (kdtool.atomic.rename is the only one
every writer uses), so tests/test_kill_matrix.py kills each long command at every one of them:

    KDTOOL_KILL_AT_RENAME=N   SIGKILL this process right before its Nth rename (1-based, counted per
                              process; the temporary file is complete, the final name not yet there)
    KDTOOL_RENAME_LOG=FILE    append one line per rename, "pid src -> dst" (how a test counts them)

Both are read at each rename, never at import, and cost one environment lookup when unset. The same
moments can be hit from outside with strace (`strace -f -e trace=rename -e inject=rename:signal=KILL:when=N`,
which counts every process's renames together); the hook needs no strace and counts one process.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "KDTOOL_KILL_AT_RENAME"
LOG = "KDTOOL_RENAME_LOG"

_count = 0


def before_rename(src: os.PathLike | str, dst: os.PathLike | str) -> None:
    """Count this rename; log it and/or kill the process here when the environment asks for it."""
    global _count
    kill_at, log = os.environ.get(KILL_AT), os.environ.get(LOG)
    if not (kill_at or log):
        return
    _count += 1
    if log:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {os.fspath(src)} -> {os.fspath(dst)}\n")
    if kill_at and _count == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
