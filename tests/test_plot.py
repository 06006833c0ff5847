"""`kdtool plot`: dispatch on KINDS, the theory figures' content, formats, provenance and errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import calibration as calibration_figs
from kdtool.plots import capacity as capacity_figs
from kdtool.plots import floor as floor_figs
from kdtool.plots import registry
from kdtool.plots import style as st
from kdtool.plots.registry import KINDS
from kdtool.theory import theorem as theory

MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


def _write_stats(path, layers=((8, 300, 6.0), (12, 240, 3.0)), with_summary=True):
    """A tiny two-layer stats table: Zipf-like importance, a few dead features, L0 set per layer."""
    rng = np.random.default_rng(0)
    cols = {k: [] for k in ("layer", "feature", "fires", "freq", "importance", "alive")}
    summary = {"layers": {}}
    for layer, n, l0 in layers:
        imp = np.arange(1, n + 1, dtype=float) ** -1.2
        rng.shuffle(imp)
        freq = rng.dirichlet(np.ones(n)) * l0
        alive = np.ones(n, bool)
        alive[:10] = False
        freq[~alive] = 0.0
        imp[~alive] = 0.0
        f = int(alive.sum())
        alpha = 1 - freq.sum() / f
        g = theory.g(alpha)
        summary["layers"][str(layer)] = {
            "F": f,
            "L0": float(freq.sum()),
            "alpha": alpha,
            "g": g,
            "d_star": f / g,
            "d_in": 64,
        }
        cols["layer"] += [layer] * n
        cols["feature"] += list(range(n))
        cols["fires"] += list((freq * 1e6).astype(int))
        cols["freq"] += list(freq)
        cols["importance"] += list(imp)
        cols["alive"] += list(alive)
    cols["layer"] = np.asarray(cols["layer"], np.int32)
    formats.write_parquet(
        path, cols, kind="kdtool.stats", provenance={"command": "test"}, summary=summary if with_summary else None
    )
    return summary


PAPER = {  # Tables 3-5 of the paper
    "width": [128, 256, 512, 768, 1024],
    "observed": [1.320, 1.008, 0.733, 0.652, 0.586],
    "predicted": [0.0795, 0.0400, 0.0111, 0.0016, 0.0001],
}


def _write_calib(path, *, predicted=True, skip_linear=False):
    """A calib.json shaped like `kdtool calibrate` writes it, with least-squares fits of the paper's numbers."""
    x, y = np.asarray(PAPER["predicted"]), np.asarray(PAPER["observed"])

    def r2(yhat):
        return float(1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2))

    c_lin = float(x @ y / (x @ x))
    c_aff, b_aff = (float(v) for v in np.polyfit(x, y, 1))
    obj = {
        "kind": "kdtool.calibration",
        "points": [
            {"width": w, "observed": o, "predicted": p if predicted else None}
            for w, o, p in zip(PAPER["width"], PAPER["observed"], PAPER["predicted"], strict=True)
        ],
        "linear": {"C": c_lin, "r2": r2(c_lin * x)},
        "affine": {"C": c_aff, "B": b_aff, "r2": r2(c_aff * x + b_aff)},
        "affine_fixed": {"C": 9.57, "B": 0.586, "r2": 0.98},
        "provenance": {"command": "test"},
    }
    if skip_linear:
        obj["linear"] = {"model": "y = C x", "skipped": "no predicted floors"}
    path.write_text(json.dumps(obj))
    return obj


@pytest.fixture
def stats(tmp_path):
    p = tmp_path / "stats.parquet"
    return p, _write_stats(p)


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.json"
    return p, _write_calib(p)


@pytest.fixture
def captured(monkeypatch):
    """Keep the figures a plot function would save, so tests can read what was drawn."""
    figures = []

    def fake_save(fig, output, **_kw):
        figures.append(fig)

    monkeypatch.setattr(st, "save", fake_save)
    yield figures
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


