"""`kdtool predict`: Table 2 through the CLI, stats files, output formats, --target-loss, --calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdtool.formats import parquet_metadata, read_table, write_json, write_parquet
from kdtool.theory import theorem as theory

PAPER = ["--features", "28665", "--alpha", "0.99238", "--g", "26.922"]
WIDTHS = "128,256,512,768,1024"


def rows_of(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_table2_through_the_cli(cli):
    out = rows_of(cli("--json", "predict", *PAPER, "--widths", WIDTHS))
    rows = out["rows"]
    assert [r["features_kept"] for r in rows] == [3446, 6892, 13784, 20676, 27568]
    assert [r["features_dropped"] for r in rows] == [25219, 21773, 14881, 7989, 1097]
    assert rows[0]["normalized"] == 1.0
    assert all(a["floor"] >= b["floor"] for a, b in zip(rows, rows[1:], strict=False))
    assert out["summary"]["layers"]["0"]["d_star"] == pytest.approx(28665 / 26.922)
    assert out["provenance"]["params"]["widths"] == WIDTHS


def test_l0_gives_table1_layer12(cli):
    out = rows_of(cli("--json", "predict", "--features", "28665", "--l0", "218.3", "--widths", "128"))
    info = out["summary"]["layers"]["0"]
    assert round(info["alpha"], 5) == 0.99238
    assert round(info["g"], 2) == 26.92
    assert round(info["d_star"]) == 1065
    assert out["rows"][0]["features_kept"] == 3445  # the unrounded g; Table 2's 3446 needs --g 26.922


def test_parametric_floor_is_the_toy_formula(cli):
    # F=50, alpha=0.9, zipf:1 -> w_i = (1/i) * (1-0.9)/3; g(0.9) = 4.343 -> F_S(3) = 13
    out = rows_of(cli("--json", "predict", "--features", "50", "--alpha", "0.9", "--widths", "1:4"))
    w = (1.0 / np.arange(1, 51)) * 0.1 / 3
    for r in out["rows"]:
        k = int(np.floor(r["width"] * theory.g(0.9)))
        assert r["features_kept"] == k
        assert r["floor"] == pytest.approx(w[k:].sum())


def test_naive_capacity_keeps_one_feature_per_dimension(cli):
    rows = rows_of(
        cli("--json", "predict", "--features", "100", "--alpha", "0.99", "--capacity", "naive", "--widths", "10:30:10")
    )["rows"]
    assert [r["features_kept"] for r in rows] == [10, 20, 30]


def _stats(tmp_path):
    rng = np.random.default_rng(1)
    cols = {k: [] for k in ("layer", "feature", "freq", "importance", "alive")}
    summary = {}
    for layer in (8, 12):
        imp = np.sort(rng.pareto(1.5, 300))[::-1]
        freq = rng.uniform(1e-4, 1e-2, 300)
        cols["layer"] += [layer] * 300
        cols["feature"] += list(range(300))
        cols["freq"] += freq.tolist()
        cols["importance"] += imp.tolist()
        cols["alive"] += [True] * 300
        summary[str(layer)] = {"F": 300, "L0": 3.0, "alpha": 0.99}
    path = tmp_path / "stats.parquet"
    write_parquet(path, cols, kind="kdtool.stats", summary={"layers": summary})
    return path, cols


def test_stats_file_one_block_per_layer(cli, tmp_path):
    path, cols = _stats(tmp_path)
    rows = rows_of(cli("--json", "predict", path, "--widths", "4,8,16"))["rows"]
    assert [(r["layer"], r["width"]) for r in rows] == [(8, 4), (8, 8), (8, 16), (12, 4), (12, 8), (12, 16)]
    g = theory.g(0.99)
    for r in rows:
        w = np.sort(np.array(cols["importance"])[np.array(cols["layer"]) == r["layer"]])[::-1]
        k = min(int(np.floor(r["width"] * g)), 300)
        assert r["features_kept"] == k and r["floor"] == pytest.approx(w[k:].sum())
    assert rows[-1]["floor"] == 0.0  # 16 * g(0.99) > 300: every feature fits
    only = rows_of(cli("--json", "predict", path, "--widths", "4", "--layer", "12"))["rows"]
    assert [r["layer"] for r in only] == [12]


def test_outputs_parquet_and_csv_carry_provenance(cli, tmp_path):
    out = tmp_path / "pred.parquet"
    r = cli("predict", *PAPER, "--widths", WIDTHS, "-o", out)
    assert r.exit_code == 0, r.output
    meta = parquet_metadata(out)
    assert meta["kind"] == "kdtool.predict"
    assert "predict" in meta["provenance"]["command"]
    assert meta["summary"]["layers"]["0"]["F"] == 28665
    cols = read_table(out)
    assert cols["features_kept"].tolist() == [3446, 6892, 13784, 20676, 27568]
    csv = tmp_path / "pred.csv"
    assert cli("predict", *PAPER, "--widths", WIDTHS, "-o", csv).exit_code == 0
    assert read_table(csv)["features_dropped"].tolist() == [25219, 21773, 14881, 7989, 1097]


def test_target_loss_without_calibration(cli):
    out = rows_of(cli("--json", "predict", "--features", "2000", "--alpha", "0.99", "--target-loss", "1e-4"))
    target = out["summary"]["target"]["layers"]["0"]
    d = target["min_width"]
    assert out["rows"][0]["width"] == d and out["rows"][0]["floor"] <= 1e-4
    before = rows_of(cli("--json", "predict", "--features", "2000", "--alpha", "0.99", "--widths", str(d - 1)))
    assert before["rows"][0]["floor"] > 1e-4


def _samples(C=9.0, B=0.6):
    rng = np.random.default_rng(0)
    return C + 0.5 * rng.standard_normal(200), B + 0.02 * rng.standard_normal(200)


def _calib(tmp_path, C=9.0, B=0.6, samples=True):
    cs, bs = _samples(C, B)
    entry = {"C": C, "B": B, "bootstrap": {"samples": {"C": cs.tolist(), "B": bs.tolist()}}}
    if not samples:
        entry["bootstrap"] = {"n": 0}
    path = tmp_path / "calib.json"
    write_json(path, {"kind": "kdtool.calibration", "affine": entry, "points": []})
    return path


def test_calibration_adds_floor_kl_and_band(cli, tmp_path):
    calib = _calib(tmp_path)
    rows = rows_of(cli("--json", "predict", *PAPER, "--widths", WIDTHS, "--calibration", calib))["rows"]
    for r in rows:
        assert r["floor_kl"] == pytest.approx(9.0 * r["floor"] + 0.6)
        assert r["floor_kl_low"] < r["floor_kl"] < r["floor_kl_high"]
        # the band: pointwise 2.5/97.5 percentiles of C_b * L* + B_b over the stored bootstrap samples
        cs, bs = _samples()
        lo, hi = np.percentile(cs * r["floor"] + bs, [2.5, 97.5])
        assert (r["floor_kl_low"], r["floor_kl_high"]) == pytest.approx((lo, hi))


def test_calibrated_target_below_baseline_is_explained(cli, tmp_path):
    calib = _calib(tmp_path)
    r = cli("--json", "predict", *PAPER, "--target-loss", "0.55", "--calibration", calib)
    out = rows_of(r)
    t = out["summary"]["target"]["layers"]["0"]
    assert t["min_width"] is None and "baseline" in t["message"]
    assert out["rows"] == []
    ok = rows_of(cli("--json", "predict", *PAPER, "--target-loss", "0.62", "--calibration", calib))
    d = ok["summary"]["target"]["layers"]["0"]["min_width"]
    assert ok["rows"][0]["floor_kl"] <= 0.62 and d >= 1


def test_calibration_without_samples_leaves_band_empty(cli, tmp_path):
    calib = _calib(tmp_path, samples=False)
    rows = rows_of(cli("--json", "predict", *PAPER, "--widths", "128", "--calibration", calib))["rows"]
    assert rows[0]["floor_kl_low"] is None and rows[0]["floor_kl"] == pytest.approx(9 * rows[0]["floor"] + 0.6)


# ------------------------------------------------------------------------------------------ the library function


def test_predict_builds_table2_without_the_cli():
    from kdtool.theory.prediction import PredictionConfig, predict

    said = []
    cfg = PredictionConfig(features=28665, alpha=0.99238, g_value=26.922, widths=(128, 256, 512, 768, 1024))
    result = predict(cfg, notify=lambda level, text: said.append((level, text)))
    assert result.columns["features_kept"] == [3446, 6892, 13784, 20676, 27568]
    assert result.columns["features_dropped"] == [25219, 21773, 14881, 7989, 1097]
    assert result.columns["normalized"][0] == 1.0 and "floor_kl" not in result.columns
    assert result.summary["capacity"] == "explicit g"
    assert result.summary["layers"]["0"]["d_star"] == pytest.approx(28665 / 26.922)
    assert result.messages == said == [("info", "layer 0: F=28,665 alpha=0.99238 g=26.92 d*=1,064.7")]
    assert result.warnings == []


def test_predict_target_answer_and_calibration_warnings_are_data(tmp_path):
    from kdtool.theory.prediction import PredictionConfig, predict

    calib = _calib(tmp_path, samples=False)
    cfg = PredictionConfig(
        features=28665, alpha=0.99238, g_value=26.922, target_loss=0.55, calibration=calib, layers=(12,)
    )
    result = predict(cfg)
    assert result.columns["layer"] == [] and set(result.columns) >= {"floor_kl", "floor_kl_low", "floor_kl_high"}
    target = result.summary["target"]
    assert target["units"] == "nats (calibrated)" and target["layers"]["12"]["min_width"] is None
    assert result.summary["calibration"]["C"] == 9.0 and result.summary["calibration"]["fit"] == "affine"
    first, below = result.warnings
    assert "no bootstrap samples" in first and below.startswith("layer 12: no width reaches 0.55")
    # a reachable target with no --widths predicts at the answer
    ok = predict(PredictionConfig(features=2000, alpha=0.99, target_loss=1e-4))
    d = ok.summary["target"]["layers"]["0"]["min_width"]
    assert ok.columns["width"] == [d] and ok.columns["floor"][0] <= 1e-4
    assert ok.messages[-1][0] == "info" and ok.messages[-1][1].startswith(f"layer 0: minimum width {d:,}:")


def test_predict_reads_a_stats_file_and_overrides_its_alpha(tmp_path):
    from kdtool.theory.prediction import PredictionConfig, predict

    path, cols = _stats(tmp_path)
    result = predict(PredictionConfig(stats=path, widths=(4,), layers=(12,), alpha=0.9))
    assert result.columns["layer"] == [12]
    assert result.summary["layers"]["12"]["alpha"] == 0.9 and result.summary["layers"]["12"]["L0"] is None
    assert result.columns["features_kept"] == [int(np.floor(4 * theory.g(0.9)))]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"features": 10, "alpha": 0.9, "g_value": 3.0, "capacity": "naive", "widths": (4,)}, "--g and --capacity"),
        ({"features": 10, "alpha": 0.9, "l0": 1.0, "widths": (4,)}, "--alpha and --l0"),
        ({"features": 10, "alpha": 0.9}, "--widths: give the student widths"),
        ({"alpha": 0.9, "widths": (4,)}, "no importance source"),
        ({"features": 10, "alpha": 0.9, "widths": (4,), "layers": (1, 2)}, "one layer"),
        ({"stats": "s.parquet", "features": 10, "widths": (4,)}, "not both"),
        ({"stats": "s.parquet", "l0": 3.0, "widths": (4,)}, "--l0 is for a parametric spec"),
    ],
)
def test_prediction_config_refuses_clashing_flags(kwargs, needle):
    from kdtool.errors import BadInput
    from kdtool.theory.prediction import PredictionConfig

    with pytest.raises(BadInput, match=needle):
        PredictionConfig(**kwargs)


def test_features_without_a_sparsity_asks_for_alpha_or_l0(cli):
    """The missing input is the sparsity, not --sq-activation (issue 13)."""
    r = cli("predict", "--features", "2304", "--widths", "64")
    assert r.exit_code == 2 and "--alpha" in r.stderr and "--l0" in r.stderr
    assert "--sq-activation is needed" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
