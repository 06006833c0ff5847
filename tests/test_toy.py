"""kdtool toy: the batched trainer against a plain one-model trainer, planted checks, the CLI, resume, figures."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from kdtool import formats
from kdtool.theory import theorem as theory
from kdtool.toy.chunk import run_chunk
from kdtool.toy.config import Grid, ToyConfigKey, TrainConfig, settings_id
from kdtool.toy.model import data_stream, forward, generator_seed, importance, init_weights, sample
from kdtool.toy.predictions import predictions
from kdtool.toy.stats import aggregate, fit_capacity, summarize
from kdtool.toy.store import PartStore
from kdtool.toy.sweep import make_chunks, run_sweep
from kdtool.toy.trainer import train_reference, width_groups

# as in the sweep's workers: two OpenMP threads on a busy 2-core box spend milliseconds per op in barriers
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = TrainConfig(steps=60, batch_size=32, eval_samples=256, eval_points=3, lr=1e-2)


def _rows(keys, seeds, cfg):
    out = {}
    for slug, res in run_chunk(keys, seeds, cfg).items():
        out[slug] = {k: np.asarray(v) for k, v in res["rows"].items()}
    return out


@pytest.mark.parametrize("optimizer,target,schedule", [("adam", "teacher", "cosine"), ("sgd", "data", "linear")])
def test_batched_trainer_matches_single_model_trainer(optimizer, target, schedule):
    """Every teacher and student of a batch ends where the plain autograd + torch.optim trainer does."""

    cfg = replace(TINY, optimizer=optimizer, target=target, schedule=schedule, lr=0.05 if optimizer == "sgd" else 1e-2)
    key = ToyConfigKey(8, 3, 0.9)
    out = run_chunk([key], 2, cfg)[key.slug]
    rows, surv = {k: np.asarray(v) for k, v in out["rows"].items()}, out["survival"]
    imp = importance(8)
    for s in range(2):
        ex = sample(data_stream(generator_seed(0, key, s, "eval")), cfg.eval_samples, 8, 0.9)
        teacher = train_reference(
            *init_weights(3, 8, generator_seed(0, key, s, "init", 0)),
            alpha=0.9,
            data_seed=generator_seed(0, key, s, "teacher-data"),
            imp=imp,
            cfg=cfg,
            eval_x=ex,
        )
        et = forward(teacher["W"], teacher["b"], ex)
        for w in range(1, 4):
            ref = train_reference(
                *init_weights(w, 8, generator_seed(0, key, s, "init", w)),
                alpha=0.9,
                data_seed=generator_seed(0, key, s, "student-data"),
                imp=imp,
                cfg=cfg,
                eval_x=ex,
                teacher=(teacher["W"], teacher["b"]),
                eval_t=et,
                train_on_teacher=target == "teacher",
            )
            i = s * 3 + (w - 1)
            assert rows["seed"][i] == s and rows["d_student"][i] == w
            assert rows["teacher_floor"][i] == pytest.approx(teacher["floor_data"], rel=1e-4)
            assert rows["floor_data"][i] == pytest.approx(ref["floor_data"], rel=1e-4)
            assert rows["floor_distill"][i] == pytest.approx(ref["floor_distill"], rel=1e-4)
            # each feature's part of the floor, I_i * its held-out squared error, is the plain trainer's too
            mine = (surv["seed"] == s) & (surv["d_student"] == w) & (surv["role"] == "student")
            np.testing.assert_allclose(surv["loss"][mine], (ref["feature_mse"] * imp.double()).numpy(), rtol=1e-4)


def test_a_configuration_trains_the_same_alone_or_batched_with_others():
    cfg = TINY
    a, b = ToyConfigKey(6, 2, 0.8), ToyConfigKey(6, 2, 0.95)
    alone = _rows([a], 2, cfg)[a.slug]
    together = _rows([a, b], 2, cfg)[a.slug]
    np.testing.assert_allclose(alone["floor_data"], together["floor_data"], rtol=1e-5)
    assert not np.allclose(alone["floor_data"], _rows([a], 2, replace(cfg, base_seed=1))[a.slug]["floor_data"])


def test_chunks_group_same_n_and_teacher_width():
    keys = Grid((10, 20), (3, 5), (0.8, 0.9, 0.99), 2).keys()
    chunks = make_chunks(keys, 2)
    assert sorted(k for c in chunks for k in c) == sorted(keys)
    for c in chunks:
        assert len({(k.n, k.d_teacher) for k in c}) == 1 and len(c) <= 2
    assert chunks[0][0].n == 20  # most expensive first


@pytest.mark.parametrize("alpha", [0.8, 0.99])
def test_toy_data_has_the_papers_distribution(alpha):
    """x_i = 0 w.p. alpha, else U[0,1]: so P(x > 0) = 1 - alpha, E[x | x > 0] = 1/2, E[x^2] = (1 - alpha)/3."""
    x = sample(data_stream(7), 50_000, 8, alpha).numpy()
    on = x[x != 0]
    assert x.min() >= 0 and x.max() < 1
    assert abs(len(on) / x.size - (1 - alpha)) < 4 * np.sqrt(alpha * (1 - alpha) / x.size)
    assert abs(on.mean() - 0.5) < 0.01 and abs(on.var() - 1 / 12) < 0.005  # uniform on (0, 1)
    assert np.mean(x**2) == pytest.approx((1 - alpha) / 3, rel=0.05)
    assert not np.array_equal(x, sample(data_stream(8), 50_000, 8, alpha).numpy())
    np.testing.assert_array_equal(x, sample(data_stream(7), 50_000, 8, alpha).numpy())


def test_width_groups_partition_consecutive_widths_and_split_only_when_it_pays():
    for n, widths in ((10, range(1, 4)), (40, range(1, 11)), (40, [3, 1, 2])):
        groups = width_groups(widths, n, 20, 256)
        assert [w for g in groups for w in g] == sorted(set(widths))  # a partition, in order
        assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)  # of consecutive widths
    assert len(width_groups(range(1, 4), 10, 20, 256)) == 1  # small models: padding is cheaper than more ops
    assert len(width_groups(range(1, 11), 40, 20, 256)) > 1  # d_T = 10, n = 40: padding all to 10 wastes ~45%
    assert len(width_groups(range(1, 11), 40, 1, 8)) == 1  # one tiny stream: op overhead dominates


def test_students_train_the_same_whatever_their_width_grouping(monkeypatch):
    """Grouping is a speed choice only: each width padded to d_T alone, per width, or in pairs gives one result."""
    import kdtool.toy.chunk as sweep

    key = ToyConfigKey(8, 4, 0.9)
    results = []
    for split in ([[1, 2, 3, 4]], [[1], [2], [3], [4]], [[1, 2], [3, 4]]):
        monkeypatch.setattr(sweep, "width_groups", lambda *a, split=split: split)
        results.append(_rows([key], 2, TINY)[key.slug])
    for other in results[1:]:
        for col in ("floor_data", "floor_distill", "train_loss_final"):
            np.testing.assert_allclose(other[col], results[0][col], rtol=1e-5)


# ------------------------------------------------------------------------------------------ planted checks

PLANT = TrainConfig(steps=400, batch_size=128, eval_samples=1024, lr=2e-2)


def test_student_as_wide_as_the_data_reaches_near_zero_loss():
    key = ToyConfigKey(4, 5, 0.8)  # students d_S = 1..5, so d_S = 4 and 5 are >= n
    rows = _rows([key], 3, PLANT)[key.slug]
    mass = predictions(4, 0.8, [1])["total_mass"]
    wide = rows["d_student"] >= 4
    assert np.all(rows["floor_data"][wide] < 0.03 * mass), rows["floor_data"][wide] / mass
    assert np.all(rows["floor_data"][rows["d_student"] == 1] > 0.2 * mass)  # a 1-d student cannot


def test_floors_fall_as_sparsity_grows_and_with_width():
    keys = [ToyConfigKey(10, 4, a) for a in (0.8, 0.95, 0.99)]
    cols = {}
    for k in keys:
        for c, v in _rows([k], 4, PLANT)[k.slug].items():
            cols.setdefault(c, []).append(v)
    cols = {c: np.concatenate(v) for c, v in cols.items()}
    cols["floor"] = cols["floor_data"]
    agg = aggregate(cols)
    for w in range(1, 5):
        sel = agg["d_student"] == w
        by_alpha = agg["floor_mean"][sel][np.argsort(agg["alpha"][sel])]
        assert np.all(np.diff(by_alpha) < 0), (w, by_alpha)
    # non-increasing in d_S, allowing 2 standard errors of the seed mean
    for a in (0.8, 0.95, 0.99):
        sel = agg["alpha"] == a
        m, se = agg["floor_mean"][sel], agg["floor_std"][sel] / np.sqrt(agg["seeds"][sel])
        assert np.all(m[1:] <= m[:-1] + 2 * (se[1:] + se[:-1])), (a, m)
        assert m[-1] < m[0]


# ------------------------------------------------------------------------------------------ statistics


def _synthetic_table(ns, d_ts, alphas, g_fn, seeds=2, beyond=0):
    """Rows whose measured floor is Eq. 2 at capacity g_fn(alpha) (continuous rank), for planted fits; `beyond`
    more students wider than the teacher have the floor of width d_T (they copy the teacher)."""
    from kdtool.toy.predictions import floor_model
    from kdtool.toy.stats import _continuous_floor

    cols: dict[str, list] = {}
    for n in ns:
        for dt in d_ts:
            for a in alphas:
                widths = np.arange(1, dt + beyond + 1)
                pred = predictions(n, a, widths)
                fm = floor_model(n, a)
                measured = _continuous_floor(fm.tail, fm.weights, np.minimum(widths, dt) * g_fn(a))
                for s in range(seeds):
                    for j, w in enumerate(widths):
                        row = {
                            "n": n,
                            "d_teacher": dt,
                            "alpha": a,
                            "d_student": w,
                            "seed": s,
                            "floor": measured[j] + 1e-9,
                            "pred_refined": pred["pred_refined"][j],
                            "pred_naive": pred["pred_naive"][j],
                            "d_star": pred["d_star"],
                            "g": pred["g"],
                            "total_mass": pred["total_mass"],
                        }
                        for k, v in row.items():
                            cols.setdefault(k, []).append(v)
    return {k: np.asarray(v) for k, v in cols.items()}


def test_paper_grid_has_140_data_points_and_a_perfect_prediction_scores_perfectly():
    g = Grid()
    cols = _synthetic_table(g.ns, g.d_teachers, g.alphas, lambda a: theory.g(a))
    cols["floor"] = np.where(cols["pred_refined"] > 0, cols["pred_refined"], 1e-9)
    s = summarize(cols)
    assert s["configs"] == 48 and s["data_points"] == 140
    assert s["refined"]["median_accuracy"] == pytest.approx(1.0)
    assert s["refined"]["mape_percent"] == pytest.approx(0.0, abs=1e-9)
    assert s["refined"]["r2"] == pytest.approx(1.0)
    assert s["naive"]["r2"] < 0.5
    assert s["underestimated_by_refined"] == 0
    assert all(a["median_measured_over_refined"] == pytest.approx(1.0) for a in s["by_alpha"].values())


def test_summary_counts_how_the_floors_rank_with_width_and_alpha():
    g = Grid()
    cols = _synthetic_table(g.ns, g.d_teachers, g.alphas, lambda a: theory.g(a))
    # a floor that falls with width and with alpha everywhere, then one point broken in each direction
    cols["floor"] = (1.0 - cols["alpha"]) / cols["d_student"]
    s = summarize(cols)
    assert s["ordering"] == {"falls_with_width": [264, 264], "falls_with_alpha": [234, 234]}
    hit = (cols["n"] == 10) & (cols["d_teacher"] == 3) & (cols["alpha"] == 0.9) & (cols["d_student"] == 2)
    cols["floor"] = np.where(hit, 1.0, cols["floor"])  # now above its d_S = 1 and its alpha = 0.8 neighbours
    s = summarize(cols)
    assert s["ordering"] == {"falls_with_width": [263, 264], "falls_with_alpha": [233, 234]}
    assert s["underestimated_by_refined"] >= 1


def test_fit_capacity_recovers_a_planted_capacity_and_power_law():
    true = {0.8: 1.5, 0.9: 2.0, 0.95: 2.6}  # = 0.76 * g(alpha)^0.55 only roughly; fit must return these
    cols = _synthetic_table((20, 40), (3, 5), tuple(true), lambda a: true[a])
    fit = fit_capacity(cols)
    for p in fit["per_alpha"]:
        assert p["g_hat"] == pytest.approx(true[p["alpha"]], rel=0.02)
        assert p["rmse_log_fit"] < p["rmse_log_paper_g"]
    pl = fit["power_law"]
    gs = np.array([theory.g(a) for a in true])
    pred = pl["k"] * gs ** pl["p"]
    np.testing.assert_allclose(pred, list(true.values()), rtol=0.1)
    assert len(fit["notes"]) == 3  # every fitted capacity is far from g(alpha): each is reported
    # students wider than their teacher (--student-widths to-dstar) copy it: the fit leaves them out
    wide = _synthetic_table((40,), (3, 5), tuple(true), lambda a: true[a], beyond=4)
    for p in fit_capacity({**wide, "target": np.array(["teacher"] * len(wide["n"]))})["per_alpha"]:
        assert p["g_hat"] == pytest.approx(true[p["alpha"]], rel=0.02)
    skewed = fit_capacity({**wide, "target": np.array(["data"] * len(wide["n"]))})["per_alpha"]
    assert skewed[0]["g_hat"] < 0.9 * true[0.8]  # counted as if they were capacity-limited, they drag g_hat down


# ------------------------------------------------------------------------------------------ CLI

SMALL = [
    "--n",
    "6",
    "--d-teacher",
    "2,3",
    "--alpha",
    "0.9",
    "--seeds",
    "2",
    "--steps",
    "40",
    "--batch-size",
    "32",
    "--eval-samples",
    "128",
    "--eval-points",
    "2",
    "--workers",
    "1",
]


def test_cli_small_sweep_writes_table_with_provenance_and_summary(cli, tmp_path):
    out = tmp_path / "toy.parquet"
    r = cli("--json", "toy", *SMALL, "-o", out, "--fit-capacity", "--log-curves", "--curve-points", "5")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["configs"] == 2 and summary["rows"] == 2 * (2 + 3) and summary["models"] == 14
    assert "fit_capacity" in summary and summary["floor_column"] == "floor_data"
    cols = formats.read_table(out)
    meta = formats.parquet_metadata(out)
    assert meta["kind"] == "kdtool.toy" and meta["provenance"]["params"]["steps"] == 40
    assert meta["summary"]["data_points"] == summary["data_points"]
    np.testing.assert_array_equal(cols["floor"], cols["floor_data"])
    for n, a, w, p in zip(cols["n"], cols["alpha"], cols["d_student"], cols["pred_refined"], strict=True):
        assert p == pytest.approx(predictions(int(n), float(a), [int(w)])["pred_refined"][0])
    curves = formats.read_table(tmp_path / "toy.curves.parquet")
    assert set(curves["role"]) == {"teacher", "student"} and curves["step"].max() == 40
    assert not (tmp_path / "toy.parquet.parts").exists()
    again = cli("--json", "toy", "--summarize", out, "--measure", "distill")
    assert again.exit_code == 0 and json.loads(again.stdout)["measure"] == "floor_distill"


def test_cli_resume_after_a_kill_trains_only_what_is_missing(cli, tmp_path, monkeypatch):
    from kdtool.toy import sweep as toy_sweep

    out = tmp_path / "t.parquet"
    real = toy_sweep._timed_chunk
    calls = {"n": 0}

    def dies_on_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(toy_sweep, "_timed_chunk", dies_on_second)
    r = cli("toy", *SMALL, "-o", out)
    assert r.exit_code == 130 and not out.exists() and not (tmp_path / "t.survival.parquet").exists()
    parts = sorted(p.name for p in (tmp_path / "t.parquet.parts").glob("*.parquet"))
    assert len(parts) == 2 and parts[1].endswith(".survival.parquet")  # one configuration: rows + survival
    monkeypatch.setattr(toy_sweep, "_timed_chunk", real)
    r = cli("--json", "toy", *SMALL, "-o", out, "--resume")
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    assert resumed["models_trained_now"] in (2 * 3, 2 * 4)  # only the configuration that was missing
    fresh = tmp_path / "fresh.parquet"
    assert cli("--quiet", "toy", *SMALL, "-o", fresh).exit_code == 0
    a, b = formats.read_table(out), formats.read_table(fresh)
    np.testing.assert_allclose(a["floor_data"], b["floor_data"], rtol=1e-6)
    sa = formats.read_table(tmp_path / "t.survival.parquet")
    sb = formats.read_table(tmp_path / "fresh.survival.parquet")
    assert list(sa) == list(sb) and len(sa["loss"]) == len(sb["loss"])
    for col in sa:  # the resumed survival records are the fresh run's, row for row
        if sa[col].dtype.kind in "fc":
            np.testing.assert_allclose(sa[col], sb[col], rtol=1e-6)
        else:
            np.testing.assert_array_equal(sa[col], sb[col])
    # a resumed run with other settings is refused, naming the file
    store = PartStore(out, settings_id(TINY, 2), {})
    run_sweep(Grid((6,), (2,), (0.9,), 2), TINY, store, workers=1)
    bad = cli("toy", *SMALL, "-o", out, "--resume")
    assert bad.exit_code == 2 and "different training settings" in bad.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--alpha", "1.2"], "--alpha"),
        (["--steps", "3"], "--steps"),
        (["-o", "toy.csv"], "Parquet"),
        (["--n", "a,b"], "--n"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    r = cli("toy", "--seeds", "1", "--workers", "1", *args)
    assert r.exit_code == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_summarize_refuses_other_files(cli, tmp_path):
    other = tmp_path / "x.parquet"
    formats.write_parquet(other, {"a": [1]}, kind="kdtool.stats")
    r = cli("toy", "--summarize", other)
    assert r.exit_code == 2 and "kdtool.stats" in r.stderr


def test_toy_figures_draw_from_a_small_sweep(cli, tmp_path):
    out = tmp_path / "toy.parquet"
    assert cli("--quiet", "toy", *SMALL, "-o", out, "--log-curves", "--curve-points", "4").exit_code == 0
    kinds = ("toy-grid", "toy-scatter", "toy-accuracy", "toy-scaling", "toy-curves", "toy-survival", "toy-kept")
    for kind in kinds:
        fig = tmp_path / f"{kind}.png"
        r = cli("plot", kind, out, "-o", fig)
        assert r.exit_code == 0, (kind, r.output)
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli("plot", "toy-curves", tmp_path / "toy-grid.png", "-o", tmp_path / "x.png")
    assert r.exit_code == 2
    r = cli("plot", "toy-survival", tmp_path / "toy.survival.parquet", "--set", "threshold=2", "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "--set threshold must be in (0, 1]" in r.stderr
