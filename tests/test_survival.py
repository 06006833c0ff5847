"""kdtool survival: the ridge map, the teacher's reference rows, a planted student, the CLI on a tiny model.

The planted case has a known answer: the teacher's hidden state is a sparse sum of orthonormal feature
directions, the SAE reads exactly those features, and the student is the teacher's state projected onto
the span of some of them. A linear map recovers exactly the features inside the span, so exactly those
must survive, whatever their importance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import make_model_dir

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.sae.layouts import LoadedSAE
from kdtool.sae.writers import saelens_cfg, save_kdtool
from kdtool.survival import job
from kdtool.survival.config import SurvivalConfig
from kdtool.survival.ridge import RIDGE_GRID, RidgeFit
from kdtool.survival.stream import ModelActs
from kdtool.survival.summary import COLUMNS

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ the ridge map


def _data(n=300, d_in=5, d_out=3, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d_in)) * np.array([1.0, 3.0, 0.5, 2.0, 1.0]) + 7.0  # a large mean, like a residual stream
    y = x @ g.normal(size=(d_in, d_out)) + g.normal(size=d_out) + 0.1 * g.normal(size=(n, d_out))
    return x, y


def _fit(x, y, ridge, chunks=4):
    fit = RidgeFit(x.shape[1], y.shape[1])
    for xs, ys in zip(np.array_split(x, chunks), np.array_split(y, chunks), strict=True):
        fit.add(torch.from_numpy(xs).float(), torch.from_numpy(ys).float())
    return fit.solve(ridge)


def test_ridge_map_equals_a_direct_least_squares_solve():
    x, y = _data()
    amap = _fit(x, y, ridge=0.0)
    direct, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)  # [d_in + 1, d_out]
    np.testing.assert_allclose(amap.W.numpy(), direct[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(amap.b.numpy(), direct[-1], rtol=1e-4, atol=1e-4)
    assert amap.penalty == 0.0


def test_ridge_penalty_is_relative_and_leaves_the_bias_alone():
    x, y = (v.astype(np.float32).astype(np.float64) for v in _data(seed=1))  # the values the fit sees
    ridge = 0.3  # large, so the shrinkage is visible
    amap = _fit(x, y, ridge)
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = ridge * np.trace(xc.T @ xc) / x.shape[1]
    # the same problem written as one stacked least-squares system: [Xc; sqrt(lam) I] W = [Yc; 0]
    a = np.vstack([xc, np.sqrt(lam) * np.eye(x.shape[1])])
    b = np.vstack([yc, np.zeros((x.shape[1], y.shape[1]))])
    w_direct, *_ = np.linalg.lstsq(a, b, rcond=None)
    np.testing.assert_allclose(amap.W.numpy(), w_direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(amap.b.numpy(), y.mean(0) - x.mean(0) @ w_direct, rtol=1e-4, atol=1e-4)
    assert amap.penalty == pytest.approx(lam, rel=1e-9)
    # scale-free: multiplying the student's activations by 100 gives the same predictions
    big = _fit(100 * x, y, ridge)
    pred = lambda m, xx: (torch.from_numpy(xx).float() @ m.W + m.b).numpy()  # noqa: E731
    np.testing.assert_allclose(pred(big, 100 * x), pred(amap, x), rtol=1e-3, atol=1e-3)


def test_validation_r2_from_sums_and_auto_ridge_choice():
    g = np.random.default_rng(2)
    x = g.normal(size=(400, 30))
    y_clean = x @ g.normal(size=(30, 4))
    for y, want_large in ((y_clean, False), (g.normal(size=(400, 4)) + 0.05 * y_clean, True)):
        fit = RidgeFit(30, 4)
        fit.add(torch.from_numpy(x[:300]).float(), torch.from_numpy(y[:300]).float(), 0)
        fit.add(torch.from_numpy(x[300:]).float(), torch.from_numpy(y[300:]).float(), 1)
        amap = fit.solve(None)
        assert set(amap.validation) == set(RIDGE_GRID)
        # the validation r2 computed from fold 1's sums equals the direct one, for the ridge fitted on fold 0
        W, b, _ = fit.folds[0].solve(1e-2)
        pred = x[300:].astype(np.float32).astype(np.float64) @ W.numpy() + b.numpy()
        yv = y[300:].astype(np.float32).astype(np.float64)
        direct = 1 - ((pred - yv) ** 2).sum() / ((yv - yv.mean(0)) ** 2).sum()
        assert amap.validation[1e-2] == pytest.approx(direct, rel=1e-6, abs=1e-9)
        # noiseless: the least shrinkage wins; mostly noise: a large ridge wins (and beats the small ones)
        assert (amap.ridge >= 0.1) == want_large
        assert amap.validation[amap.ridge] == max(amap.validation.values())


def test_ridge_refuses_too_few_rows_and_a_negative_ridge():
    fit = RidgeFit(2, 2)
    fit.add(torch.ones(1, 2), torch.ones(1, 2))
    with pytest.raises(BadInput, match="1 token"):
        fit.solve(1e-3)
    fit.add(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(BadInput, match="--ridge"):
        fit.solve(-1.0)
    with pytest.raises(BadInput, match="validation"):  # auto needs rows in both folds
        fit.solve(None)


# ------------------------------------------------------------------------------------------ planted student

D, VOCAB, LAYER = 12, 4000, 3
INSIDE = [1, 4, 7, 10]  # features whose directions span the student's subspace (not the most important ones)


def planted(seed=0):
    """(teacher, student inside INSIDE's span, the SAE that reads the features, token batches)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    q = q.float()  # [D, F=D]: column i is feature i's direction
    scale = torch.linspace(2.0, 0.5, D)  # importance falls with the feature index
    active = torch.rand(VOCAB, D, generator=g) < 0.3
    a = torch.rand(VOCAB, D, generator=g) * active * scale  # [V, F] sparse, non-negative feature values
    table = a @ q.T  # [V, D]: each token's hidden state, sum_i a_i q_i
    basis = q[:, INSIDE]  # [D, 4]

    teacher = ModelActs("teacher", "teacher", D, lambda ids: {LAYER: table[ids]})
    student = ModelActs("projected", "student", len(INSIDE), lambda ids: {LAYER: table[ids] @ basis})
    sae = LoadedSAE(
        path="planted",
        layout="kdtool",
        W_enc=q.clone(),
        b_enc=torch.full((D,), -1e-4),
        W_dec=q.T.clone(),
        b_dec=torch.zeros(D),
        layer=LAYER,
    )  # fmt: skip  (the small negative bias keeps float rounding of exact zeros from firing, as a real SAE's does)
    batches = [torch.randint(0, VOCAB, (8, 33), generator=g) for _ in range(40)]
    return teacher, student, sae, batches


def by_model(result, name):
    c = result.columns
    sel = np.asarray([m == name for m in c["model"]])
    return {k: np.asarray(v)[sel] for k, v in c.items()}


def test_planted_student_keeps_exactly_the_features_in_its_subspace():
    teacher, student, sae, batches = planted()
    cfg = SurvivalConfig(tokens=8000, fit_fraction=0.5, ridge=1e-6, max_norm_ratio=0)
    result = job.survival(teacher, [student], [sae], batches, cfg)
    s = by_model(result, "projected")
    assert list(np.flatnonzero(s["survived"])) == INSIDE
    assert np.all(s["r2"][INSIDE] > 0.999)
    outside = np.setdiff1d(np.arange(D), INSIDE)
    assert np.all(s["r2"][outside] < 0.05)  # the map can only predict their mean
    assert np.all(s["fire_recall"][INSIDE] > 0.99) and np.all(s["fire_precision"][INSIDE] > 0.99)
    row = next(r for r in result.rows if r["model"] == "projected")
    assert row["survived"] == len(INSIDE) and row["measured"] == D and row["map_r2"] < 0.6
    # ranks come from importance measured on the same tokens: feature 0 is the most important
    assert list(np.argsort(s["rank"])[:3]) == [0, 1, 2]
    assert result.summary["importance_source"] == "measured"
    assert result.summary["tokens"] == {"fit": 4000, "measured": 4000}


def test_teacher_against_itself_scores_one_everywhere():
    teacher, student, sae, batches = planted(seed=1)
    result = job.survival(teacher, [student], [sae], batches, SurvivalConfig(tokens=4000, max_norm_ratio=0))
    t = by_model(result, "teacher")
    assert np.all(t["r2"] == 1.0) and np.all(t["fire_recall"] == 1.0) and np.all(t["fire_precision"] == 1.0)
    assert t["survived"].all() and set(t["role"]) == {"teacher"} and set(t["width"]) == {D}
    row = next(r for r in result.rows if r["role"] == "teacher")
    assert row["map_r2"] == 1.0 and row["mass_kept"] == 1.0 and row["spearman"] is None  # r2 is constant


def test_teacher_as_its_own_student_through_a_fitted_map_scores_one():
    teacher, _, sae, batches = planted(seed=2)
    twin = ModelActs("twin", "student", D, teacher.forward)
    result = job.survival(teacher, [twin], [sae], batches, SurvivalConfig(tokens=4000, ridge=0, max_norm_ratio=0))
    s = by_model(result, "twin")
    assert np.all(s["r2"] > 1 - 1e-5) and s["survived"].all()


def test_staircase_summary_counts_follow_the_definitions():
    teacher, student, sae, batches = planted(seed=3)
    cfg = SurvivalConfig(tokens=6000, ridge=1e-6, max_norm_ratio=0, capacity="naive")  # F_S = d_S = 4
    result = job.survival(teacher, [student], [sae], batches, cfg)
    s = by_model(result, "projected")
    row = next(r for r in result.rows if r["model"] == "projected")
    assert row["F_S"] == 4 and list(np.flatnonzero(s["predicted_kept"])) == list(np.flatnonzero(s["rank"] < 4))
    pk, sv = s["predicted_kept"], s["survived"]
    assert row["kept_agree"] == pytest.approx((pk & sv).sum() / pk.sum())
    assert row["lost_agree"] == pytest.approx((~pk & ~sv).sum() / (~pk).sum())
    imp = s["importance"]
    assert row["mass_kept"] == pytest.approx(imp[sv].sum() / imp.sum())
    assert row["survived_at"]["0.5"] == row["survived"] == 4
    assert row["g_measured"] == pytest.approx(1.0)


def test_unmeasured_features_never_survive():
    teacher, student, sae, batches = planted(seed=4)
    cfg = SurvivalConfig(tokens=4000, ridge=1e-6, max_norm_ratio=0, min_fires=10**6)
    s = by_model(job.survival(teacher, [student], [sae], batches, cfg), "projected")
    assert not s["measured"].any() and not s["survived"].any()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"fit_fraction": 1.0}, "--fit-fraction"),
        ({"tokens": 2}, "--tokens"),
        ({"threshold": 2.0}, "--threshold"),
        ({"min_fires": 0}, "--min-fires"),
        ({"ridge": -1.0}, "--ridge"),
    ],
)
def test_config_errors_name_the_option(kw, message):
    with pytest.raises(BadInput, match=message):
        SurvivalConfig(**kw)


