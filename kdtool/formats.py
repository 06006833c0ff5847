"""Reading and writing kdtool's files: Parquet/CSV/JSON tables, safetensors, PyTorch tensors (via kdtool/atomic.py).

One place decides how provenance is stored:
- Parquet: schema metadata key ``kdtool`` (provenance JSON) plus ``kdtool.kind`` and
  optional ``kdtool.summary`` (JSON).
- safetensors: ``__metadata__`` keys ``kdtool`` (provenance JSON) and ``kdtool.kind``.
- JSON: top-level keys ``kind`` and ``provenance``.
See docs/formats.md for each artifact's schema.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from kdtool import provenance as _prov
from kdtool.atomic import atomic_path
from kdtool.errors import BadInput, MissingColumns, UnknownFormat

PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_SUFFIXES = {*PARQUET_SUFFIXES, ".csv", ".json", ".jsonl", ".tsv"}


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether a path names a Parquet file by its suffix (.parquet or .pq)."""
    return Path(path).suffix.lower() in PARQUET_SUFFIXES


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    write_text(path, json.dumps(_prov.jsonable(obj), indent=2, sort_keys=False) + "\n")


def _schema_metadata(kind: str, provenance: dict | None, summary: Any | None) -> dict[bytes, bytes]:
    meta = {b"kdtool.kind": kind.encode()}
    if provenance is not None:
        meta[b"kdtool"] = _prov.dumps(provenance).encode()
    if summary is not None:
        meta[b"kdtool.summary"] = json.dumps(_prov.jsonable(summary)).encode()
    return meta


def write_parquet(
    path: str | os.PathLike,
    columns: dict[str, Any],
    *,
    kind: str,
    provenance: dict | None = None,
    summary: Any | None = None,
) -> None:
    """Write a dict of equal-length columns as Parquet with kdtool metadata, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    table = table.replace_schema_metadata(_schema_metadata(kind, provenance, summary))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    return str(v)


def table_text(columns: dict[str, Any], fmt: str, *, kind: str = "", provenance=None, summary=None) -> str:
    """Equal-length columns as CSV, TSV, JSONL (one record a line) or JSON ({kind, rows, summary, provenance}).

    The text twin of `read_table`: what it writes, read_table reads back.
    """
    import csv
    import io

    names = list(columns)
    n = len(next(iter(columns.values()))) if columns else 0
    rows = [{k: _prov.jsonable(columns[k][i]) for k in names} for i in range(n)]
    if fmt == "json":
        obj = {"kind": kind, "rows": rows, "summary": _prov.jsonable(summary), "provenance": provenance}
        return json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n", delimiter="\t" if fmt == "tsv" else ",")
        writer.writerow(names)
        writer.writerows([[_csv_cell(r[k]) for k in names] for r in rows])
        return buf.getvalue()
    raise UnknownFormat(f"unknown table format {fmt!r} (use parquet, csv, tsv, json or jsonl)")


def write_table(
    path: str | os.PathLike,
    columns: dict[str, Any],
    *,
    kind: str,
    provenance: dict | None = None,
    summary: Any | None = None,
    fmt: str | None = None,
) -> None:
    """Write a table atomically in the format its suffix names (or `fmt`): Parquet, CSV, TSV, JSON or JSONL.

    Only Parquet and JSON carry kind/provenance inside the file; CSV/TSV/JSONL are plain data.
    """
    fmt = fmt or ("parquet" if is_parquet(path) else Path(path).suffix.lower().lstrip("."))
    if fmt == "parquet":
        write_parquet(path, columns, kind=kind, provenance=provenance, summary=summary)
    else:
        write_text(path, table_text(columns, fmt, kind=kind, provenance=provenance, summary=summary))


def parquet_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """kdtool metadata of a Parquet file: {'kind', 'provenance', 'summary'} (missing -> None)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise BadInput(f"{path}: not a readable Parquet file ({exc})") from exc
    out: dict[str, Any] = {"kind": None, "provenance": None, "summary": None}
    if b"kdtool.kind" in meta:
        out["kind"] = meta[b"kdtool.kind"].decode()
    if b"kdtool" in meta:
        out["provenance"] = json.loads(meta[b"kdtool"])
    if b"kdtool.summary" in meta:
        out["summary"] = json.loads(meta[b"kdtool.summary"])
    return out


