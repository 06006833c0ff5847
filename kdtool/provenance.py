"""How a file was made: kdtool version, command line, inputs, seed, time.

Every writer in kdtool stores this dict (as JSON) in its output's metadata so that any
artifact says how to rebuild it. The CLI fills `command` and `params`; library callers
may pass their own.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from kdtool import __version__

#: Files up to this size get a content hash; larger ones are fingerprinted by size + mtime.
HASH_LIMIT_BYTES = 64 * 2**20


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Path, size and a content hash (or mtime for big files and folders)."""
    p = Path(path)
    info: dict[str, Any] = {"path": str(p)}
    if p.is_file():
        st = p.stat()
        info["size"] = st.st_size
        if st.st_size <= HASH_LIMIT_BYTES:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            info["sha256"] = h.hexdigest()
        else:
            info["mtime"] = st.st_mtime
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        info["size"] = sum(f.stat().st_size for f in files)
        info["files"] = len(files)
        info["mtime"] = max((f.stat().st_mtime for f in files), default=p.stat().st_mtime)
    else:
        info["note"] = "not a local file (hub id or generated)"
    return info


def jsonable(value: Any) -> Any:
    """Best-effort conversion of option values (paths, tuples, enums) to JSON types."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if hasattr(value, "value"):  # Enum
        return jsonable(value.value)
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return str(value)


def make(
    *,
    command: str | None = None,
    params: dict[str, Any] | None = None,
    inputs: list[str | os.PathLike] | tuple = (),
    seed: int | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the provenance record stored in every output file."""
    return {
        "kdtool_version": __version__,
        "command": command or shlex.join(["kdtool", *sys.argv[1:]]),
        "argv": list(sys.argv),
        "params": jsonable(params or {}),
        "inputs": [fingerprint(p) for p in inputs],
        "seed": seed,
        "config": jsonable(config or {}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def dumps(prov: dict[str, Any]) -> str:
    return json.dumps(jsonable(prov), sort_keys=True)
