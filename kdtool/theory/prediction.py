"""The prediction table of `kdtool predict`: Eq. 2's floor at each student width, per layer.

From an importance source (kdtool.theory.importance: a stats file or a parametric spec), a
capacity model (kdtool.theory.capacity: g(alpha), naive, power:K,P or a capacity file; or an
explicit g) and optionally a calibration (kdtool.theory.calibrated) `predict` builds, per layer and
width: features kept and dropped, the floor L*, the floor normalised to the smallest width's, the
capacity g used and the model's name (so a CSV says it too), and with a calibration
floor_kl = C L* + B with its bootstrap band. With a target loss it answers the minimum width
(kdtool.theory.theorem.target_width), and predicts at that width when no widths are given.

What the command would say on stderr comes back as data (`Prediction.messages`), in order;
`notify` hears each one as it arises, so a caller can interleave them with Python warnings
(g(alpha) below 1 - 1/e) and with an error raised by a later layer, as `kdtool predict` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kdtool import teachers
from kdtool.errors import BadInput
from kdtool.kinds import expect
from kdtool.theory import calibrated as calib_mod
from kdtool.theory import capacity as capacity_mod
from kdtool.theory import importance as imp
from kdtool.theory import spread as spread_mod
from kdtool.theory import theorem as theory

KIND = "kdtool.predict"
COLUMNS = ("layer", "width", "features_kept", "features_dropped", "floor", "normalized", "g", "capacity", "estimator")
CALIBRATED_COLUMNS = ("floor_kl", "floor_kl_low", "floor_kl_high")
BAND = "pointwise 2.5-97.5 percentiles of C_b*L* + B_b over bootstrap fits"

#: notify(level, text): level is "info" (a progress line) or "warning" (may change how to read the table)
Notify = Callable[[str, str], None]


@dataclass(frozen=True)
class PredictionConfig:
    """One question for Eq. 2; the flag names of `kdtool predict` are in the comments and the errors."""

    stats: str | os.PathLike | None = None  # STATS: a `kdtool stats` table; None: the parametric spec below
    widths: tuple[int, ...] | None = None  # --widths: student widths d_S; None: only the target-loss answer
    layers: tuple[int, ...] | None = None  # --layer: layers of STATS (None: all); a parametric spec's label (None: 0)
    features: int | None = None  # --features: parametric spec, number of features F
    alpha: float | None = None  # --alpha: sparsity in [0, 1); with STATS it overrides the file's
    l0: float | None = None  # --l0: parametric spec, mean active features per token; alpha = 1 - L0/F
    importance: str = "zipf"  # --importance: parametric spec, zipf, zipf:S or uniform
    sq_activation: float | None = None  # --sq-activation: parametric spec, E(x_i^2); default (1-alpha)/3
    capacity: str = "paper"  # --capacity: paper (g(alpha), Eq. 1), naive (g = 1), power:K,P or a capacity file
    g_value: float | None = None  # --g: this capacity instead of g(alpha)
    target_loss: float | None = None  # --target-loss: answer the minimum width whose floor is <= this
    calibration: str | os.PathLike | None = None  # --calibration: calib.json from `kdtool calibrate`
    fit: str = "affine"  # --fit: which fit of the calibration maps L* to nats
    estimator: str = "paper"  # --estimator: paper (alive latents, F and alpha as the paper defines them) or robust
    saes: tuple[str, ...] | None = None  # --sae: only these SAEs of STATS (its `sae` keys)

    def __post_init__(self) -> None:
        if self.g_value is not None and self.capacity != "paper":
            raise BadInput(f"--g and --capacity {self.capacity} both set the capacity: give only one")
        if self.alpha is not None and self.l0 is not None:
            raise BadInput("--alpha and --l0 both set the sparsity: give only one")
        if self.widths is None and self.target_loss is None:
            raise BadInput("--widths: give the student widths to predict (e.g. 128,256,512), or --target-loss")
        if self.estimator not in imp.ESTIMATORS:
            raise BadInput(f"--estimator must be one of {', '.join(imp.ESTIMATORS)}, got {self.estimator!r}")
        if self.stats is None and (self.estimator != "paper" or self.saes):
            raise BadInput("--estimator robust and --sae read a stats file: give STATS")
        if self.stats is not None:
            if self.features is not None:
                raise BadInput(f"{self.stats}: give a stats file or --features, not both")
            for flag, value in (("--l0", self.l0), ("--sq-activation", self.sq_activation)):
                if value is not None:
                    raise BadInput(f"{flag} is for a parametric spec; {self.stats} already has the measured values")
        else:
            if self.features is None:
                raise BadInput("no importance source: give a STATS file, or --features N with --alpha A (or --l0)")
            if self.layers is not None and len(self.layers) != 1:
                raise BadInput("--layer: a parametric spec is one layer; give one label")


@dataclass
class Prediction:
    """The table (columns of equal length), its summary, and the messages about it in the order they arose."""

    columns: dict[str, list]  # COLUMNS, plus CALIBRATED_COLUMNS with a calibration
    summary: dict[str, Any]  # capacity, per-layer F/alpha/L0/g/d*/source, calibration, target answer
    messages: list[tuple[str, str]] = field(default_factory=list)  # (level, text), level "info" or "warning"

    @property
    def warnings(self) -> list[str]:
        return [text for level, text in self.messages if level == "warning"]


def importance_source(cfg: PredictionConfig) -> list[imp.LayerImportance]:
    """The per-layer loss weights the config names: a stats file's layers, or one parametric layer."""
    if cfg.stats is not None:
        expect(cfg.stats, "kdtool.stats", "STATS")
        layers = imp.from_stats(cfg.stats, layers=list(cfg.layers) if cfg.layers else None, estimator=cfg.estimator)
        if cfg.saes:
            have = [lay.sae for lay in layers]
            unknown = [k for k in cfg.saes if k not in have]
            if unknown:
                raise BadInput(f"--sae: {', '.join(unknown)} not in {cfg.stats} (it has: {', '.join(map(str, have))})")
            layers = [lay for lay in layers if lay.sae in cfg.saes]
        if cfg.alpha is None:
            return layers
        if not (0 <= cfg.alpha < 1):
            raise BadInput(f"--alpha must be in [0, 1), got {cfg.alpha}")
        return [replace(lay, alpha=cfg.alpha, l0=None) for lay in layers]
    label = cfg.layers[0] if cfg.layers else 0
    a = imp.alpha_from_l0(cfg.features, cfg.l0, what="--l0") if cfg.l0 is not None else cfg.alpha
    return [
        imp.parametric(
            cfg.features, alpha=a, importance=cfg.importance, sq_activation=cfg.sq_activation, layer=label, l0=cfg.l0
        )
    ]


