"""The SAE tables of a run report: per-SAE measurements (Table 1), fidelity in the model, each SAE trial's
headline, and the last step of each training log.

Builders take the run's artifacts and return kdtool.report.model.Tables (see kdtool/report/tables.py).
"""

from __future__ import annotations

import numpy as np

from kdtool import formats
from kdtool.report import trials
from kdtool.report.model import SAE_LOG, STATS, Artifact, Table, number, of_kind
from kdtool.sae.summary import Entry, entries, several_per_layer
from kdtool.theory import importance
from kdtool.theory import theorem as theory


def _stats_entries(arts: list[Artifact]) -> list[tuple[Artifact, Entry]]:
    """(file, SAE) pairs of every stats file, from its summary (or its rows when it has none)."""
    out = []
    for art in of_kind(arts, STATS):
        found = entries(art.summary if isinstance(art.summary, dict) else None)
        if not found:
            found = [Entry(None, int(k), v) for k, v in _layers_from_rows(art).items()]
        out += [(art, e) for e in found]
    return out


def sae_layers(arts: list[Artifact]) -> list[Table]:
    """Table 1: per SAE, F, L0, alpha, g(alpha), d*, the robust count and reconstruction, from each stats summary."""
    pairs = _stats_entries(arts)
    if not pairs:
        return []
    multi = len({a.rel for a, _ in pairs}) > 1
    several = any(several_per_layer([e for b, e in pairs if b is a]) for a, _ in pairs)
    robust = any("F_robust" in e.info for _, e in pairs)
    t = Table(
        "sae_layers",
        "SAE measurements",
        "SAE measurements per layer (Table 1)",
        (["file"] if multi else []) + (["SAE"] if several else [])
        + ["layer", "F (alive)", "L0", "α", "g(α)", "d*"] + (["F robust", "α robust", "d* robust"] if robust else [])
        + ["dead", "d_sae", "tokens", "MSE", "expl. var."],
        (["text"] if multi else []) + (["text"] if several else []) + ["int", "int", "f1", "f5", "g4", "f1"]
        + (["int", "f5", "f1"] if robust else []) + ["int", "int", "int", "g4", "f3"],
    )  # fmt: skip
    notes = []
    for art, e in pairs:
        if art.rel not in t.sources:
            t.sources.append(art.rel)
        s = e.info
        t.add(
            *([art.rel] if multi else []),
            *([e.key] if several else []),
            e.layer,
            *(s.get(k) for k in ("F", "L0", "alpha", "g", "d_star")),
            *((s.get("F_robust"), s.get("alpha_robust"), s.get("d_star_robust")) if robust else ()),
            *(s.get(k) for k in ("dead", "d_sae", "tokens", "mse", "explained_variance")),
        )
        notes += [str(n) for n in s.get("notes") or []]
    t.note = "F = features firing on more than the alive threshold of tokens; α = 1 − L0/F; d* = F / g(α)."
    if robust:
        cfg = next((a.summary["robust"] for a, _ in pairs if isinstance((a.summary or {}).get("robust"), dict)), {})
        t.note += (
            f" Robust: de-duplicated features (decoder cosine ≥ {cfg.get('cosine', '?')}) carrying"
            f" {100 * cfg.get('mass', float('nan')):g}% of the importance, active above {cfg.get('theta', '?')} of"
            " their typical size (docs/sae.md); unlike F it does not grow with the SAE's width."
        )
    if notes:
        t.note += " " + " ".join(notes)
    return [t]


#: the fidelity table's (header, cell format) pairs; the cells come from each SAE's summary "fidelity"
_FIDELITY_COLUMNS = (("file", "text"), ("SAE", "text"), ("layer", "int"), ("tokens", "int"), ("CE clean", "f4"),
                     ("CE spliced", "f4"), ("CE zero-abl.", "f4"), ("CE mean-abl.", "f4"), ("CE score", "f3"),
                     ("CE score (mean)", "f3"), ("KL spliced", "g4"), ("KL score", "f3"), ("expl. var.", "f3"),
                     ("dead", "pct"))  # fmt: skip


def sae_fidelity(arts: list[Artifact]) -> list[Table]:
    """`stats --fidelity`: the teacher's loss with each SAE spliced in (SAELens ce_loss_score, kl_div_score)."""
    pairs = [(a, e) for a, e in _stats_entries(arts) if isinstance(e.info.get("fidelity"), dict)]
    if not pairs:
        return []
    t = Table("sae_fidelity", "SAE measurements", "SAE fidelity in the model (held-out text)",
              [h for h, _ in _FIDELITY_COLUMNS], [f for _, f in _FIDELITY_COLUMNS])  # fmt: skip
    for art, e in pairs:
        f = e.info["fidelity"]
        if art.rel not in t.sources:
            t.sources.append(art.rel)
        t.add(art.rel, e.key or f"layer{e.layer}", e.layer, f.get("tokens"),
              *(f.get(k) for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "ce_loss_score",
                                   "ce_loss_score_mean", "kl", "kl_div_score", "explained_variance",
                                   "dead_fraction")))  # fmt: skip
    t.note = (
        "Per token over held-out text, layer L replaced by the SAE's reconstruction (spliced) or by zeros / the mean "
        "activation; CE score = (CE_zero − CE_spliced)/(CE_zero − CE_clean), KL score = (KL_zero − KL_spliced)/KL_zero "
        "(SAELens evals.py); 1 = the model is unchanged."
    )
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
