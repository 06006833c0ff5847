"""The calibration figures: observed vs predicted floors with their fits (Fig. 7), and both floors
normalised to the smallest width (Fig. 17).

Input: one calib.json (`kdtool calibrate`; docs/formats.md). Each function has the registry signature
fn(inputs, output, *, style, options) and reads the generic option title (and `--set d_star=N`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.plots.inputs import check_inputs


def read_calibration(path: Path, *, need_predicted: bool = True) -> dict:
    """widths / observed / predicted arrays and the fits of a calib.json written by `kdtool calibrate`.

    The points come from `points` [{width, observed, predicted}] (calibrate's own key), else from
    parallel `widths`/`observed`/`predicted` lists, else from the `decomposition` rows.
    """
    obj = formats.read_json(path)
    kind = obj.get("kind")
    if kind is not None and kind != "kdtool.calibration":
        raise BadInput(f"{path}: not a calibration file (kind={kind!r}; make one with kdtool calibrate -o)")
    rows = None
    for key in ("points", "decomposition"):
        if isinstance(obj.get(key), list) and obj[key]:
            rows = obj[key]
            break
    if isinstance(obj.get("widths"), list) and isinstance(obj.get("observed"), list):
        preds = obj.get("predicted") or [None] * len(obj["widths"])
        if not len(obj["widths"]) == len(obj["observed"]) == len(preds):
            raise BadInput(f"{path}: widths, observed and predicted differ in length")
        rows = [
            {"width": w, "observed": o, "predicted": p}
            for w, o, p in zip(obj["widths"], obj["observed"], preds, strict=False)
        ]
    if rows is None:
        raise BadInput(f"{path}: not a calibration file (no points; write one with `kdtool calibrate`)")
    try:
        width = np.asarray([r["width"] for r in rows], dtype=float)
        observed = np.asarray([r["observed"] for r in rows], dtype=float)
        raw_pred = [r.get("predicted") for r in rows]
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{path}: each point needs numeric width and observed") from None
    if any(p is None for p in raw_pred):
        if need_predicted:
            raise BadInput(f"{path}: no predicted floors (run kdtool calibrate with --predicted PRED)")
        predicted = None
    else:
        predicted = np.asarray(raw_pred, dtype=float)
    arrays = [width, observed] + ([predicted] if predicted is not None else [])
    if not all(np.all(np.isfinite(v)) for v in arrays):
        raise BadInput(f"{path}: widths, observed or predicted has NaN or infinite values")
    order = np.argsort(width, kind="stable")
    out: dict = {
        "width": width[order],
        "observed": observed[order],
        "predicted": None if predicted is None else predicted[order],
    }
    for fit in ("linear", "affine", "affine_fixed", "power_law"):
        if isinstance(obj.get(fit), dict):
            out[fit] = obj[fit]
    return out


def _fit(cal: dict, name: str, path: Path) -> dict:
    fit = cal.get(name)
    if not isinstance(fit, dict):
        raise BadInput(f"{path}: no {name!r} fit (expected keys linear and affine from `kdtool calibrate`)")
    if "skipped" in fit:
        raise BadInput(f"{path}: the {name} fit was skipped ({fit['skipped']})")
    return fit


def _fit_number(fit: dict, key: str, path: Path, name: str) -> float:
    value = fit.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{path}: {name}.{key} is missing or not a finite number")
    return float(value)


def _r2_text(fit: dict) -> str:
    r2 = fit.get("r2")
    return rf"$R^2={r2:.3f}$" if isinstance(r2, (int, float)) else r"$R^2$ n/a"


def calibration(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 7: observed vs predicted floors; (a) through-origin linear fit, (b) affine fit, R^2 in the titles."""
    check_inputs(inputs, "calibration", at_most=1)
    path = inputs[0]
    cal = read_calibration(path)
    linear, affine = _fit(cal, "linear", path), _fit(cal, "affine", path)
    x, y, w = cal["predicted"], cal["observed"], cal["width"]
    c_lin = _fit_number(linear, "C", path, "linear")
    c_aff = _fit_number(affine, "C", path, "affine")
    b_aff = _fit_number(affine, "B", path, "affine")
    xs = np.linspace(0, float(x.max()) * 1.08, 50)

    fig, axes = st.figure(style, 1, 2, sharey=True)
    panels = [
        (axes[0][0], "(a) linear $y=Cx$", c_lin * xs, rf"fit: $C={c_lin:.3g}$", linear),
        (axes[0][1], "(b) affine $y=Cx+B$", c_aff * xs + b_aff, rf"fit: $C={c_aff:.3g}$, $B={b_aff:.3g}$", affine),
    ]
    for ax, title, fit_y, fit_label, fit in panels:
        ax.plot(xs, fit_y, color=st.PALETTE[3], ls="--", label=fit_label)
        ax.plot(x, y, "o", color=st.PALETTE[0], label="observed floors", zorder=3)
        for j, (xi, yi, wi) in enumerate(zip(x, y, w, strict=True)):
            # alternate below/above so neighbouring widths (768 and 1024 sit almost together) stay legible
            ax.annotate(
                f"{wi:g}",
                (xi, yi),
                xytext=(4, -9 if j % 2 == 0 else 4),
                textcoords="offset points",
                fontsize="x-small",
                color=st.GREY,
            )
        ax.set_title(f"{title}: {_r2_text(fit)}")
        ax.set_xlabel(r"predicted floor $L^*$ (importance units)")
        ax.set_xlim(0, float(xs[-1]))
        ax.legend(loc="lower right")
    axes[0][1].axhline(b_aff, color=st.GREY, lw=0.9, ls=":")
    axes[0][1].annotate(
        rf"baseline $B={b_aff:.3g}$",
        (float(xs[-1]), b_aff),
        xytext=(-4, -10),
        textcoords="offset points",
        ha="right",
        fontsize="small",
        color=st.GREY,
    )
    axes[0][0].set_ylabel("observed floor (nats/token)")
    ymax = max(float(y.max()), float(np.max(panels[0][2])), float(np.max(panels[1][2])))
    axes[0][0].set_ylim(0, ymax * 1.08)
    st.title(fig, options, default="labels: student width $d_S$")
    st.save(fig, output)


def calibration_normalized(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 17: predicted and observed floors, each normalised to its value at the smallest width, against width."""
    check_inputs(inputs, "calibration-normalized", at_most=1)
    path = inputs[0]
    cal = read_calibration(path)
    w, obs, pred = cal["width"], cal["observed"], cal["predicted"]
    if np.unique(w).size != w.size:
        raise BadInput(f"{path}: several points per width; normalising needs one floor per width")
    if obs[0] <= 0 or pred[0] <= 0:
        raise BadInput(f"{path}: floors at the smallest width must be > 0 to normalise")
    fig, axes = st.figure(style)
    ax = axes[0][0]
    ax.plot(w, pred / pred[0], color=st.GREY, ls="--", marker="s", label=r"predicted $L^*$ (Eq. 2)")
    ax.plot(w, obs / obs[0], color=st.PALETTE[3], ls="-", marker="o", label="observed (distillation)")
    # The paper's Fig. 17 baseline is the measured one (B fixed from the widest student, Table 5);
    # fall back to the fitted affine B when the calibration has no fixed-baseline fit.
    for fit, how in (("affine_fixed", "fixed"), ("affine", "fitted")):
        b = cal[fit].get("B") if isinstance(cal.get(fit), dict) and "skipped" not in cal[fit] else None
        if isinstance(b, (int, float)) and math.isfinite(b):
            ax.axhline(
                b / obs[0],
                color=st.PALETTE[3],
                lw=0.9,
                ls=":",
                label=rf"{how} baseline $B/L_{{obs}}({w[0]:g})={b / obs[0]:.2f}$",
            )
            break
    d_star = options.get("d_star")
    if d_star:
        ax.axvline(float(d_star), color="black", lw=0.8, ls=":", label=rf"$d^*={st.math_int(float(d_star))}$")
    ax.set_xlabel(r"student width $d_S$ (hidden dimensions)")
    ax.set_ylabel(rf"floor / floor at $d_S={w[0]:g}$")
    ax.set_ylim(bottom=0)
    ax.set_title("normalised predicted vs observed floors")
    st.legend_outside(ax)  # inside, it sat on the curves and the d* line
    st.title(fig, options)
    st.save(fig, output)