def predict(cfg: PredictionConfig, notify: Notify | None = None) -> Prediction:
    """Eq. 2's floors for every layer of the importance source at cfg.widths (or the target width)."""
    messages: list[tuple[str, str]] = []

    def say(level: str, text: str) -> None:
        messages.append((level, text))
        if notify is not None:
            notify(level, text)

    layers = importance_source(cfg)
    cap = capacity_mod.parse(cfg.capacity)
    cap_label = "explicit g" if cfg.g_value is not None else cap.label
    cal = calib = None
    if cfg.calibration is not None:
        expect(cfg.calibration, "kdtool.calibration", "--calibration")
        calib = calib_mod.load(cfg.calibration)
        cal = calib_mod.fit_params(calib, cfg.fit, cfg.calibration)
        if cal["C_samples"].size == 0:
            say(
                "warning",
                f"{cfg.calibration}: no bootstrap samples (calibrate --bootstrap 0?): floor_kl_low/high are empty",
            )

    several = len({lay.layer for lay in layers}) != len(layers)  # several SAEs of a layer: rows keyed by SAE too
    names = (("sae",) if several else ()) + COLUMNS + (CALIBRATED_COLUMNS if cal is not None else ())
    columns: dict[str, list] = {k: [] for k in names}
    summary: dict[str, Any] = {
        "capacity": cap_label,
        "capacity_model": {"model": "explicit g", "g": cfg.g_value} if cfg.g_value is not None else cap.describe(),
        "estimator": cfg.estimator,
        "layers": {},
    }
    if cfg.stats is not None:  # the teacher the stats file measures (the report combines files of one model)
        summary["model"] = teachers.of_file(cfg.stats)
    if cal is not None:
        summary["calibration"] = {
            "file": str(cfg.calibration),
            "fit": cal["fit"],
            "C": cal["C"],
            "B": cal["B"],
            "band": BAND,
        }
    targets = {}
    per_sae: dict[str, dict] = {}
    for lay in layers:
        model = imp.floor_model(lay, g_value=_layer_g(lay, cap, cfg.g_value))
        entry = {"F": lay.n_features, "alpha": lay.alpha, "L0": lay.l0, "g": model.g, "d_star": model.d_star,
                 "source": lay.source, "estimator": lay.estimator}  # fmt: skip
        name = f"layer {lay.layer}" + (f" ({lay.sae})" if several else "")
        if lay.sae is not None:
            per_sae[lay.sae] = {"layer": lay.layer} | entry
        if not several:
            summary["layers"][str(lay.layer)] = entry
        alpha_txt = "?" if lay.alpha is None else f"{lay.alpha:.5f}"
        say("info", f"{name}: F={lay.n_features:,} alpha={alpha_txt} g={model.g:.4g} d*={model.d_star:,.1f}")
        widths = list(cfg.widths) if cfg.widths is not None else []
        if cfg.target_loss is not None:
            d, why = _target(model, cfg.target_loss, cal)
            targets[lay.sae if several else str(lay.layer)] = {"min_width": d, "message": why}
            if d is None:
                say("warning", f"{name}: {why}")
            else:
                say("info", f"{name}: minimum width {d:,}: {why}")
            if cfg.widths is None and d is not None:
                widths = [d]
        if widths:
            _add_rows(columns, lay, model, np.asarray(widths, dtype=np.int64), cal, calib, cfg.calibration, say)
            columns["capacity"] += [cap_label] * len(widths)
    if per_sae:
        summary["saes"] = per_sae
    if several:
        del summary["layers"]  # a layer has several SAEs: their numbers are under "saes", the spread below
        summary["spread"] = spread_mod.spread(columns, per_sae)
        for text in spread_mod.describe(summary["spread"]):
            say("info", text)
    if cfg.target_loss is not None:
        summary["target"] = {
            "loss": cfg.target_loss,
            "units": "nats (calibrated)" if cal is not None else "importance",
            "layers": targets,
        }
    return Prediction(columns=columns, summary=summary, messages=messages)


