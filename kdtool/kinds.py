"""Every kind of file kdtool writes, what it is and which command makes it; and the check at every input.

Each kdtool file records its kind (Parquet schema metadata `kdtool.kind`, JSON top-level `kind`,
safetensors `__metadata__`, a folder's manifest.json / cfg.json / kdtool.json). A command that reads
a file calls `expect(path, wanted, option)` first, so that a file of the wrong kind is refused with a
sentence a newcomer can act on:

    predict.parquet is a kdtool.predict table (from `kdtool predict`); --calibration wants
    calib.json (kdtool.calibration, from `kdtool calibrate`)

rather than a decoding error from deep inside the reader. Files that record no kind (a CSV a user
wrote, an SAE from SAELens) pass: the reader checks their columns or tensors itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kdtool.errors import BadInput
from kdtool.formats import parquet_metadata, safetensors_header


@dataclass(frozen=True)
class Kind:
    name: str  # the recorded kind, e.g. "kdtool.predict"
    what: str  # a noun phrase: "a kdtool.predict table"
    example: str  # the file or folder a user usually has: "predict.parquet"
    made_by: str  # the command that writes it


KINDS = {
    k.name: k
    for k in (
        Kind("kdtool.acts", "an activation cache", "acts/", "kdtool cache-acts"),
        Kind("kdtool.sae", "an SAE folder", "saes/layer12/", "kdtool train-sae"),
        Kind("kdtool.sae.train_log", "an SAE training log", "saes/layer12/train_log.parquet", "kdtool train-sae"),
        Kind("kdtool.sae.checkpoint", "an SAE training checkpoint", "saes/checkpoint.json", "kdtool train-sae"),
        Kind("kdtool.stats", "a stats table", "stats.parquet", "kdtool stats"),
        Kind("kdtool.predict", "a prediction table", "predict.parquet", "kdtool predict"),
        Kind("kdtool.predict.spread", "a prediction spread table", "spread.parquet", "kdtool predict --spread"),
        Kind("kdtool.distill.floors", "a distillation floors table", "students/floors.parquet", "kdtool distill"),
        Kind("kdtool.distill.curves", "a distillation curves table", "students/curves.parquet", "kdtool distill"),
        Kind("kdtool.distill.student", "a distilled student", "students/width128/", "kdtool distill"),
        Kind(
            "kdtool.distill.residual_map",
            "a student's learned map to the teacher's residual stream",
            "students/width128-hidden/residual_map.safetensors",
            "kdtool distill --loss hidden",
        ),
        Kind(
            "kdtool.distill.student.weights",
            "a student's weights",
            "students/width128/model.safetensors",
            "kdtool distill",
        ),
        Kind("kdtool.distill.checkpoint", "a distillation checkpoint", "students/checkpoint/", "kdtool distill"),
        Kind("kdtool.teacher_cache", "a teacher top-k cache", "teacher-cache/", "kdtool distill --teacher-cache"),
        Kind("kdtool.calibration", "a calibration", "calib.json", "kdtool calibrate"),
        Kind("kdtool.survival", "a feature-survival table", "survival.parquet", "kdtool survival"),
        Kind("kdtool.concepts", "a concepts table", "concepts.parquet", "kdtool probe build-concepts"),
        Kind("kdtool.probe", "a probe table", "probe.parquet", "kdtool probe run"),
        Kind("kdtool.toy", "a toy sweep table", "toy.parquet", "kdtool toy"),
        Kind("kdtool.toy.curves", "toy training curves", "toy.curves.parquet", "kdtool toy --log-curves"),
        Kind("kdtool.toy.survival", "toy per-feature survival records", "toy.survival.parquet", "kdtool toy"),
        Kind("kdtool.capacity", "a capacity model", "toy.capacity.json", "kdtool toy --fit-capacity"),
        Kind("kdtool.report", "a run report", "report/report.json", "kdtool plot report"),
        Kind("kdtool.reproduce.plan", "a reproduction plan", "plan.json", "scripts/reproduce-paper"),
        Kind("kdtool.reproduce.throughput", "measured throughputs", "throughput.json", "scripts/reproduce-paper"),
        # files inside the folders above, and the JSON summaries commands print with --json
        Kind("kdtool.acts.shard", "an activation shard", "acts/layer12/shard-00000.safetensors", "kdtool cache-acts"),
        Kind("kdtool.acts.run", "a cache-acts summary", "(stdout of --json)", "kdtool --json cache-acts"),
        Kind("kdtool.acts.shuffle", "a shuffle summary", "(stdout of --json)", "kdtool --json cache-acts --shuffle"),
        Kind(
            "kdtool.sae.optimizer",
            "an SAE's optimizer state",
            "checkpoints/*/optimizer.safetensors",
            "kdtool train-sae",
        ),
        Kind("kdtool.sae.train_state", "an SAE's training state", "checkpoints/*/state.json", "kdtool train-sae"),
        Kind("kdtool.sae.train_summary", "a train-sae summary", "(stdout of --json)", "kdtool --json train-sae"),
        Kind("kdtool.stats.summary", "a stats summary", "(stdout of --json)", "kdtool --json stats"),
        Kind("kdtool.survival.summary", "a survival summary", "(stdout of --json)", "kdtool --json survival"),
        Kind("kdtool.toy.summary", "a toy sweep summary", "(stdout of --json)", "kdtool --json toy"),
        Kind("kdtool.toy.convergence", "a toy convergence check", "(stdout of --json)", "kdtool --json toy"),
        Kind("kdtool.demo.run", "the demo's record of a run", "demo-out/demo-run.json", "scripts/demo"),
        Kind("kdtool.reproduce.stage", "a reproduction stage record", "RUN/stages.jsonl", "scripts/reproduce-paper"),
        Kind(
            "kdtool.lock", "a lock on an output being written", "run/.acts.lock", "a writing command (kdtool/locks.py)"
        ),
    )
}

#: Files inside a folder that say what the folder is, in the order they are tried.
_FOLDER_MARKERS = ("manifest.json", "kdtool.json", "cfg.json", "checkpoint.json", "report.json")


def folder_marker(folder: str | os.PathLike) -> Path | None:
    """The file that says what a kdtool folder is (its manifest, kdtool.json, cfg.json...), if any."""
    for marker in _FOLDER_MARKERS:
        if (Path(folder) / marker).is_file() and _json_kind(Path(folder) / marker):
            return Path(folder) / marker
    return None


def _json_kind(path: Path) -> str | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("kind"), str):
        return obj["kind"]
    section = obj.get("kdtool")  # an SAE's cfg.json keeps kdtool's record in a "kdtool" section
    return "kdtool.sae" if isinstance(section, dict) and path.name == "cfg.json" else None


def kind_of(path: str | os.PathLike) -> str | None:
    """The kind a file or folder records, read from its metadata only (cheap); None if it records none."""
    p = Path(path)
    if p.is_dir():
        marker = folder_marker(p)
        if marker is None and (p / "floors.parquet").is_file():  # a distill run folder is known by its floors
            return kind_of(p / "floors.parquet")
        return _json_kind(marker) if marker else None
    if not p.is_file():
        return None
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if head[:4] == b"PAR1":
        try:
            return parquet_metadata(p)["kind"]
        except BadInput:
            return None
    if p.suffix.lower() == ".json":
        return _json_kind(p)
    if p.suffix.lower() == ".safetensors":
        try:
            return safetensors_header(p)["metadata"].get("kdtool.kind")
        except BadInput:
            return None
    return None


def describe(kind: str | None) -> str:
    """`a kdtool.predict table (from kdtool predict)`; for unknown kinds, the kind itself."""
    if kind is None:
        return "a file that records no kdtool kind"
    known = KINDS.get(kind)
    return f"{known.what} ({kind}, from `{known.made_by}`)" if known else f"a {kind} file"


def _wanted(kind: str) -> str:
    known = KINDS.get(kind)
    return f"{known.example} ({kind}, from `{known.made_by}`)" if known else kind


def expect(
    path: str | os.PathLike, wanted: str | tuple[str, ...], option: str, *, allow_unmarked: bool = True
) -> str | None:
    """Refuse `path` (BadInput, exit 2) if it records a kind other than `wanted`; return the kind it records.

    `option` names where the path was given ("--calibration", "FLOORS"). A file that records no kind
    passes when `allow_unmarked` (the caller's reader checks it); otherwise it is refused too.
    """
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    found = kind_of(path)
    if found in wanted or (found is None and allow_unmarked):
        return found
    choices = " or ".join(_wanted(w) for w in wanted)
    raise BadInput(f"{path} is {describe(found)}; {option} wants {choices}")
