"""The key tables of a run report, read from the artifacts `kdtool.report.build.discover` found.

Each builder takes the run's artifacts and returns Tables whose cells are raw values (numbers,
text, None) plus a format per column; kdtool/report/page.py formats them for HTML and Markdown
and report.json keeps the raw numbers. A builder that cannot read a file adds a one-line note
and the other tables go on.

| table          | from                                   | paper    |
|----------------|----------------------------------------|----------|
| sae_layers     | stats summary (`kdtool.stats`)         | Table 1  |
| sae_training   | last row of each `train_log.parquet`   | Fig. 15  |
| predicted      | predict tables (`kdtool.predict`)      | Table 2  |
| distill_floors | `students/floors.parquet`              | Table 3  |
| calibration    | calib.json fits                        | Table 4  |
| decomposition  | calib.json decomposition               | Table 5  |
| probe          | probe.parquet, accuracy per concept    | Table 6  |
| toy            | toy.parquet, per sparsity              | Fig. 3   |
| inputs         | every artifact's provenance            |          |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdtool import formats
from kdtool.errors import KdtoolError

#: Cell formats: int (thousands separators), f1..f5 (fixed decimals), g3/g4 (significant digits),
#: pct (fraction shown as %), pm (a (mean, std) pair), text.
FORMATS = ("int", "f1", "f2", "f3", "f4", "f5", "g3", "g4", "pct", "pm", "text")


@dataclass
class Table:
    key: str  # machine name, e.g. "sae_layers"
    section: str  # report section (kdtool.report.build.SECTIONS, or "Inputs")
    title: str
    columns: list[str]  # column headers
    formats: list[str]  # one of FORMATS per column
    rows: list[list[Any]] = field(default_factory=list)  # raw cell values
    sources: list[str] = field(default_factory=list)  # relative paths of the files read
    note: str = ""  # shown under the table

    def add(self, *cells: Any) -> None:
        self.rows.append([_plain(c) for c in cells])


def _plain(v: Any) -> Any:
    """numpy scalars -> Python; NaN/inf -> None (JSON has neither)."""
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def format_cell(v: Any, fmt: str) -> str:
    """A cell as text ('–' for missing values)."""
    if v is None:
        return "–"
    if fmt == "text" or isinstance(v, str):
        return str(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if fmt == "pm":
        mean, std = v
        if mean is None:
            return "–"
        return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"
    if fmt == "int":
        return f"{int(round(v)):,}"
    if fmt == "pct":
        return f"{100 * v:.1f}%"
    if fmt.startswith("f"):
        return f"{v:,.{int(fmt[1:])}f}"
    if fmt.startswith("g"):
        return f"{v:.{int(fmt[1:])}g}"
    return str(v)


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _of(arts, kind):
    return [a for a in arts if a.kind == kind]


def _source_col(arts) -> bool:
    return len(arts) > 1


# --------------------------------------------------------------------------------------------- SAE


def sae_layers(arts) -> list[Table]:
    """Table 1: per-layer F, L0, alpha, g(alpha), d* and reconstruction from each stats file's summary."""
    stats = _of(arts, "kdtool.stats")
    if not stats:
        return []
    multi = _source_col(stats)
    t = Table(
        "sae_layers",
        "SAE measurements",
        "SAE measurements per layer (Table 1)",
        (["file"] if multi else [])
        + ["layer", "F (alive)", "L0", "α", "g(α)", "d*", "dead", "d_sae", "tokens", "MSE", "expl. var."],
        (["text"] if multi else []) + ["int", "int", "f1", "f5", "g4", "f1", "int", "int", "int", "g4", "f3"],
    )
    notes = []
    for art in stats:
        layers = (art.summary or {}).get("layers") if isinstance(art.summary, dict) else None
        if not isinstance(layers, dict) or not layers:
            layers = _layers_from_rows(art)
        t.sources.append(art.rel)
        for key in sorted(layers, key=lambda k: int(k)):
            s = layers[key] or {}
            t.add(
                *([art.rel] if multi else []),
                int(key),
                s.get("F"),
                s.get("L0"),
                s.get("alpha"),
                s.get("g"),
                s.get("d_star"),
                s.get("dead"),
                s.get("d_sae"),
                s.get("tokens"),
                s.get("mse"),
                s.get("explained_variance"),
            )
            notes += [str(n) for n in s.get("notes") or []]
    t.note = "F = features firing on more than the alive threshold of tokens; α = 1 − L0/F; d* = F / g(α)."
    if notes:
        t.note += " " + " ".join(notes)
    return [t]


def _layers_from_rows(art) -> dict:
    """F, L0, alpha, g, d* from the rows when a stats file has no summary (as kdtool.theory.importance does)."""
    from kdtool.theory import importance
    from kdtool.theory import theorem as theory

    out = {}
    for li in importance.from_stats(art.path):
        F = int(li.weights.size)
        g = float(theory.g(li.alpha)) if li.alpha and li.alpha > 0 else None
        out[str(li.layer)] = {
            "F": F,
            "L0": li.l0 if li.l0 is not None else F * (1 - li.alpha),
            "alpha": li.alpha,
            "g": g,
            "d_star": F / g if g else None,
        }
    return out


