"""The headline of a run report: the answer the user came for, per teacher model, at the top of the page.

Per model the run measured (kdtool/teachers.py; files of different teachers are never combined):

- d* per layer with its spread over the SAEs of the run (every SAE of every stats file of that layer:
  min / median / max, kdtool/theory/spread.py), the paper's count and, when measured, the robust one;
- the predicted floor L*(d_S) at each student width the run has (the distilled widths, else the
  predict tables'), as the median over those SAEs with its range;
- the observed floor of each width when the run distilled students (loss kl, seeds pooled);
- with a calibration of that model: the calibrated floor in nats (floor = C L* + B, the layer it was
  fit on) and the smallest width for a target loss (targets: `predict --target-loss` of the run,
  the report option target_loss, else B + 10% and B + 25%), as kdtool/theory/calibrated.py does.

Each card is a few lines of text and Tables (kdtool/report/model.py), so the page, the Markdown and
report.json render it as they render every other table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdtool import formats, teachers
from kdtool.report.model import CALIB, FLOORS, PREDICT, STATS, Artifact, Table, model_groups, number
from kdtool.sae.summary import Entry, finished_saes
from kdtool.theory import calibrated, theorem
from kdtool.theory import importance as imp

#: the fit of a calibration the headline maps L* to nats with (predict --calibration's default)
FIT = "affine"


@dataclass
class Card:
    """One model's headline: its lines of text and tables (raw numbers: report.json keeps them)."""

    teacher: str | None
    lines: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def _mmm(values: list[float]) -> list[float | None]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return [None, None, None]
    return [float(v.min()), float(np.median(v)), float(v.max())]


def _chosen(stats: list[Artifact]) -> tuple[list[tuple[Artifact, Entry]], int]:
    """The SAEs the headline spreads over (kdtool.sae.summary.finished_saes)."""
    return finished_saes([(art, art.summary) for art in stats])


def _models(chosen: list[tuple[Artifact, Entry]]) -> dict[int, list[tuple[str, theorem.FloorModel]]]:
    """Per layer, (SAE label, Eq. 2 model) of the chosen SAEs (paper estimator, capacity g(alpha))."""
    want = {(art.path, e.key, e.layer) for art, e in chosen}
    out: dict[int, list[tuple[str, theorem.FloorModel]]] = {}
    for path in dict.fromkeys(art.path for art, _ in chosen):
        rel = next(a.rel for a, _ in chosen if a.path == path)
        for lay in imp.from_stats(path):
            if (path, lay.sae, lay.layer) not in want:
                continue
            label = f"{rel}:{lay.sae}" if lay.sae else f"{rel}:layer{lay.layer}"
            out.setdefault(lay.layer, []).append((label, imp.floor_model(lay)))
    return dict(sorted(out.items()))


def _widths(floors: list[Artifact], preds: list[Artifact]) -> list[int]:
    for arts in (floors, preds):
        ws: set[int] = set()
        for art in arts:
            ws.update(int(w) for w in formats.read_table(art.path, required=("width",))["width"])
        if ws:
            return sorted(ws)
    return []


def _observed(floors: list[Artifact]) -> dict[int, float]:
    """Mean observed floor per width over the floors tables' kl students (seeds pooled)."""
    got: dict[int, list[float]] = {}
    for art in floors:
        cols = formats.read_table(art.path, required=("width", "floor"))
        losses = cols["loss"] if "loss" in cols else ["kl"] * len(cols["width"])
        for w, f, loss in zip(cols["width"], cols["floor"], losses, strict=True):
            if str(loss) == "kl" and number(f) is not None:
                got.setdefault(int(w), []).append(float(f))
    return {w: float(np.mean(v)) for w, v in sorted(got.items())}


def _targets(preds: list[Artifact], cal_params: dict, options: dict) -> list[tuple[float, str]]:
    wanted = options.get("target_loss")
    out = [(float(t), "asked") for t in (wanted if isinstance(wanted, list) else [wanted]) if number(t) is not None]
    for art in preds:
        t = ((art.summary or {}).get("target") or {}) if isinstance(art.summary, dict) else {}
        if number(t.get("loss")) is not None and "calibrated" in str(t.get("units")):
            out.append((float(t["loss"]), f"predict --target-loss ({art.rel})"))
    if not out and cal_params["B"] > 0:
        out = [(cal_params["B"] * 1.10, "B + 10%"), (cal_params["B"] * 1.25, "B + 25%")]
    return list(dict.fromkeys(out))


