"""kdtool probe: linear probes of concepts on teacher vs students (paper section 7, Fig. 8).

`kdtool probe build-concepts` builds the default six-concept set offline from Debian text;
`kdtool probe run` probes a concepts file on the teacher and each student.
Example: kdtool probe build-concepts -o concepts.parquet && kdtool probe run concepts.parquet --models teacher
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common

app = typer.Typer(
    help="Linear probes of concepts on teacher vs students (paper section 7, Fig. 8).\n\n"
    "Example: kdtool probe build-concepts -o concepts.parquet && "
    "kdtool probe run concepts.parquet --models teacher,students/width128",
    no_args_is_help=True,
)

CONCEPT_SUFFIXES = (".parquet", ".pq", ".jsonl", ".csv")


class Pool(str, Enum):
    mean = "mean"
    last = "last"


@app.command("run")
def run(
    concepts: Annotated[
        Path,
        typer.Argument(
            help="Concepts file (Parquet/JSONL/CSV): text, concept, label 0/1 "
            "[, item]; see `kdtool probe build-concepts`."
        ),
    ],
    models: Annotated[
        str,
        typer.Option(
            "--models",
            "-m",
            help="Comma-separated models to probe: 'teacher' "
            "and/or student folders written by `kdtool distill` (or hub ids).",
        ),
    ] = "teacher",
    teacher: Annotated[
        Optional[str],
        typer.Option(
            "--teacher", help="What 'teacher' means: hub id, folder or .gguf (default: the embedded SmolLM2-135M)."
        ),
    ] = None,
    layer: Annotated[
        Optional[int],
        typer.Option(
            "--layer",
            "-l",
            help="hidden_states index in the teacher (default: its middle layer); students use the same depth.",
        ),
    ] = None,
    pool: Annotated[Pool, typer.Option("--pool", help="Pool hidden states over non-padding tokens.")] = Pool.mean,
    seeds: Annotated[int, typer.Option("--seeds", help="Stratified 80/20 splits (accuracy = mean +- std).")] = 5,
    only: Annotated[Optional[str], typer.Option("--concepts", help="Probe only these concepts (comma list).")] = None,
    per_class: Annotated[
        Optional[int],
        typer.Option("--per-class", help="Use at most N examples per class and concept (deterministic subsample)."),
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens kept per text.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per forward pass.")] = 16,
    c: Annotated[float, typer.Option("--C", help="Inverse L2 strength of the logistic regression.")] = 1.0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Results as Parquet.", dir_okay=False)] = Path(
        "probe.parquet"
    ),
    fmt: common.FormatOpt = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16.")] = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network.")] = False,
    seed: common.SeedOpt = 0,
) -> None:
    """Probe each concept on the teacher and each student: accuracy, control task, selectivity.

    Writes probe.parquet (concept, model, role, width, layer, accuracy, accuracy_std,
    control_accuracy, selectivity, n, ...) and prints the table on stdout.
    Example: kdtool probe run concepts.parquet --models teacher,students/width128,students/width768 --per-class 200
    """
    from kdtool.errors import BadInput
    from kdtool.models import ModelSpec, load_model
    from kdtool.probe import probes as probe

    if output.suffix.lower() not in (".parquet", ".pq"):
        raise BadInput(f"--output {output}: probe results are Parquet (use a .parquet name)")
    cfg = probe.ProbeConfig(
        layer=layer,
        pool=pool,
        seeds=seeds,
        seed=seed,
        max_length=max_length,
        batch_size=batch_size,
        C=c,
        per_class=per_class,
    )
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise BadInput("--models: give at least one model (e.g. teacher)")
    if len(set(names)) != len(names):
        raise BadInput("--models: a model is listed twice")
    only_list = [x.strip() for x in only.split(",") if x.strip()] if only else None
    table = probe.read_concepts(concepts, only=only_list, per_class=per_class, seed=seed)

    def entry(name: str) -> probe.ModelEntry:
        is_teacher = name == "teacher" or (teacher is not None and name == teacher)
        spec = ModelSpec(model=teacher if is_teacher else name, dtype=dtype, device=device, offline=offline)
        return probe.ModelEntry(
            name="teacher" if is_teacher else name,
            role="teacher" if is_teacher else "student",
            load=lambda: load_model(spec, notify=common.log),
        )

    entries = [entry(n) for n in names]
    if sum(e.role == "teacher" for e in entries) > 1:
        raise BadInput("--models: 'teacher' and the --teacher model are the same model; list it once")
    common.log(
        f"probe: {len(table.concepts())} concept(s), {len(set(table.text))} texts, "
        f"{len(entries)} model(s), pool={pool.value}, {seeds} split(s)"
    )
    with common.progress(transient=True) as bar:
        task = bar.add_task("encoding", total=None, rate="")

        def on_model(name: str, n: int) -> None:
            bar.reset(task, total=n, description=f"encoding {name}")
            common.log(f"probe: {name}: encoding {n} texts")

        def on_result(row: dict) -> None:
            common.log(
                f"probe: {row['model']} layer {row['layer']} {row['concept']}: "
                f"accuracy {row['accuracy']:.3f} +- {row['accuracy_std']:.3f}, "
                f"control {row['control_accuracy']:.3f}, selectivity {row['selectivity']:+.3f}"
            )

        result = probe.run(
            table, entries, cfg, on_model=on_model, on_batch=lambda k: bar.advance(task, k), on_result=on_result
        )
    prov = common.make_provenance(inputs=[concepts], seed=seed, config=probe.config_dict(cfg))
    summary = {
        "teacher": teacher or "embedded default",
        "concepts": table.concepts(),
        "layer_rule": "teacher: --layer or n_layers // 2; students: the same index (scaled if depth differs)",
    }
    from kdtool import formats

    formats.write_parquet(output, result, kind="kdtool.probe", provenance=prov, summary=summary)
    common.log(f"probe: wrote {output}")
    shown = ("concept", "model", "width", "layer", "accuracy", "accuracy_std", "control_accuracy", "selectivity", "n")
    common.emit_table(
        {k: result[k] for k in shown},
        fmt=fmt,
        output=None,
        kind="kdtool.probe",
        provenance=prov,
        title=f"Linear probe accuracy (pool={pool.value})",
        summary=summary,
    )


@app.command("build-concepts")
def build_concepts(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Concepts file: .parquet, .jsonl or .csv.", dir_okay=False)
    ] = Path("concepts.parquet"),
    sources: Annotated[
        Optional[Path],
        typer.Option(
            "--sources",
            help="Folder with the unpacked Debian packages (default: $KDTOOL_HOME/sources, then $KDTOOL_HOME/corpus).",
            file_okay=False,
        ),
    ] = None,
    per_class: Annotated[int, typer.Option("--per-class", help="Examples per class and concept (at most).")] = 1000,
    only: Annotated[
        Optional[str],
        typer.Option(
            "--concepts", help="Build only these (comma list of question, french, code, sports, legal, medical)."
        ),
    ] = None,
    max_chars: Annotated[int, typer.Option("--max-chars", help="Longest text kept (characters).")] = 600,
    fetch: Annotated[
        bool,
        typer.Option(
            "--fetch", help="First download missing packages with apt-get (like scripts/fetch-concept-sources)."
        ),
    ] = False,
    seed: common.SeedOpt = 0,
) -> None:
    """Build the default concept set offline from real text in Debian packages (labels from the source's own marks).

    question (Austen), french (manpages-fr vs manpages), code (Python docs), sports/legal/medical
    (WordNet topic domains). Concepts whose package is missing are skipped with the reason.
    Example: scripts/fetch-concept-sources && kdtool probe build-concepts -o concepts.parquet --per-class 500
    """
    from kdtool import formats
    from kdtool.errors import BadInput, RuntimeFailure
    from kdtool.probe import concepts as cs
    from kdtool.text import debian as debsource

    suffix = output.suffix.lower()
    if suffix not in CONCEPT_SUFFIXES:
        raise BadInput(f"--output {output}: use .parquet, .jsonl or .csv")
    if max_chars < 50:
        raise BadInput("--max-chars must be >= 50")
    wanted = tuple(x.strip() for x in only.split(",") if x.strip()) if only else cs.CONCEPTS
    home = debsource.kdtool_home()
    roots = [sources] if sources is not None else [home / "sources", home / "corpus"]
    if sources is not None and not sources.is_dir():
        raise BadInput(f"--sources {sources}: no such folder")
    if fetch:
        pkgs = sorted({p for c in wanted if c in cs.PACKAGES for p in cs.PACKAGES[c]})
        pkgs = [debsource.newest_python_doc() if p == "python3*-doc" else p for p in pkgs]
        for pkg, status in debsource.fetch(pkgs, roots[0]).items():
            (common.log if status in ("ok", "cached") else common.warn)(f"fetch {pkg}: {status}")
    columns, report = cs.build(roots, concepts=wanted, per_class=per_class, seed=seed, max_chars=max_chars)
    for concept, info in report.items():
        if "error" in info:
            common.warn(f"{concept}: not built: {info['error']}")
        else:
            note = "" if info["per_class"] == per_class else f" (only {info['positives_available']} positives)"
            common.log(f"{concept}: {info['per_class']} per class from {', '.join(info['sources'])}{note}")
    if not columns["text"]:
        raise RuntimeFailure(
            "no concept could be built: fetch the sources with scripts/fetch-concept-sources (or pass --fetch)"
        )
    prov = common.make_provenance(
        inputs=[],
        seed=seed,
        config={"per_class": per_class, "concepts": list(wanted), "max_chars": max_chars, "sources": roots},
    )
    summary = {"concepts": report}
    if suffix in (".parquet", ".pq"):
        formats.write_parquet(output, columns, kind="kdtool.concepts", provenance=prov, summary=summary)
    else:
        _write_text_table(output, columns)
        formats.write_json(
            output.with_name(output.name + ".provenance.json"),
            {"kind": "kdtool.concepts", "provenance": prov, "summary": summary},
        )
    common.log(f"build-concepts: wrote {len(columns['text'])} examples to {output}")
    if common.STATE.json:
        common.emit_json({"kind": "kdtool.concepts", "output": str(output), "concepts": report})


def _write_text_table(path: Path, columns: dict[str, list]) -> None:
    import csv
    import io
    import json

    from kdtool import formats

    names = list(columns)
    rows = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    formats.write_text(path, text)