def sae_training(arts) -> list[Table]:
    """The last logged step of each SAE's train_log.parquet."""
    logs = _of(arts, "kdtool.sae.train_log")
    if not logs:
        return []
    t = Table(
        "sae_training",
        "SAE measurements",
        "SAE training, last logged step",
        ["log", "layer", "step", "tokens", "MSE", "L0", "alive", "expl. var.", "λ"],
        ["text", "int", "int", "int", "g4", "f1", "pct", "f3", "g3"],
    )
    for art in logs:
        cols = formats.read_table(art.path, required=("step",))
        last = int(np.argmax(np.asarray(cols["step"], dtype=np.float64)))

        def at(name, cols=cols, last=last):
            return _num(cols[name][last]) if name in cols else None

        t.sources.append(art.rel)
        t.add(
            art.rel,
            at("layer"),
            at("step"),
            at("tokens"),
            at("mse"),
            at("l0"),
            at("alive_fraction"),
            at("explained_variance"),
            at("lambda"),
        )
    t.rows.sort(key=lambda r: (r[1] is None, r[1] or 0, r[0]))
    return [t]


# --------------------------------------------------------------------------------------------- floors


def predicted(arts) -> list[Table]:
    """Table 2: the rows of each predict table (Eq. 2: F_S = floor(d_S g), L* = importance mass dropped)."""
    preds = _of(arts, "kdtool.predict")
    out = []
    spec = [
        ("layer", "layer", "int"),
        ("width", "d_S", "int"),
        ("features_kept", "F_S kept", "int"),
        ("features_dropped", "dropped", "int"),
        ("floor", "L*(d_S)", "g4"),
        ("normalized", "normalised", "g4"),
        ("floor_kl", "floor (nats)", "g4"),
        ("floor_kl_low", "2.5%", "g4"),
        ("floor_kl_high", "97.5%", "g4"),
    ]
    for art in preds:
        cols = formats.read_table(art.path, required=("width", "floor"))
        present = [s for s in spec if s[0] in cols]
        title = "Predicted floors (Eq. 2, Table 2)" + (f": {art.rel}" if len(preds) > 1 else "")
        t = Table(
            "predicted", "Predicted floors", title, [s[1] for s in present], [s[2] for s in present], sources=[art.rel]
        )
        order = np.lexsort((np.asarray(cols["width"], float), np.asarray(cols.get("layer", cols["width"]), float)))
        for i in order:
            t.add(*(_num(cols[s[0]][i]) for s in present))
        t.note = "L* in the importance units of the stats file; floor (nats) = C·L* + B with the calibration."
        out.append(t)
    return out


def distill_floors(arts) -> list[Table]:
    """Table 3: the distillation floor of each student (mean held-out KL over the final 10% of steps)."""
    floors = _of(arts, "kdtool.distill.floors")
    spec = [
        ("width", "d_S", "int"),
        ("params", "params", "int"),
        ("non_embedding_params", "non-emb. params", "int"),
        ("floor", "floor (nats/token)", "f4"),
        ("floor_std", "std", "f4"),
        ("floor_scaled", "T²·floor", "f4"),
        ("raw_kl", "raw KL", "f1"),
        ("eval_ce", "eval CE", "f3"),
        ("n_evals", "evals", "int"),
        ("steps", "steps", "int"),
        ("tokens", "tokens", "int"),
    ]
    out = []
    for art in floors:
        cols = formats.read_table(art.path, required=("width", "floor"))
        present = [s for s in spec if s[0] in cols]
        title = "Distillation floors (Table 3)" + (f": {art.rel}" if len(floors) > 1 else "")
        t = Table(
            "distill_floors", "Distillation", title, [s[1] for s in present], [s[2] for s in present], sources=[art.rel]
        )
        for i in np.argsort(np.asarray(cols["width"], float), kind="stable"):
            t.add(*(_num(cols[s[0]][i]) for s in present))
        t.note = (
            "floor = per-token KL(teacher‖student) at temperature T, nats; raw KL = T² × KL summed over a "
            "sequence (the paper's raw value)."
        )
        out.append(t)
    return out


# --------------------------------------------------------------------------------------------- calibration

_FITS = (("linear", "C"), ("affine", "C, B"), ("affine_fixed", "C, B fixed"), ("power_law", "a, γ, c"))


