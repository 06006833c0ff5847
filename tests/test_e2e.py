"""The whole chain through the real CLI on a tiny in-process model, as CI runs it.

cache-acts -> train-sae (fixed and adaptive L1) -> stats -> predict -> distill -> calibrate ->
survival -> probe -> plot report, all into one run folder. Each file is checked for its kind and schema,
and the numbers are checked across files: predict recomputes from what stats wrote, calibrate joins
what distill and predict wrote, the report tabulates what distill wrote.
"""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
from tiny_models import make_model_dir

from kdtool import formats
from kdtool.theory import theorem as theory

LAYERS = (1, 2)
WIDTHS = (8, 16, 24)
STEPS = 10  # distill: the floor window (steps >= ceil(0.9 * 10) = 9) holds two evaluations
SEQ = 16
WORDS = (
    "the a river stone light garden north winter music paper quiet bright slowly window market "
    "ships follow under across between carry wonder simple heavy early"
).split()


pytestmark = pytest.mark.usefixtures("one_thread")


def write_text(path, paragraphs=400):
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(12, 40)))) + "." for _ in range(paragraphs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_concepts(path):
    """A tiny concept: questions vs statements (the giveaway '?' removed, as build-concepts does)."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(24):
        noun = " ".join(rng.choice(WORDS, size=3))
        rows.append({"text": f"where did the {noun} go", "concept": "question", "label": 1, "item": f"q{i}"})
        rows.append({"text": f"the {noun} went north", "concept": "question", "label": 0, "item": f"s{i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(cli, cmdline: str):
    """Run `kdtool --quiet CMDLINE` in-process (written like a shell line; tmp paths have no spaces)."""
    r = cli("--quiet", *shlex.split(cmdline))
    assert r.exit_code == 0, f"kdtool {cmdline} failed:\n{r.output}"
    return r


def test_whole_chain_tiny_model(tmp_path, cli):
    model = make_model_dir(tmp_path / "model", "llama")  # 4 blocks, d_model 32
    text = write_text(tmp_path / "text.txt")
    concepts = write_concepts(tmp_path / "concepts.jsonl")
    out = tmp_path / "run"
    teacher = f"--model {model} --device cpu"
    widths = ",".join(map(str, WIDTHS))

    # -- activations
    run(
        cli,
        f"cache-acts {teacher} --dataset {text} --layers 1,2 --tokens 4K --seq-len 32 --shard-size 1K -o {out}/acts",
    )
    manifest = formats.read_json(out / "acts" / "manifest.json")
    assert manifest["kind"] == "kdtool.acts" and manifest["layers"] == list(LAYERS)
    assert manifest["d_model"] == 32 and manifest["tokens"] == 4000
    assert sum(s["tokens"] for s in manifest["shards"]) == 4000

    # -- SAEs: fixed lambda (both layers) and the adaptive controller (trial C's law; kept outside the run
    #    folder only to spare the report two figures)
    sae = f"train-sae --acts {out}/acts --features 128 --batch-tokens 256 --tokens 8K --log-every 2"
    run(cli, f"{sae} --l1 1e-3 -o {out}/saes")
    run(cli, f"{sae} --layer 2 --target-l0 20 --l1-rate 0.05 -o {tmp_path}/adaptive")
    for L in LAYERS:
        cfg = json.loads((out / "saes" / f"layer{L}" / "cfg.json").read_text())
        assert (cfg["d_in"], cfg["d_sae"]) == (32, 128)
        assert cfg["kdtool"]["l1"] == pytest.approx(1e-3) and cfg["kdtool"]["controller"]["target_l0"] is None
        assert cfg["kdtool"]["tokens"] == (8000 // 256) * 256  # whole batches, looping the 4,000-token cache
    log = formats.read_table(tmp_path / "adaptive" / "layer2" / "train_log.parquet")
    assert formats.parquet_metadata(tmp_path / "adaptive" / "layer2" / "train_log.parquet")["kind"] == (
        "kdtool.sae.train_log"
    )
    assert {"step", "tokens", "mse", "l1_term", "loss", "l0", "alive_fraction", "lambda"} <= set(log)
    assert log["lambda"][-1] != log["lambda"][0]  # the controller moved lambda
    acfg = json.loads((tmp_path / "adaptive" / "layer2" / "cfg.json").read_text())
    assert acfg["kdtool"]["controller"]["target_l0"] == 20

    # -- stats: the summary agrees with its own rows and with g(alpha)
    run(cli, f"stats --sae {out}/saes --acts {out}/acts -o {out}/stats.parquet")
    smeta = formats.parquet_metadata(out / "stats.parquet")
    assert smeta["kind"] == "kdtool.stats"
    rows = formats.read_table(out / "stats.parquet")
    summary = smeta["summary"]["layers"]
    assert sorted(int(k) for k in summary) == list(LAYERS)
    for L in LAYERS:
        s = summary[str(L)]
        sel = np.asarray(rows["layer"]) == L
        alive = np.asarray(rows["alive"])[sel]
        assert s["F"] == int(alive.sum()) and s["tokens"] == 4000 and s["d_sae"] == 128
        assert s["L0"] == pytest.approx(float(np.asarray(rows["freq"])[sel].sum()), rel=1e-9)
        assert s["alpha"] == pytest.approx(1 - s["L0"] / s["F"], rel=1e-9)
        assert s["g"] == pytest.approx(theory.g(s["alpha"]), rel=1e-9)
        assert s["d_star"] == pytest.approx(s["F"] / s["g"], rel=1e-9)

    # -- predict: F_S = floor(d_S g) and the dropped importance mass, recomputed from the stats rows
    run(cli, f"predict {out}/stats.parquet --widths {widths} -o {out}/predict.parquet")
    assert formats.parquet_metadata(out / "predict.parquet")["kind"] == "kdtool.predict"
    pred = formats.read_table(out / "predict.parquet")
    predicted = {}
    for L in LAYERS:
        s = summary[str(L)]
        sel = np.asarray(rows["layer"]) == L
        imp = np.sort(np.asarray(rows["importance"])[sel][np.asarray(rows["alive"])[sel]])[::-1]
        for i in np.flatnonzero(np.asarray(pred["layer"]) == L):
            w = int(pred["width"][i])
            kept = math.floor(w * s["g"])
            assert int(pred["features_kept"][i]) == min(kept, s["F"])
            assert int(pred["features_dropped"][i]) == s["F"] - min(kept, s["F"])
            assert float(pred["floor"][i]) == pytest.approx(float(imp[kept:].sum()), rel=1e-9, abs=1e-12)
            if L == 2:
                predicted[w] = float(pred["floor"][i])
    assert sorted(predicted) == list(WIDTHS)

    # -- distill: floors are the mean held-out KL of curves over the final 10% of steps
    run(
        cli,
        f"distill {teacher} --dataset {text} --widths {widths} --heads head-dim:8 --steps {STEPS} --warmup 1 "
        f"--batch-size 2 --seq-len {SEQ} --eval-every 1 --eval-batches 2 --lr 3e-3 --save-every 0 -o {out}/students",
    )
    fmeta = formats.parquet_metadata(out / "students" / "floors.parquet")
    assert fmeta["kind"] == "kdtool.distill.floors"
    assert formats.parquet_metadata(out / "students" / "curves.parquet")["kind"] == "kdtool.distill.curves"
    floors = formats.read_table(out / "students" / "floors.parquet")
    curves = formats.read_table(out / "students" / "curves.parquet")
    assert list(floors["width"]) == list(WIDTHS)
    observed = {}
    for i, w in enumerate(floors["width"]):
        sel = (np.asarray(curves["width"]) == w) & (np.asarray(curves["step"]) >= math.ceil(0.9 * STEPS))
        window = np.asarray(curves["eval_kl"])[sel]
        assert len(window) == int(floors["n_evals"][i]) == 2
        assert floors["floor"][i] == pytest.approx(window.mean(), rel=1e-9)
        assert floors["floor_std"][i] == pytest.approx(window.std(ddof=1), rel=1e-6, abs=1e-12)
        assert floors["floor_scaled"][i] == pytest.approx(4 * floors["floor"][i], rel=1e-9)  # T = 2
        assert floors["raw_kl"][i] == pytest.approx(4 * SEQ * floors["floor"][i], rel=1e-5)  # no padding
        student = json.loads((out / "students" / f"width{w}" / "config.json").read_text())
        assert student["hidden_size"] == w and student["num_hidden_layers"] == 4
        assert formats.read_json(out / "students" / f"width{w}" / "kdtool.json")["floor"]["floor"] == pytest.approx(
            floors["floor"][i]
        )
        observed[int(w)] = float(floors["floor"][i])

    # -- calibrate joins what distill and predict wrote, by width
    run(
        cli,
        f"calibrate {out}/students/floors.parquet --predicted {out}/predict.parquet --layer 2 --bootstrap 20 "
        f"-o {out}/calib.json",
    )
    calib = formats.read_json(out / "calib.json")
    assert calib["kind"] == "kdtool.calibration"
    pts = {p["width"]: p for p in calib["points"]}
    assert sorted(pts) == list(WIDTHS)
    for w in WIDTHS:
        assert pts[w]["observed"] == pytest.approx(observed[w], rel=1e-12)
        assert pts[w]["predicted"] == pytest.approx(predicted[w], rel=1e-12)
    C, B = np.polyfit([predicted[w] for w in WIDTHS], [observed[w] for w in WIDTHS], 1)
    assert calib["affine"]["C"] == pytest.approx(C, rel=1e-6) and calib["affine"]["B"] == pytest.approx(B, rel=1e-6)

    # -- survival: every distilled student against the layer-2 SAE, ranked by the stats file; the teacher scores 1.0
    run(
        cli,
        f"survival {teacher} --dataset {text} --seq-len {SEQ} --sae {out}/saes/layer2 --students {out}/students "
        f"--stats {out}/stats.parquet --tokens 300 --min-fires 3 -o {out}/survival.parquet",
    )
    smeta = formats.parquet_metadata(out / "survival.parquet")
    assert smeta["kind"] == "kdtool.survival" and smeta["summary"]["importance_source"] == "stats"
    srows = {r["model"]: r for r in smeta["summary"]["rows"]}
    assert list(srows) == ["teacher", *(f"width{w}" for w in WIDTHS)]  # the reference first, then narrowest first
    assert srows["teacher"]["survived"] == srows["teacher"]["measured"] > 0
    for w in WIDTHS:  # F_S from the stats file's g, as predict computed it; each student labelled by its loss
        assert srows[f"width{w}"]["F_S"] == min(math.floor(w * summary["2"]["g"]), summary["2"]["F"])
        assert (srows[f"width{w}"]["loss"], srows[f"width{w}"]["seed"]) == ("kl", 0)

    # -- probe the teacher and two students on the concept file the test wrote
    run(
        cli,
        f"probe run {concepts} --teacher {model} --models teacher,{out}/students/width8,{out}/students/width24 "
        f"--seeds 2 --device cpu -o {out}/probe.parquet",
    )
    assert formats.parquet_metadata(out / "probe.parquet")["kind"] == "kdtool.probe"
    probe = formats.read_table(out / "probe.parquet")
    assert list(probe["width"]) == [32, 8, 24] and set(probe["layer"]) == {2}  # the middle of 4 blocks
    assert set(probe["n"]) == {48}
    for acc, ctrl, sel in zip(probe["accuracy"], probe["control_accuracy"], probe["selectivity"], strict=True):
        assert 0 <= acc <= 1 and sel == pytest.approx(acc - ctrl)

    # -- the report finds every file and tabulates what distill wrote
    run(cli, f"plot report {out}")
    rep = formats.read_json(out / "report" / "report.json")
    assert rep["kind"] == "kdtool.report"
    drawn = {f["figure"] for f in rep["figures"] if f["file"]}
    assert {
        "sae-curves",
        "sae-layers",
        "importance",
        "floor",
        "distill-curves",
        "floors",
        "calibration",
        "decomposition",
        "probe",
        "survival",
    } <= drawn
    for f in rep["figures"]:
        if f["file"]:
            assert (out / "report" / f["file"]).stat().st_size > 1000
    table = next(t for t in rep["tables"] if t["key"] == "distill_floors")
    cols = table["columns"]
    col = next(i for i, c in enumerate(cols) if c.startswith("floor"))
    got = {int(r[cols.index("d_S")]): r[col] for r in table["rows"]}
    assert got == pytest.approx(observed)
    html = (out / "report" / "index.html").read_text()
    assert "figures/floors.png" in html and "figures/probe.png" in html

    # -- every file and folder kdtool wrote says what it is and how it was made (kdtool info)
    paths = [out / "acts", out / "saes", out / "students", out / "report"]
    paths += [p for p in out.rglob("*") if not any(part.startswith(".") for part in p.relative_to(out).parts)]
    assert any("checkpoint" in p.parts for p in paths) and any("figures" in p.parts for p in paths)
    r = cli("--json", "info", *map(str, paths))
    assert r.exit_code == 0, r.output
    described = json.loads(r.stdout)["files"]
    unexplained = [d["path"] for d in described if not (d["kind"] or d.get("part_of"))]
    assert not unexplained, f"kdtool info cannot say what these are: {unexplained}"
    no_provenance = [d["path"] for d in described if not d["provenance"]]
    assert not no_provenance, f"no provenance: {no_provenance}"
    weights = formats.safetensors_header(out / "students" / "width8" / "model.safetensors")["metadata"]
    assert weights["kdtool.kind"] == "kdtool.distill.student.weights" and "command" in json.loads(weights["kdtool"])
