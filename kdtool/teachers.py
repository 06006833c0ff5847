"""Which teacher model a kdtool file measures, read from the file's own metadata.

Why: a figure, a table or the report's headline that mixes numbers of two models (d* of a SmolLM2
stats file drawn on the panel of the paper's Pythia calibration) answers no question. Every kdtool
file names its teacher somewhere (a stats summary's `source`, a distillation's `run_key`, a
calibration's inputs, a cache's manifest); `teacher_of` finds it, and `same_teacher` says whether
two files may be combined: only when both name the same model. A file that names none is combined
only with another written by the same command (identical provenance), never by guess.

Reads metadata only (kdtool.formats): the report, `kdtool calibrate` and `kdtool predict` use it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Any

from kdtool import formats

#: The teacher of the paper's numbers (`kdtool calibrate --example paper`, kdtool/data/paper_pythia410m*.csv).
PAPER_MODEL = "EleutherAI/pythia-410m"
#: Shipped example data -> the model it measures.
EXAMPLE_MODELS = {"paper_pythia410m.csv": PAPER_MODEL, "paper_pythia410m_layers.csv": PAPER_MODEL}
#: `kdtool probe` writes this when it ran on the embedded default teacher.
_EMBEDDED_ALIASES = ("embedded default",)


def _get(obj: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def teacher_of(kind: str, summary: Any, provenance: Any = None) -> str | None:
    """The teacher a file of `kind` measures (its summary, manifest or JSON object; its provenance), or None.

    summary: a Parquet file's kdtool.summary, or the JSON object / manifest / cfg.json of the others.
    """
    found = None
    if kind == "kdtool.stats":
        found = _get(summary, "source", "model") or _get(summary, "model")
        if not found:  # each SAE's training record names the model it was trained on
            saes = _get(summary, "saes")
            models = {_text(v.get("model")) for v in (saes or {}).values() if isinstance(v, dict)} - {None}
            found = models.pop() if len(models) == 1 else None
    elif kind in ("kdtool.predict", "kdtool.predict.spread", "kdtool.sae.train_log", "kdtool.acts"):
        found = _get(summary, "model") or _get(summary, "source", "model")
    elif kind == "kdtool.sae":
        found = _get(summary, "kdtool", "source", "model") or _get(summary, "model_name")
    elif kind in ("kdtool.distill.floors", "kdtool.distill.curves"):
        found = _named(_get(summary, "config", "run_key", "teacher"), provenance)
    elif kind == "kdtool.distill.student":
        found = _named(
            _get(provenance, "config", "distill", "run_key", "teacher") or _get(provenance, "config", "key", "teacher"),
            provenance,
        )
    elif kind == "kdtool.calibration":
        found = _get(summary, "inputs", "model")
        observed = _text(_get(summary, "inputs", "observed"))
        if not found and observed:
            found = EXAMPLE_MODELS.get(PurePath(observed).name)
    elif kind == "kdtool.probe":
        found = _get(summary, "teacher")
    elif kind == "kdtool.teacher_cache":
        found = _get(summary, "model") or _get(summary, "run", "teacher")
    return normalise(_text(found))


def _named(teacher: Any, provenance: Any) -> str | None:
    """A distillation's teacher as a name: its run key holds a name (older files) or a content identity
    (kdtool/identity.py), which names a hub model by id and the embedded one by its source; a folder or
    GGUF file is named by the loaded model's name in the provenance."""
    if isinstance(teacher, str):
        return teacher
    if isinstance(teacher, dict):
        if teacher.get("source") == "hub" and _text(teacher.get("id")):
            return teacher["id"]
        if teacher.get("source") == "embedded":
            return "SmolLM2-135M-Instruct (embedded)"
    return _get(provenance, "config", "teacher", "model")


def of_file(path: str | os.PathLike) -> str | None:
    """The teacher a kdtool Parquet or JSON file names (None for other files, unreadable ones or none named);
    a shipped example file (kdtool/data/paper_pythia410m.csv) names the paper's."""
    p = Path(path)
    if p.name in EXAMPLE_MODELS:
        return EXAMPLE_MODELS[p.name]
    try:
        if formats.is_parquet(p):
            meta = formats.parquet_metadata(p)
            return teacher_of(meta.get("kind") or "", meta.get("summary"), meta.get("provenance"))
        if p.suffix.lower() == ".json" and p.is_file():
            obj = formats.read_json(p)
            return teacher_of(str(obj.get("kind")), obj, obj.get("provenance"))
    except Exception:  # metadata only: a file that cannot say is a file that names no teacher
        return None
    return None


def normalise(name: str | None) -> str | None:
    """A model name in one spelling: no trailing slash; the embedded default under one name."""
    if name is None:
        return None
    name = name.rstrip("/")
    if name in _EMBEDDED_ALIASES or name.startswith("SmolLM2-135M-Instruct (embedded"):
        return "SmolLM2-135M-Instruct (embedded)"
    return name


def same_teacher(a: str | None, b: str | None, prov_a: Any = None, prov_b: Any = None) -> bool:
    """Whether two files may be combined: both name the same teacher, or neither names one and both were
    written by one command (the same provenance)."""
    if a is not None or b is not None:
        return a is not None and b is not None and a.lower() == b.lower()
    return isinstance(prov_a, dict) and bool(prov_a) and prov_a == prov_b


def short(name: str | None) -> str:
    """A model name for a title: the last part of a hub id or path ("pythia-410m")."""
    if not name:
        return "model not recorded"
    return name.rsplit("/", 1)[-1] or name