def calibration(arts) -> list[Table]:
    """Table 4 (fits: C, B, a, gamma, c, R^2) and Table 5 (decomposition) of each calib.json."""
    out = []
    cals = _of(arts, "kdtool.calibration")
    for art in cals:
        cal = art.summary if isinstance(art.summary, dict) else formats.read_json(art.path)
        suffix = f": {art.rel}" if len(cals) > 1 else ""
        t = Table(
            "calibration",
            "Calibration",
            "Calibration fits (Table 4)" + suffix,
            ["fit", "model", "C", "B", "a", "γ", "c", "R²", "RMSE", "LOO RMSE", "n", "note"],
            ["text", "text", "g4", "g4", "g4", "g4", "g4", "f4", "g3", "g3", "int", "text"],
            sources=[art.rel],
        )
        for name, _ in _FITS:
            fit = cal.get(name)
            if not isinstance(fit, dict):
                continue
            if fit.get("skipped"):
                t.add(
                    name,
                    fit.get("model"),
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    f"skipped: {fit['skipped']}",
                )
                continue
            t.add(
                name,
                fit.get("model"),
                *(_num(fit.get(k)) for k in ("C", "B", "a", "gamma", "c", "r2", "rmse", "loo_rmse", "n")),
                "",
            )
        t.note = "R² = 1 − SS_res/SS_tot over all points (negative when a fit is worse than the mean)."
        out.append(t)
        decomp = cal.get("decomposition")
        if isinstance(decomp, list) and decomp:
            dfit = cal.get("decomposition_fit") or {}
            d = Table(
                "decomposition",
                "Calibration",
                "Floor decomposition (Table 5)" + suffix,
                ["d_S", "observed", "predicted L*", "geometric C·L*", "baseline B", "fitted", "% geometric"],
                ["int", "f3", "g4", "f3", "f3", "f3", "pct"],
                sources=[art.rel],
            )
            for row in decomp:
                d.add(
                    *(
                        _num(row.get(k))
                        for k in ("width", "observed", "predicted", "geometric", "baseline", "fitted", "pct_geometric")
                    )
                )
            d.note = (
                f"fit: {dfit.get('fit', '?')} (C = {format_cell(_num(dfit.get('C')), 'g4')}, "
                f"B = {format_cell(_num(dfit.get('B')), 'g4')}); % geometric = (observed − B) / observed."
            )
            out.append(d)
    return out


# --------------------------------------------------------------------------------------------- probe, toy


def probe(arts) -> list[Table]:
    """Table 6: probe accuracy (%) mean ± std per concept (rows) and model (columns), one table per layer."""
    files = _of(arts, "kdtool.probe")
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
                    "acc": _num(cols["accuracy"][i]),
                    "std": _num(cols["accuracy_std"][i]) if "accuracy_std" in cols else None,
                    "sel": _num(cols["selectivity"][i]) if "selectivity" in cols else None,
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


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def toy(arts) -> list[Table]:
    """Per sparsity: configurations, points, and Pearson r between the seed-mean actual floor and Eq. 2."""
    out = []
    files = _of(arts, "kdtool.toy")
    for art in files:
        cols = formats.read_table(
            art.path, required=("n", "d_teacher", "alpha", "d_student", "floor_data", "pred_refined")
        )
        key = np.stack([np.asarray(cols[c], float) for c in ("n", "d_teacher", "alpha", "d_student")], axis=1)
        uniq, inv = np.unique(key, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        obs = np.bincount(inv, weights=np.asarray(cols["floor_data"], float)) / np.bincount(inv)
        pred = np.bincount(inv, weights=np.asarray(cols["pred_refined"], float)) / np.bincount(inv)
        naive = (
            np.bincount(inv, weights=np.asarray(cols["pred_naive"], float)) / np.bincount(inv)
            if "pred_naive" in cols
            else None
        )
        seeds = len(np.unique(np.asarray(cols["seed"]))) if "seed" in cols else None
        title = "Toy model: Eq. 2 vs actual floor per sparsity (Fig. 3)" + (f": {art.rel}" if len(files) > 1 else "")
        t = Table(
            "toy",
            "Toy model",
            title,
            [
                "α",
                "g(α)",
                "configurations",
                "points",
                "seeds",
                "mean actual",
                "mean predicted",
                "Pearson r (refined)",
                "Pearson r (naive)",
            ],
            ["text", "g4", "int", "int", "int", "g4", "g4", "f3", "f3"],
            sources=[art.rel],
        )
        from kdtool.theory import theorem as theory

        groups = [(f"{a:g}", uniq[:, 2] == a, float(theory.g(a))) for a in np.unique(uniq[:, 2])]
        groups.append(("all", np.ones(len(uniq), bool), None))
        for label, sel, g in groups:
            configs = len(np.unique(uniq[sel][:, :3], axis=0))
            t.add(
                label,
                g,
                configs,
                int(sel.sum()),
                seeds,
                float(obs[sel].mean()),
                float(pred[sel].mean()),
                _pearson(pred[sel], obs[sel]),
                _pearson(naive[sel], obs[sel]) if naive is not None else None,
            )
        t.note = (
            "A point is one (n, d_T, α, d_S) averaged over seeds; actual = the student's importance-weighted "
            "loss on data (floor_data); refined = Eq. 2 with g(α), naive = g = 1."
        )
        out.append(t)
    return out


# --------------------------------------------------------------------------------------------- inputs


def inputs(arts) -> list[Table]:
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


BUILDERS: tuple[Callable, ...] = (sae_layers, sae_training, predicted, distill_floors, calibration, probe, toy)


def build_tables(arts) -> tuple[list[Table], list[str]]:
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
