"""Several SAEs of one layer: a row set per SAE in stats, predict reports each and their spread; figure, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic_acts import write_random

from kdtool import formats
from kdtool.sae.writers import saelens_cfg, save_kdtool

pytestmark = pytest.mark.usefixtures("one_thread")

D = 8


def make_sae(folder, *, f, layer=3, seed=0, l1=1.0, tokens=1000):
    """A random unit-norm SAE whose cfg says how it was 'trained' (the axes of plot sensitivity)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(f, D, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    t = {"W_enc": w.t().contiguous(), "b_enc": -0.6 + 0.1 * torch.randn(f, generator=g), "W_dec": w,
         "b_dec": torch.zeros(D)}  # fmt: skip
    kd = {"layer": layer, "l1": l1, "tokens": tokens, "config": {"seed": seed}}
    return save_kdtool(folder, t, cfg=saelens_cfg(D, f, layer=layer), kdtool=kd, provenance=None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder: a cache (layers 3 and 5), three SAEs of layer 3 (widths 16, 32, 64) and one of layer 5."""
    root = tmp_path_factory.mktemp("run")
    write_random(root / "acts", d=D, n=6000, layers=(3, 5), shard=3000)
    for f in (16, 32, 64):
        make_sae(root / f"x{f // D}" / "layer3", f=f, seed=f)
    make_sae(root / "x4" / "layer5", f=32, layer=5, seed=5)
    return root


def test_stats_keeps_one_row_set_per_sae_and_predict_reports_each_and_their_spread(cli, run):
    out = run / "stats.parquet"
    saes = [a for f in ("x2", "x4", "x8") for a in ("--sae", run / f / "layer3")] + ["--sae", run / "x4" / "layer5"]
    r = cli("--json", "stats", *saes, "--acts", run / "acts", "-o", out)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [(row["sae"], row["layer"]) for row in rows] == [
        ("x2/layer3", 3), ("x4/layer3", 3), ("x8/layer3", 3), ("layer5", 5)]  # fmt: skip
    cols = formats.read_table(out)
    for key, f in (("x2/layer3", 16), ("x4/layer3", 32), ("x8/layer3", 64), ("layer5", 32)):
        assert int((cols["sae"] == key).sum()) == f
    summary = formats.parquet_metadata(out)["summary"]
    assert "layers" not in summary  # layer 3 has three SAEs: only the per-SAE form can say which is which
    trained = summary["saes"]["x8/layer3"]["trained"]  # the axes of plot sensitivity (kdtool/sae/record.py)
    assert (trained["d_sae"], trained["l1"], trained["init_seed"], trained["tokens"]) == (64, 1.0, 64, 1000)

    r = cli("--json", "predict", out, "--widths", "2,4")
    assert r.exit_code == 0, r.output
    pred = json.loads(r.stdout)
    assert [row["sae"] for row in pred["rows"]] == ["x2/layer3"] * 2 + ["x4/layer3"] * 2 + ["x8/layer3"] * 2 + [
        "layer5"
    ] * 2
    assert {row["estimator"] for row in pred["rows"]} == {"paper"} and pred["summary"]["estimator"] == "paper"
    spread = pred["summary"]["spread"]["3"]
    d_stars = [pred["summary"]["saes"][k]["d_star"] for k in ("x2/layer3", "x4/layer3", "x8/layer3")]
    assert spread["d_star"] == pytest.approx({"min": min(d_stars), "median": sorted(d_stars)[1], "max": max(d_stars)})
    floors = [row["floor"] for row in pred["rows"] if row["layer"] == 3 and row["width"] == 4]
    assert spread["widths"]["4"]["floor"]["max"] == pytest.approx(max(floors))
    assert "layer 3: 3 SAEs, d* min" in r.stderr

    r = cli("--json", "predict", out, "--widths", "2,4", "--spread")
    assert r.exit_code == 0, r.output
    table = json.loads(r.stdout)["rows"]
    assert [(row["layer"], row["width"], row["saes"]) for row in table] == [(3, 2, 3), (3, 4, 3), (5, 2, 1), (5, 4, 1)]
    assert table[1]["floor_median"] == pytest.approx(sorted(floors)[1])

    r = cli("--json", "predict", out, "--widths", "4", "--sae", "x4/layer3", "--estimator", "robust")
    assert r.exit_code == 0, r.output
    pred = json.loads(r.stdout)
    assert [row["sae"] if "sae" in row else None for row in pred["rows"]] == [None]  # one SAE left: no sae column
    assert pred["rows"][0]["estimator"] == "robust"
    assert pred["summary"]["layers"]["3"]["F"] == summary["saes"]["x4/layer3"]["F_robust"]
    r = cli("predict", out, "--widths", "4", "--sae", "nope")
    assert r.exit_code == 2 and "--sae: nope not in" in r.stderr


def test_one_sae_per_layer_files_keep_their_old_form(cli, run, tmp_path):
    out = tmp_path / "one.parquet"
    r = cli("--quiet", "stats", "--sae", run / "x4", "--acts", run / "acts", "-o", out)
    assert r.exit_code == 0, r.output
    summary = formats.parquet_metadata(out)["summary"]
    assert set(summary["layers"]) == {"3", "5"} and summary["layers"]["3"] == summary["saes"]["layer3"]
    r = cli("--json", "predict", out, "--widths", "4")
    assert r.exit_code == 0, r.output
    assert "sae" not in json.loads(r.stdout)["rows"][0]
    r = cli("predict", out, "--widths", "4", "--spread")
    assert r.exit_code == 2 and "one SAE per layer" in r.stderr


def test_sensitivity_figure_report_and_info(cli, run, tmp_path):
    out = run / "stats.parquet"  # the three SAEs of layer 3 only (the report reads the whole run folder)
    saes = [a for f in ("x2", "x4", "x8") for a in ("--sae", run / f / "layer3")]
    assert cli("--quiet", "stats", *saes, "--acts", run / "acts", "-o", out).exit_code == 0
    r = cli("plot", "sensitivity", out, "-o", tmp_path / "sens.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "sens.png").stat().st_size > 1000
    r = cli("plot", "sensitivity", out, "--set", "x=l1", "-o", tmp_path / "l1.png")
    assert r.exit_code == 0, r.output  # asked for: every SAE at the one lambda they share
    r = cli("plot", "sensitivity", out, "--set", "x=depth", "-o", tmp_path / "bad.png")
    assert r.exit_code == 2 and "--set x=depth: use one of width, l1, seed, tokens" in r.stderr
    r = cli("plot", "layers", out, "-o", tmp_path / "card.png")
    assert r.exit_code == 0, r.output
    r = cli("--json", "info", out)
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)["files"][0]["saes"]
    assert [s["sae"] for s in listed] == ["x2/layer3", "x4/layer3", "x8/layer3"] and "F_robust" in listed[0]
    r = cli("info", out)
    assert r.exit_code == 0 and "x8/layer3" in r.stdout and "d_star_robust" in r.stdout
    r = cli("plot", "report", run, "-o", tmp_path / "report")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    figures = {f["figure"]: f for f in report["figures"]}
    assert figures["sensitivity"]["file"], figures["sensitivity"]
    table = next(t for t in report["tables"] if t["key"] == "sae_layers")
    assert "SAE" in table["columns"] and "F robust" in table["columns"]


def test_robust_count_is_in_every_row_set(cli, run, tmp_path):
    out = tmp_path / "s.parquet"
    saes = [a for f in ("x2", "x8") for a in ("--sae", run / f / "layer3")]
    assert cli("--quiet", "stats", *saes, "--acts", run / "acts", "-o", out).exit_code == 0
    cols = formats.read_table(out)
    summary = formats.parquet_metadata(out)["summary"]
    for key in ("x2/layer3", "x8/layer3"):
        rows = cols["sae"] == key
        counted_groups = np.unique(cols["group"][rows & cols["counted"]])
        assert counted_groups.size == summary["saes"][key]["F_robust"]
        assert summary["saes"][key]["d_star_robust"] > 0
