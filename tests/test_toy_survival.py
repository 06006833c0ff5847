"""Per-feature survival in the toy (issue 11): the records, kept counts, the measured capacity, Eq. 2 on the measured
kept set, student widths beyond the teacher, and resume with the new records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.theory import theorem as theory
from kdtool.toy.chunk import SURVIVAL_COLUMNS, run_chunk
from kdtool.toy.config import Grid, ToyConfigKey, TrainConfig, settings_id, student_widths
from kdtool.toy.experiment import ExperimentConfig, run_experiment
from kdtool.toy.kept_capacity import fit_kept_capacity
from kdtool.toy.store import PartStore, survival_path
from kdtool.toy.survival import kept_mask, per_model, points, summarize_survival
from kdtool.toy.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TrainConfig(steps=60, batch_size=32, eval_samples=256, eval_points=3, lr=1e-2)
PLANT = TrainConfig(steps=400, batch_size=128, eval_samples=1024, lr=2e-2)


# ------------------------------------------------------------------------------------------ trained records


def test_a_student_at_least_as_wide_as_the_data_keeps_every_feature():
    key = ToyConfigKey(4, 5, 0.8)  # students d_S = 1..5: d_S = 4 and 5 are >= n
    surv = run_chunk([key], 3, PLANT)[key.slug]["survival"]
    models = per_model(surv)
    wide = models["student"] & (models["d_student"] >= 4)
    assert wide.sum() == 2 * 3 and np.all(models["kept"][wide] == 4)
    assert np.all(models["kept"][models["student"] & (models["d_student"] == 1)] < 4)  # a 1-d student cannot


def test_per_feature_losses_sum_to_each_models_floor():
    key = ToyConfigKey(6, 3, 0.9)
    out = run_chunk([key], 2, TINY)[key.slug]
    rows, surv = out["rows"], out["survival"]
    assert tuple(surv) == SURVIVAL_COLUMNS and set(np.unique(surv["feature"])) == set(range(1, 7))
    per_row = zip(rows["seed"], rows["d_student"], rows["floor_data"], rows["teacher_floor"], strict=True)
    for s, w, floor, teacher in per_row:
        mine = (surv["seed"] == s) & (surv["d_student"] == w) & (surv["role"] == "student")
        assert mine.sum() == 6
        assert surv["loss"][mine].sum() == pytest.approx(floor, rel=1e-12)
        assert surv["share"][mine].sum() == pytest.approx(1.0, rel=1e-12)
        own = (surv["seed"] == s) & (surv["role"] == "teacher")
        assert surv["loss"][own].sum() == pytest.approx(teacher, rel=1e-12)
    assert np.all(surv["rel_error"] >= 0)


# ------------------------------------------------------------------------------------------ planted records


def _records(models: list[tuple[int, int, float, int, int, str, list[int]]], rel_dropped: float = 1.0) -> dict:
    """Survival records of made-up models: (n, d_T, alpha, d_S, seed, role, kept features) each; kept features
    get rel_error 0 and a loss of 0, the others rel_error `rel_dropped` and the loss I_i E[x_i^2]."""
    cols: dict[str, list] = {c: [] for c in SURVIVAL_COLUMNS}
    for n, d_t, alpha, d_s, seed, role, kept in models:
        for i in range(1, n + 1):
            w = (1.0 / i) * (1 - alpha) / 3
            row = (n, d_t, alpha, d_s, seed, role, i, 1.0 / i, 0.0 if i in kept else w, 0.0, 0.0 if i in kept else 1)
            for c, v in zip(SURVIVAL_COLUMNS, row, strict=True):
                cols[c].append(v)
    out = {c: np.asarray(v) for c, v in cols.items()}
    out["rel_error"] = np.where(out["rel_error"] > 0, rel_dropped, 0.0)
    return out


def test_measured_kept_predictor_is_eq2_when_the_kept_set_is_the_top_F_S():
    models = []
    for alpha in (0.8, 0.95):
        g = theory.g(alpha)
        for d_s in (1, 2, 3):
            f_s = theory.features_kept(d_s, g, 30)
            models.append((30, 5, alpha, d_s, 0, "student", list(range(1, f_s + 1))))
        models.append((30, 5, alpha, 5, 0, "teacher", list(range(1, 31))))
    per = per_model(_records(models))
    s = per["student"]
    np.testing.assert_allclose(per["pred_measured_kept"][s], per["pred_refined"][s], rtol=1e-12)
    assert np.all(per["pred_refined"][s] > 0) and np.all(per["top_k"][s])
    # the floor the records charge is exactly that mass too (dropped features cost I_i E[x_i^2] here)
    np.testing.assert_allclose(per["floor"][s], per["pred_refined"][s], rtol=1e-12)
    # keep feature 2 instead of feature 1: Eq. 2 on the measured set charges w_1 - w_2 more; A2 is broken
    swapped = per_model(_records([(30, 5, 0.8, 1, 0, "student", [2, 3]), (30, 5, 0.8, 5, 0, "teacher", [])]))
    top = per_model(_records([(30, 5, 0.8, 1, 0, "student", [1, 2, 3]), (30, 5, 0.8, 5, 0, "teacher", [])]))
    w1 = 0.2 / 3
    assert swapped["pred_measured_kept"][swapped["student"]][0] == pytest.approx(
        top["pred_measured_kept"][top["student"]][0] + w1
    )
    assert not swapped["top_k"][swapped["student"]][0]


def test_kept_counts_follow_the_threshold_and_a_feature_that_never_fired_is_not_kept():
    rel = np.array([0.05, 0.3, 0.6, 0.95, np.nan])
    assert kept_mask(rel, 0.5).tolist() == [True, True, False, False, False]
    assert kept_mask(rel, 0.1).sum() == 1 and kept_mask(rel, 1.0).sum() == 4
    rec = _records([(10, 3, 0.9, 2, 0, "student", [1, 2, 3]), (10, 3, 0.9, 3, 0, "teacher", [1, 2, 3, 4])], 0.7)
    assert per_model(rec, 0.5)["kept"].tolist() == [4, 3] and per_model(rec, 0.8)["kept"].tolist() == [10, 10]


def test_g_meas_recovers_a_planted_capacity_law_and_ignores_students_limited_by_their_teacher():
    k, p = 1.2, 0.5
    models = []
    for alpha in (0.8, 0.9, 0.95, 0.99):
        g_hat = k * theory.g(alpha) ** p
        teacher_keeps = round(6 * g_hat)  # a width-6 teacher
        models.append((200, 6, alpha, 6, 0, "teacher", list(range(1, teacher_keeps + 1))))
        for d_s in range(1, 10):  # students wider than the teacher copy it: kept = what the teacher keeps
            kept = min(round(d_s * g_hat), teacher_keeps)
            models.append((200, 6, alpha, d_s, 0, "student", list(range(1, kept + 1))))
    fit = fit_kept_capacity(points(per_model(_records(models))), "teacher")
    for entry in fit["per_alpha"]:
        assert max(w["d_student"] for w in entry["by_width"]) <= 5  # d_S >= 6 keep all the teacher keeps
        assert entry["g_meas"] == pytest.approx(k * theory.g(entry["alpha"]) ** p, rel=0.05)
    assert fit["power_law"]["k"] == pytest.approx(k, rel=0.05) and fit["power_law"]["p"] == pytest.approx(p, abs=0.02)
    # trained on the data instead, the ceiling is n = 200: every width counts
    data_fit = fit_kept_capacity(points(per_model(_records(models))), "data")
    assert max(w["d_student"] for w in data_fit["per_alpha"][0]["by_width"]) == 9


def test_summary_scores_the_measured_kept_predictor_next_to_eq2_on_the_same_points():
    models = []
    for alpha in (0.8, 0.9):
        for d_s in (1, 2, 3, 4):
            models.append((20, 4, alpha, d_s, 0, "student", list(range(1, 2 * d_s + 1))))  # 2 features per dim
        models.append((20, 4, alpha, 4, 0, "teacher", list(range(1, 9))))
    summary = summarize_survival(_records(models), 0.5, "teacher")
    pred = summary["measured_kept_predictor"]["data_points"]
    assert pred["measured_kept"]["median_accuracy"] == pytest.approx(1.0)  # the records' floors are exactly Eq. 2's
    assert pred["refined"]["points"] == pred["measured_kept"]["points"] == pred["points"] > 0
    assert pred["refined"]["median_accuracy"] < 1.0  # g(alpha) > 2: Eq. 2 keeps more, predicts lower floors
    assert summary["kept_below_F_S"][0] == summary["points"] == 8
    law = summary["capacity"]["power_law"]
    assert law["p"] == pytest.approx(0.0, abs=1e-9) and law["k"] == pytest.approx(2.0)  # 2 per dim at every alpha
    assert [t["threshold"] for t in summary["threshold_sensitivity"]] == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert len(summary["point_list"]) == 8 and summary["top_k_share"] == 1.0


# ------------------------------------------------------------------------------------------ widths and resume


def test_student_width_policies():
    assert student_widths(ToyConfigKey(40, 10, 0.8)) == list(range(1, 11))
    d_star = 40 / theory.g(0.8)  # 12.9
    assert student_widths(ToyConfigKey(40, 10, 0.8), "to-dstar") == list(range(1, math.ceil(d_star) + 2))
    assert student_widths(ToyConfigKey(80, 3, 0.99), "to-dstar") == [1, 2, 3, 4, 5]  # d* = 3.7
    assert student_widths(ToyConfigKey(80, 10, 0.99), "to-dstar") == list(range(1, 11))  # never fewer than d_T
    assert student_widths(ToyConfigKey(10, 3, 0.9), (4, 1, 2, 2)) == [1, 2, 4]
    grid = Grid((10,), (3,), (0.8,), 2, "to-dstar")
    assert grid.models() == 2 * (5 + 1)  # d* = 3.2: widths 1..5, and the teacher
    with pytest.raises(BadInput, match="--student-widths"):
        Grid((10,), (3,), (0.8,), 2, "wide")
    ids = {settings_id(TINY, 2, w) for w in ("teacher", "to-dstar", (1, 2))}
    assert len(ids) == 3  # a part made under another width policy is refused on --resume


def test_widths_beyond_the_teacher_train_alone_or_batched_with_other_widths():
    a, b = ToyConfigKey(12, 2, 0.8), ToyConfigKey(12, 2, 0.99)  # to-dstar: 1..5 and 1..2
    alone = run_chunk([a], 2, TINY, "to-dstar")[a.slug]
    together = run_chunk([a, b], 2, TINY, "to-dstar")
    assert sorted(set(alone["rows"]["d_student"])) == [1, 2, 3, 4, 5]
    assert sorted(set(together[b.slug]["rows"]["d_student"])) == [1, 2]
    np.testing.assert_allclose(alone["rows"]["floor_data"], together[a.slug]["rows"]["floor_data"], rtol=1e-5)
    np.testing.assert_allclose(alone["survival"]["loss"], together[a.slug]["survival"]["loss"], rtol=1e-5, atol=1e-12)


def _experiment(out, widths="teacher", **kwargs):
    grid = Grid((6,), (2, 3), (0.9,), 2, widths)
    return ExperimentConfig(output=out, grid=grid, train=TINY, workers=1, **kwargs)


def test_resume_refuses_parts_of_another_width_policy_and_retrains_a_configuration_without_survival(tmp_path):
    out = tmp_path / "toy.parquet"
    run_sweep(Grid((6,), (2,), (0.9,), 2), TINY, PartStore(out, settings_id(TINY, 2), {}), workers=1)
    with pytest.raises(BadInput, match="different training settings"):
        run_experiment(_experiment(out, "to-dstar", resume=True), {})
    (tmp_path / "toy.parquet.parts" / "n6-dT2-a0.900000.survival.parquet").unlink()  # killed between two writes
    again = run_experiment(_experiment(out, resume=True), {})
    assert again.summary["models_trained_now"] == 2 * 3 + 2 * 4  # the half-written configuration ran again
    # an output whose survival file is gone (a toy.parquet from before survival records): trained again
    survival_path(out).unlink()
    assert run_experiment(_experiment(out, resume=True), {}).summary["models_trained_now"] == 14
    full = run_experiment(_experiment(out, resume=True), {})
    assert full.summary["models_trained_now"] == 0 and survival_path(out).exists()
    surv = formats.read_table(survival_path(out))
    assert set(surv["kept"].tolist()) <= {True, False} and len(surv["kept"]) == 2 * (3 + 4) * 6
    meta = formats.parquet_metadata(survival_path(out))
    assert meta["kind"] == "kdtool.toy.survival" and meta["summary"]["kept_threshold"] == 0.5


def test_kept_threshold_is_recorded_and_refused_outside_zero_one(tmp_path):
    with pytest.raises(BadInput, match="--kept-threshold"):
        _experiment(tmp_path / "t.parquet", kept_threshold=1.5)
    res = run_experiment(_experiment(tmp_path / "t.parquet", kept_threshold=0.25), {})
    surv = formats.read_table(survival_path(tmp_path / "t.parquet"))
    np.testing.assert_array_equal(surv["kept"], kept_mask(surv["rel_error"], 0.25))
    assert res.summary["survival"]["kept_threshold"] == 0.25
    # the threshold is not a training setting: a resumed run recounts the same records at another one
    again = run_experiment(_experiment(tmp_path / "t.parquet", kept_threshold=0.75, resume=True), {})
    assert again.summary["models_trained_now"] == 0
    surv = formats.read_table(survival_path(tmp_path / "t.parquet"))
    np.testing.assert_array_equal(surv["kept"], kept_mask(surv["rel_error"], 0.75))


def test_the_report_draws_the_survival_figures_of_a_toy_sweep(tmp_path):
    from kdtool.report import discover, figures

    run_experiment(_experiment(tmp_path / "toy.parquet"), {"command": "kdtool toy"})
    arts, notes = discover.discover(tmp_path)
    assert sorted(a.kind for a in arts) == ["kdtool.toy", "kdtool.toy.survival"] and notes == []
    jobs, _ = figures.plan_figures(arts)
    planned = {j.rule.figure: [a.kind for a in j.inputs] for j in jobs}
    assert planned["toy-survival"] == planned["toy-kept"] == ["kdtool.toy.survival"]
    from kdtool.report.tables import build_tables

    tables, notes = build_tables(arts)
    (surv,) = [t for t in tables if t.key == "toy_survival"]
    assert notes == [] and [r[0] for r in surv.rows] == ["0.9"] and surv.rows[0][1] == pytest.approx(theory.g(0.9))


def test_summarize_refuses_survival_records_of_another_sweep(tmp_path):
    from kdtool.toy.stats import summarize_file

    a, b = tmp_path / "a" / "toy.parquet", tmp_path / "b" / "toy.parquet"
    run_experiment(_experiment(a), {})
    run_experiment(ExperimentConfig(output=b, grid=Grid((6,), (2,), (0.9,), 1), train=TINY, workers=1), {})
    assert summarize_file(a, kept_threshold=0.25)["survival"]["kept_threshold"] == 0.25
    survival_path(a).write_bytes(survival_path(b).read_bytes())
    with pytest.raises(BadInput, match="made by another sweep"):
        summarize_file(a)


def test_a_killed_to_dstar_sweep_resumes_to_the_fresh_result(tmp_path):
    out, fresh = tmp_path / "k" / "toy.parquet", tmp_path / "f" / "toy.parquet"
    grid = Grid((12,), (2,), (0.8, 0.99), 2, "to-dstar")  # widths 1..5 and 1..2: both beyond d_T = 2 or at it
    store = PartStore(out, settings_id(TINY, 2, "to-dstar"), {})
    run_sweep(grid, TINY, store, workers=1, pending=[grid.keys()[0]])  # killed after its first configuration
    resumed = run_experiment(ExperimentConfig(output=out, grid=grid, train=TINY, workers=1, resume=True), {})
    assert resumed.summary["models_trained_now"] == grid.models(grid.keys()[1:])
    run_experiment(ExperimentConfig(output=fresh, grid=grid, train=TINY, workers=1), {})
    for path in (lambda p: p, survival_path):
        a, b = formats.read_table(path(out)), formats.read_table(path(fresh))
        assert list(a) == list(b)
        for col in a:
            if a[col].dtype.kind == "f":
                np.testing.assert_allclose(a[col], b[col], rtol=1e-6, atol=1e-12)
            else:
                np.testing.assert_array_equal(a[col], b[col])
