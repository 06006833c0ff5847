"""Which toy features survive in each student (issue 11): the staircase and the kept counts, from survival records.

Inputs: toy.survival.parquet (kind kdtool.toy.survival, written by `kdtool toy`) or the toy.parquet it
sits beside. Theorem 1 with assumption A2 says a width-d_S student keeps the F_S = floor(d_S g(alpha))
most important features, so survival against importance rank should be a staircase stepping down at F_S.

Options read: alpha (only these sparsities), title, and via --set: n=40 (only this n),
d_teacher=10 (toy-survival: which teacher width; default the widest in the file), threshold=0.25
(re-count kept at another fraction of the variance; default the file's `kept` column).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np

from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.plots.toy import select
from kdtool.theory import theorem as theory
from kdtool.toy.kept_capacity import fit_kept_capacity
from kdtool.toy.survival import check_threshold, kept_mask, per_model, points, read_survival


def _records(inputs: list[Path], what: str, options: dict) -> dict[str, np.ndarray]:
    """The survival records, `kept` set (at --set threshold= if given), filtered by --alpha and --set n=."""
    if len(inputs) != 1:
        raise BadInput(f"{what} takes one toy.survival.parquet (or the toy.parquet beside it), got {len(inputs)}")
    cols, meta = read_survival(inputs[0])
    recorded = (meta.get("summary") or {}).get("kept_threshold")
    threshold = options.get("threshold", recorded)
    if threshold is None:
        raise BadInput(f"{inputs[0]}: records no kept threshold; give --set threshold=0.5")
    cols["kept"] = kept_mask(cols["rel_error"], check_threshold(float(threshold), "--set threshold"))
    cols["threshold"] = np.full(len(cols["kept"]), float(threshold))
    target = ((meta.get("provenance") or {}).get("config") or {}).get("target", "teacher")
    cols["target"] = np.full(len(cols["kept"]), str(target))  # what is available to a student: kept_capacity
    return select(cols, options, inputs[0])


def staircase(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fraction of seeds keeping each feature vs its importance rank, one line per d_S, F_S marked; rows alpha,
    columns n, for one teacher width; the teacher dashed black."""
    cols = _records(inputs, "toy-survival", options)
    d_t = int(options.get("d_teacher", cols["d_teacher"].max()))
    cols = {k: v[cols["d_teacher"] == d_t] for k, v in cols.items()}
    if not len(cols["n"]):
        raise BadInput(f"{inputs[0]}: no configuration with d_T = {d_t}")
    ns, alphas = sorted(set(cols["n"].tolist())), sorted(set(cols["alpha"].tolist()))
    widest = int(cols["d_student"][cols["role"] == "student"].max())
    cmap = mpl.colormaps["viridis"]
    fig, axes = st.figure(style, len(alphas), len(ns))
    for r, a in enumerate(alphas):
        g = float(theory.g(a))
        for c, n in enumerate(ns):
            ax = axes[r][c]
            sel = (cols["alpha"] == a) & (cols["n"] == n)
            ranks = np.arange(1, n + 1)
            models = zip(cols["role"][sel], cols["d_student"][sel], strict=True)
            for role, w in sorted({(str(ro), int(w)) for ro, w in models}):
                m = sel & (cols["role"] == role) & (cols["d_student"] == w)
                share = np.bincount(cols["feature"][m], weights=cols["kept"][m], minlength=n + 1)[1:]
                share = share / max(1, len(set(cols["seed"][m].tolist())))
                if role == "teacher":
                    ax.step(ranks, share, where="mid", color="black", linestyle="--", linewidth=1, label="teacher")
                    continue
                color = cmap(0.9 * (w - 1) / max(1, widest - 1))
                ax.step(ranks, share, where="mid", color=color, linewidth=1.2)
                f_s = theory.features_kept(w, g, n)
                if f_s < n:  # Eq. 2's step: kept up to rank F_S, lost after
                    ax.plot([f_s + 0.5] * 2, [1.02, 1.1], color=color, linewidth=1.5, clip_on=False)
            ax.set_xlim(0.5, n + 0.5)
            ax.set_ylim(-0.03, 1.12)
            ax.set_title(f"n={n}, α={a:g}, $d_T$={d_t}", fontsize="medium")
            if c == 0:
                ax.set_ylabel("fraction of seeds keeping it")
            if r == len(alphas) - 1:
                ax.set_xlabel("feature (importance rank)")
    norm = mpl.colors.Normalize(vmin=1, vmax=max(2, widest))
    sm = mpl.cm.ScalarMappable(cmap=mpl.colors.ListedColormap(cmap(np.linspace(0, 0.9, 256))), norm=norm)
    fig.colorbar(sm, ax=[ax for row in axes for ax in row], label="student width $d_S$", shrink=0.8)
    threshold = float(cols["threshold"][0])
    fig.suptitle(
        options.get("title")
        or f"survival by importance rank (kept: error < {threshold:g} x variance); ticks above = Eq. 2's F_S"
    )
    st.save(fig, output)