def read_table(path: str | os.PathLike, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read Parquet, CSV/TSV, JSON (list of records or dict of columns) or JSONL into numpy columns.

    Raises BadInput naming the file for anything unreadable, and MissingColumns when a
    required column is absent.
    """
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file")
    if p.is_dir():
        raise BadInput(f"{p}: is a folder, expected a table file")
    suffix = p.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            table = pq.read_table(p)
            cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        elif suffix in (".csv", ".tsv"):
            import pyarrow.csv as pcsv

            opts = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            table = pcsv.read_csv(p, parse_options=opts)
            cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        elif suffix in (".json", ".jsonl"):
            text = p.read_text()
            if suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                obj = json.loads(text)
                records = obj.get("rows", obj) if isinstance(obj, dict) else obj
            if isinstance(records, dict):
                cols = {k: np.asarray(v) for k, v in records.items()}
            elif isinstance(records, list) and records and isinstance(records[0], dict):
                keys = list(records[0])
                cols = {k: np.asarray([r.get(k) for r in records]) for k in keys}
            else:
                raise BadInput(f"{p}: JSON must be a list of records or an object of columns")
        else:
            raise UnknownFormat(f"{p}: unknown table format {suffix!r} (use .parquet, .csv, .tsv, .json or .jsonl)")
    except (BadInput, UnknownFormat):
        raise
    except Exception as exc:
        raise BadInput(f"{p}: cannot read as {suffix.lstrip('.')} ({str(exc).splitlines()[0]})") from exc
    missing = [c for c in required if c not in cols]
    if missing:
        raise MissingColumns(f"{p}: missing column(s) {', '.join(missing)} (has: {', '.join(cols) or 'none'})")
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:
        raise BadInput(f"{p}: columns have different lengths")
    if cols and lengths == {0}:
        raise BadInput(f"{p}: table has no rows")
    return cols


def numeric_column(cols: dict[str, Any], name: str, path: str | os.PathLike, *, positive: bool = False):
    """A column as float64, refusing non-numbers, NaN and infinities with a one-line error."""
    import numpy as np

    try:
        arr = np.asarray(cols[name], dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInput(f"{path}: column {name!r} is not numeric") from None
    if not np.all(np.isfinite(arr)):
        raise BadInput(f"{path}: column {name!r} has NaN or infinite values")
    if positive and np.any(arr <= 0):
        raise BadInput(f"{path}: column {name!r} must be > 0")
    return arr


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise BadInput(f"{p}: expected a JSON object")
    return obj


def save_safetensors(
    path: str | os.PathLike,
    tensors: dict,
    *,
    kind: str,
    provenance: dict | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    """Save torch tensors as safetensors with kdtool metadata, atomically."""
    from safetensors.torch import save_file

    meta = {"kdtool.kind": kind}
    if provenance is not None:
        meta["kdtool"] = _prov.dumps(provenance)
    meta.update(extra or {})
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def load_safetensors(path: str | os.PathLike) -> dict:
    """Every tensor of a safetensors file; BadInput naming the file when it is missing, cut short or not one."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such file")
    try:
        return load_file(str(p))
    except Exception as exc:
        raise BadInput(f"{p}: not a complete safetensors file ({_first_line(exc)}); was its write cut short?") from None


def load_torch(path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """A PyTorch file read with torch.load(weights_only=True): tensors and plain containers only, never code.

    A file that holds other Python objects is refused with the object's name; PyTorch's own advice
    (to turn weights_only off) is not passed on: that would run whatever the file contains.
    """
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such file")
    try:
        return torch.load(str(p), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(exc))
        what = f" ({found.group(0)})" if found else ""
        raise BadInput(
            f"{p}: holds Python objects, not only tensors{what}; kdtool reads tensors and never unpickles code"
        ) from None
    except Exception as exc:
        line = _first_line(exc)
        detail = "" if "weights_only" in line else f" ({line})"
        raise BadInput(f"{p}: not a complete PyTorch tensor file{detail}; was its write cut short?") from None


def stamp_safetensors(path: str | os.PathLike, *, kind: str, provenance: dict | None) -> None:
    """Add kdtool's kind and provenance to a safetensors file another library wrote (keeps its own metadata).

    Hugging Face's save_pretrained records only {"format": "pt"}; a student's weights should say how
    they were made like every other kdtool file. Rewrites the file atomically (tensors unchanged).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    meta["kdtool.kind"] = kind
    if provenance is not None:
        meta["kdtool"] = _prov.dumps(provenance)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a safetensors header without loading tensors: {'tensors': {name: {dtype, shape}}, 'metadata': {...}}."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100 * 2**20:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise BadInput(f"{p}: not a safetensors file ({exc})") from exc
    meta = header.pop("__metadata__", {}) or {}
    tensors = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items()}
    return {"tensors": tensors, "metadata": meta}


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN/inf: map them to null."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
