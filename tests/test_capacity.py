"""Capacity models in `kdtool predict` (issue 11): paper | naive | power:K,P | a capacity file, against hand
computations; every output names the model; `kdtool toy --fit-capacity` writes a file predict reads."""

from __future__ import annotations

import json
import math

import pytest

from kdtool.errors import BadInput
from kdtool.formats import parquet_metadata, read_table, write_json
from kdtool.theory import capacity

SPEC = ["--features", "100", "--alpha", "0.95", "--widths", "4,8"]


def _g_by_hand(alpha: float) -> float:
    return 1.0 / ((1.0 - alpha) * math.log(1.0 / (1.0 - alpha)))


def _floor_by_hand(kept: int, alpha: float = 0.95, n: int = 100) -> float:
    return sum((1.0 / i) * (1.0 - alpha) / 3.0 for i in range(kept + 1, n + 1))


def test_power_capacity_matches_a_hand_computation(cli):
    r = cli("--json", "predict", *SPEC, "--capacity", "power:1.03,0.53")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    g_hat = 1.03 * _g_by_hand(0.95) ** 0.53  # 1.03 * 6.676^0.53 = 2.817
    assert g_hat == pytest.approx(2.8173, abs=1e-4)
    kept = [math.floor(4 * g_hat), math.floor(8 * g_hat)]
    assert kept == [11, 22]
    assert [row["features_kept"] for row in out["rows"]] == kept
    assert [row["floor"] for row in out["rows"]] == pytest.approx([_floor_by_hand(k) for k in kept], rel=1e-12)
    assert all(row["g"] == pytest.approx(g_hat, rel=1e-12) for row in out["rows"])
    assert {row["capacity"] for row in out["rows"]} == {"power:1.03,0.53"}
    model = out["summary"]["capacity_model"]
    assert out["summary"]["capacity"] == "power:1.03,0.53" and (model["k"], model["p"]) == (1.03, 0.53)
    assert out["summary"]["layers"]["0"]["d_star"] == pytest.approx(100 / g_hat)
    # power:1,1 is the paper's model, and the paper's model is the default
    paper = json.loads(cli("--json", "predict", *SPEC).stdout)
    same = json.loads(cli("--json", "predict", *SPEC, "--capacity", "power:1,1").stdout)
    assert [r["features_kept"] for r in paper["rows"]] == [r["features_kept"] for r in same["rows"]] == [26, 53]
    assert paper["summary"]["capacity"] == "paper" and paper["rows"][0]["capacity"] == "paper"


def _capacity_file(path, k=2.0, p=0.5):
    model = capacity.CapacityModel("power", k=k, p=p)
    doc = capacity.document(
        model, fitted_on={"source": "a hand-made test file"}, per_alpha=[{"alpha": 0.95, "g_hat": 5.0}], provenance={}
    )
    write_json(path, doc)
    return path


def test_a_capacity_file_is_applied_and_named_in_every_output(cli, tmp_path):
    cap = _capacity_file(tmp_path / "cap.json")
    g_hat = 2.0 * math.sqrt(_g_by_hand(0.95))  # 5.168
    kept = [math.floor(4 * g_hat), math.floor(8 * g_hat)]
    assert kept == [20, 41]
    csv = cli("predict", *SPEC, "--capacity", cap, "-f", "csv")
    assert csv.exit_code == 0, csv.output
    header, first, _ = csv.stdout.strip().splitlines()
    assert header.split(",")[-3:] == ["g", "capacity", "estimator"] and f"power:2,0.5 from {cap}" in first
    assert int(first.split(",")[2]) == kept[0]
    assert cli("predict", *SPEC, "--capacity", cap, "-o", tmp_path / "p.parquet").exit_code == 0
    meta = parquet_metadata(tmp_path / "p.parquet")
    assert meta["summary"]["capacity_model"]["file"] == str(cap)
    assert meta["summary"]["capacity_model"]["fitted_on"] == {"source": "a hand-made test file"}
    assert [i["path"] for i in meta["provenance"]["inputs"]] == [str(cap)]
    assert read_table(tmp_path / "p.parquet")["features_kept"].tolist() == kept
    table = cli("predict", *SPEC, "--capacity", cap, "-f", "table")
    assert table.exit_code == 0 and "power:2,0.5" in table.stdout


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("power:1.03", "use power:K,P with two numbers"),
        ("power:-1,0.5", "K must be > 0"),
        ("powr:1,2", "not paper, naive or power:K,P, and no such capacity file"),
        ("WRONG_KIND", "--capacity wants toy.capacity.json (kdtool.capacity"),
    ],
)
def test_bad_capacity_is_one_line_exit_2(cli, tmp_path, spec, needle):
    if spec == "WRONG_KIND":
        spec = str(tmp_path / "calib.json")
        write_json(spec, {"kind": "kdtool.calibration"})
    r = cli("predict", *SPEC, "--capacity", spec)
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_explicit_g_clashes_with_any_capacity_model_but_paper():
    from kdtool.theory.prediction import PredictionConfig

    with pytest.raises(BadInput, match="--g and --capacity power:1,2 both set the capacity"):
        PredictionConfig(features=10, alpha=0.9, g_value=3.0, capacity="power:1,2", widths=(4,))


def test_capacity_model_reads_back_what_document_writes(tmp_path):
    cap = capacity.read(_capacity_file(tmp_path / "c.json", k=1.5, p=0.25))
    assert (cap.model, cap.k, cap.p) == ("power", 1.5, 0.25) and cap.per_alpha == [{"alpha": 0.95, "g_hat": 5.0}]
    assert cap.g_hat(0.9) == pytest.approx(1.5 * _g_by_hand(0.9) ** 0.25)
    assert capacity.parse("naive").g_hat(0.99) == 1.0
    assert capacity.parse("paper").g_hat(0.99) == pytest.approx(_g_by_hand(0.99))


def test_toy_fit_capacity_writes_a_file_predict_applies(cli, tmp_path):
    out = tmp_path / "toy.parquet"
    args = ["--n", "8", "--d-teacher", "3", "--alpha", "0.8,0.95", "--seeds", "2", "--steps", "40"]
    args += ["--batch-size", "32", "--eval-samples", "256", "--eval-points", "2", "--workers", "1"]
    r = cli("--json", "toy", *args, "-o", out, "--fit-capacity")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    cap_path = tmp_path / "toy.capacity.json"
    assert summary["capacity_file"] == str(cap_path)
    doc = json.loads(cap_path.read_text())
    law = summary["survival"]["capacity"]["power_law"]
    assert doc["kind"] == "kdtool.capacity" and doc["model"] == "power"
    assert doc["params"] == {"k": law["k"], "p": law["p"]} and doc["fitted_on"]["method"] == "kept"
    assert [p["alpha"] for p in doc["per_alpha"]] == [0.8, 0.95] and doc["provenance"]["command"]
    pred = json.loads(cli("--json", "predict", *SPEC, "--capacity", cap_path).stdout)
    assert pred["rows"][0]["g"] == pytest.approx(law["k"] * _g_by_hand(0.95) ** law["p"], rel=1e-9)
    # from the floors instead, through --summarize, to a named file
    floors = tmp_path / "floors.json"
    r = cli(
        "--json", "toy", "--summarize", out, "--fit-capacity", "--capacity-from", "floors", "--capacity-out", floors
    )
    assert r.exit_code == 0, r.output
    fit = json.loads(r.stdout)["fit_capacity"]["power_law"]
    assert json.loads(floors.read_text())["params"] == {"k": fit["k"], "p": fit["p"]}