def _layer_g(lay: imp.LayerImportance, cap: capacity_mod.CapacityModel, g_value: float | None) -> float:
    """The capacity of one layer: an explicit --g, else the model's g_hat at the layer's alpha."""
    if g_value is not None or cap.model != "power":
        return imp.capacity_g(lay.alpha, cap.model, g_value)  # type: ignore[arg-type]
    return cap.k * imp.capacity_g(lay.alpha, "paper") ** cap.p


def _target(model: theory.FloorModel, target: float, cal: dict | None) -> tuple[int | None, str]:
    if cal is None:
        return theory.target_width(model, target)
    return theory.target_width(model, target, scale=cal["C"], baseline=cal["B"], calibrated=True)


def _add_rows(columns, lay, model, w_arr, cal, calib, calibration, say) -> None:
    """One layer's rows: kept/dropped features, floor, normalised floor (+ calibrated floor and band)."""
    n = len(w_arr)
    kept = np.atleast_1d(model.kept(w_arr))
    floor = np.atleast_1d(model.floor(w_arr))
    ref = floor[int(np.argmin(w_arr))]
    if "sae" in columns:
        columns["sae"] += [lay.sae] * n
    columns["layer"] += [lay.layer] * n
    columns["estimator"] += [lay.estimator] * n
    columns["width"] += w_arr.tolist()
    columns["features_kept"] += kept.tolist()
    columns["features_dropped"] += (lay.n_features - kept).tolist()
    columns["floor"] += floor.tolist()
    columns["normalized"] += [float(f / ref) if ref > 0 else None for f in floor]
    columns["g"] += [model.g] * n
    if cal is None:
        return
    mid, lo, hi = calib_mod.calibrated_floor(cal, floor)
    columns["floor_kl"] += mid.tolist()
    columns["floor_kl_low"] += [None] * n if lo is None else lo.tolist()
    columns["floor_kl_high"] += [None] * n if hi is None else hi.tolist()
    problems = calib_mod.scale_mismatch(calib, w_arr, floor)
    if problems:
        say(
            "warning",
            f"layer {lay.layer}: {calibration} was fit on other predicted floors ("
            + "; ".join(problems[:2])
            + ("; ..." if len(problems) > 2 else "")
            + "): its C maps those importance units, not these",
        )