def kept_counts(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Seed-mean kept count vs d_S, one panel per alpha: a line per (n, d_T), Eq. 2's floor(d_S g(alpha)) dashed,
    and d_S * g_meas (the measured capacity) dotted."""
    cols = _records(inputs, "toy-kept", options)
    pts = points(per_model(cols, float(cols["threshold"][0])))
    fit = {p["alpha"]: p["g_meas"] for p in fit_kept_capacity(pts, str(cols["target"][0]))["per_alpha"]}
    alphas = sorted(set(pts["alpha"].tolist()))
    fig, axes = st.figure(style, 1, len(alphas))
    ns, d_ts = sorted(set(pts["n"].tolist())), sorted(set(pts["d_teacher"].tolist()))
    for c, a in enumerate(alphas):
        ax = axes[0][c]
        for i, n in enumerate(ns):  # colour = n, marker = d_T (a student wider than its teacher copies it: flat)
            for j, d_t in enumerate(d_ts):
                sel = (pts["alpha"] == a) & (pts["n"] == n) & (pts["d_teacher"] == d_t)
                if sel.any():
                    ax.plot(pts["d_student"][sel], pts["kept_mean"][sel], color=st.PALETTE[i % len(st.PALETTE)],
                            marker=st.MARKERS[j % len(st.MARKERS)], markersize=3, linewidth=0.8, alpha=0.8)  # fmt: skip
        for i, n in enumerate(ns):
            ax.plot([], [], color=st.PALETTE[i % len(st.PALETTE)], label=f"n={n}")
        for j, d_t in enumerate(d_ts):
            marker = st.MARKERS[j % len(st.MARKERS)]
            ax.plot([], [], color=st.GREY, marker=marker, linestyle="none", label=f"$d_T$={d_t}")
        widths = np.arange(0, int(pts["d_student"][pts["alpha"] == a].max()) + 1)
        ax.plot(widths, np.floor(widths * theory.g(a)), "--", color=st.GREY, label="Eq. 2: ⌊d_S g(α)⌋")
        if a in fit:
            ax.plot(widths, widths * fit[a], ":", color="black", label="$d_S$ g_meas (measured capacity)")
        top = float(pts["kept_mean"][pts["alpha"] == a].max())
        ax.set_ylim(0, top * 1.3 + 1)
        measured = f", g_meas={fit[a]:.3g}" if a in fit else ""
        ax.set_title(f"α={a:g}: g(α)={theory.g(a):.3g}{measured}")
        ax.set_xlabel("student width $d_S$")
        if c == 0:
            ax.set_ylabel("features kept (mean over seeds)")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    fig.suptitle(options.get("title") or "kept features vs width: measured (lines per n, d_T) against Eq. 2")
    st.save(fig, output)
