"""SAE trials in a run folder: told apart by each SAE's training record (never the file name), matched to the
preset trials A/B/C, and drawn per trial by the report: summary card, alpha/g/d* per layer, correlation of
the metrics across layers, headline card (the authors' project-page figures)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from synthetic_acts import write_random

from kdtool import formats
from kdtool.plots import registry
from kdtool.plots.sae_trials import correlations
from kdtool.report import build as report
from kdtool.report import trials
from kdtool.theory import theorem as theory

pytestmark = pytest.mark.usefixtures("one_thread")

D_SAE = 256


def record(**kw) -> dict:
    """A training record as `kdtool stats` copies it from a kdtool SAE's cfg.json (kdtool/sae/record.py)."""
    base = {"l1": 3e-4, "target_l0": None, "l1_rate": 0.01, "l1_warmup": 0, "normalize": "none", "d_sae": D_SAE,
            "d_in": 16, "init_seed": 0, "data_seed": 0, "lr": 3e-4, "batch_tokens": 32768, "tokens": 300_000_000,
            "model": "EleutherAI/pythia-410m", "dataset": "monology/pile-uncopyrighted"}  # fmt: skip
    return base | kw


def write_stats(path, layers: dict[int, tuple[float, int]], trained: dict | None) -> dict:
    """A stats file whose layers have the given (L0, dead) and training record; rows agree with the summary."""
    cols = {k: [] for k in ("layer", "feature", "fires", "freq", "mean_act", "importance", "max_act", "alive")}
    summary = {"layers": {}}
    tokens = 100_000
    for layer, (l0, dead) in layers.items():
        alive = np.arange(D_SAE) >= dead
        F = int(alive.sum())
        freq = np.where(alive, l0 / F, 0.0)
        imp = np.where(alive, 1.0 / (1 + np.arange(D_SAE)), 0.0)
        alpha = 1 - l0 / F
        g = float(theory.g(alpha))
        summary["layers"][str(layer)] = {
            "F": F, "L0": l0, "alpha": alpha, "g": g, "d_star": F / g, "dead": dead, "d_sae": D_SAE, "d_in": 16,
            "tokens": tokens, "mse": 0.01 * l0, "explained_variance": 0.9, "alive_threshold": 1e-5,
            "sae": f"/nowhere/layer{layer}", "trained": trained,
        }  # fmt: skip
        cols["layer"] += [layer] * D_SAE
        cols["feature"] += list(range(D_SAE))
        cols["fires"] += list((freq * tokens).astype(np.int64))
        cols["freq"] += list(freq)
        cols["mean_act"] += list(np.sqrt(imp))
        cols["importance"] += list(imp)
        cols["max_act"] += list(np.sqrt(imp) * 2)
        cols["alive"] += list(alive)
    cols["layer"] = np.asarray(cols["layer"], np.int32)
    cols["feature"] = np.asarray(cols["feature"], np.int32)
    formats.write_parquet(path, cols, kind="kdtool.stats", summary=summary)
    return summary


@pytest.fixture
def run(tmp_path):
    """Trial A (fixed 3e-4) in one file named like trial C; trial C (L0 -> 150 from 5e-4) split over two files,
    one of them named like A; and a stats file of an SAE without a training record."""
    folder = tmp_path / "run"
    folder.mkdir()
    a = {1: (40.0, 2), 2: (30.0, 5), 3: (20.0, 9), 4: (12.0, 14)}  # L0 falls as dead latents rise
    c = {1: (9.0, 20), 2: (8.0, 24), 3: (7.5, 30), 4: (7.0, 31)}
    rec_c = record(l1=5e-4, target_l0=150, l1_rate=0.01)
    s_a = write_stats(folder / "stats-C.parquet", a, record())
    s_c1 = write_stats(folder / "stats-A.parquet", {k: c[k] for k in (1, 2)}, rec_c)
    s_c2 = write_stats(folder / "later.parquet", {k: c[k] for k in (3, 4)}, rec_c)
    write_stats(folder / "foreign.parquet", {5: (10.0, 3)}, None)
    return folder, s_a["layers"], {**s_c1["layers"], **s_c2["layers"]}


