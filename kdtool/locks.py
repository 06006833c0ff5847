"""One writer per output: an exclusive lock beside each output a command writes or resumes.

Two runs writing one cache folder interleave their shards under one manifest; two toy sweeps
delete each other's part files. So every command that writes a folder or resumes takes

    with claim(output, command="kdtool cache-acts ..."):
        ...                                    # the only writer of `output` until the block ends

The lock is the file PARENT/.NAME.lock beside the output (a folder or a file), holding JSON:
{kind: "kdtool.lock", pid, host, command, started}. It is taken with flock(2), which the kernel
drops when its process dies however it dies (kill -9 included): a lock left behind by a dead
process is simply taken over by the next claim, with no guessing from pids. Where flock is not
available (no fcntl, or a file system that refuses it), the file is created exclusively instead
and taken over when it names a process of this host that no longer runs. The text is what the
refusal shows: BadInput (exit 2) naming the holder.

Holding the lock, `claim` also removes the output's stale temporary files (kdtool.formats
`remove_stale_temps`): with no other writer they can only be a killed run's. Claims are re-entrant
within a process (cache-acts holds one around caching and the shuffle that follows), and each
claim checks that the output can be written, so a read-only place is refused before any work.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from kdtool.atomic import remove_stale_temps
from kdtool.errors import BadInput

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

KIND = "kdtool.lock"
#: lock file -> [claims held by this process, open file or None]
_held: dict[Path, list] = {}


def lock_path(output: str | os.PathLike) -> Path:
    """Where the lock of `output` lives: .NAME.lock in the folder that holds it."""
    out = Path(os.path.abspath(output))
    return out.with_name(f".{out.name}.lock")


def holder(output: str | os.PathLike) -> dict | None:
    """What the lock file of `output` says (pid, host, command, started), or None when there is none."""
    try:
        info = json.loads(lock_path(output).read_text() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextlib.contextmanager
def claim(output: str | os.PathLike, *, command: str | None = None, also: Sequence = ()) -> Iterator[Path]:
    """Be the only writer of `output` (and of the companions `also`: a parts folder, a curves file)
    for the block: refuse with BadInput naming the holder if another process is; then clear their
    stale temporary files and check that `output` can be written. Yields the lock file's path."""
    path = lock_path(output)
    if path in _held:  # this process holds it already
        _held[path][0] += 1
        try:
            yield path
        finally:
            _held[path][0] -= 1
        return
    fh = _acquire(path, output, command)
    _held[path] = [1, fh]
    try:
        for p in (output, *also):
            remove_stale_temps(p)
        _check_writable(Path(output))
        yield path
    finally:
        del _held[path]
        _release(path, fh)


def _record(command: str | None) -> str:
    return json.dumps(
        {
            "kind": KIND,
            "pid": os.getpid(),
            "host": platform.node(),
            "command": command or shlex.join(["kdtool", *sys.argv[1:]]),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )


def _refuse(output, path: Path) -> BadInput:
    info = holder(output) or {}
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    what = f", `{info['command']}`" if info.get("command") else ""
    since = f", since {info['started']}" if info.get("started") else ""
    return BadInput(
        f"{output}: in use by another kdtool ({who}{what}{since}); two writers would mix their files: "
        f"wait for it or stop it (lock: {path})"
    )


def _acquire(path: Path, output, command: str | None):
    """Take the lock file; the open file (flock) or None (exclusive-create fallback)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return _acquire_exclusive(path, output, command)
        for _ in range(10):  # the file may be unlinked by a releasing holder between our open and flock
            fh = open(path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise _refuse(output, path) from None
            except OSError as exc:
                fh.close()
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return _acquire_exclusive(path, output, command)
                raise
            same = path.exists() and os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
            if same:
                fh.seek(0)
                fh.truncate()
                fh.write(_record(command))
                fh.flush()
                return fh
            fh.close()
        raise BadInput(f"{output}: could not take its lock {path} (it kept changing)")
    except OSError as exc:
        raise BadInput(f"{output}: cannot write here ({os.strerror(exc.errno or errno.EIO)})") from None


def _acquire_exclusive(path: Path, output, command: str | None) -> None:
    """Without flock: create the lock file exclusively; take over one naming a dead process of this host."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = holder(output) or {}
            if info.get("host") == platform.node() and not _alive(info.get("pid")):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise _refuse(output, path) from None
        with os.fdopen(fd, "w") as out:
            out.write(_record(command))
        return None
    raise _refuse(output, path)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _release(path: Path, fh) -> None:
    """Remove the lock file while still holding it, then let go (a waiting claim re-checks the inode)."""
    try:
        path.unlink(missing_ok=True)
    finally:
        if fh is not None:
            fh.close()


def _check_writable(output: Path) -> None:
    """Refuse a read-only output before any work: a folder must take new files, a file's folder too
    (a file is replaced by a rename, which needs only its folder)."""
    folder = output if output.is_dir() else output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"{output}: cannot write here ({os.strerror(exc.errno or errno.EIO)})") from None
