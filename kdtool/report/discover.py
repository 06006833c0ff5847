"""Finding the kdtool files of a run folder by their own metadata, never by name (`kdtool plot report`, step 1).

Parquet schema `kdtool.kind`, JSON top-level `kind`, activation-cache/teacher-cache manifests, SAE
folders (cfg.json + weights) and student folders (kdtool.json). Files without a kind are ignored;
files that cannot be read become one-line notes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq

from kdtool import formats, teachers
from kdtool.errors import BadInput, KdtoolError
from kdtool.report.model import KIND, SAE_LOG, STATS, Artifact
from kdtool.sae.summary import entries, several_per_layer

#: JSON files bigger than this are not opened while looking for kdtool files (tokenizers, datasets).
MAX_JSON_BYTES = 16 * 2**20
#: Folders never searched: checkpoints and resumable part files hold nothing a report shows.
SKIP_DIRS = {"checkpoint", "checkpoints", "__pycache__", "node_modules"}
SAE_WEIGHTS = ("sae_weights.safetensors", "sae.safetensors")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def natural_key(text: str) -> list:
    """Sort key that puts layer6 before layer12."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message (a kdtool error) or `Type: message` (anything else)."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(exc, KdtoolError) else f"{type(exc).__name__}: {msg}".rstrip(": ")


def read_json_quiet(path: Path) -> dict | None:
    """A JSON object, or None when the file is unreadable, not JSON or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _parquet_artifact(path: Path, root: Path) -> Artifact | None:
    meta = formats.parquet_metadata(path)  # BadInput when unreadable
    if not meta["kind"]:
        return None
    rows = pq.ParquetFile(path).metadata.num_rows
    summary = meta["summary"]
    details = f"{rows:,} rows"
    if meta["kind"] == STATS and (found := entries(summary)):
        details += ", layers " + ", ".join(str(L) for L in sorted({e.layer for e in found}))
        if several_per_layer(found):
            details += f" ({len(found)} SAEs)"
    elif meta["kind"] == SAE_LOG and isinstance(summary, dict) and summary.get("layer") is not None:
        details += f", layer {summary['layer']}"
    return Artifact(path, _rel(path, root), meta["kind"], meta["provenance"], summary, details)


def _json_artifact(path: Path, root: Path) -> Artifact | None:
    obj = formats.read_json(path)  # BadInput when not valid JSON
    kind = obj.get("kind")
    if not (isinstance(kind, str) and kind.startswith("kdtool.")) or kind == KIND:
        return None
    details = ""
    if isinstance(obj.get("rows"), list):
        details = f"{len(obj['rows']):,} rows"
    elif isinstance(obj.get("points"), list):
        details = f"{len(obj['points'])} points"
    return Artifact(path, _rel(path, root), kind, obj.get("provenance"), obj, details)


def _folder_artifact(folder: Path, root: Path, names: set[str]) -> tuple[Artifact | None, bool]:
    """A kdtool folder recognised by its marker file: (artifact or None, prune its subfolders)."""
    if "manifest.json" in names:
        m = read_json_quiet(folder / "manifest.json")
        if m and isinstance(m.get("kind"), str) and m["kind"].startswith("kdtool."):
            if m["kind"] == "kdtool.acts":
                layers = ", ".join(map(str, m.get("layers") or []))
                details = f"{m.get('model', '?')}, {int(m.get('tokens') or 0):,} tokens, layers {layers}"
                details += f", d_model {m.get('d_model')}"
                shuffled = m.get("shuffle") if isinstance(m.get("shuffle"), dict) else None
                details += f", shuffled (seed {shuffled.get('seed')})" if shuffled else ", document order"
            else:
                details = ", ".join(f"{k} {m[k]}" for k in ("topk", "temperature", "vocab_size") if k in m)
            return Artifact(folder, _rel(folder, root), m["kind"], m.get("provenance"), m, details), True
    if "cfg.json" in names and any(w in names for w in SAE_WEIGHTS):
        cfg = read_json_quiet(folder / "cfg.json") or {}
        kd = cfg.get("kdtool") if isinstance(cfg.get("kdtool"), dict) else {}
        bits = []
        if kd.get("layer") is not None:
            bits.append(f"layer {kd['layer']}")
        for key in ("d_in", "d_sae"):
            if cfg.get(key) is not None:
                bits.append(f"{key} {cfg[key]}")
        norm = kd.get("normalize") if isinstance(kd.get("normalize"), dict) else {}
        if norm.get("method") not in (None, "none"):
            bits.append(f"trained on x / {norm.get('scale', 0):.3g} ({norm['method']}, folded)")
        layout = "kdtool" if kd else ("saelens" if "sae_weights.safetensors" in names else "sparsify")
        bits.append(f"{layout} layout")
        return Artifact(folder, _rel(folder, root), "kdtool.sae", cfg.get("provenance"), cfg, ", ".join(bits)), False
    if "kdtool.json" in names:  # a distilled student (HF save_pretrained + kdtool.json)
        info = read_json_quiet(folder / "kdtool.json")
        if info and isinstance(info.get("kind"), str):
            floor = info.get("floor") if isinstance(info.get("floor"), dict) else {}
            details = f"width {floor['width']}" if "width" in floor else ""
            if floor.get("loss", "kl") != "kl":
                details += f", loss {floor['loss']}"
            return Artifact(folder, _rel(folder, root), info["kind"], info.get("provenance"), info, details), True
    if "report.json" in names:  # another report inside the run folder: not an input
        rep = read_json_quiet(folder / "report.json")
        if rep and rep.get("kind") == KIND:
            return None, True
    return None, False


def discover(run_dir: str | os.PathLike, *, exclude: list[Path] = ()) -> tuple[list[Artifact], list[str]]:
    """The kdtool files under `run_dir` (sorted by path) and one-line notes about files that could not be read."""
    root = Path(run_dir)
    if not root.is_dir():
        raise BadInput(f"{root}: not a folder (kdtool plot report takes a run folder)")
    excluded = {p.resolve() for p in exclude}
    artifacts: list[Artifact] = []
    notes: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here.resolve() in excluded:
            dirnames[:] = []
            continue
        names = set(filenames)
        found, prune = _folder_artifact(here, root, names)
        if found is not None:
            artifacts.append(found)
        dirnames[:] = (
            []
            if prune
            else sorted(
                d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".parts")
            )
        )
        if prune:
            continue
        for name in sorted(filenames):
            if name.startswith("."):  # temporary files of atomic writes, editor files
                continue
            path = here / name
            suffix = path.suffix.lower()
            try:
                if formats.is_parquet(path):
                    art = _parquet_artifact(path, root)
                elif suffix == ".json" and name not in ("cfg.json", "manifest.json"):
                    if path.stat().st_size > MAX_JSON_BYTES:
                        continue
                    art = _json_artifact(path, root)
                else:
                    continue
            except Exception as exc:  # one unreadable file must not stop the report
                msg = one_line(exc)
                msg = msg[len(f"{path}: ") :] if msg.startswith(f"{path}: ") else msg  # the note names the file
                notes.append(f"{_rel(path, root)}: skipped, {msg}")
                continue
            if art is not None:
                artifacts.append(art)
    for art in artifacts:
        art.teacher = teachers.teacher_of(art.kind, art.summary, art.provenance)
    artifacts.sort(key=lambda a: natural_key(a.rel))
    return artifacts, notes
