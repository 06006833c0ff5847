"""The probe table of a run report: accuracy per concept and model, one table per layer (Table 6).

See kdtool/report/tables.py for the other tables.
"""

from __future__ import annotations

from kdtool import formats
from kdtool.report.model import PROBE, Artifact, Table, number, of_kind


def probe(arts: list[Artifact]) -> list[Table]:
    """Table 6: probe accuracy (%) mean ± std per concept (rows) and model (columns), one table per layer."""
    files = of_kind(arts, PROBE)
    if not files:
        return []
    rows = []
    for art in files:
        cols = formats.read_table(art.path, required=("concept", "model", "accuracy"))
        n = len(cols["concept"])
        for i in range(n):
            rows.append(
                {
                    "concept": str(cols["concept"][i]),
                    "model": str(cols["model"][i]),
                    "teacher": (str(cols["role"][i]) == "teacher")
                    if "role" in cols
                    else str(cols["model"][i]) == "teacher",
                    "width": int(cols["width"][i]) if "width" in cols else 0,
                    "layer": int(cols["layer"][i]) if "layer" in cols else None,
                    "acc": number(cols["accuracy"][i]),
                    "std": number(cols["accuracy_std"][i]) if "accuracy_std" in cols else None,
                    "sel": number(cols["selectivity"][i]) if "selectivity" in cols else None,
                }
            )
    out = []
    for layer in sorted({r["layer"] for r in rows}, key=lambda v: (v is None, v or 0)):
        sub = [r for r in rows if r["layer"] == layer]
        models: dict[str, dict] = {}
        for r in sub:
            models.setdefault(r["model"], r)
        order = sorted(models, key=lambda m: (not models[m]["teacher"], -models[m]["width"], m))
        labels = [
            f"teacher (d={models[m]['width']})"
            if models[m]["teacher"]
            else (
                f"d_S={models[m]['width']}" if [models[o]["width"] for o in order].count(models[m]["width"]) == 1 else m
            )
            for m in order
        ]
        title = "Probe accuracy, % (Table 6)" + (f", layer {layer}" if layer is not None else "")
        t = Table(
            "probe",
            "Probing",
            title,
            ["concept", *labels],
            ["text", *(["pm"] * len(order))],
            sources=[a.rel for a in files],
        )
        cell = {(r["concept"], r["model"]): r for r in sub}
        for concept in dict.fromkeys(r["concept"] for r in sub):
            vals = []
            for m in order:
                r = cell.get((concept, m))
                if r is None or r["acc"] is None:
                    vals.append(None)
                else:
                    vals.append((100 * r["acc"], 100 * r["std"] if r["std"] is not None else None))
            t.add(concept, *vals)
        sels = [r["sel"] for r in sub if r["sel"] is not None]
        t.note = "mean ± std over the probe's seeds; chance is 50%."
        if sels:
            t.note += (
                f" Selectivity (accuracy − control task accuracy) ranges {100 * min(sels):+.1f} to "
                f"{100 * max(sels):+.1f} points."
            )
        out.append(t)
    return out
