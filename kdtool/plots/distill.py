"""The distillation figures: eval curves with floors (Fig. 6a / 16a), floor vs width (Fig. 6b) and
the two-component decomposition (Table 5 as stacked bars).

Inputs are `kdtool distill` outputs (a students/ folder, or its curves.parquet / floors.parquet),
a stats Parquet (for d*) and a calib.json (`kdtool calibrate`); see docs/formats.md. Options read:
widths (only these students), layer (which stats layer's d*), title, and via --set: x=step|tokens,
train=true|false (distill-curves), logy=true, baseline=B (decomposition without calib.json).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import style as st

CURVES_KIND = "kdtool.distill.curves"
FLOORS_KIND = "kdtool.distill.floors"


# --------------------------------------------------------------------------- inputs


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return "students"
    if formats.is_parquet(path):
        return formats.parquet_metadata(path).get("kind")
    if path.suffix.lower() == ".json":
        return formats.read_json(path).get("kind")
    return None


def _expand(inputs: list[Path]) -> list[tuple[Path, str | None]]:
    """A students/ folder stands for its curves.parquet and floors.parquet."""
    out = []
    for p in inputs:
        if p.is_dir():
            found = [p / n for n in ("curves.parquet", "floors.parquet") if (p / n).exists()]
            if not found:
                raise BadInput(f"{p}: folder has no curves.parquet or floors.parquet (a kdtool distill output?)")
            out += [(f, _kind(f)) for f in found]
        else:
            out.append((p, _kind(p)))
    return out


def main_loss(losses) -> str:
    """The loss a single-loss figure shows from a table of several: kl when present (the paper's), else the first."""
    names = list(dict.fromkeys(str(x) for x in losses))
    return "kl" if "kl" in names else names[0]


def _floors_table(path: Path, loss: str | None = None) -> dict:
    """width, floor, floor_std (and loss) sorted by width; a table of several losses keeps `loss`'s rows
    (default: main_loss)."""
    cols = formats.read_table(path, required=("width", "floor"))
    out = {
        "width": formats.numeric_column(cols, "width", path, positive=True).astype(int),
        "floor": formats.numeric_column(cols, "floor", path),
    }
    out["floor_std"] = (
        formats.numeric_column(cols, "floor_std", path) if "floor_std" in cols else np.zeros_like(out["floor"])
    )
    out["loss"] = np.asarray([str(x) for x in cols["loss"]] if "loss" in cols else ["kl"] * len(out["width"]))
    keep = out["loss"] == (loss or main_loss(out["loss"]))
    order = np.argsort(out["width"][keep], kind="stable")
    return {k: v[keep][order] for k, v in out.items()}


def _want_widths(options: dict, widths) -> np.ndarray:
    wanted = options.get("widths")
    keep = np.ones(len(widths), dtype=bool) if not wanted else np.isin(widths, list(wanted))
    if not keep.any():
        raise BadInput(f"--widths: none of {wanted} is in the input (widths: {sorted(set(map(int, widths)))})")
    return keep


def _flag(options: dict, key: str, default: bool) -> bool:
    v = options.get(key, default)
    if isinstance(v, str):
        return v.lower() in ("1", "true", "yes", "on")
    return bool(v)


def _width_ticks(ax, widths) -> None:
    ws = sorted(set(int(w) for w in widths))
    ax.xaxis.set_major_locator(FixedLocator(ws))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([f"{w:,}" for w in ws])


# --------------------------------------------------------------------------- Fig. 6a: curves


def curves(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 6a: held-out per-token KL vs step per student (width, and loss when there are several), the
    floor dashed over its final-10% window; a second panel with the training KL (Fig. 16a; with several
    losses each student's own training loss) unless --set train=false."""
    files = _expand(inputs)
    curve_files = [p for p, k in files if k == CURVES_KIND or (k is None and p.name.startswith("curves"))]
    if len(curve_files) != 1:
        raise BadInput("plot distill-curves: give one students/ folder, or one curves.parquet (+ floors.parquet)")
    path = curve_files[0]
    cols = formats.read_table(path, required=("width", "step", "eval_kl", "train_kl"))
    summary = {}
    if formats.is_parquet(path):
        summary = formats.parquet_metadata(path).get("summary") or {}
    widths = np.asarray(cols["width"]).astype(int)
    step = formats.numeric_column(cols, "step", path)
    xkey = str(options.get("x", "step"))
    if xkey not in ("step", "tokens"):
        raise BadInput(f"--set x: must be step or tokens, got {xkey!r}")
    x = formats.numeric_column(cols, xkey, path) if xkey in cols else step
    ev = np.asarray(cols["eval_kl"], dtype=float)
    losses = np.asarray([str(v) for v in cols["loss"]] if "loss" in cols else ["kl"] * len(widths))
    several = len(set(losses.tolist())) > 1
    # training panel: each student's own objective (train_loss) when the losses differ, else the KL
    tr = np.asarray(cols["train_loss" if several and "train_loss" in cols else "train_kl"], dtype=float)
    keep = _want_widths(options, widths)
    floor_files = [p for p, k in files if k == FLOORS_KIND]
    start = summary.get("floor_from_step")
    show_train = _flag(options, "train", True)
    fig, axes = st.figure(style, 1, 2 if show_train else 1)
    ax_eval = axes[0][0]
    series = list(dict.fromkeys(zip(widths[keep].tolist(), losses[keep].tolist(), strict=True)))
    series.sort(key=lambda wl: wl[0])  # by width; losses in file order
    by_loss = (
        {lo: _floors_table(floor_files[0], lo) for lo in dict.fromkeys(lo for _, lo in series)} if floor_files else {}
    )
    for i, (w, loss) in enumerate(series):
        s = st.layer_style(i)
        label = f"$d_S$={w:,}" + (f" ({loss})" if several else "")
        mine = (widths == w) & (losses == loss)
        sel = mine & np.isfinite(ev)
        ax_eval.plot(x[sel], ev[sel], color=s["color"], linestyle="-", marker=s["marker"], markersize=2.5, label=label)
        floor = None
        floors = by_loss.get(loss)
        if floors is not None and w in floors["width"]:
            floor = float(floors["floor"][floors["width"] == w][0])
        elif start is not None:
            win = sel & (step >= start) & (step > 0)
            floor = float(ev[win].mean()) if win.any() else None
        if floor is not None:
            ax_eval.axhline(floor, color=s["color"], linestyle="--", linewidth=0.9, alpha=0.8)
        if show_train:
            tsel = mine & np.isfinite(tr)
            xs, ys = x[tsel], tr[tsel]
            k = max(1, len(ys) // 50)  # a light moving average: per-step training KL is noisy
            if k > 1:
                ys = np.convolve(ys, np.ones(k) / k, mode="valid")
                xs = xs[k - 1 :]
            axes[0][1].plot(xs, ys, color=s["color"], label=label)
    if start is not None and xkey == "step":
        ax_eval.axvspan(start, float(step.max()), color="0.85", alpha=0.5, linewidth=0, label="floor window")
    xlabel = "training step" if xkey == "step" else "training tokens"
    ax_eval.set_xlabel(xlabel)
    ax_eval.set_ylabel("held-out KL at T (nats/token)")
    ax_eval.set_title("(a) eval KL, floors dashed")
    if _flag(options, "logy", False):
        ax_eval.set_yscale("log")
    ax_eval.legend(loc="upper right")
    if show_train:
        axes[0][1].set_xlabel(xlabel)
        what = "training loss at T (each its own)" if several else "training KL at T (nats/token)"
        axes[0][1].set_ylabel(what)
        axes[0][1].set_title("(b) training loss, not comparable across losses" if several else "(b) training KL")
        if _flag(options, "logy", False):
            axes[0][1].set_yscale("log")
    if options.get("title"):
        fig.suptitle(options["title"])
    st.save(fig, output)


# --------------------------------------------------------------------------- Table 5: decomposition


def _decomposition_rows(files, options) -> tuple[list[dict], str]:
    calib = [p for p, k in files if k == "kdtool.calibration"]
    floor_files = [p for p, k in files if k == FLOORS_KIND or (k is None and p.name.startswith("floors"))]
    if calib:
        obj = formats.read_json(calib[0])
        rows = obj.get("decomposition") or []
        fit = obj.get("decomposition_fit") or {}
        if not rows:
            why = fit.get("skipped", "no decomposition")
            raise BadInput(f"{calib[0]}: has no decomposition ({why}); run kdtool calibrate with --predicted")
        c, b = fit.get("C", float("nan")), fit.get("B", float("nan"))
        source = f"{fit.get('fit', '?')} fit: C = {c:.3g}, B = {b:.3g}"
        return rows, source
    if not floor_files:
        raise BadInput("plot decomposition: give a calib.json (kdtool calibrate) or a floors.parquet")
    t = _floors_table(floor_files[0])
    if "baseline" in options:
        b, source = float(options["baseline"]), f"B = {float(options['baseline']):.3g} (--set baseline)"
    else:
        b = float(t["floor"][-1])
        source = f"B = floor of the widest student ({int(t['width'][-1]):,}) = {b:.3g}, as the paper's control"
    rows = [
        {
            "width": int(w),
            "observed": float(o),
            "baseline": b,
            "geometric": None,
            "pct_geometric": (o - b) / o if o > 0 else None,
        }
        for w, o in zip(t["width"], t["floor"], strict=True)
    ]
    return rows, source


def decomposition(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Table 5 as stacked bars: baseline B (width-independent) + geometric part (observed - B) per width,
    labelled with % geometric; C x predicted (the fitted geometric term) as a marker when calib.json has it."""
    rows, source = _decomposition_rows(_expand(inputs), options)
    widths = np.array([r["width"] for r in rows])
    keep = _want_widths(options, widths)
    rows = [r for r, k in zip(rows, keep, strict=True) if k]
    fig, axes = st.figure(style, 1, 1)
    ax = axes[0][0]
    pos = np.arange(len(rows))
    obs = np.array([r["observed"] for r in rows], dtype=float)
    base = np.array([r["baseline"] for r in rows], dtype=float)
    geo_obs = np.clip(obs - base, 0, None)
    ax.bar(pos, np.minimum(base, obs), color="0.75", label="baseline $B$", width=0.6)
    ax.bar(
        pos, geo_obs, bottom=np.minimum(base, obs), color=st.PALETTE[0], label="geometric (observed - $B$)", width=0.6
    )
    fitted = [r.get("geometric") for r in rows]
    if any(f is not None for f in fitted):
        fx = [p for p, f in zip(pos, fitted, strict=True) if f is not None]
        fy = [b + f for b, f in zip(base, fitted, strict=True) if f is not None]
        ax.plot(
            fx,
            fy,
            linestyle="none",
            marker="_",
            markersize=14,
            markeredgewidth=2,
            color=st.PALETTE[3],
            label=r"$B + C\hat{L}^*$ (fit)",
        )
    for p, o, b, f, r in zip(pos, obs, base, fitted, rows, strict=True):
        pct = r.get("pct_geometric")
        if pct is not None and math.isfinite(pct):
            top = max(o, b + f) if f is not None else o  # above the bar and the fit marker
            ax.annotate(
                f"{100 * pct:.1f}%", (p, top), textcoords="offset points", xytext=(0, 5), ha="center", fontsize="small"
            )
    ax.set_xticks(pos)
    ax.set_xticklabels([f"{r['width']:,}" for r in rows])
    ax.set_xlabel("student width $d_S$")
    ax.set_ylabel("floor (nats/token)")
    ax.set_ylim(0, float(obs.max()) * 1.2)
    handles, labels = ax.get_legend_handles_labels()  # below the panel: bars of any height stay readable
    fig.legend(
        handles, labels, loc="outside lower center", ncol=min(3, len(handles)), title=source, title_fontsize="x-small"
    )
    if options.get("title"):
        ax.set_title(options["title"])
    st.save(fig, output)
