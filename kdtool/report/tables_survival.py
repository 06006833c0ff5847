"""The feature-survival table of a run report: per layer and model, measured survival against F_S.

Read from survival.parquet's summary rows (kdtool/survival/summary.py defines each number); see
kdtool/report/tables.py for the other tables.
"""

from __future__ import annotations

from kdtool.errors import BadInput
from kdtool.report.model import SURVIVAL, Artifact, Table, of_kind

#: (header, cell format, summary-row key) of each column, in order
# fmt: off
COLUMNS = (
    ("layer", "int", "layer"), ("model", "text", "model"), ("d_S", "int", "width"),
    ("F_S", "int", "F_S"), ("survived", "int", "survived"), ("measured", "int", "measured"),
    ("kept ok", "pct", "kept_agree"), ("lost ok", "pct", "lost_agree"), ("Spearman", "f3", "spearman"),
    ("mass kept", "pct", "mass_kept"), ("mass kept (pred.)", "pct", "mass_kept_pred"), ("map R²", "f3", "map_r2"),
)
# fmt: on


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(header, format, key) of COLUMNS, with the loss after d_S when a student trained on anything but kl and
    the seed when runs differ."""
    students = [r for r in rows if r.get("role") != "teacher"]
    extra = []
    if any(r.get("loss") not in (None, "kl") for r in students):
        extra.append(("loss", "text", "loss"))
    if len({r.get("seed") for r in students}) > 1:
        extra.append(("seed", "int", "seed"))
    return [*COLUMNS[:3], *extra, *COLUMNS[3:]]


def survival(arts: list[Artifact]) -> list[Table]:
    """One table per survival file: d_S (loss, seed), F_S, survived, staircase agreement, Spearman, mass kept."""
    files = of_kind(arts, SURVIVAL)
    out = []
    for art in files:
        summary = art.summary if isinstance(art.summary, dict) else {}
        rows = summary.get("rows")
        if not rows:
            raise BadInput(f"{art.rel}: no summary rows")
        threshold = (summary.get("config") or {}).get("threshold")
        title = "Which features survive: measured vs Theorem 1's F_S" + (f": {art.rel}" if len(files) > 1 else "")
        headers, formats, keys = (list(c) for c in zip(*_columns(rows), strict=True))
        t = Table("survival", "Feature survival", title, headers, formats, sources=[art.rel])
        for r in rows:
            t.add(*(r.get(k) for k in keys))
        tokens = summary.get("tokens") or {}
        t.note = (
            f"A feature survives when the teacher SAE's code of the student's activation, mapped to the teacher's "
            f"space by ridge regression, has r2 >= {threshold} against the teacher's own code, on "
            f"{tokens.get('measured', 0):,} held-out tokens (map fitted on {tokens.get('fit', 0):,} others). "
            "kept ok: share of the F_S most important features that survive; lost ok: share of the others that "
            f"do not; importance {summary.get('importance_source', '?')}. The teacher row is the reference (1.0)."
        )
        if "loss" in keys:
            t.note += " One row per (width, loss): students distilled with different losses are not pooled."
        out.append(t)
    return out
