"""The objective ablation: pooling floors over seeds and runs, the verdict per width, its figure and report section."""

from __future__ import annotations

import numpy as np
import pytest
from test_distill import captured  # noqa: F401 (a fixture: keeps the figures a plot function saves)

from kdtool import formats
from kdtool.distill import ablation
from kdtool.report.build import build_report

CONFIG = {"temperature": 2.0, "steps": 100, "batch_size": 4, "seq_len": 16, "run_key": {"teacher": "t"}}


def floors_table(path, seed, rows, *, n_evals=3, floor_std=0.001, **config):
    """A floors.parquet of (loss, width, floor) rows, as `kdtool distill --seed SEED` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    formats.write_parquet(
        path,
        {
            "width": [w for _, w, _ in rows],
            "loss": [loss for loss, _, _ in rows],
            "floor": [f for _, _, f in rows],
            "floor_std": [floor_std] * len(rows),
            "n_evals": [n_evals] * len(rows),
            "seed": [seed] * len(rows),
        },
        kind="kdtool.distill.floors",
        # as distill records it: the data's shuffle seed is the run's --seed
        summary={
            "config": CONFIG | {"seed": seed, "run_key": {"teacher": "t", "data": {"x": "d", "seed": seed}}} | config
        },
    )
    return path


@pytest.fixture
def two_seeds(tmp_path):
    a = floors_table(tmp_path / "s0" / "floors.parquet", 0,
                     [("kl", 8, 1.00), ("tvd", 8, 0.90), ("kl", 16, 0.80), ("tvd", 16, 0.81)])  # fmt: skip
    b = floors_table(tmp_path / "s1" / "floors.parquet", 1,
                     [("kl", 8, 1.02), ("tvd", 8, 0.91), ("kl", 16, 0.82), ("tvd", 16, 0.80)])  # fmt: skip
    return a, b


def test_seed_repeats_pool_and_the_verdict_compares_the_gap_with_the_spreads(two_seeds):
    a, b = two_seeds
    assert ablation.group_tables([a, b]) == [[a, b]]
    lf = {(f.loss, f.width): f for f in ablation.loss_floors(ablation.pooled([a, b]))}
    kl8, tvd8 = lf[("kl", 8)], lf[("tvd", 8)]
    assert kl8.floor == pytest.approx(1.01) and kl8.seeds == 2 and kl8.spread_source == "seeds"
    assert kl8.spread == pytest.approx(np.std([1.00, 1.02], ddof=1))
    v8, v16 = ablation.verdicts(list(lf.values()))
    assert (v8.best, v8.runner_up) == ("tvd", "kl") and v8.gap == pytest.approx(0.105)
    assert v8.threshold == pytest.approx(kl8.spread + tvd8.spread) and v8.below is True
    assert v8.text().startswith("yes: tvd is 0.105 below kl")
    assert v16.below is False and v16.gap == pytest.approx(0.005) and v16.text().startswith("no:")


def test_one_seed_uses_the_evaluation_spread_and_says_when_there_is_none(tmp_path):
    one = floors_table(tmp_path / "a" / "floors.parquet", 0, [("kl", 8, 1.0), ("jsd:0.5", 8, 0.99)], floor_std=0.02)
    (v,) = ablation.verdicts(ablation.loss_floors(ablation.pooled([one])))
    assert v.spread_source == "evaluations" and v.threshold == pytest.approx(0.04) and v.below is False
    single = floors_table(tmp_path / "b" / "floors.parquet", 0, [("kl", 8, 1.0), ("tvd", 8, 0.5)], n_evals=1)
    (v,) = ablation.verdicts(ablation.loss_floors(ablation.pooled([single])))
    assert v.below is None and v.text().startswith("undetermined")


def test_runs_pool_only_when_comparable_and_repeated_students_count_once(tmp_path, two_seeds):
    a, b = two_seeds
    longer = floors_table(tmp_path / "long" / "floors.parquet", 0, [("kl", 8, 0.5)], steps=1000)
    again = floors_table(tmp_path / "again" / "floors.parquet", 0, [("kl", 8, 1.00), ("hidden", 8, 0.95)])
    assert ablation.group_tables([a, longer, b, again]) == [[a, b, again], [longer]]
    rows = ablation.pooled([a, b, again])
    assert len([r for r in rows if (r.loss, r.width, r.seed) == ("kl", 8, 0)]) == 1
    assert {r.loss for r in rows} == {"kl", "tvd", "hidden"}
    old = tmp_path / "old.parquet"  # a floors table from before --loss: all kl, no seed column
    formats.write_parquet(old, {"width": [8], "floor": [1.0]}, kind="kdtool.distill.floors")
    assert [(r.loss, r.seed) for r in ablation.read_rows(old)] == [("kl", 0)]


def test_floors_figure_draws_one_line_per_loss_with_seed_bars_and_the_predicted_floor(two_seeds, tmp_path, captured):  # noqa: F811
    from kdtool.plots import distill_floors

    pred = tmp_path / "predict.parquet"
    formats.write_parquet(pred, {"layer": [1, 1], "width": [8, 16], "floor": [0.1, 0.05], "floor_kl": [0.9, 0.7]},
                          kind="kdtool.predict")  # fmt: skip
    distill_floors.floors([*two_seeds, pred], tmp_path / "x.png", style="paper", options={})
    ax = captured[0].axes[0]
    (legend,) = [a.get_legend() for a in captured[0].axes if a.get_legend()]  # one legend, below the panel
    labels = [t.get_text() for t in legend.get_texts()]
    assert "kl" in labels and "tvd" in labels and "std over 2 seeds" in " ".join(labels)
    assert "predicted, layer 1 (calibrated)" in labels
    kl = [c for c in ax.containers if c.get_label() == "kl"][0]
    np.testing.assert_allclose(kl.lines[0].get_ydata(), [1.01, 0.81])
    segments = kl.lines[2][0].get_segments()  # the error bar of width 8: mean +- seed std
    half = np.std([1.00, 1.02], ddof=1)
    np.testing.assert_allclose([segments[0][0][1], segments[0][1][1]], [1.01 - half, 1.01 + half])


def test_report_has_an_objective_ablation_section_only_for_several_losses(two_seeds, tmp_path):
    run = two_seeds[0].parent.parent
    report = build_report(run, tmp_path / "report")
    figs = [f for f in report.figures if f.section == "Objective ablation"]
    assert [f.figure for f in figs] == ["objective-ablation"] and figs[0].file
    (table,) = [t for t in report.tables if t.key == "objective_ablation"]
    assert table.columns[:3] == ["d_S", "kl", "tvd"]
    assert table.rows[0][0] == 8 and table.rows[0][-1].startswith("yes: tvd") and table.rows[1][-1].startswith("no:")
    assert "std over 2 seeds" in table.note
    floors = [t for t in report.tables if t.key == "distill_floors"]  # Table 3 names each row's loss
    assert floors and all({r[floors[0].columns.index("loss")] for r in t.rows} == {"kl", "tvd"} for t in floors)
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Objective ablation" in html and "1.0100 ± 0.0141" in html
    kl_only = tmp_path / "kl"
    floors_table(kl_only / "students" / "floors.parquet", 0, [("kl", 8, 1.0), ("kl", 16, 0.8)])
    report = build_report(kl_only, tmp_path / "report2")
    assert not [f for f in report.figures if f.section == "Objective ablation"]
    assert not [t for t in report.tables if t.key == "objective_ablation"]
