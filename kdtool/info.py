# Over 400 lines on purpose: one concept (what a file is), one short describer per format, all sharing _base/_overview.
"""Describe any file kdtool reads or writes: kind, shape/schema, summary numbers, provenance.

`describe(path)` returns a JSON-able dict; `kdtool info` prints it. It is generic on purpose: a
Parquet file of a kind added later shows its kind, stored summary, provenance and per-column
statistics without code here. Recognised:

    Parquet (.parquet/.pq)       schema, rows, column min/max/mean, kdtool.kind/summary/provenance
    CSV/TSV, JSONL               columns, rows, column statistics
    JSON                         kdtool JSON (kind + provenance; tables written by --format json) or plain JSON
    safetensors                  tensors (dtype, shape), parameter count, __metadata__ (kind, provenance)
    activation cache folder      manifest.json of kind kdtool.acts
    SAE folder                   cfg.json + weights (kdtool/SAELens/sparsify), ae.pt (dictionary_learning),
                                 or a folder of those
    other kdtool folders         any folder with a manifest.json that has a kind (e.g. the teacher cache)
    figures (.png/.pdf/.svg)     the provenance `kdtool plot` stores in them

Nothing here loads tensors or whole tables into memory beyond what the statistics need.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from kdtool import formats, kinds
from kdtool.acts.store import manifest_summary
from kdtool.errors import BadInput, UnknownFormat
from kdtool.plots.style import read_figure_metadata
from kdtool.sae.summary import overview

#: Column statistics are computed only for tables up to this many cells (bigger: Parquet row-group stats).
STATS_CELL_LIMIT = 50_000_000
#: Tensors listed per safetensors file in a description (the count and parameter total cover the rest).
MAX_TENSORS = 200

_SAE_WEIGHTS = ("sae_weights.safetensors", "sae.safetensors")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `path` is. Raises BadInput/UnknownFormat (exit 2) for missing, unknown or corrupt files.

    A file that records no kind of its own but lies in a kdtool folder (a student's config.json, an
    SAE's weights) says which folder it is part of, and carries that folder's provenance.
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file or folder")
    try:
        out = _describe_folder(p) if p.is_dir() else _describe_file(p)
    except UnknownFormat:
        if kinds.kind_of(p.parent) is None:
            raise
        # a page, a text file or a sub-folder (acts/layer12/) of a kdtool folder: described by its container below
        out = _base(p, "folder" if p.is_dir() else p.suffix.lstrip(".").lower() or "file")
    if out["kind"] is None:
        out["kind"] = kinds.kind_of(p)
    if out["kind"] is None or not out["provenance"]:  # a file inside a kdtool folder: the folder's record
        for folder in list(p.parents)[:3]:  # the nearest kdtool folder; provenance from the nearest that has it
            if (folder_kind := kinds.kind_of(folder)) is not None:
                out.setdefault("part_of", {"folder": str(folder), "kind": folder_kind})
                out["provenance"] = out["provenance"] or _describe_folder(folder).get("provenance")
                if out["provenance"]:
                    break
    return out


def _describe_file(p: Path) -> dict[str, Any]:
    suffix = p.suffix.lower()
    try:
        head = _head(p, 8)
    except OSError as exc:
        raise BadInput(f"{p}: cannot read ({exc.strerror or exc})") from None
    if formats.is_parquet(p) or head.startswith(b"PAR1"):
        return _describe_parquet(p)
    if suffix == ".safetensors":
        return _describe_safetensors(p)
    if suffix in (".csv", ".tsv", ".jsonl"):
        return _describe_table(p)
    if suffix == ".json":
        return _describe_json(p)
    if suffix in (".png", ".pdf", ".svg"):
        return _describe_figure(p)
    if suffix == ".pt":
        return _describe_pt(p)
    raise UnknownFormat(
        f"{p}: unknown file type {suffix or '(no suffix)'!r} (kdtool info reads Parquet, CSV/TSV, JSON/JSONL, "
        "safetensors, .pt, figures and kdtool folders)"
    )


def _head(p: Path, n: int) -> bytes:
    with open(p, "rb") as fh:
        return fh.read(n)


def _base(p: Path, fmt: str) -> dict[str, Any]:
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return {
        "path": str(p),
        "format": fmt,
        "kind": None,
        "size_bytes": size,
        "shape": {},
        "schema": [],
        "summary": None,
        "provenance": None,
        "metadata": {},
    }


# --------------------------------------------------------------------------- tables


def _column_stats(name: str, arr) -> dict[str, Any]:
    """min/max/mean for numbers, true-count for booleans, distinct count for the rest (nulls counted)."""
    out: dict[str, Any] = {"name": name, "type": str(arr.type)}
    out["nulls"] = int(arr.null_count)
    t = arr.type
    if pa.types.is_boolean(t):
        out["true"] = int(pc.sum(arr).as_py() or 0)
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        values = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size:
            out["min"], out["max"], out["mean"] = float(finite.min()), float(finite.max()), float(finite.mean())
        nonfinite = int(values.size - finite.size - arr.null_count)
        if nonfinite:
            out["nan_or_inf"] = nonfinite
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        out["distinct"] = int(pc.count_distinct(arr).as_py())
    return out


def _table_schema(table) -> list[dict[str, Any]]:
    return [_column_stats(name, table.column(name)) for name in table.column_names]


def _describe_parquet(p: Path) -> dict[str, Any]:
    try:
        pf = pq.ParquetFile(p)
    except Exception as exc:
        raise BadInput(f"{p}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    meta = formats.parquet_metadata(p)
    out = _base(p, "parquet")
    rows, cols = pf.metadata.num_rows, pf.metadata.num_columns
    out.update(kind=meta["kind"], summary=meta["summary"], provenance=meta["provenance"])
    out["shape"] = {"rows": rows, "columns": cols, "row_groups": pf.metadata.num_row_groups}
    if rows * max(cols, 1) <= STATS_CELL_LIMIT:
        try:
            table = pf.read()
        except Exception as exc:
            raise BadInput(f"{p}: Parquet data is corrupt ({str(exc).splitlines()[0]})") from None
        out["schema"] = _table_schema(table)
    else:  # too big to read for a look: types and row-group min/max only
        out["schema"] = _rowgroup_stats(pf)
    other = {
        k.decode(): v.decode(errors="replace")[:200]
        for k, v in (pf.schema_arrow.metadata or {}).items()
        if not k.startswith(b"kdtool") and k != b"pandas" and k != b"ARROW:schema"
    }
    out["metadata"] = other
    if meta["kind"] == "kdtool.stats":
        out["saes"] = overview(meta["summary"])
    return out


def _rowgroup_stats(pf) -> list[dict[str, Any]]:
    schema = pf.schema_arrow
    out = []
    for i, field in enumerate(schema):
        entry: dict[str, Any] = {"name": field.name, "type": str(field.type)}
        lo = hi = None
        for rg in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(rg).column(i).statistics
            if st is None or not st.has_min_max:
                lo = hi = None
                break
            lo = st.min if lo is None else min(lo, st.min)
            hi = st.max if hi is None else max(hi, st.max)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            entry["min"], entry["max"] = float(lo), float(hi)
        out.append(entry)
    return out


def _describe_table(p: Path) -> dict[str, Any]:
    fmt = p.suffix.lower().lstrip(".")
    try:
        if fmt == "jsonl":
            table = pjson.read_json(p)
        else:
            table = pcsv.read_csv(p, parse_options=pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","))
    except Exception as exc:
        raise BadInput(f"{p}: cannot read as {fmt} ({str(exc).splitlines()[0]})") from None
    out = _base(p, fmt)
    out["shape"] = {"rows": table.num_rows, "columns": table.num_columns}
    out["schema"] = _table_schema(table)
    return out


# --------------------------------------------------------------------------- JSON


def _overview(value: Any, depth: int = 0, max_depth: int = 2) -> Any:
    """A short view of a JSON value: scalars as they are, containers below max_depth by size and keys."""
    if isinstance(value, dict):
        if depth >= max_depth:
            return f"{{{len(value)} keys: {', '.join(list(map(str, value))[:6])}{', ...' if len(value) > 6 else ''}}}"
        return {k: _overview(v, depth + 1, max_depth) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and len(value) <= 8:
            return value
        inner = type(value[0]).__name__ if value else "empty"
        return f"[{len(value)} x {inner}]"
    if isinstance(value, str) and len(value) > 120:
        return value[:117] + "..."
    return value


def _describe_json(p: Path) -> dict[str, Any]:
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{p}: not valid JSON ({exc})") from None
    out = _base(p, "json")
    if isinstance(obj, list):
        out["shape"] = {"items": len(obj)}
        if obj and all(isinstance(r, dict) for r in obj):
            return _describe_records(p, out, obj)
        return out
    if not isinstance(obj, dict):
        out["summary"] = {"value": _overview(obj)}
        return out
    out["kind"] = obj.get("kind") if isinstance(obj.get("kind"), str) else None
    out["provenance"] = obj.get("provenance") if isinstance(obj.get("provenance"), dict) else None
    rows = obj.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):  # a table from --format json
        out = _describe_records(p, out, rows)
        out["summary"] = obj.get("summary")
        return out
    body = {k: v for k, v in obj.items() if k not in ("kind", "provenance")}
    out["shape"] = {"keys": len(body)}
    out["summary"] = _overview(body)
    return out


def _describe_records(p: Path, out: dict, rows: list[dict]) -> dict[str, Any]:
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise BadInput(f"{p}: rows of mixed types ({str(exc).splitlines()[0]})") from None
    out["shape"] = {"rows": table.num_rows, "columns": table.num_columns}
    out["schema"] = _table_schema(table)
    return out


# --------------------------------------------------------------------------- tensors


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


def _describe_safetensors(p: Path) -> dict[str, Any]:
    header = formats.safetensors_header(p)  # BadInput when it is not one
    out = _base(p, "safetensors")
    meta = dict(header["metadata"])
    out["kind"] = meta.pop("kdtool.kind", None)
    prov = meta.pop("kdtool", None)
    if prov:
        try:
            out["provenance"] = json.loads(prov)
        except json.JSONDecodeError:
            out["metadata"]["kdtool"] = prov[:200]
    out["metadata"].update(meta)
    tensors = header["tensors"]
    params = sum(math.prod(t["shape"]) for t in tensors.values())
    nbytes = sum(math.prod(t["shape"]) * _DTYPE_BYTES.get(t["dtype"], 0) for t in tensors.values())
    header_len = int.from_bytes(_head(p, 8), "little")
    if p.stat().st_size < 8 + header_len + nbytes:
        raise BadInput(
            f"{p}: truncated safetensors file ({p.stat().st_size:,} bytes, the header promises "
            f"{8 + header_len + nbytes:,})"
        )
    out["shape"] = {"tensors": len(tensors), "parameters": params, "tensor_bytes": nbytes}
    out["schema"] = [
        {"name": k, "dtype": v["dtype"], "shape": v["shape"]} for k, v in list(tensors.items())[:MAX_TENSORS]
    ]
    return out


def _describe_pt(p: Path) -> dict[str, Any]:
    """A PyTorch pickle (dictionary_learning's ae.pt): read only with weights_only=True."""
    import torch  # here, not at the top: seconds to import, and only .pt files need it

    obj = formats.load_torch(p, mmap=True)  # weights_only=True: tensors, never code
    out = _base(p, "pytorch")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        out["summary"] = {"type": type(obj).__name__}
        return out
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    out["shape"] = {"tensors": len(tensors), "parameters": int(sum(v.numel() for v in tensors.values()))}
    out["schema"] = [
        {"name": k, "dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
        for k, v in list(tensors.items())[:MAX_TENSORS]
    ]
    return out


# --------------------------------------------------------------------------- figures


def _describe_figure(p: Path) -> dict[str, Any]:
    out = _base(p, p.suffix.lower().lstrip("."))
    try:
        meta = read_figure_metadata(p)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{p}: cannot read figure metadata ({exc})") from None
    out["kind"], out["provenance"] = meta["kind"], meta["provenance"]
    if meta["creator"]:
        out["metadata"]["creator"] = meta["creator"]
    return out


# --------------------------------------------------------------------------- folders


def _sae_layout(p: Path) -> str | None:
    if (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file():
        try:
            cfg = json.loads((p / "cfg.json").read_text())
        except (OSError, json.JSONDecodeError):
            return "saelens"
        return "kdtool" if isinstance(cfg, dict) and "kdtool" in cfg else "saelens"
    if (p / "cfg.json").is_file() and (p / "sae.safetensors").is_file():
        return "sparsify"
    if (p / "ae.pt").is_file():
        return "dictionary_learning"
    return None


def _describe_sae(p: Path, layout: str) -> dict[str, Any]:
    out = _base(p, f"sae folder ({layout})")
    cfg: dict = {}
    for name in ("cfg.json", "config.json"):
        if (p / name).is_file():
            cfg = formats.read_json(p / name)
            break
    weights = next((p / w for w in _SAE_WEIGHTS if (p / w).is_file()), None)
    if weights is not None:
        tensors = _describe_safetensors(weights)
        out["schema"], out["shape"] = tensors["schema"], tensors["shape"]
        out["kind"], out["provenance"] = tensors["kind"], tensors["provenance"]
        out["metadata"] = tensors["metadata"]
    elif (p / "ae.pt").is_file():
        tensors = _describe_pt(p / "ae.pt")
        out["schema"], out["shape"] = tensors["schema"], tensors["shape"]
    if isinstance(cfg.get("provenance"), dict):
        out["provenance"] = cfg["provenance"]
    out["kind"] = out["kind"] or "sae"
    keys = (
        "d_in",
        "d_sae",
        "architecture",
        "activation",
        "k",
        "num_latents",
        "expansion_factor",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
        "hook_name",
        "hookpoint",
    )
    summary = {k: cfg[k] for k in keys if k in cfg}
    for section in ("metadata", "kdtool"):
        if isinstance(cfg.get(section), dict):
            summary[section] = _overview(cfg[section])
    out["summary"] = summary
    return out


def _describe_folder(p: Path) -> dict[str, Any]:
    manifest = p / "manifest.json"
    if manifest.is_file():
        obj = formats.read_json(manifest)
        kind = obj.get("kind")
        if kind == "kdtool.acts":
            out = _base(p, "activation cache folder")
            out["kind"], out["provenance"] = kind, obj.get("provenance")
            summary = manifest_summary(p)
            out["summary"] = summary
            out["shape"] = {
                "layers": len(summary.get("layers") or []),
                "tokens": summary.get("tokens"),
                "d_model": summary.get("d_model"),
                "shards": summary.get("shards"),
            }
            return out
        if isinstance(kind, str):  # another kdtool folder with a manifest (teacher cache, ...): generic view
            out = _base(p, "folder")
            out["kind"], out["provenance"] = kind, obj.get("provenance")
            out["summary"] = _overview({k: v for k, v in obj.items() if k not in ("kind", "provenance")})
            out["shape"] = {"files": sum(1 for f in p.rglob("*") if f.is_file())}
            return out
    layout = _sae_layout(p)
    if layout is not None:
        return _describe_sae(p, layout)
    if (p / "kdtool.json").is_file():  # a distilled student: a Hugging Face folder + kdtool's record of it
        return _describe_student(p)
    floors = p / "floors.parquet"
    if floors.is_file() and kinds.kind_of(floors) == "kdtool.distill.floors":
        return _describe_distill_run(p, floors)
    subs = sorted(s for s in p.iterdir() if s.is_dir() and _sae_layout(s) is not None)
    if subs:
        out = _base(p, "folder of SAEs")
        out["kind"] = "sae collection"
        members = [_describe_sae(s, _sae_layout(s)) for s in subs]
        out["shape"] = {"saes": len(members)}
        out["schema"] = [
            {
                "name": s.name,
                "layout": m["format"],
                **{k: m["summary"].get(k) for k in ("d_in", "d_sae")},
                "parameters": m["shape"].get("parameters"),
            }
            for s, m in zip(subs, members, strict=True)
        ]
        out["provenance"] = next((m["provenance"] for m in members if m["provenance"]), None)
        return out
    marker = kinds.folder_marker(p)  # any other kdtool folder: a report, train-sae's checkpoints only, ...
    if marker is not None:
        return _describe_json_folder(p, marker, "folder")
    raise UnknownFormat(
        f"{p}: a folder kdtool did not write (not an activation cache, SAE, student, distillation run "
        "or a folder with a kdtool manifest.json)"
    )


def _describe_json_folder(p: Path, marker: Path, fmt: str) -> dict[str, Any]:
    obj = formats.read_json(marker)
    out = _base(p, fmt)
    out["kind"], out["provenance"] = obj.get("kind"), obj.get("provenance")
    out["summary"] = _overview({k: v for k, v in obj.items() if k not in ("kind", "provenance")})
    out["shape"] = {"files": sum(1 for f in p.rglob("*") if f.is_file())}
    return out


def _describe_student(p: Path) -> dict[str, Any]:
    """A student folder: kdtool.json (kind, its floor row, provenance) beside the Hugging Face files."""
    out = _describe_json_folder(p, p / "kdtool.json", "distilled student (Hugging Face folder)")
    config = p / "config.json"
    if config.is_file():
        cfg = formats.read_json(config)
        student = cfg.get("kdtool_student") or {}
        out["summary"] = {
            "model_type": cfg.get("model_type"),
            "hidden_size": cfg.get("hidden_size"),
            "layers": cfg.get("num_hidden_layers"),
            "heads": cfg.get("num_attention_heads"),
            **({"policy": _overview(student)} if student else {}),
            **(out["summary"] or {}),
        }
    return out


def _describe_distill_run(p: Path, floors: Path) -> dict[str, Any]:
    """A `kdtool distill` output folder: the floors table's rows, the students, the curves, the checkpoint."""
    meta = formats.parquet_metadata(floors)
    table = pq.read_table(floors)
    out = _base(p, "distillation run folder")
    out["kind"], out["provenance"] = meta["kind"], meta["provenance"]
    students = sorted(s.name for s in p.iterdir() if s.is_dir() and (s / "kdtool.json").is_file())
    out["shape"] = {"students": len(students), "floors": table.num_rows}
    out["schema"] = _table_schema(table)
    out["summary"] = {
        "students": ", ".join(students),
        "checkpoint": "checkpoint/ (for --resume; delete it to reclaim the space)"
        if (p / "checkpoint").is_dir()
        else None,
        "floors": {  # width, or width/loss for students of a loss other than kl (distill --loss)
            str(r.get("width")) + ("" if r.get("loss", "kl") == "kl" else f"/{r['loss']}"): r.get("floor")
            for r in table.to_pylist()
        },
    }
    return out