def _legend_texts(fig) -> list[str]:
    out = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is not None:
            out += [t.get_text() for t in leg.get_texts()]
    return out


# --------------------------------------------------------------------------- the registry, from Python


def test_every_registered_kind_names_a_function_that_exists():
    for kind in KINDS:
        assert callable(registry.figure_function(kind)), kind
    with pytest.raises(BadInput, match="unknown figure kind 'nope'; kinds: capacity"):
        registry.entry("nope")
    assert registry.entry("x", {"x": ("theoryish", "f", "h")}) == ("kdtool.plots.theoryish", "f", "h")


def test_draw_writes_the_figure_with_the_given_provenance(tmp_path, calib):
    out = tmp_path / "n.svg"
    prov = {"command": "from python", "config": {"kind": "calibration-normalized"}}
    written = registry.draw("calibration-normalized", [calib[0]], out, options={"d_star": 1065}, provenance=prov)
    assert written == out and out.read_bytes().startswith(MAGIC[".svg"])
    meta = st.read_figure_metadata(out)
    assert meta["kind"] == "kdtool.figure.calibration-normalized" and meta["provenance"] == prov


# --------------------------------------------------------------------------- the CLI


def test_list_shows_every_kind_with_its_help(cli):
    r = cli("plot", "--list")
    assert r.exit_code == 0
    for name, (_mod, _fn, help_) in KINDS.items():
        assert f"{name}  " in r.output and help_ in r.output
    r = cli("--json", "plot", "--list")
    assert set(json.loads(r.stdout)) == set(KINDS)


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_each_format_carries_provenance(cli, tmp_path, calib, suffix):
    out = tmp_path / f"norm{suffix}"
    r = cli("plot", "calibration-normalized", calib[0], "--title", "Fig 17", "--set", "d_star=1065", "-o", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes().startswith(MAGIC[suffix])
    meta = st.read_figure_metadata(out)
    assert meta["kind"] == "kdtool.figure.calibration-normalized"
    assert meta["provenance"]["params"]["title"] == "Fig 17"
    assert meta["provenance"]["config"]["options"]["d_star"] == 1065
    assert meta["provenance"]["params"]["command"] == "kdtool plot"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_every_theory_kind_dispatches_with_provenance(cli, tmp_path, stats, calib, monkeypatch):
    """Through the CLI, each kind draws one figure for -o and the provenance of that run is active when it saves.

    Rendering to disk is covered by test_each_format_carries_provenance; here save only records.
    """
    inputs = {
        "capacity": [stats[0]],
        "importance": [stats[0]],
        "floor": [stats[0]],
        "calibration": [calib[0]],
        "calibration-normalized": [calib[0]],
    }
    saved = []

    def record(fig, output, **_kw):
        import matplotlib.pyplot as plt

        saved.append((output, st._PROVENANCE.get(), st._KIND.get(), len(fig.axes)))
        plt.close(fig)

    monkeypatch.setattr(st, "save", record)
    for kind, paths in inputs.items():
        assert KINDS[kind][0] in ("kdtool.plots.capacity", "kdtool.plots.floor", "kdtool.plots.calibration")
        out = tmp_path / f"{kind}.png"
        r = cli("plot", kind, *paths, "-o", out)
        assert r.exit_code == 0, (kind, r.output)
        output, prov, fig_kind, n_axes = saved.pop()
        assert output == out and fig_kind == f"kdtool.figure.{kind}" and n_axes >= 1
        assert [i["path"] for i in prov["inputs"]] == [str(p) for p in paths]
        assert "sha256" in prov["inputs"][0] and prov["config"]["kind"] == kind
    assert not saved


@pytest.mark.parametrize(
    "args,needle",
    [
        (["nope", "-o", "x.png"], "unknown figure kind 'nope'; kinds: capacity"),
        (["capacity", "-o", "x.jpg"], "must be .png, .pdf or .svg"),
        (["capacity"], "-o/--output"),
        ([], "KIND is missing"),
        (["floor", "missing.parquet", "-o", "x.png"], "missing.parquet: no such file"),
        (["floor", "-o", "x.png"], "needs at least 1 input"),
        (["capacity", "--alpha", "1.5", "-o", "x.png"], "--alpha must be in [0, 1)"),
        (["capacity", "--alpha", "a,b", "-o", "x.png"], "--alpha"),
        (["capacity", "--features", "0", "-o", "x.png"], "--features must be >= 1"),
        (["floor", "STATS", "--layer", "3", "-o", "x.png"], "layer(s) 3 not in"),
        (["floor", "STATS", "--widths", "0,5", "-o", "x.png"], "--widths"),
        (["capacity", "--set", "oops", "-o", "x.png"], "--set: expected KEY=VALUE"),
        (["capacity", "--set", "layer=3", "-o", "x.png"], "has its own flag"),
        (["calibration", "STATS", "-o", "x.png"], "plot calibration wants calib.json"),
        (["calibration", "CALIB", "CALIB", "-o", "x.png"], "at most 1 input"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, tmp_path, stats, calib, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    args = [{"STATS": stats[0], "CALIB": calib[0]}.get(a, a) for a in args]
    r = cli("plot", *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtool plot: error:"), r.stderr
    assert needle in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_calibration_without_predicted_or_with_skipped_fit_is_refused(cli, tmp_path):
    p = tmp_path / "c.json"
    _write_calib(p, predicted=False)
    r = cli("plot", "calibration", p, "-o", tmp_path / "c.png")
    assert r.exit_code == 2 and "no predicted floors" in r.stderr
    _write_calib(p, skip_linear=True)
    r = cli("plot", "calibration", p, "-o", tmp_path / "c.png")
    assert r.exit_code == 2 and "linear fit was skipped" in r.stderr
    assert not (tmp_path / "c.png").exists()


def test_kind_completion_lists_kinds_without_matplotlib():
    code = (
        "import sys\n"
        "from kdtool.cli.plot import complete_kind\n"
        "names = [n for n, _ in complete_kind('cal')]\n"
        "print(','.join(names)); print('matplotlib' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    names, heavy = r.stdout.split()
    assert set(names.split(",")) == {k for k in KINDS if k.startswith("cal")} and "calibration" in names
    assert heavy == "False"


# --------------------------------------------------------------------------- what the figures show


def test_floor_from_stats_draws_eq2_and_marks_d_star(stats, captured, tmp_path):
    path, summary = stats
    floor_figs.floor([path], tmp_path / "f.png", style="paper", options={"layer": [12], "widths": [8, 16]})
    (fig,) = captured
    ax = fig.axes[0]
    labels = _legend_texts(fig)
    assert any(t.startswith("layer 12") for t in labels) and not any(t.startswith("layer 8") for t in labels)
    d_star = summary["layers"]["12"]["d_star"]
    vlines = [ln.get_xdata()[0] for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1 and ln.get_linestyle() == ":"]
    assert vlines == pytest.approx([d_star])
    curve = ax.get_lines()[1]  # [0] is the d* line
    x, y = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    from kdtool.theory import importance

    (li,) = importance.from_stats(path, layers=[12])
    model = theory.FloorModel.from_weights(li.weights, li.alpha)
    assert np.allclose(y, model.floor(x))
    assert np.all(np.diff(y) <= 0), "the floor must not increase with width"
    assert x.max() < d_star, "the floor is 0 from d* on and must not be drawn on a log axis"
    assert ax.get_yscale() == "log"


def test_floor_from_predict_csv_estimates_d_star(tmp_path, captured):
    # predict's output for F = 28,665 at the paper's g: F_S = floor(d g), d* = F / g = 1,064.7
    g, f = 26.922, 28_665
    w = np.array([128, 256, 512, 768, 1024])
    kept = np.floor(w * g).astype(int)
    p = tmp_path / "pred.csv"
    p.write_text(
        "layer,width,features_kept,features_dropped,floor\n"
        + "".join(f"12,{a},{k},{f - k},{0.1 / a}\n" for a, k in zip(w, kept, strict=True))
    )
    floor_figs.floor([p], tmp_path / "f.png", style="paper", options={})
    (fig,) = captured
    (label,) = [t for t in _legend_texts(fig) if t.startswith("layer 12")]
    est = float(label.split("approx")[1].strip("$)").replace("{,}", ""))
    assert abs(est - f / g) < 2


def test_calibration_titles_carry_each_fits_r2(calib, captured, tmp_path):
    path, obj = calib
    calibration_figs.calibration([path], tmp_path / "c.png", style="paper", options={})
    (fig,) = captured
    titles = [ax.get_title() for ax in fig.axes]
    assert f"{obj['linear']['r2']:.3f}" in titles[0] and "-1.98" in titles[0]
    assert f"{obj['affine']['r2']:.3f}" in titles[1] and "0.993" in titles[1]
    fit_line = fig.axes[1].get_lines()[0]
    xs, ys = np.asarray(fit_line.get_xdata()), np.asarray(fit_line.get_ydata())
    assert np.allclose(ys, obj["affine"]["C"] * xs + obj["affine"]["B"])


def test_calibration_normalized_uses_the_fixed_baseline(calib, captured, tmp_path):
    path, _ = calib
    calibration_figs.calibration_normalized([path], tmp_path / "n.png", style="paper", options={"d_star": 1065})
    (fig,) = captured
    ax = fig.axes[0]
    pred, obs = ax.get_lines()[0], ax.get_lines()[1]
    assert np.asarray(pred.get_ydata())[0] == 1.0 and np.asarray(obs.get_ydata())[0] == 1.0
    assert np.asarray(obs.get_ydata())[-1] == pytest.approx(0.586 / 1.320)
    assert any("fixed baseline" in t and "0.44" in t for t in _legend_texts(fig))  # the paper's B/L_obs(128) ~ 0.44


def test_capacity_marks_layers_and_the_non_monotone_region(stats, captured, tmp_path):
    path, summary = stats
    capacity_figs.capacity([path], tmp_path / "c.png", style="paper", options={})
    (fig,) = captured
    ax_g, ax_d = fig.axes[0], fig.axes[1]
    (curve,) = [ln for ln in ax_g.get_lines() if len(ln.get_xdata()) > 100]
    a, gv = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    assert np.allclose(gv, 1 / ((1 - a) * np.log(1 / (1 - a))))
    assert a.min() < theory.MONOTONE_FROM < a.max()
    span = [p for p in ax_g.patches if p.get_width() > 0]
    assert span and math.isclose(span[0].get_x() + span[0].get_width(), theory.MONOTONE_FROM, rel_tol=1e-9)
    marks = {
        (round(ln.get_xdata()[0], 6), round(ln.get_ydata()[0], 3))
        for ln in ax_d.get_lines()
        if len(ln.get_xdata()) == 1
    }
    for info in summary["layers"].values():
        assert (round(info["alpha"], 6), round(info["d_star"], 3)) in marks
    assert any("teacher width 64" in t for t in _legend_texts(fig))


def test_stats_without_summary_recompute_alpha_from_freq(tmp_path, captured):
    p = tmp_path / "s.parquet"
    summary = _write_stats(p, with_summary=False)
    capacity_figs.capacity([p], tmp_path / "c.png", style="paper", options={"layer": [8]})
    (fig,) = captured
    text = [t for t in _legend_texts(fig) if t.startswith("layer 8")][0]  # panel (a): alpha and g
    assert f"{summary['layers']['8']['alpha']:.4f}" in text


def test_slides_style_is_larger_than_paper(stats, captured, tmp_path):
    for style in ("paper", "slides"):
        floor_figs.importance([stats[0]], tmp_path / "i.png", style=style, options={})
    paper, slides = captured
    assert slides.get_size_inches()[0] > paper.get_size_inches()[0]
    assert slides.axes[0].xaxis.label.get_fontsize() > paper.axes[0].xaxis.label.get_fontsize()
    line = paper.axes[0].get_lines()[0]
    y = np.asarray(line.get_ydata())
    assert np.all(np.diff(y) <= 0) and paper.axes[0].get_xscale() == "log"


def _legend_outside_axes(fig) -> bool:
    fig.canvas.draw()
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is not None:
            box, frame = leg.get_window_extent(), ax.get_window_extent()
            return box.x0 >= frame.x1 or box.y1 <= frame.y0 or box.x1 <= frame.x0 or box.y0 >= frame.y1
    raise AssertionError("no legend")


def test_legends_do_not_cover_data(calib, captured, tmp_path):
    """Figs. 17 and 6b (one line): the legend sits outside the axes, so it cannot hide points or lines."""
    from kdtool.distill import files as distill
    from kdtool.plots import distill_floors

    path, _ = calib
    calibration_figs.calibration_normalized([path], tmp_path / "n.png", style="paper", options={"d_star": 300})
    floors = {"width": [8, 16, 32], "floor": [1.3, 1.0, 0.7], "floor_std": [0.01, 0.01, 0.01], "steps": [10] * 3}
    formats.write_parquet(tmp_path / "floors.parquet", floors, kind=distill.FLOORS_KIND, provenance={})
    _write_stats(tmp_path / "s.parquet")
    distill_floors.floors([tmp_path / "floors.parquet", tmp_path / "s.parquet"], tmp_path / "f.png", style="paper",
                          options={})  # fmt: skip
    assert len(captured) == 2 and all(_legend_outside_axes(fig) for fig in captured)


def test_toy_accuracy_draws_without_warnings(tmp_path, captured):
    """Fig. 11 printed a matplotlib deprecation warning (Colormap.set_bad) into the report page."""
    import warnings

    from kdtool.plots import toy as toy_figs
    from kdtool.toy import store as toy_store

    rows = {c: [] for c in ("n", "d_teacher", "alpha", "d_student", "seed", "floor_data", "pred_refined",
                            "pred_naive", "floor", "total_mass", "d_star", "g")}  # fmt: skip
    for n in (10, 20):
        for alpha in (0.8, 0.99):
            for ds in (1, 2, 30):  # d_S = 30 >= d*: no prediction there, a masked ("bad") cell
                for seed in range(2):
                    pred = 1.0 / ds + alpha
                    for c, v in zip(rows, (n, 3, alpha, ds, seed, pred * 1.05, pred, 1.0, pred * 1.05, 3.0, 0.6 * n,
                                           1.5), strict=True):  # fmt: skip
                        rows[c].append(v)
    formats.write_parquet(tmp_path / "toy.parquet", rows, kind=toy_store.KIND, provenance={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        toy_figs.accuracy([tmp_path / "toy.parquet"], tmp_path / "acc.png", style="paper", options={})
    assert len(captured) == 1


def test_sae_curves_of_a_one_step_log_show_the_point(tmp_path, captured):
    from kdtool.plots import sae as sae_figs
    from kdtool.sae.training import LOG_COLUMNS

    log = {c: [1.0] for c in LOG_COLUMNS} | {"layer": [6], "step": [10], "tokens": [2560], "alive_fraction": [0.9]}
    formats.write_parquet(tmp_path / "train_log.parquet", log, kind="kdtool.sae.train_log", provenance={},
                          summary={"layer": 6})  # fmt: skip
    sae_figs.curves([tmp_path / "train_log.parquet"], tmp_path / "c.png", style="paper", options={})
    (fig,) = captured
    for ax in fig.axes:
        (line,) = ax.get_lines()
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", " ")
    assert any(t.get_text() == "one step logged" for t in fig.axes[0].texts)