def _card(group: list[Artifact], options: dict) -> Card:
    teacher = group[0].teacher
    card = Card(teacher, sources=[a.rel for a in group])
    stats = [a for a in group if a.kind == STATS]
    preds = [a for a in group if a.kind == PREDICT]
    floors = [a for a in group if a.kind == FLOORS]
    cals = [a for a in group if a.kind == CALIB]
    if teacher is None:
        card.lines.append(
            "These files name no teacher (the paper's own numbers by spec, a toy sweep, or files of an older "
            "kdtool): the headline does not combine them; each section below shows its own file."
        )
        floors = preds = cals = []
    # d* per layer, spread over the SAEs of the run
    d = Table("headline_d_star", "Headline", "Critical width d* per layer, over the SAEs of the run",
              ["layer", "SAEs", "d*", "d* min", "d* max", "d* robust", "robust min", "robust max"],
              ["int", "int", "f1", "f1", "f1", "f1", "f1", "f1"], sources=[a.rel for a in stats])  # fmt: skip
    chosen, checkpoints = _chosen(stats)
    by_layer: dict[int, list[dict]] = {}
    for _, e in chosen:
        by_layer.setdefault(e.layer, []).append(e.info)
    for layer, infos in sorted(by_layer.items()):
        paper = _mmm([number(i.get("d_star")) for i in infos])
        robust = _mmm([number(i.get("d_star_robust")) for i in infos])
        d.add(layer, len(infos), paper[1], paper[0], paper[2], robust[1], robust[0], robust[2])
    d.note = (
        "d* = F / g(α): the width below which the student must drop features (median, min and max over the "
        "run's finished SAEs, each counted once"
        + (f"; {checkpoints} token checkpoint(s) left out: plot sensitivity draws them" if checkpoints else "")
        + ")."
    )
    if d.rows:
        card.tables.append(d)
    if teacher is None:
        return card
    widths = _widths(floors, preds)
    models = _models(chosen) if widths else {}
    observed = _observed(floors)
    cal_art = cals[0] if cals else None
    cal_params = cal_layer = None
    if cal_art is not None:
        cal_params = calibrated.fit_params(cal_art.summary, FIT, cal_art.rel)
        cal_layer = (cal_art.summary.get("inputs") or {}).get("layer")
        if cal_layer is None and len(models) == 1:
            cal_layer = next(iter(models))
        if len(cals) > 1:
            card.lines.append(f"{len(cals)} calibrations of this model: the headline uses {cal_art.rel}.")
    if widths:
        cols, fmts = ["d_S"], ["int"]
        for layer, found in models.items():
            cols += [f"L* layer {layer}"] + ([f"range layer {layer}"] if len(found) > 1 else [])
            fmts += ["g4"] + (["text"] if len(found) > 1 else [])
        if cal_params is not None and cal_layer in models:
            cols, fmts = cols + [f"calibrated (nats, layer {cal_layer})"], fmts + ["f3"]
        if observed:
            cols, fmts = cols + ["observed (nats)"], fmts + ["f3"]
        t = Table("headline_floors", "Headline", "Floor at each student width", cols, fmts,
                  sources=[a.rel for a in stats + floors + cals[:1]])  # fmt: skip
        for w in widths:
            row: list = [w]
            for found in models.values():
                lo, mid, hi = _mmm([float(m.floor(w)) for _, m in found])
                row.append(mid)
                if len(found) > 1:
                    row.append(f"{lo:.4g} – {hi:.4g}")
            if cal_params is not None and cal_layer in models:
                mids = [float(m.floor(w)) for _, m in models[cal_layer]]
                row.append(cal_params["C"] * float(np.median(mids)) + cal_params["B"])
            if observed:
                row.append(observed.get(w))
            t.add(*row)
        t.note = (
            "L* = the importance mass of the features a student of width d_S cannot keep (Eq. 2, importance units; "
            "median over the SAEs of the layer)"
            + (f"; calibrated = C·L* + B with the {FIT} fit of {cal_art.rel}" if cal_params is not None else "")
            + ("; observed = distilled floor, KL students, seeds pooled" if observed else "")
            + "."
        )
        card.tables.append(t)
    if cal_params is not None and cal_layer in models:
        fitted = models[cal_layer]
        if mismatch := calibrated.scale_mismatch(
            cal_art.summary, widths, [float(np.median([float(m.floor(w)) for _, m in fitted])) for w in widths]
        ):
            card.lines.append(f"{cal_art.rel} was fit on other predicted floors ({mismatch[0]}): nats are indicative.")
        for target, why in _targets(preds, cal_params, options):
            found = []
            for _, m in fitted:
                dmin, message = theorem.target_width(
                    m, target, scale=cal_params["C"], baseline=cal_params["B"], calibrated=True
                )
                found.append(dmin)
            known = [x for x in found if x is not None]
            if not known:
                card.lines.append(f"Target {target:.3f} nats ({why}): {message}.")
                continue
            lo, mid, hi = _mmm(known)
            spread = f" (range {lo:,.0f} – {hi:,.0f} over {len(known)} SAEs)" if lo != hi else ""
            card.lines.append(
                f"Smallest width for a floor of {target:.3f} nats ({why}): d_S = {mid:,.0f}{spread}, layer "
                f"{cal_layer}, {FIT} fit of {cal_art.rel} (C = {cal_params['C']:.4g}, B = {cal_params['B']:.4g})."
            )
    elif cal_art is not None:
        which = f"layer {cal_layer}" if cal_layer is not None else "its layer"
        card.lines.append(f"{cal_art.rel}: no stats file of this model ({which}) in the run to apply it to.")
    elif cals == [] and stats:
        card.lines.append("No calibration of this model: floors stay in importance units (kdtool calibrate).")
    return card


def headline(arts: list[Artifact], options: dict | None = None) -> list[Card]:
    """One card per teacher the run's stats, predict, floors and calibration files measure."""
    relevant = [a for a in arts if a.kind in (STATS, PREDICT, FLOORS, CALIB)]
    cards = [_card(g, options or {}) for g in model_groups(relevant)]
    return [c for c in cards if c.tables or c.lines]


def title(card: Card) -> str:
    return f"Teacher {card.teacher}" if card.teacher else f"Teacher: {teachers.short(None)}"
