"""kdtool toy's driver without the CLI: run_experiment (resume, stale parts, progress, the merge), its config,
check_convergence and summarize_file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.toy.config import Grid, TrainConfig, settings_id
from kdtool.toy.experiment import ExperimentConfig, check_convergence, run_experiment
from kdtool.toy.stats import summarize_file
from kdtool.toy.store import PartStore
from kdtool.toy.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TrainConfig(steps=60, batch_size=32, eval_samples=256, eval_points=3, lr=1e-2)


def _experiment(out, train=TINY, **kwargs):
    return ExperimentConfig(output=out, grid=Grid((6,), (2, 3), (0.9,), 2), train=train, workers=1, **kwargs)


def test_run_experiment_trains_what_is_pending_and_reports_progress_as_data(tmp_path):
    out = tmp_path / "toy.parquet"
    said, seen = [], []
    result = run_experiment(
        _experiment(out, fit_capacity=True),
        {"command": "test"},
        notify=lambda *m: said.append(m),
        on_progress=seen.append,
    )
    s = result.summary
    assert s["configs"] == 2 and s["models_trained_now"] == 2 * (3 + 4) and s["floor_column"] == "floor_data"
    assert "fit_capacity" in s and "curves" not in s and s["workers"] == 1 and s["output"] == str(out)
    np.testing.assert_array_equal(result.table["floor"], formats.read_table(out)["floor_data"])
    assert formats.parquet_metadata(out)["summary"]["settings"] == settings_id(TINY, 2)
    assert not (tmp_path / "toy.parquet.parts").exists()
    line = f"toy sweep: 2 configurations x 2 seeds = 14 models (0 configurations already done), {TINY.steps} steps"
    assert said[0] == ("info", f"{line}, batch {TINY.batch_size}, 1 workers -> {out}")
    # one alpha: the fits are in the summary, but a power law across alphas (the capacity file) cannot be made
    why = f"{out}: a power law needs measured capacities at 2 or more alphas, got 1"
    assert said[1:] == [("warning", f"no capacity file written: {why}")]
    assert "capacity_file" not in s and not (tmp_path / "toy.capacity.json").exists()
    # progress in work units: starts at 0 of the whole grid, ends at all of it, one report per configuration
    assert [p.configs_done for p in seen] == [0, 1, 2] and seen[0].done == 0 and seen[-1].done == seen[-1].total
    assert seen[0].models_per_second is None and seen[-1].models_per_second > 0
    # a resumed run trains nothing and keeps the rows; --measure distill picks the other floor
    again = run_experiment(_experiment(out, resume=True, measure="distill"), {})
    assert again.summary["models_trained_now"] == 0 and again.summary["floor_column"] == "floor_distill"
    np.testing.assert_array_equal(again.table["floor"], result.table["floor_distill"])


def test_run_experiment_discards_stale_parts_unless_resumed_and_warns_about_missing_curves(tmp_path):
    out = tmp_path / "toy.parquet"
    store = PartStore(out, settings_id(TINY, 2), {})
    run_sweep(Grid((6,), (2,), (0.9,), 2), TINY, store, workers=1)  # a killed run: one part, no curves
    with pytest.raises(BadInput, match="different training settings"):
        run_experiment(_experiment(out, train=replace(TINY, lr=0.5), resume=True), {})
    said = []
    cfg = _experiment(out, train=replace(TINY, curve_points=3), resume=True, log_curves=True)  # curves: not a setting
    result = run_experiment(cfg, {}, notify=lambda *m: said.append(m))
    assert said[0] == (
        "warning",
        "some resumed configurations have no training curves (they were run without --log-curves)",
    )
    assert result.summary["models_trained_now"] == 2 * 4  # only d_T = 3 was pending
    assert result.summary["curves"] == str(tmp_path / "toy.curves.parquet")
    run_sweep(Grid((6,), (2,), (0.9,), 2), TINY, PartStore(out, settings_id(TINY, 2), {}), workers=1)
    fresh = []
    run_experiment(_experiment(out), {}, notify=lambda *m: fresh.append(m))
    parts = tmp_path / "toy.parquet.parts"
    # two part files for the one configuration: its rows and its survival records
    assert fresh[0] == ("info", f"discarded 2 part files of an earlier run in {parts} (--resume keeps them)")


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"log_curves": True}, "--curve-points must be >= 2, got 0"),
        ({"workers": 0}, "--workers must be >= 1"),
        ({"output": "toy.csv"}, "the toy table is Parquet"),
        ({"measure": "teacher"}, "--measure"),
    ],
)
def test_experiment_config_refuses_bad_settings(tmp_path, kwargs, needle):
    base = {"output": tmp_path / "t.parquet", "grid": Grid((6,), (2,), (0.9,), 1), "train": TINY}
    with pytest.raises(BadInput, match=needle):
        ExperimentConfig(**{**base, **kwargs})


def test_experiment_config_records_the_grid_as_given(tmp_path):
    cfg = ExperimentConfig(output=tmp_path / "t.parquet", grid=Grid((20, 10), (3,), (0.9,), 2), train=TINY)
    assert cfg.workers >= 1  # default: one per core
    grid = {"n": [20, 10], "d_teacher": [3], "alpha": [0.9], "seeds": 2, "student_widths": "teacher"}
    assert cfg.settings() == {"grid": grid, **TINY.to_dict(), "kept_threshold": 0.5}


def test_check_convergence_and_summarize_file(tmp_path):
    said, counts = [], []
    check = check_convergence(
        _experiment(tmp_path / "c.parquet"),
        1,
        notify=lambda *m: said.append(m),
        on_progress=lambda *c: counts.append(c),
    )
    assert said[0][1].startswith("convergence check: 1 configurations x 2 seeds at 60 and 120 steps")
    assert counts == [(0, 2), (1, 2), (2, 2)] and check["steps_doubled"] == 120
    assert not (tmp_path / "c.parquet").exists()
    out = tmp_path / "toy.parquet"
    run_experiment(_experiment(out), {"config": {"zipf_exponent": 1.0}})
    plain, distill = summarize_file(out), summarize_file(out, "distill", capacity_fit=True)
    assert plain["measure"] == "floor" and distill["measure"] == "floor_distill" and "fit_capacity" in distill
