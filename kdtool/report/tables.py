"""The key tables of a run report, read from the artifacts `kdtool.report.discover.discover` found.

Each builder takes the run's artifacts and returns Tables whose cells are raw values (numbers,
text, None) plus a format per column; kdtool/report/page.py formats them for HTML and Markdown
and report.json keeps the raw numbers. A builder that cannot read a file adds a one-line note
and the other tables go on.

| table          | from                                   | paper    | module              |
|----------------|----------------------------------------|----------|---------------------|
| sae_layers     | stats summary (`kdtool.stats`)         | Table 1  | tables_sae.py       |
| sae_fidelity   | stats summary, `stats --fidelity`      |          | tables_sae.py       |
| sae_trials     | stats summaries, grouped by SAE trial  | project  | tables_sae.py       |
| sae_training   | last row of each `train_log.parquet`   | Fig. 15  | tables_sae.py       |
| predicted      | predict tables (`kdtool.predict`)      | Table 2  | tables_floors.py    |
| distill_floors | `students/floors.parquet`              | Table 3  | tables_floors.py    |
| objective_ablation | floors of several losses, pooled   |          | tables_ablation.py  |
| calibration    | calib.json fits                        | Table 4  | tables_floors.py    |
| decomposition  | calib.json decomposition               | Table 5  | tables_floors.py    |
| survival       | survival.parquet summary rows          | §8       | tables_survival.py  |
| probe          | probe.parquet, accuracy per concept    | Table 6  | tables_probe.py     |
| toy            | toy.parquet, per sparsity              | Fig. 3   | tables_toy.py       |
| toy_survival   | toy.survival.parquet, per sparsity     |          | tables_toy.py       |
| inputs         | every artifact's provenance            |          | here                |

The Table class and cell formats are kdtool/report/model.py.
"""

from __future__ import annotations

from collections.abc import Callable

from kdtool.errors import KdtoolError
from kdtool.report.model import Artifact, Table
from kdtool.report.tables_ablation import objective_ablation
from kdtool.report.tables_floors import calibration, distill_floors, predicted
from kdtool.report.tables_probe import probe
from kdtool.report.tables_sae import sae_fidelity, sae_layers, sae_training, sae_trials
from kdtool.report.tables_survival import survival
from kdtool.report.tables_toy import toy, toy_survival


def inputs(arts: list[Artifact]) -> list[Table]:
    """How each input was made: kind, short description, command, kdtool version, time."""
    t = Table(
        "inputs",
        "Inputs",
        "Inputs and how they were made",
        ["file", "kind", "details", "command", "kdtool", "created"],
        ["text"] * 6,
    )
    for art in arts:
        prov = art.provenance if isinstance(art.provenance, dict) else {}
        t.add(art.rel, art.kind, art.details, prov.get("command"), prov.get("kdtool_version"), prov.get("created"))
    t.sources = [a.rel for a in arts]
    return [t]


BUILDERS: tuple[Callable, ...] = (
    sae_layers,
    sae_fidelity,
    sae_trials,
    sae_training,
    predicted,
    distill_floors,
    objective_ablation,
    calibration,
    survival,
    probe,
    toy,
    toy_survival,
)


def build_tables(arts: list[Artifact]) -> tuple[list[Table], list[str]]:
    """Every table the artifacts allow (inputs last) and one-line notes for builders that failed."""
    tables: list[Table] = []
    notes: list[str] = []
    for builder in BUILDERS:
        try:
            tables += builder(arts)
        except (KdtoolError, KeyError, ValueError, TypeError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            msg = first if isinstance(exc, KdtoolError) else f"{type(exc).__name__}: {first}"
            notes.append(f"table {builder.__name__}: not built, {msg}")
    tables += inputs(arts)
    return tables, notes
