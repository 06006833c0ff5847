"""The SAE tables of a run report: per-layer measurements (Table 1), each SAE trial's headline, and the last
step of each training log.

Builders take the run's artifacts and return kdtool.report.model.Tables (see kdtool/report/tables.py).
"""

from __future__ import annotations

import numpy as np

from kdtool import formats
from kdtool.report import trials
from kdtool.report.model import SAE_LOG, STATS, Artifact, Table, number, of_kind
from kdtool.theory import importance
from kdtool.theory import theorem as theory


def _source_col(arts: list[Artifact]) -> bool:
    return len(arts) > 1


def sae_layers(arts: list[Artifact]) -> list[Table]:
    """Table 1: per-layer F, L0, alpha, g(alpha), d* and reconstruction from each stats file's summary."""
    stats = of_kind(arts, STATS)
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


def sae_trials(arts: list[Artifact]) -> list[Table]:
    """The headline of each SAE trial (the project page's card): layers, mean alpha, L0, d*, total dead.

    Trials are told apart by how their SAEs were trained (kdtool/report/trials.py), not by file names.
    """
    stats = of_kind(arts, STATS)
    if not stats:
        return []
    by_path = {a.path: a for a in stats}
    found = trials.trials(list(by_path))
    t = Table(
        "sae_trials",
        "SAE measurements",
        "SAE trials at a glance",
        ["trial", "layers", "mean α", "mean L0", "mean g(α)", "mean d*", "dead", "of latents", "dead %",
         "λ (start)", "target L0", "d_sae", "training tokens", "files"],
        ["text", "int", "f4", "f1", "g4", "f1", "int", "int", "pct", "g3", "f1", "int", "int", "text"],
    )  # fmt: skip
    for trial in found:
        h, rec = trial.headline(), trial.record or {}
        t.add(
            trial.label,
            h["layers"],
            h["mean_alpha"],
            h["mean_l0"],
            h["mean_g"],
            h["mean_d_star"],
            h["total_dead"],
            h["total_latents"],
            h["dead_fraction"],
            rec.get("l1"),
            rec.get("target_l0"),
            rec.get("d_sae"),
            rec.get("tokens"),
            ", ".join(by_path[p].rel for p in trial.paths),
        )
        t.sources += [by_path[p].rel for p in trial.paths if by_path[p].rel not in t.sources]
    t.note = (
        "A trial is one set of SAE training settings (lambda or the L0 controller, width, seeds, tokens), read from "
        "each layer's training record in the stats file; A, B, C = the authors' trials (paper-sae-trials.toml). "
        "Means are over the trial's layers; dead = latents firing on no more than the alive threshold."
    )
    notes = [n for trial in found for n in trial.notes]
    if notes:
        t.note += " " + " ".join(notes)
    return [t]


def _layers_from_rows(art: Artifact) -> dict:
    """F, L0, alpha, g, d* from the rows when a stats file has no summary (as kdtool.theory.importance does)."""
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


def sae_training(arts: list[Artifact]) -> list[Table]:
    """The last logged step of each SAE's train_log.parquet."""
    logs = of_kind(arts, SAE_LOG)
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
            return number(cols[name][last]) if name in cols else None

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
