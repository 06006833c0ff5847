"""The probe commands' jobs, callable from Python: probe a concepts file, build the concept set into a file.

`probe_file` resolves the model list (which entry is the teacher), reads the concepts, probes every
model (kdtool/probe/probes.py) and writes probe.parquet; `build_concepts_file` fetches and reads the
Debian sources (kdtool/probe/concepts.py) and writes the concept table as Parquet, JSONL or CSV
(the text formats with a .provenance.json beside them). Progress reaches the caller as events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdtool import formats
from kdtool import provenance as _provenance
from kdtool.errors import BadInput, RuntimeFailure
from kdtool.models import ModelSpec, check_model_path, load_model
from kdtool.probe import concepts as cs
from kdtool.probe import probes
from kdtool.text import debian

PROBE_KIND = "kdtool.probe"
CONCEPTS_KIND = "kdtool.concepts"
CONCEPT_SUFFIXES = (".parquet", ".pq", ".jsonl", ".csv")
LAYER_RULE = "teacher: --layer or n_layers // 2; students: the same index (scaled if depth differs)"

Callback = Callable[[dict], None]


def _ignore(event: dict) -> None:
    pass


def _check_names(names: list[str]) -> None:
    if not names:
        raise BadInput("--models: give at least one model (e.g. teacher)")
    if len(set(names)) != len(names):
        raise BadInput("--models: a model is listed twice")


def model_entries(
    names: list[str],
    teacher: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    offline: bool = False,
    notify: Callable[[str], None] | None = None,
) -> list[probes.ModelEntry]:
    """What --models lists, as models to load one at a time.

    'teacher' (or the --teacher model's own name) is the teacher: `teacher`, or the embedded default
    when None; every other name is a student folder or hub id. Each model is listed once.
    """
    _check_names(names)

    def entry(name: str) -> probes.ModelEntry:
        is_teacher = name == "teacher" or (teacher is not None and name == teacher)
        spec = ModelSpec(model=teacher if is_teacher else name, dtype=dtype, device=device, offline=offline)
        if spec.model is not None:  # a missing folder is refused now, not after the models before it ran
            check_model_path(spec.model, "--teacher" if is_teacher else "--models")
        return probes.ModelEntry(
            name="teacher" if is_teacher else name,
            role="teacher" if is_teacher else "student",
            load=lambda: load_model(spec, notify=notify),
        )

    entries = [entry(n) for n in names]
    if sum(e.role == "teacher" for e in entries) > 1:
        raise BadInput("--models: 'teacher' and the --teacher model are the same model; list it once")
    return entries


@dataclass
class ProbeResult:
    columns: dict[str, list]  # probe.parquet's columns (probes.COLUMNS)
    summary: dict  # its summary metadata: teacher, concepts, layer rule
    provenance: dict


def probe_file(
    concepts: Path,
    names: list[str],
    cfg: probes.ProbeConfig,
    output: Path,
    *,
    teacher: str | None = None,
    only: list[str] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    offline: bool = False,
    provenance: Callable[..., dict] = _provenance.make,
    notify: Callable[[str], None] | None = None,
    callback: Callback | None = None,
) -> ProbeResult:
    """Probe every concept of a concepts file on every model named and write the results table to `output`.

    names, teacher, dtype, device, offline: as model_entries (notify hears the model loader's messages);
    `only` keeps those concepts. callback(event) hears "start" (concepts, texts, models), then per
    model "model" (name, texts to encode), "batch" (texts encoded) and "result" (one row per concept).
    """
    emit = callback or _ignore
    _check_names(names)
    table = probes.read_concepts(concepts, only=only, per_class=cfg.per_class, seed=cfg.seed)
    models = model_entries(names, teacher, dtype=dtype, device=device, offline=offline, notify=notify)
    emit({"event": "start", "concepts": len(table.concepts()), "texts": len(set(table.text)), "models": len(models)})
    columns = probes.run(
        table,
        models,
        cfg,
        on_model=lambda name, n: emit({"event": "model", "name": name, "texts": n}),
        on_batch=lambda n: emit({"event": "batch", "texts": n}),
        on_result=lambda row: emit({"event": "result", "row": row}),
    )
    record = provenance(inputs=[concepts], seed=cfg.seed, config=probes.config_dict(cfg))
    summary = {"teacher": teacher or "embedded default", "concepts": table.concepts(), "layer_rule": LAYER_RULE}
    formats.write_table(output, columns, kind=PROBE_KIND, provenance=record, summary=summary)
    return ProbeResult(columns, summary, record)


def build_concepts_file(
    output: Path,
    *,
    sources: Path | None = None,
    concepts: tuple[str, ...] = cs.CONCEPTS,
    per_class: int = 1000,
    max_chars: int = 600,
    fetch: bool = False,
    seed: int = 0,
    provenance: Callable[..., dict] = _provenance.make,
    callback: Callback | None = None,
) -> tuple[dict[str, list], dict[str, dict]]:
    """Build the concept set from the Debian sources and write it to `output`: (columns, report).

    sources: the folder of unpacked packages (default $KDTOOL_HOME/sources, then $KDTOOL_HOME/corpus);
    fetch: first download the missing ones with apt-get. callback(event) hears "fetch" (package,
    status) and, per concept, "concept" (its report entry: counts or why it was not built).
    Parquet carries provenance inside; JSONL and CSV get OUTPUT.provenance.json beside them.
    """
    emit = callback or _ignore
    if output.suffix.lower() not in CONCEPT_SUFFIXES:
        raise BadInput(f"--output {output}: use .parquet, .jsonl or .csv")
    if max_chars < 50:
        raise BadInput("--max-chars must be >= 50")
    home = debian.kdtool_home()
    roots = [sources] if sources is not None else [home / "sources", home / "corpus"]
    if sources is not None and not sources.is_dir():
        raise BadInput(f"--sources {sources}: no such folder")
    if fetch:
        pkgs = sorted({p for c in concepts if c in cs.PACKAGES for p in cs.PACKAGES[c]})
        pkgs = [debian.newest_python_doc() if p == "python3*-doc" else p for p in pkgs]
        for pkg, status in debian.fetch(pkgs, roots[0]).items():
            emit({"event": "fetch", "package": pkg, "status": status})
    columns, report = cs.build(roots, concepts=concepts, per_class=per_class, seed=seed, max_chars=max_chars)
    for concept, info in report.items():
        emit({"event": "concept", "concept": concept, "info": info})
    if not columns["text"]:
        raise RuntimeFailure(
            "no concept could be built: fetch the sources with scripts/fetch-concept-sources (or pass --fetch)"
        )
    record = provenance(
        inputs=[],
        seed=seed,
        config={"per_class": per_class, "concepts": list(concepts), "max_chars": max_chars, "sources": roots},
    )
    summary = {"concepts": report}
    formats.write_table(output, columns, kind=CONCEPTS_KIND, provenance=record, summary=summary)
    if not formats.is_parquet(output):
        formats.write_json(
            output.with_name(output.name + ".provenance.json"),
            {"kind": CONCEPTS_KIND, "provenance": record, "summary": summary},
        )
    return columns, report
