"""`kdtool calibrate`: the paper's Tables 4-5 and Eq. 4 from the shipped data, fits, bootstrap, joins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdtool.formats import read_json, read_table, write_parquet
from kdtool.theory import calibration as cal
from kdtool.theory import fits

PAPER = Path(__file__).resolve().parents[1] / "kdtool" / "data" / "paper_pythia410m.csv"


def run(cli, *args):
    r = cli("--json", "calibrate", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def paper_fit():
    """One calibration of the paper's numbers, shared (the bootstrap is the slow part)."""
    points = cal.load_points(PAPER)
    return cal.calibrate(points, cal.CalibrationConfig(baseline_width=1024, bootstrap=200, seed=0))


def test_paper_affine_table4(paper_fit):
    a = paper_fit["affine"]
    assert (round(a["C"], 2), round(a["B"], 3), round(a["r2"], 3)) == (8.96, 0.623, 0.993)


def test_paper_linear_table4_is_the_least_squares_slope(paper_fit):
    lin = paper_fit["linear"]
    assert round(lin["r2"], 2) == -1.98
    assert round(lin["C"], 1) == 19.2  # the paper's table prints C = 8.97 (the affine slope)
    # with C = 8.97 through the origin, R^2 would be far worse than the printed -1.98
    x, y = np.array([0.0795, 0.04, 0.0111, 0.0016, 0.0001]), np.array([1.320, 1.008, 0.733, 0.652, 0.586])
    assert fits.r_squared(y, 8.97 * x) < -4


def test_paper_power_law_eq4(paper_fit):
    p = paper_fit["power_law"]
    assert (round(p["a"], 1), round(p["gamma"], 2), round(p["c"], 2), round(p["r2"], 3)) == (11.6, 0.47, 0.13, 0.998)
    assert not p["at_bound"]


def test_paper_decomposition_table5(paper_fit):
    dfit, rows = paper_fit["decomposition_fit"], paper_fit["decomposition"]
    assert dfit["fit"] == "affine_fixed" and dfit["B"] == pytest.approx(0.586)
    assert [round(100 * r["pct_geometric"], 1) for r in rows] == [55.6, 41.9, 20.1, 10.1, 0.0]
    # B fixed at the 1024 control, C fit on the other four widths (closed form)
    x, y = np.array([0.0795, 0.04, 0.0111, 0.0016]), np.array([1.320, 1.008, 0.733, 0.652])
    c = float(x @ (y - 0.586) / (x @ x))
    assert dfit["C"] == pytest.approx(c)
    assert [r["geometric"] for r in rows] == pytest.approx(list(c * np.append(x, 0.0001)))
    assert paper_fit["affine_fixed"]["n_fit"] == 4 and paper_fit["affine_fixed"]["n"] == 5


def test_loo_and_intervals(paper_fit):
    a = paper_fit["affine"]
    # LOO by hand at width 128
    x, y = np.array([0.04, 0.0111, 0.0016, 0.0001]), np.array([1.008, 0.733, 0.652, 0.586])
    c, b = np.polyfit(x, y, 1)
    err128 = 1.320 - (c * 0.0795 + b)
    assert a["loo"][0] == {"width": 128, "error": pytest.approx(err128)}
    assert a["loo_max_abs"] >= abs(err128) - 1e-12
    for name, keys in (("linear", "C"), ("affine", "CB"), ("affine_fixed", "C"), ("power_law", ["a", "gamma", "c"])):
        for k in keys:
            lo, hi = paper_fit[name]["ci95"][k]
            assert lo <= paper_fit[name][k] <= hi, (name, k)
    assert len(a["bootstrap"]["samples"]["C"]) == 200
    assert "samples" not in paper_fit["power_law"]["bootstrap"]


def test_bootstrap_is_seeded():
    points = cal.load_points(PAPER)
    one = cal.calibrate(points, cal.CalibrationConfig(bootstrap=50, seed=3))
    two = cal.calibrate(points, cal.CalibrationConfig(bootstrap=50, seed=3))
    other = cal.calibrate(points, cal.CalibrationConfig(bootstrap=50, seed=4))
    assert one["affine"]["ci95"] == two["affine"]["ci95"]
    assert one["affine"]["ci95"] != other["affine"]["ci95"]
    pairs = cal.calibrate(points, cal.CalibrationConfig(bootstrap=50, seed=3, method="pairs"))
    assert pairs["affine"]["bootstrap"]["method"] == "pairs" and pairs["affine"]["bootstrap"]["ok"] > 30


@pytest.mark.parametrize("a,gamma,c", [(5.0, 0.8, 0.2), (30.0, 0.3, 0.0), (2.0, 1.7, 0.5)])
def test_power_law_recovers_known_curves(a, gamma, c):
    d = np.array([32, 64, 128, 256, 512, 1024], dtype=float)
    y = a * d**-gamma + c
    m = fits.models(None)["power_law"]
    p = m.polish(d, y, m.fit(d, y))
    assert p == pytest.approx([a, gamma, c], rel=1e-4, abs=1e-6)