def test_too_little_text_is_a_bad_input():
    teacher, student, sae, batches = planted()
    with pytest.raises(BadInput, match="--tokens"):
        job.survival(teacher, [student], [sae], batches[:1], SurvivalConfig(tokens=10_000, max_norm_ratio=0))


# ------------------------------------------------------------------------------------------ the CLI, tiny model

WORDS = "the a river stone light garden north winter music paper quiet bright slowly window market".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny teacher (4 blocks, d 32), text with enough held-out documents, and a random SAE at layer 2."""
    root = tmp_path_factory.mktemp("survival")
    make_model_dir(root / "model", "llama")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 40)))) + "." for _ in range(3000)]
    (root / "text.txt").write_text("\n\n".join(docs) + "\n")
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(64, 32, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    t = {"W_enc": w_dec.t().contiguous(), "b_enc": torch.zeros(64), "W_dec": w_dec, "b_dec": torch.zeros(32)}
    save_kdtool(root / "saes" / "layer2", t, cfg=saelens_cfg(32, 64, layer=2), kdtool={"layer": 2}, provenance=None)
    return root


def test_cli_teacher_as_student_survives_and_file_describes_itself(cli, tmp_path, tiny):
    out = tmp_path / "survival.parquet"
    r = cli(
        "--json", "survival", "--model", tiny / "model", "--device", "cpu", "--dataset", tiny / "text.txt",
        "--seq-len", "32", "--sae", tiny / "saes", "--students", tiny / "model", "--tokens", "2K", "-o", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = formats.parquet_metadata(out)
    assert meta["kind"] == "kdtool.survival" and meta["provenance"]["params"]["command"] == "kdtool survival"
    summary = meta["summary"]
    assert summary["data"]["holdout"] == "eval" and summary["tokens"] == {"fit": 1000, "measured": 1000}
    assert summary["importance_source"] == "measured" and summary["config"]["ridge"] is None  # auto
    cols = formats.read_table(out)
    assert set(cols) == set(COLUMNS) and len(cols["feature"]) == 2 * 64
    printed = json.loads(r.stdout)
    rows = {row["model"]: row for row in printed["rows"]}
    assert set(rows) == {"teacher", "model"} and rows["teacher"]["width"] == 32
    assert rows["teacher"]["survived"] == rows["teacher"]["measured"] > 0
    assert rows["model"]["survived"] == rows["model"]["measured"]  # the same network through a fitted map
    assert rows["model"]["map_r2"] > 0.999


def test_cli_reads_a_distill_folder_and_a_stats_file(cli, tmp_path, tiny):
    from transformers import AutoConfig, AutoTokenizer

    from kdtool.distill.students import StudentPolicy, build_student

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    config = AutoConfig.from_pretrained(tiny / "model")
    # a distill-shaped folder of two losses: width{W}/ (kl) and width{W}-tvd/, each with config.json, the
    # teacher's tokenizer and the kdtool.json distill writes (its floors row names the loss and the seed)
    for w, loss in ((16, "kl"), (8, "tvd"), (8, "kl")):
        folder = tmp_path / "students" / (f"width{w}" + ("" if loss == "kl" else f"-{loss}"))
        build_student(config, w, StudentPolicy(heads="head-dim:4")).save_pretrained(folder)
        tok.save_pretrained(folder)
        info = {"kind": "kdtool.distill.student", "floor": {"width": w, "loss": loss, "seed": 3}}
        formats.write_json(folder / "kdtool.json", info)
    (tmp_path / "students" / "notes").mkdir()  # not a student: ignored
    stats = tmp_path / "stats.parquet"
    common = ["--model", tiny / "model", "--device", "cpu", "--dataset", tiny / "text.txt", "--seq-len", "32"]
    r = cli("stats", "--sae", tiny / "saes", *common, "--tokens", "2K", "-o", stats)
    assert r.exit_code == 0, r.output
    out = tmp_path / "survival.parquet"
    r = cli("--json", "survival", *common, "--sae", tiny / "saes", "--students", tmp_path / "students",
            "--stats", stats, "--tokens", "2K", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    got = [(row["model"], row["width"], row["loss"]) for row in rows]  # narrowest first, kl first at a width
    assert got == [("teacher", 32, None), ("width8", 8, "kl"), ("width8-tvd", 8, "tvd"), ("width16", 16, "kl")]
    summary = formats.parquet_metadata(out)["summary"]
    assert summary["importance_source"] == "stats" and summary["layers"]["2"]["importance_source"] == f"stats {stats}"
    st = formats.read_table(stats)
    cols = formats.read_table(out)
    teacher = np.asarray([m == "teacher" for m in cols["model"]])
    np.testing.assert_allclose(np.asarray(cols["importance"])[teacher], st["importance"])
    for row in rows:  # F_S = floor(d_S g(alpha)) with the stats file's alpha, capped at F
        layer = summary["layers"]["2"]
        assert row["F_S"] == min(int(np.floor(row["width"] * layer["g"] + 1e-9)), layer["F"])
    assert [(r["loss"], r["seed"]) for r in summary["rows"]] == [(None, None), ("kl", 3), ("tvd", 3), ("kl", 3)]
    tvd = np.asarray([m == "width8-tvd" for m in cols["model"]])
    assert set(np.asarray(cols["loss"])[tvd]) == {"tvd"} and set(np.asarray(cols["seed"])[tvd]) == {3}
    assert set(np.asarray(cols["loss"])[teacher]) == {None}


def test_stats_of_several_saes_give_the_rows_of_the_sae_measured(cli, tmp_path, tiny):
    """A stats file of two SAEs at layer 2 (issue 10): survival ranks by the rows of its own --sae."""
    g = torch.Generator().manual_seed(1)
    w_dec = torch.randn(64, 32, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    t = {"W_enc": w_dec.t().contiguous(), "b_enc": torch.zeros(64), "W_dec": w_dec, "b_dec": torch.zeros(32)}
    other = tmp_path / "other" / "layer2"
    save_kdtool(other, t, cfg=saelens_cfg(32, 64, layer=2), kdtool={"layer": 2}, provenance=None)
    common = ["--model", tiny / "model", "--device", "cpu", "--dataset", tiny / "text.txt", "--seq-len", "32"]
    stats = tmp_path / "stats.parquet"
    r = cli("stats", "--sae", other, "--sae", tiny / "saes" / "layer2", *common, "--tokens", "2K", "-o", stats)
    assert r.exit_code == 0, r.output
    st = formats.read_table(stats)
    assert len(set(st["sae"])) == 2
    out = tmp_path / "survival.parquet"
    r = cli("survival", *common, "--sae", tiny / "saes" / "layer2", "--students", tiny / "model", "--stats", stats,
            "--tokens", "2K", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    cols = formats.read_table(out)
    teacher = np.asarray([m == "teacher" for m in cols["model"]])
    mine = np.asarray(st["sae"]) == next(k for k in set(st["sae"]) if "other" not in k)
    np.testing.assert_allclose(np.asarray(cols["importance"])[teacher], np.asarray(st["importance"])[mine])


def test_cli_errors_are_one_line(cli, tmp_path, tiny):
    base = ["survival", "--model", tiny / "model", "--device", "cpu", "--dataset", tiny / "text.txt"]
    r = cli(*base, "--sae", tiny / "saes", "--students", tmp_path / "missing", "-o", tmp_path / "s.parquet")
    assert r.exit_code == 2 and "--students" in r.output and "Traceback" not in r.output
    r = cli(*base, "--sae", tiny / "saes", "--students", tiny / "model", "-o", tmp_path / "s.csv")
    assert r.exit_code == 2 and "Parquet" in r.output
    r = cli(*base, "--sae", tiny / "saes", "--students", tiny / "model", "--fit-fraction", "0", "-o",
            tmp_path / "s.parquet")  # fmt: skip
    assert r.exit_code == 2 and "--fit-fraction" in r.output
    assert not (tmp_path / "s.parquet").exists()


# ------------------------------------------------------------------------------------------ figure and report


@pytest.fixture
def planted_file(tmp_path):
    teacher, student, sae, batches = planted(seed=5)
    cfg = SurvivalConfig(tokens=4000, ridge=1e-6, max_norm_ratio=0, capacity="naive")  # F_S = d_S = 4
    result = job.survival(teacher, [student], [sae], batches, cfg)
    path = tmp_path / "run" / "survival.parquet"
    formats.write_parquet(path, result.columns, kind="kdtool.survival", provenance={}, summary=result.summary)
    return path, result


def test_figure_marks_f_s_and_puts_counts_against_width(planted_file, monkeypatch):
    from kdtool.plots import registry
    from kdtool.plots import style as st

    figures = []
    monkeypatch.setattr(st, "save", lambda fig, output, **kw: figures.append(fig))
    path, result = planted_file
    registry.draw("survival", [path], path.with_suffix(".png"))
    feature_ax, count_ax = figures[0].axes
    F_S = next(r["F_S"] for r in result.rows if r["role"] == "student")
    assert 0 < F_S < D and any(list(line.get_xdata()) == [F_S, F_S] for line in feature_ax.get_lines())
    assert feature_ax.get_xscale() == "log"
    points = {tuple(p) for line in count_ax.get_lines() if line.get_marker() in ("o", "s") for p in line.get_xydata()}
    assert points == {(len(INSIDE), len(INSIDE)), (D, D)}  # (width, survived): the student and the teacher
    import matplotlib.pyplot as plt

    plt.close(figures[0])


def test_report_draws_the_figure_and_tabulates_the_summary(cli, planted_file):
    path, result = planted_file
    r = cli("--quiet", "plot", "report", path.parent)
    assert r.exit_code == 0, r.output
    rep = formats.read_json(path.parent / "report" / "report.json")
    fig = next(f for f in rep["figures"] if f["figure"] == "survival")
    assert fig["file"] and fig["section"] == "Feature survival"
    table = next(t for t in rep["tables"] if t["key"] == "survival")
    got = {row[table["columns"].index("model")]: row[table["columns"].index("survived")] for row in table["rows"]}
    assert got == {"teacher": D, "projected": len(INSIDE)}


def test_students_of_two_losses_are_never_pooled(tmp_path, cli, monkeypatch):
    """The same subspace under two loss labels: ordered kl first, one count series per loss, a loss column."""
    import dataclasses

    from kdtool.plots import registry
    from kdtool.plots import style as st

    teacher, student, sae, batches = planted(seed=5)
    kl = dataclasses.replace(student, name="width4", loss="kl", seed=0)
    tvd = dataclasses.replace(student, name="width4-tvd", loss="tvd", seed=0)
    cfg = SurvivalConfig(tokens=4000, ridge=1e-6, max_norm_ratio=0, capacity="naive")
    result = job.survival(teacher, [tvd, kl], [sae], batches, cfg)
    got = [(r["model"], r["loss"]) for r in result.rows]
    assert got == [("teacher", None), ("width4", "kl"), ("width4-tvd", "tvd")]
    path = tmp_path / "run" / "survival.parquet"
    formats.write_parquet(path, result.columns, kind="kdtool.survival", provenance={}, summary=result.summary)
    assert list(formats.read_table(path)["loss"]).count("tvd") == D

    figures = []
    monkeypatch.setattr(st, "save", lambda fig, output, **kw: figures.append(fig))
    registry.draw("survival", [path], path.with_suffix(".png"))
    *feature_axes, count_ax = figures[0].axes
    assert ["tvd" in ax.get_title() for ax in feature_axes] == [False, True]
    labels = [line.get_label() for line in count_ax.get_lines() if line.get_marker() == "o"]
    assert labels == ["kl students: survived", "tvd students: survived"]
    import matplotlib.pyplot as plt

    plt.close(figures[0])

    r = cli("--quiet", "plot", "report", path.parent)
    assert r.exit_code == 0, r.output
    tables = formats.read_json(path.parent / "report" / "report.json")["tables"]
    table = next(t for t in tables if t["key"] == "survival")
    assert table["columns"][:4] == ["layer", "model", "d_S", "loss"] and "seed" not in table["columns"]
    assert [row[3] for row in table["rows"]] == [None, "kl", "tvd"] and "not pooled" in table["note"]
