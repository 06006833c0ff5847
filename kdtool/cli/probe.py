"""kdtool probe: linear probes of concepts on teacher vs students (paper section 7, Fig. 8).

`kdtool probe build-concepts` builds the default six-concept set offline from Debian text;
`kdtool probe run` probes a concepts file on the teacher and each student.
Example: kdtool probe build-concepts -o concepts.parquet && kdtool probe run concepts.parquet --models teacher
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common
from kdtool.cli.options import choices

app = typer.Typer(
    help="Linear probes of concepts on teacher vs students (paper section 7, Fig. 8).\n\n"
    "Example: kdtool probe build-concepts -o concepts.parquet && "
    "kdtool probe run concepts.parquet --models teacher,students/width128",
    no_args_is_help=True,
)

Pool = choices("Pool", "mean", "last")


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
    control_accuracy, selectivity, n, ...) and prints the table on stderr (stdout with --json or
    --format).
    Example: kdtool probe run concepts.parquet --models teacher,students/width128,students/width768 --per-class 200
    """
    from kdtool import formats, kinds
    from kdtool.cli.options import quiet_transformers
    from kdtool.errors import BadInput
    from kdtool.probe import job
    from kdtool.probe.probes import ProbeConfig

    if not formats.is_parquet(output):
        raise BadInput(f"--output {output}: probe results are Parquet (use a .parquet name)")
    kinds.expect(concepts, job.CONCEPTS_KIND, "CONCEPTS")
    quiet_transformers()
    cfg = ProbeConfig(
        layer=layer,
        pool=pool.value,
        seeds=seeds,
        seed=seed,
        max_length=max_length,
        batch_size=batch_size,
        C=c,
        per_class=per_class,
    )
    with _ProbeReport(cfg) as report:
        result = job.probe_file(
            concepts,
            [m.strip() for m in models.split(",") if m.strip()],
            cfg,
            output,
            teacher=teacher,
            only=[x.strip() for x in only.split(",") if x.strip()] if only else None,
            dtype=dtype,
            device=device,
            offline=offline,
            provenance=common.make_provenance,
            notify=common.log,
            callback=report.on_event,
        )
    common.log(f"probe: wrote {output}")
    shown = ("concept", "model", "width", "layer", "accuracy", "accuracy_std", "control_accuracy", "selectivity", "n")
    common.emit_summary(
        {k: result.columns[k] for k in shown},
        fmt=fmt,
        kind=job.PROBE_KIND,
        provenance=result.provenance,
        title=f"Linear probe accuracy (pool={cfg.pool})",
        summary=result.summary,
    )


class _ProbeReport:
    """Renders probe_file's events: a log line per model and per result, a transient encoding bar."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.stack = contextlib.ExitStack()
        self.bar = self.task = None

    def __enter__(self) -> _ProbeReport:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def on_event(self, ev: dict) -> None:
        kind = ev["event"]
        if kind == "start":
            common.log(
                f"probe: {ev['concepts']} concept(s), {ev['texts']} texts, "
                f"{ev['models']} model(s), pool={self.cfg.pool}, {self.cfg.seeds} split(s)"
            )
            self.bar = self.stack.enter_context(common.progress(transient=True))
            self.task = self.bar.add_task("encoding", total=None, rate="")
        elif kind == "model":
            self.bar.reset(self.task, total=ev["texts"], description=f"encoding {ev['name']}")
            common.log(f"probe: {ev['name']}: encoding {ev['texts']} texts")
        elif kind == "batch":
            self.bar.advance(self.task, ev["texts"])
        elif kind == "result":
            row = ev["row"]
            common.log(
                f"probe: {row['model']} layer {row['layer']} {row['concept']}: "
                f"accuracy {row['accuracy']:.3f} +- {row['accuracy_std']:.3f}, "
                f"control {row['control_accuracy']:.3f}, selectivity {row['selectivity']:+.3f}"
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
            "--fetch", help="First download missing packages with apt-get download (no root; nothing is installed)."
        ),
    ] = False,
    seed: common.SeedOpt = 0,
) -> None:
    """Build the default concept set offline from real text in Debian packages (labels from the source's own marks).

    question (Austen), french (manpages-fr vs manpages), code (Python docs), sports/legal/medical
    (WordNet topic domains). Concepts whose package is missing are skipped with the reason.
    Example: kdtool probe build-concepts --fetch -o concepts.parquet --per-class 500
    """
    from kdtool.probe import concepts as cs
    from kdtool.probe import job

    def on_event(ev: dict) -> None:
        if ev["event"] == "fetch":
            (common.log if ev["status"] in ("ok", "cached") else common.warn)(f"fetch {ev['package']}: {ev['status']}")
        elif "error" in ev["info"]:
            common.warn(f"{ev['concept']}: not built: {ev['info']['error']}")
        else:
            info = ev["info"]
            note = "" if info["per_class"] == per_class else f" (only {info['positives_available']} positives)"
            common.log(f"{ev['concept']}: {info['per_class']} per class from {', '.join(info['sources'])}{note}")

    columns, report = job.build_concepts_file(
        output,
        sources=sources,
        concepts=tuple(x.strip() for x in only.split(",") if x.strip()) if only else cs.CONCEPTS,
        per_class=per_class,
        max_chars=max_chars,
        fetch=fetch,
        seed=seed,
        provenance=common.make_provenance,
        callback=on_event,
    )
    common.log(f"build-concepts: wrote {len(columns['text'])} examples to {output}")
    if common.STATE.json:
        common.emit_json({"kind": job.CONCEPTS_KIND, "output": str(output), "concepts": report})