def test_power_law_bounds_hold_on_rising_data():
    d = np.array([100, 200, 400, 800.0])
    y = np.array([0.1, 0.2, 0.3, 0.5])  # floors that rise with width: best is a flat line, c = mean
    m = fits.models(None)["power_law"]
    p = m.fit(d, y)
    assert p[0] >= 0 and fits.GAMMA_BOUNDS[0] <= p[1] <= fits.GAMMA_BOUNDS[1] and p[2] >= 0


def test_cli_json_and_output_file_agree(cli, tmp_path):
    out = tmp_path / "calib.json"
    obj = run(cli, PAPER, "--baseline", "0.586", "--bootstrap", "20", "-o", out)
    saved = read_json(out)
    assert saved["kind"] == "kdtool.calibration" and obj["kind"] == "kdtool.calibration"
    assert saved["affine"]["C"] == obj["affine"]["C"]
    assert saved["affine_fixed"]["B"] == 0.586 and saved["affine_fixed"]["n_fit"] == 5
    assert saved["provenance"]["seed"] == 0 and saved["provenance"]["inputs"][0]["sha256"]


def test_floors_parquet_joined_with_predict_output(cli, tmp_path):
    """The pipeline: predict -> (distill's floors.parquet) -> calibrate --predicted -> predict --calibration."""
    pred = tmp_path / "pred.csv"
    spec = ["--features", "3000", "--alpha", "0.99", "--importance", "zipf:1.3"]
    assert cli("predict", *spec, "--widths", "8,16,32,64,128", "-o", pred).exit_code == 0
    p = read_table(pred)
    rng = np.random.default_rng(0)
    floor = 40.0 * p["floor"] + 0.5 + 0.002 * rng.standard_normal(5)
    floors = tmp_path / "floors.parquet"
    write_parquet(
        floors,
        {
            "width": p["width"],
            "params": p["width"] * 1000,
            "floor": floor,
            "floor_std": np.full(5, 0.01),
            "raw_kl": floor * 2048,
            "steps": np.full(5, 100),
        },
        kind="kdtool.distill.floors",
    )
    calib = tmp_path / "calib.json"
    obj = run(cli, floors, "--predicted", pred, "--bootstrap", "100", "-o", calib)
    assert obj["affine"]["C"] == pytest.approx(40.0, rel=0.05)
    assert obj["affine"]["B"] == pytest.approx(0.5, abs=0.01)
    assert obj["affine"]["r2"] > 0.99
    r = cli("--json", "predict", *spec, "--widths", "8,16,32,64,128", "--calibration", calib)
    assert r.exit_code == 0, r.output
    assert "other predicted floors" not in r.stderr  # same prediction: no unit-mismatch warning
    rows = json.loads(r.stdout)["rows"]
    assert [x["floor_kl"] for x in rows] == pytest.approx(list(floor), abs=0.01)
    # another prediction (different importance profile) is flagged
    r2 = cli("predict", "--features", "3000", "--alpha", "0.99", "--widths", "8", "--calibration", calib)
    assert r2.exit_code == 0 and "other predicted floors" in r2.stderr


def test_without_predicted_only_power_law(cli, tmp_path):
    obs = tmp_path / "obs.csv"
    obs.write_text("width,floor\n128,1.320\n256,1.008\n512,0.733\n768,0.652\n1024,0.586\n")
    r = cli("calibrate", obs, "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # piped stdout: calib.json itself (docs/cli.md, "Where output goes")
    assert "skipped" in out["linear"] and "skipped" not in out["power_law"]
    obj = run(cli, obs, "--bootstrap", "0")
    assert "skipped" in obj["linear"] and round(obj["power_law"]["gamma"], 2) == 0.47
    assert obj["decomposition"] == []


def test_calibrate_files_returns_the_document_and_its_warnings(tmp_path):
    """The library function behind the command: fits, calib.json's fields and the warnings, nothing printed."""
    cfg = cal.CalibrationConfig(baseline_width=1024, bootstrap=20, seed=0)
    run = cal.calibrate_files(PAPER, cfg)
    assert run.warnings == []
    assert run.inputs == {"observed": str(PAPER), "predicted": None, "column": "floor", "layer": None, "loss": "kl",
                          "model": "EleutherAI/pythia-410m"}  # the paper's numbers name their teacher  # fmt: skip
    assert round(run.result["affine"]["C"], 2) == 8.96
    doc = run.document({"command": "test"})
    assert list(doc)[:2] == ["kind", "inputs"] and list(doc)[-1] == "provenance"
    assert doc["kind"] == "kdtool.calibration" and doc["affine_fixed"] == run.result["affine_fixed"]
    obs = tmp_path / "obs.csv"
    obs.write_text("width,floor\n128,1.320\n256,1.008\n512,0.733\n768,0.652\n1024,0.586\n")
    bare = cal.calibrate_files(obs, cal.CalibrationConfig(bootstrap=0))
    # no predicted floors: the three floor-scale fits are skipped; affine_fixed quietly (no baseline was asked for)
    assert [w.split(":")[0] for w in bare.warnings] == ["linear fit skipped", "affine fit skipped"]
    with_b = cal.calibrate_files(obs, cal.CalibrationConfig(bootstrap=0, baseline=0.5))
    assert [w.split(":")[0] for w in with_b.warnings] == [
        "linear fit skipped",
        "affine fit skipped",
        "affine_fixed fit skipped",
    ]