def test_trials_are_told_apart_by_their_training_records(run):
    folder, s_a, s_c = run
    found = trials.trials(sorted(folder.glob("*.parquet")))
    assert [t.label for t in found] == ["A (dense)", "C (adaptive)", "foreign.parquet (no training record)"]
    a, c, foreign = found
    assert a.preset == "A" and [x.path.name for x in a.layers] == ["stats-C.parquet"] * 4
    assert c.preset == "C" and [(x.layer, x.path.name) for x in c.layers] == [
        (1, "stats-A.parquet"), (2, "stats-A.parquet"), (3, "later.parquet"), (4, "later.parquet"),
    ]  # fmt: skip
    assert foreign.preset is None and [x.layer for x in foreign.layers] == [5]
    h = a.headline()  # the project page's headline card, by hand
    assert h["layers"] == 4 and h["total_dead"] == 2 + 5 + 9 + 14 and h["total_latents"] == 4 * D_SAE
    assert h["mean_alpha"] == pytest.approx(np.mean([s["alpha"] for s in s_a.values()]))
    assert h["mean_l0"] == pytest.approx(25.5) and h["dead_fraction"] == pytest.approx(30 / (4 * D_SAE))
    assert c.headline()["mean_d_star"] == pytest.approx(np.mean([s["d_star"] for s in s_c.values()]))
    # Pearson r across layers, against numpy on the summaries: in A, alpha tracks the dead count
    labels, r = correlations(a)
    alpha = [s_a[str(L)]["alpha"] for L in (1, 2, 3, 4)]
    dead = [s_a[str(L)]["dead"] for L in (1, 2, 3, 4)]
    i, j = labels.index("alpha"), labels.index("dead")
    assert r[i, j] == pytest.approx(np.corrcoef(alpha, dead)[0, 1]) and r[i, j] > 0.9
    assert math.isnan(r[labels.index("expl. var."), i])  # constant over the layers: no correlation

    # settings beyond lambda tell trials apart in the label; lambda on x / s is never a preset
    assert trials._key(record(d_sae=128)) != trials._key(record())
    assert trials.preset_trial(record(normalize="expected-norm")) is None
    assert trials.preset_trial(record(l1=8e-5)) == "B" and trials.preset_trial(record(l1=2.5e-5)) == "code"
    assert trials.preset_trial(record(l1=5e-4)) is None  # C's start, but without the controller


def test_report_draws_the_project_page_figures_per_trial(run):
    folder, _, _ = run
    per_trial = ("sae-headline", "sae-layers", "layer-capacity", "layer-correlation")
    rep = report.build_report(folder, registered={k: registry.KINDS[k] for k in per_trial})  # those figures only
    drawn = {f.file for f in rep.figures if f.file}
    for slug in ("a-dense", "c-adaptive"):
        for figure in per_trial:
            assert f"figures/{figure}--{slug}.png" in drawn, (figure, slug, [f.note for f in rep.figures])
    # the foreign file has one layer: a card, capacity and headline, but no correlation (needs 3 layers)
    assert "figures/layer-correlation--foreign-parquet-no-training-record.png" not in drawn
    assert "figures/sae-layers--foreign-parquet-no-training-record.png" in drawn
    assert not [f.note for f in rep.figures if f.note]
    titles = {f.title for f in rep.figures}
    assert "Per-layer SAE measurements (Table 1) — C (adaptive)" in titles
    table = json.loads((folder / "report" / "report.json").read_text())
    t = next(t for t in table["tables"] if t["key"] == "sae_trials")
    rows = {row[0]: dict(zip(t["columns"], row, strict=True)) for row in t["rows"]}
    assert rows["A (dense)"]["dead"] == 30 and rows["A (dense)"]["layers"] == 4
    assert rows["C (adaptive)"]["files"] == "stats-A.parquet, later.parquet"  # in layer order
    assert rows["C (adaptive)"]["target L0"] == 150 and rows["C (adaptive)"]["λ (start)"] == 5e-4
    # each per-trial figure is drawn from that trial's files only
    fig = next(f for f in rep.figures if f.file == "figures/layer-capacity--c-adaptive.png")
    assert sorted(fig.inputs) == ["later.parquet", "stats-A.parquet"]


def test_plot_commands_draw_several_trials_and_refuse_too_few_layers(cli, run, tmp_path):
    folder, _, _ = run
    files = [folder / n for n in ("stats-C.parquet", "stats-A.parquet", "later.parquet")]
    for kind in ("layer-capacity", "layer-correlation", "sae-headline", "layers"):
        assert kind in registry.KINDS
        r = cli("plot", kind, *files, "-o", tmp_path / f"{kind}.png")
        assert r.exit_code == 0, r.output
        assert (tmp_path / f"{kind}.png").stat().st_size > 1000
    r = cli("plot", "layer-correlation", *files, "--layer", "1,2", "-o", tmp_path / "few.png")
    assert r.exit_code == 2 and "needs at least 3" in r.stderr and not (tmp_path / "few.png").exists()


def test_stats_records_how_each_sae_was_trained(cli, tmp_path):
    """train-sae -> stats: the summary carries each SAE's training record, and --l1 3e-4 is trial A."""
    acts = write_random(tmp_path / "acts", d=16, n=4_000, layers=(3, 5))
    opts = ("--acts", acts, "--layer", "3,5", "--batch-tokens", "512", "--tokens", "2K", "--features", "32")
    assert cli("--quiet", "train-sae", *opts, "--l1", "3e-4,0.2", "-o", tmp_path / "saes").exit_code == 0
    r = cli("--quiet", "stats", "--acts", acts, "--sae", tmp_path / "saes" / "layer3-lambda3e-4",
            "--sae", tmp_path / "saes" / "layer5-lambda3e-4", "-o", tmp_path / "a.parquet")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli("--quiet", "stats", "--acts", acts, "--sae", tmp_path / "saes" / "layer3-lambda0.2",
            "-o", tmp_path / "b.parquet")  # fmt: skip
    assert r.exit_code == 0, r.output
    rec = formats.parquet_metadata(tmp_path / "a.parquet")["summary"]["layers"]["5"]["trained"]
    assert rec["l1"] == 3e-4 and rec["d_sae"] == 32 and rec["tokens"] == 1536 and rec["target_l0"] is None
    found = trials.trials([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert [(t.label, [x.layer for x in t.layers]) for t in found] == [("A (dense)", [3, 5]), ("lambda 0.2", [3])]
