"""Files are complete or absent: every kdtool write goes to a temporary name and is renamed into place.

    with atomic_path("floors.parquet") as tmp: write(tmp)      # a file
    with atomic_dir("students/width128") as tmp: save(tmp)     # a folder, swapped in whole

`rename` is the one rename every writer uses (the kill matrix's hook, kdtool/killpoints.py, runs in
it). A kill -9 can leave temporary names behind, `.NAME.XXXXXXXX.tmp` (and `.NAME.XXXXXXXX.old` for
a folder set aside mid-swap): `remove_stale_temps` clears them, and puts such a folder back, for the
output's one writer (kdtool/locks.py `claim` calls it). A failed write is reported naming the
output, never its hidden temporary name: read-only is a bad output (exit 2), a full disk a runtime
failure (exit 1). kdtool/formats.py's writers (tables, JSON, safetensors) all go through here.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kdtool import killpoints
from kdtool.errors import BadInput, KdtoolError, RuntimeFailure


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a finished file or folder onto its final name (os.replace): the one rename every writer uses.

    The kill matrix's hook (kdtool/killpoints.py) runs first, so a test can kill a command at each rename.
    """
    killpoints.before_rename(src, dst)
    os.replace(src, dst)


#: what atomic_path / atomic_dir name their temporary files and folders, and what atomic_dir sets aside
#: while it swaps: .NAME.XXXXXXXX.tmp and .NAME.XXXXXXXX.old (XXXXXXXX: tempfile's 8 random characters)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.(?P<what>tmp|old)$")


def _umask_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp make owner-only files and folders; give the final one the usual umask mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _write_error(exc: BaseException, final: Path) -> Exception | None:
    """A failed write as one line naming the output, not its hidden temporary name; None: not ours to name.

    Disk full is a runtime failure (exit 1), also when a library reports it in its own words
    (safetensors' "os error 28", torch.save's "unexpected pos"): by the message, or by the free space
    left. A read-only place is a bad output (exit 2).
    """
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BadInput(f"{final}: cannot write here ({os.strerror(exc.errno)})")
    if isinstance(exc, KdtoolError):
        return None  # already says what went wrong
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(exc)
    if not full:
        try:
            full = shutil.disk_usage(final.parent).free < 1 << 20
        except OSError:
            full = False
    if full:
        return RuntimeFailure(f"{final}: no space left on device while writing it")
    return None


@contextlib.contextmanager
def _errors_named(final: Path) -> Iterator[None]:
    """Re-raise a failed write of `final` as one line naming it (`_write_error`), or as it was."""
    try:
        yield
    except Exception as exc:
        named = _write_error(exc, final)
        if named is None:
            raise
        raise named from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    A crash or an exception leaves no partial file under the final name; a kill -9 leaves the
    temporary file, which the next writer's `remove_stale_temps` removes.
    """
    final = Path(path)
    with _errors_named(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _errors_named(final):
            yield tmp
            if tmp.exists():
                _umask_mode(tmp, 0o666)
            rename(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it in for `path` only if the block succeeds.

    The swap is two renames: the old folder aside as .NAME.XXXXXXXX.old, the new one in. A kill
    between them leaves no folder under the final name and the old one aside: `remove_stale_temps`
    puts it back, so a reader finds the previous complete folder, never a partial one.
    """
    final = Path(path)
    with _errors_named(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        with _errors_named(final):
            yield tmp
            _umask_mode(tmp, 0o777)
            old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
            if final.exists():
                rename(final, old)
            rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Clear what killed writes of `path` left: its .NAME.*.tmp files and folders (for a folder, anywhere
    inside it), and a folder set aside mid-swap (.NAME.*.old), put back when its final name is missing.

    Only the output's one writer may call this (kdtool/locks.py `claim` does, once it holds the
    lock): another writer's temporary files would look the same. Returns what was removed.
    """
    p = Path(path)
    if p.is_dir():
        found = [c for c in p.rglob(".*") if _TEMP_NAME.match(c.name)]
    else:
        found = [c for c in p.parent.glob(f".{glob.escape(p.name)}.*") if _TEMP_NAME.match(c.name)]
    removed = []
    for c in sorted(found, key=lambda c: len(c.parts)):  # outer first: inner ones go with them
        m = _TEMP_NAME.match(c.name)
        if not (c.exists() or c.is_symlink()):
            continue
        original = c.with_name(m["name"])
        if m["what"] == "old" and not original.exists():
            rename(c, original)  # killed between atomic_dir's two renames: the previous folder is whole
            continue
        if c.is_dir() and not c.is_symlink():
            shutil.rmtree(c)
        else:
            c.unlink()
        removed.append(c)
    return removed
