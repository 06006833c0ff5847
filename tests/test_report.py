"""`kdtool plot report RUN_DIR`: discovery by metadata, the figures a run allows, tables, pages, failures as notes.

The run folder is written through kdtool's own writers: calib.json by `kdtool calibrate` on the paper's
Pythia-410M numbers, pred.parquet by `kdtool predict`, and stats/floors/curves/probe/train-log tables
with formats.write_parquet in the schemas of docs/formats.md.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdtool import formats
from kdtool.plots import style as st
from kdtool.plots.registry import KINDS
from kdtool.report import build as report
from kdtool.report import discover as report_discover
from kdtool.report import figures as report_figures
from kdtool.report import model as report_model
from kdtool.report import tables_toy
from kdtool.sae.training import LOG_COLUMNS
from kdtool.theory import theorem as theory

REPO = Path(__file__).resolve().parents[1]
PAPER_CSV = REPO / "kdtool" / "data" / "paper_pythia410m.csv"
WIDTHS = [8, 16, 32, 48]
LAYERS = ((6, 600, 12.0), (12, 500, 6.0))  # (layer, d_sae, L0)
TEACHER = "tiny/teacher"  # the model every file of the run fixture measures, recorded where kdtool's writers put it
#: the figures this run folder allows (FIGURES rules whose inputs are present); toy figures are not among them
ALLOWED = {
    "sae-curves",
    "l0-mse",
    "sae-layers",
    "sae-headline",
    "layer-capacity",  # layer-correlation needs >= 3 layers: this run has 2
    "importance",
    "capacity",
    "floor",
    "distill-curves",
    "floors",
    "calibration",
    "calibration-normalized",
    "decomposition",
    "probe",
}


def invoke(*args):
    from kdtool.cli.common import STATE
    from kdtool.cli.main import app

    STATE.json = STATE.quiet = STATE.debug = False
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def prov(command):
    from kdtool.provenance import make

    return make(command=command)


def write_stats(path: Path) -> dict:
    """Two layers in the documented kdtool.stats schema; the summary agrees with the rows."""
    rng = np.random.default_rng(0)
    cols = {k: [] for k in ("layer", "feature", "fires", "freq", "mean_act", "importance", "max_act", "alive")}
    summary = {"layers": {}, "source": {"model": TEACHER, "source": "cache"}}
    tokens = 100_000
    for layer, n, l0 in LAYERS:
        imp = np.arange(1, n + 1, dtype=float) ** -1.1
        rng.shuffle(imp)
        freq = rng.dirichlet(np.ones(n)) * l0
        alive = np.ones(n, bool)
        alive[:20] = False
        freq[~alive] = 0.0
        imp[~alive] = 0.0
        F, L0 = int(alive.sum()), float(freq.sum())
        alpha = 1 - L0 / F
        g = float(theory.g(alpha))
        summary["layers"][str(layer)] = {
            "F": F,
            "L0": L0,
            "alpha": alpha,
            "g": g,
            "d_star": F / g,
            "dead": n - F,
            "d_sae": n,
            "d_in": 64,
            "tokens": tokens,
            "mse": 0.0123,
            "explained_variance": 0.91,
            "alive_threshold": 1e-5,
            "notes": [],
        }
        cols["layer"] += [layer] * n
        cols["feature"] += list(range(n))
        cols["fires"] += list((freq * tokens).astype(np.int64))
        cols["freq"] += list(freq)
        cols["mean_act"] += list(np.sqrt(imp) / 2)
        cols["importance"] += list(imp)
        cols["max_act"] += list(np.sqrt(imp) * 3)
        cols["alive"] += list(alive)
    cols["layer"] = np.asarray(cols["layer"], np.int32)
    cols["feature"] = np.asarray(cols["feature"], np.int32)
    formats.write_parquet(
        path, cols, kind="kdtool.stats", provenance=prov("kdtool stats acts --sae saes"), summary=summary
    )
    return summary


def write_students(folder: Path) -> dict:
    from kdtool.distill import files as distill

    floors = {
        "width": WIDTHS,
        "params": [w * 1000 for w in WIDTHS],
        "non_embedding_params": [w * 500 for w in WIDTHS],
        "floor": [1.31, 1.02, 0.74, 0.66],
        "floor_std": [0.011, 0.012, 0.013, 0.014],
        "floor_scaled": [4 * f for f in (1.31, 1.02, 0.74, 0.66)],
        "raw_kl": [2683.0, 2089.0, 1515.5, 1351.7],
        "eval_ce": [3.1, 3.0, 2.9, 2.85],
        "n_evals": [2] * 4,
        "steps": [100] * 4,
        "tokens": [51_200] * 4,
        "loss": ["kl"] * 4,  # as distill writes it (a string column: the headline once choked on it)
    }
    formats.write_parquet(
        folder / "floors.parquet",
        floors,
        kind=distill.FLOORS_KIND,
        provenance=prov("kdtool distill --widths 8,16,32,48"),
        summary={"floor_from_step": 90, "config": {"run_key": {"teacher": TEACHER}}},
    )
    curves = {c: [] for c in distill.CURVE_COLUMNS}
    for w, f in zip(WIDTHS, floors["floor"], strict=True):
        for s in range(0, 101, 10):
            v = f + 2 * np.exp(-s / 20)
            row = {
                "width": w,
                "step": s,
                "tokens": s * 512,
                "train_kl": 1.05 * v,
                "train_kl_scaled": 4.2 * v,
                "train_ce": 3 + v,
                "eval_kl": v,
                "eval_kl_scaled": 4 * v,
                "eval_raw_kl": 2048 * v,
                "eval_ce": 3 + v,
                "lr": 3e-4,
                "grad_norm": 1.0,
                "loss": "kl",
                "train_loss": 1.05 * v,
                "train_aux": float("nan"),
            }
            for c in distill.CURVE_COLUMNS:
                curves[c].append(row[c])
    formats.write_parquet(
        folder / "curves.parquet",
        curves,
        kind=distill.CURVES_KIND,
        provenance=prov("kdtool distill"),
        summary={"floor_from_step": 90, "config": {"run_key": {"teacher": TEACHER}}},
    )
    return floors


def write_train_log(path: Path, layer: int, steps: int = 20) -> None:
    s = np.arange(1, steps + 1) * 10
    log = {
        "layer": [layer] * steps,
        "step": s,
        "tokens": s * 256,
        "mse": 1 / s,
        "l1_term": 0.1 / s,
        "loss": 1.1 / s,
        "l0": 50 * np.exp(-s / 80) + layer,
        "alive_fraction": np.linspace(1, 0.9, steps),
        "explained_variance": 1 - 1 / s,
        "lambda": [2.5e-5] * steps,
        "lr": [1e-3] * steps,
        "elapsed_s": s * 0.1,
    }
    assert tuple(log) == LOG_COLUMNS
    formats.write_parquet(
        path,
        log,
        kind="kdtool.sae.train_log",
        provenance=prov("kdtool train-sae"),
        summary={"layer": layer, "source": {"model": TEACHER}},
    )


def write_probe(path: Path) -> dict:
    from kdtool.probe import probes as probe

    acc = {
        ("question", "teacher"): 0.912,
        ("question", "students/width8"): 0.801,
        ("question", "students/width32"): 0.874,
        ("french", "teacher"): 0.955,
        ("french", "students/width8"): 0.902,
        ("french", "students/width32"): 0.931,
    }
    cols = {c: [] for c in probe.COLUMNS}
    for (concept, model), a in acc.items():
        width = {"teacher": 64, "students/width8": 8, "students/width32": 32}[model]
        row = {
            "concept": concept,
            "model": model,
            "role": "teacher" if model == "teacher" else "student",
            "width": width,
            "layer": 6,
            "pool": "mean",
            "accuracy": a,
            "accuracy_std": 0.02,
            "control_accuracy": 0.55,
            "control_accuracy_std": 0.03,
            "selectivity": a - 0.55,
            "n": 200,
            "n_test": 40,
        }
        for c in probe.COLUMNS:
            cols[c].append(row[c])
    formats.write_parquet(
        path, cols, kind="kdtool.probe", provenance=prov("kdtool probe run"), summary={"teacher": TEACHER}
    )
    return acc


def write_calib(path: Path) -> dict:
    r = invoke("calibrate", PAPER_CSV, "--bootstrap", "0", "-o", path)
    assert r.exit_code == 0, r.output
    return json.loads(path.read_text())


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with every kind of file but the toy sweep, and its report (drawn once, with --json)."""
    root = tmp_path_factory.mktemp("run")
    made = {"stats": write_stats(root / "stats.parquet")}
    (root / "students").mkdir()
    made["floors"] = write_students(root / "students")
    for layer, *_ in LAYERS:
        write_train_log(root / "saes" / f"layer{layer}" / "train_log.parquet", layer)
    # checkpoints are skipped: this log must not show up anywhere
    write_train_log(root / "saes" / "layer6" / "checkpoints" / "tokens-000000001000" / "train_log.parquet", 6, 3)
    made["probe"] = write_probe(root / "probe.parquet")
    made["calib"] = write_calib(root / "calib.json")
    r = invoke("predict", root / "stats.parquet", "--widths", ",".join(map(str, WIDTHS)), "-o", root / "pred.parquet")
    assert r.exit_code == 0, r.output
    acts = root / "acts"
    (acts / "layer6").mkdir(parents=True)
    (acts / "layer6" / "shard-00000.safetensors").write_bytes(b"not read")
    formats.write_json(
        acts / "manifest.json",
        {
            "kind": "kdtool.acts",
            "model": TEACHER,
            "layers": [6, 12],
            "d_model": 64,
            "tokens": 4096,
            "shards": [],
            "provenance": prov("kdtool cache-acts --tokens 4096"),
        },
    )
    (root / "notes.csv").write_text("a,b\n1,2\n")  # no kdtool metadata: ignored
    sae = root / "saes" / "layer6"  # an SAE folder as train-sae leaves it (weights are never opened)
    cfg = {"d_in": 64, "d_sae": 600, "kdtool": {"format": 1, "layer": 6}, "provenance": prov("kdtool train-sae")}
    formats.write_json(sae / "cfg.json", cfg)
    (sae / "sae_weights.safetensors").write_bytes(b"not read")
    student = root / "students" / "width8"  # a distilled student: kdtool.json; its other files are not searched
    info = {"kind": "kdtool.distill.student", "floor": {"width": 8}, "provenance": prov("kdtool distill")}
    formats.write_json(student / "kdtool.json", info)
    (student / "tokenizer.json").write_text("{ not json")
    formats.write_parquet(student / "stray.parquet", {"x": [1]}, kind="kdtool.stats")
    result = invoke("--json", "plot", "report", root, "-o", root / "report")
    assert result.exit_code == 0, result.output
    out = root / "report"
    return {
        "root": root,
        "out": out,
        "made": made,
        "result": result,
        "json": json.loads((out / "report.json").read_text()),
        "html": (out / "index.html").read_text(),
        "md": (out / "README.md").read_text(),
    }


def table(rep: dict, key: str) -> dict:
    found = [t for t in rep["json"]["tables"] if t["key"] == key]
    assert len(found) == 1, [t["key"] for t in rep["json"]["tables"]]
    t = found[0]
    return {
        "columns": t["columns"],
        "rows": t["rows"],
        "col": lambda name: [r[t["columns"].index(name)] for r in t["rows"]],
    }


# --------------------------------------------------------------------------------------------- the full run


def test_report_draws_exactly_the_figures_the_files_allow(run):
    figs = run["json"]["figures"]
    drawn = {f["figure"] for f in figs if f["file"]}
    registered = set(KINDS) - {"report"}
    assert drawn == ALLOWED & registered, [f["note"] for f in figs if f["note"]]
    assert set(run["json"]["unavailable"]) == ALLOWED - registered
    assert not any(f["figure"].startswith("toy") for f in figs)
    assert run["json"]["notes"] == []
    stdout = json.loads(run["result"].stdout)
    assert sorted(stdout["figures"]) == sorted(f["file"] for f in figs)
    assert stdout["index"].endswith("index.html") and stdout["notes"] == []


def test_figures_are_valid_pngs_carrying_their_inputs(run):
    for fig in run["json"]["figures"]:
        path = run["out"] / fig["file"]
        w, h = png_size(path)
        assert w > 300 and h > 200, (fig["file"], w, h)
        meta = st.read_figure_metadata(path)
        assert meta["kind"] == f"kdtool.figure.{fig['figure']}"
        assert [Path(i["path"]).relative_to(run["root"]).as_posix() for i in meta["provenance"]["inputs"]] == fig[
            "inputs"
        ]
        assert meta["provenance"]["params"]["command"] == "kdtool plot"  # in-process: argv is pytest's
        assert meta["provenance"]["params"]["kind"] == "report" and meta["provenance"]["config"]["report"] is True
    by_kind = {f["figure"]: f for f in run["json"]["figures"]}
    # d* of the stats file goes with the floors figure
    assert by_kind["floors"]["inputs"] == ["students/floors.parquet", "stats.parquet"]
    # the floors beside the curves, not any other
    assert by_kind["distill-curves"]["inputs"] == ["students/curves.parquet", "students/floors.parquet"]
    assert by_kind["floor"]["inputs"] == ["stats.parquet"]  # stats win over the predict table for Fig. 5b
    floor_opts = st.read_figure_metadata(run["out"] / by_kind["floor"]["file"])["provenance"]["config"]["options"]
    assert floor_opts["widths"] == WIDTHS  # the distilled widths are marked on the predicted curve


def test_discovery_skips_checkpoints_foreign_files_and_the_report(run):
    inputs = {i["path"]: i["kind"] for i in run["json"]["inputs"]}
    assert inputs == {
        "acts": "kdtool.acts",
        "calib.json": "kdtool.calibration",
        "pred.parquet": "kdtool.predict",
        "probe.parquet": "kdtool.probe",
        "saes/layer6": "kdtool.sae",
        "saes/layer6/train_log.parquet": "kdtool.sae.train_log",
        "saes/layer12/train_log.parquet": "kdtool.sae.train_log",
        "stats.parquet": "kdtool.stats",
        "students/curves.parquet": "kdtool.distill.curves",
        "students/floors.parquet": "kdtool.distill.floors",
        "students/width8": "kdtool.distill.student",
    }
    assert list(inputs)[5:7] == ["saes/layer6/train_log.parquet", "saes/layer12/train_log.parquet"]  # natural order
    t = table(run, "inputs")
    cmds = dict(zip(t["col"]("file"), t["col"]("command"), strict=True))
    assert cmds["acts"] == "kdtool cache-acts --tokens 4096"
    assert cmds["calib.json"] == run["made"]["calib"]["provenance"]["command"]
    details = dict(zip(t["col"]("file"), t["col"]("details"), strict=True))
    assert details["acts"].startswith(f"{TEACHER}, 4,096 tokens") and details["students/width8"] == "width 8"
    assert details["acts"].endswith("document order")
    assert details["saes/layer6"] == "layer 6, d_in 64, d_sae 600, kdtool layout"


def test_inputs_table_says_how_a_cache_is_ordered_and_how_an_sae_was_scaled(tmp_path):
    from kdtool.report.discover import _folder_artifact

    acts, sae = tmp_path / "acts", tmp_path / "sae"
    manifest = {"kind": "kdtool.acts", "model": "tiny", "layers": [6], "d_model": 64, "tokens": 10}
    formats.write_json(acts / "manifest.json", {**manifest, "shuffle": {"seed": 3, "method": "buckets"}})
    cfg = {"d_in": 64, "d_sae": 600, "kdtool": {"layer": 6, "normalize": {"method": "expected-norm", "scale": 5.7064}}}
    formats.write_json(sae / "cfg.json", cfg)
    (sae / "sae_weights.safetensors").write_bytes(b"not read")
    a, _ = _folder_artifact(acts, tmp_path, {"manifest.json"})
    s, _ = _folder_artifact(sae, tmp_path, {"cfg.json", "sae_weights.safetensors"})
    assert a.details.endswith("d_model 64, shuffled (seed 3)")
    assert s.details == "layer 6, d_in 64, d_sae 600, trained on x / 5.71 (expected-norm, folded), kdtool layout"


def test_sae_table_has_each_layers_measurements(run):
    t = table(run, "sae_layers")
    want = run["made"]["stats"]["layers"]
    assert t["col"]("layer") == [6, 12]
    for name, key in (("F (alive)", "F"), ("L0", "L0"), ("α", "alpha"), ("g(α)", "g"), ("d*", "d_star")):
        assert t["col"](name) == pytest.approx([want["6"][key], want["12"][key]]), name
    d_star = want["6"]["d_star"]
    assert abs(d_star - want["6"]["F"] / theory.g(want["6"]["alpha"])) < 1e-9
    assert f"{d_star:,.1f}" in run["html"] and f"{want['6']['alpha']:.5f}" in run["md"]
    logs = table(run, "sae_training")
    assert logs["col"]("layer") == [6, 12] and logs["col"]("step") == [200, 200]  # last rows, checkpoint log ignored
    assert logs["col"]("L0") == pytest.approx([50 * np.exp(-2.5) + 6, 50 * np.exp(-2.5) + 12])


def test_calibration_tables_reproduce_the_papers_fits(run):
    fits = table(run, "calibration")
    by_fit = {r[0]: dict(zip(fits["columns"], r, strict=True)) for r in fits["rows"]}
    assert by_fit["affine"]["C"] == pytest.approx(8.96, abs=0.01)  # paper Table 4
    assert by_fit["affine"]["B"] == pytest.approx(0.623, abs=0.001)
    assert by_fit["affine"]["R²"] == pytest.approx(0.993, abs=0.001)
    assert by_fit["linear"]["R²"] == pytest.approx(-1.98, abs=0.01)
    assert by_fit["power_law"]["γ"] == pytest.approx(0.47, abs=0.01)
    assert by_fit["affine_fixed"]["note"].startswith("skipped:")
    dec = table(run, "decomposition")
    assert dec["col"]("d_S") == [128, 256, 512, 768, 1024]
    c, b = run["made"]["calib"]["affine"]["C"], run["made"]["calib"]["affine"]["B"]
    assert dec["col"]("% geometric")[0] == pytest.approx((1.320 - b) / 1.320)
    assert dec["col"]("geometric C·L*")[0] == pytest.approx(c * 0.0795)
    for text in ("8.964", "0.9927", "-1.9829", "52.8%"):
        assert text in run["html"] and text in run["md"], text


def test_floor_probe_and_prediction_tables(run):
    fl = table(run, "distill_floors")
    assert fl["col"]("d_S") == WIDTHS and fl["col"]("floor (nats/token)") == run["made"]["floors"]["floor"]
    assert fl["col"]("raw KL") == run["made"]["floors"]["raw_kl"]
    pred = formats.read_table(run["root"] / "pred.parquet")
    pt = table(run, "predicted")
    assert pt["col"]("L*(d_S)") == pytest.approx(list(pred["floor"]))
    assert pt["col"]("F_S kept") == list(pred["features_kept"])
    pr = table(run, "probe")
    assert pr["columns"] == ["concept", "teacher (d=64)", "d_S=32", "d_S=8"]  # teacher, then widest first
    acc = run["made"]["probe"]
    assert pr["rows"][0] == [
        "question",
        [pytest.approx(100 * acc["question", "teacher"]), 2.0],
        [pytest.approx(100 * acc["question", "students/width32"]), 2.0],
        [pytest.approx(100 * acc["question", "students/width8"]), 2.0],
    ]
    assert "91.2 ± 2.0" in run["html"] and "80.1 ± 2.0" in run["md"]


class _Tags(HTMLParser):
    VOID = {"meta", "img", "br", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.links = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def test_pages_are_self_contained_and_well_formed(run):
    html, md = run["html"], run["md"]
    p = _Tags()
    p.feed(html)
    assert p.errors == [] and p.stack == []
    drawn = [f["file"] for f in run["json"]["figures"] if f["file"]]
    assert p.imgs == drawn and all((run["out"] / src).is_file() for src in p.imgs)
    assert all(link.startswith("#") for link in p.links)
    ids = {part.split('"')[0] for part in html.split(' id="')[1:]}
    assert {link[1:] for link in p.links} <= ids
    for text in (html, md):
        assert "http://" not in text and "https://" not in text
        assert "kdtool 0." in text and run["json"]["provenance"]["created"] in text  # how it was made
    assert "<script" not in html and "<style>" in html
    assert [line for line in md.splitlines() if line.startswith("![")] == [
        f"![{f['title']}]({f['file']})".replace("*", "\\*") for f in run["json"]["figures"] if f["file"]
    ]
    assert run["json"]["kind"] == "kdtool.report" and run["json"]["provenance"]["params"]["command"] == "kdtool plot"


# --------------------------------------------------------------------------------------------- failures and reruns


def test_broken_inputs_become_notes_not_a_crash(run, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    shutil.copy(run["root"] / "calib.json", root / "calib.json")
    (root / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "truncated.json").write_text('{"kind": "kdtool.calibration", "points": [')
    formats.write_parquet(root / "stats-bad.parquet", {"layer": [1, 1], "feature": [0, 1]}, kind="kdtool.stats")
    r = invoke("plot", "report", root)
    assert r.exit_code == 0, r.output
    rep = json.loads((root / "report" / "report.json").read_text())
    notes = "\n".join(rep["notes"])
    assert "garbage.parquet: skipped, not a readable Parquet file" in notes
    assert "truncated.json: skipped, not valid JSON" in notes and str(root) not in notes
    bad = [f for f in rep["figures"] if not f["file"]]
    assert {f["figure"] for f in bad} >= {"importance", "capacity"}
    assert all(f["note"].startswith(f"{f['figure']} (stats-bad.parquet): not drawn, ") for f in bad)
    assert next(f for f in bad if f["figure"] == "importance")["note"].endswith(
        "missing column(s) importance (has: layer, feature)"
    )
    assert len(table({"json": rep}, "calibration")["rows"]) == 4  # the good file still gives its tables
    drawn = {f["figure"] for f in rep["figures"] if f["file"]}
    assert {"calibration", "calibration-normalized"} <= drawn
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) >= 2 + len(bad) and any("garbage.parquet" in w for w in warnings)
    html = (root / "report" / "index.html").read_text()
    assert html.count('<p class="note">') >= len(bad) + 1 and "stats-bad.parquet" in html
    assert "Not drawn:" in (root / "report" / "README.md").read_text()


def _tiny_png(path: Path) -> None:
    raw = b"\x00\x00\x00\x00"
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw[:2])) + chunk(b"IEND", b"")
    )


def fake_draw(inputs, output, *, style, options):
    _tiny_png(output)


def fake_warn(inputs, output, *, style, options):
    import warnings

    warnings.warn("set_bad is deprecated, drawn anyway", PendingDeprecationWarning, stacklevel=1)
    _tiny_png(output)


def fake_fail(inputs, output, *, style, options):
    import warnings

    warnings.warn("ignored before the failure", stacklevel=1)
    raise ValueError("boom\nsecond line never shown")


def test_unregistered_kinds_failures_and_stale_figures(run, tmp_path, monkeypatch):
    import sys
    import types

    figs = types.ModuleType("kdtool_test_fakes.figs")  # registry entries name a dotted module
    figs.fake_draw, figs.fake_fail = fake_draw, fake_fail
    monkeypatch.setitem(sys.modules, "kdtool_test_fakes.figs", figs)
    root = tmp_path / "run"
    root.mkdir()
    shutil.copy(run["root"] / "probe.parquet", root / "probe.parquet")
    shutil.copy(run["root"] / "calib.json", root / "calib.json")
    registered = {
        "probe": ("kdtool_test_fakes.figs", "fake_draw", "probe help"),
        "calibration": ("kdtool_test_fakes.figs", "fake_fail", "cal help"),
        "decomposition": ("kdtool_test_fakes.figs", "fake_draw", "dec help"),
    }
    said = []
    rep = report.build_report(root, registered=registered, on_warning=said.append)
    files = {f.figure: f.file for f in rep.figures}
    assert files == {"probe": "figures/probe.png", "calibration": None, "decomposition": "figures/decomposition.png"}
    assert rep.unavailable == ["calibration-normalized"]
    assert rep.notes == ["calibration (calib.json): not drawn, ValueError: boom"] and said == rep.notes
    user_file = root / "report" / "figures" / "mine.png"
    _tiny_png(user_file)
    (root / "probe.parquet").unlink()
    rep = report.build_report(root, registered=registered)
    assert not (root / "report" / "figures" / "probe.png").exists()  # drawn by the last report, now stale
    assert user_file.exists() and (root / "report" / "figures" / "decomposition.png").exists()
    assert "probe" not in (root / "report" / "README.md").read_text().lower()


def test_toy_table_and_figures_from_a_toy_sweep(tmp_path):
    from kdtool.toy import store as toy_sweep

    rng = np.random.default_rng(1)
    rows = {c: [] for c in ("n", "d_teacher", "alpha", "d_student", "seed", "floor_data", "pred_refined", "pred_naive")}
    for alpha in (0.8, 0.99):
        for ds in (1, 2, 3):
            for seed in range(3):
                pred = 1.0 / ds + alpha
                for c, v in zip(
                    rows, (10, 3, alpha, ds, seed, pred * (1 + 0.1 * rng.normal()), pred, 2 - ds / 3), strict=True
                ):
                    rows[c].append(v)
    formats.write_parquet(tmp_path / "toy.parquet", rows, kind=toy_sweep.KIND, provenance=prov("kdtool toy"))
    arts, notes = report_discover.discover(tmp_path)
    assert [a.kind for a in arts] == ["kdtool.toy"] and notes == []
    jobs, unavailable = report_figures.plan_figures(arts, registered={"toy-grid": ("m", "f", "h")})
    assert [j.rule.figure for j in jobs] == ["toy-grid"] and "toy-scatter" in unavailable
    (t,) = tables_toy.toy(arts)
    by = {r[0]: dict(zip(t.columns, r, strict=True)) for r in t.rows}
    assert set(by) == {"0.8", "0.99", "all"} and by["all"]["points"] == 6 and by["0.8"]["seeds"] == 3
    obs = np.asarray(rows["floor_data"]).reshape(2, 3, 3).mean(axis=2)  # alpha x d_S, mean over seeds
    pred = np.asarray(rows["pred_refined"]).reshape(2, 3, 3)[:, :, 0]
    assert by["0.99"]["Pearson r (refined)"] == pytest.approx(np.corrcoef(pred[1], obs[1])[0, 1])
    assert by["all"]["Pearson r (refined)"] == pytest.approx(np.corrcoef(pred.ravel(), obs.ravel())[0, 1])
    assert by["0.8"]["g(α)"] == pytest.approx(theory.g(0.8))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plot", "report"], "give exactly one run folder (got 0)"),
        (["plot", "report", "EMPTY", "EMPTY"], "give exactly one run folder (got 2)"),
        (["plot", "report", "nowhere"], "nowhere: no such folder"),
        (["plot", "report", "FILE"], "not a folder"),
        (["plot", "report", "EMPTY"], "no kdtool files found"),
        (["plot", "report", "RUN", "-o", "FILE"], "exists and is not a folder"),
        (["plot", "report", "RUN", "--widths", "x"], "--widths"),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "RUN").mkdir()
    formats.write_json(tmp_path / "RUN" / "x.json", {"kind": "kdtool.something", "provenance": None})
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtool plot: error:") and needle in lines[0], r.stderr


def test_report_kind_is_listed_and_every_registered_figure_has_a_rule():
    assert "report" in KINDS and KINDS["report"][:2] == ("kdtool.report.build", "build_report")
    figures = [r.figure for r in report_figures.FIGURES]
    assert len(figures) == len(set(figures))
    drawn_by_rule = {KINDS[f][:2] for f in figures if f in KINDS}
    missing = [k for k, spec in KINDS.items() if k != "report" and spec[:2] not in drawn_by_rule]
    assert missing == [], "registered figure kinds that kdtool plot report never draws (add a FIGURES rule)"
    assert all(r.section in report_model.SECTIONS for r in report_figures.FIGURES)


# --------------------------------------------------------------------------------------------- one model per figure


def test_a_figure_combines_only_files_of_one_model(run, tmp_path):
    """The fixture's calib.json is the paper's Pythia calibration: no d* of the run's tiny stats file on its panel;
    a calibration of the run's own floors (same teacher) gets it; floors of another model get no d* nor widths."""
    by_kind = {f["figure"]: f for f in run["json"]["figures"]}
    meta = st.read_figure_metadata(run["out"] / by_kind["calibration-normalized"]["file"])
    assert "d_star" not in meta["provenance"]["config"]["options"]
    root = tmp_path / "run"
    (root / "students").mkdir(parents=True)
    shutil.copy(run["root"] / "stats.parquet", root / "stats.parquet")
    shutil.copy(run["root"] / "pred.parquet", root / "pred.parquet")
    write_students(root / "students")
    r = invoke("calibrate", root / "students" / "floors.parquet", "--predicted", root / "pred.parquet",
               "--layer", "6", "--bootstrap", "0", "-o", root / "calib.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((root / "calib.json").read_text())["inputs"]["model"] == TEACHER
    other = root / "other"
    other.mkdir()
    write_students(other)
    for name in ("floors.parquet", "curves.parquet"):  # the same floors, distilled from another teacher
        meta_other = formats.parquet_metadata(other / name)
        cols = formats.read_table(other / name)
        summary = meta_other["summary"] | {"config": {"run_key": {"teacher": "someone/else"}}}
        formats.write_parquet(other / name, cols, kind=meta_other["kind"], provenance=prov("x"), summary=summary)
    arts, _ = report_discover.discover(root)
    teacher = {a.rel: a.teacher for a in arts}
    assert teacher["calib.json"] == teacher["stats.parquet"] == teacher["pred.parquet"] == TEACHER
    assert teacher["other/floors.parquet"] == "someone/else"
    jobs, _ = report_figures.plan_figures(arts)
    mine = {(j.rule.figure, j.inputs[0].rel): j for j in jobs}
    d_star = run["made"]["stats"]["layers"]["6"]["d_star"]
    assert mine["calibration-normalized", "calib.json"].options["d_star"] == pytest.approx(d_star)
    assert [a.rel for a in mine["floors", "students/floors.parquet"].inputs] == [
        "students/floors.parquet",
        "stats.parquet",
    ]
    assert [a.rel for a in mine["floors", "other/floors.parquet"].inputs] == ["other/floors.parquet"]
    # the predicted-floor figure marks only its own model's student widths
    assert mine["floor", "stats.parquet"].options["widths"] == WIDTHS
    ablation = [j for j in jobs if j.rule.figure == "objective-ablation"]
    assert all(len({a.teacher for a in j.inputs}) == 1 for j in ablation)
    # several figures of one rule: titles say which file each shows
    titles = [j.title for j in jobs if j.rule.figure == "floors"]
    assert titles == ["Distillation floor vs width (Fig. 6b) — other/floors.parquet",
                      "Distillation floor vs width (Fig. 6b) — students/floors.parquet"]  # fmt: skip


# --------------------------------------------------------------------------------------------- the headline


def test_headline_answers_first_per_model(run, tmp_path):
    """d* per layer with its spread over SAEs, L* at each student width, observed and calibrated floors and the
    smallest width for a target, one card per teacher, at the top of each page and in report.json."""
    cards = run["json"]["headline"]["models"]
    by_teacher = {c["teacher"]: c for c in cards}
    assert set(by_teacher) == {TEACHER, "EleutherAI/pythia-410m"}  # the paper's calibration is not applied to tiny
    mine = by_teacher[TEACHER]
    d = {t["key"]: t for t in mine["tables"]}["headline_d_star"]
    want = run["made"]["stats"]["layers"]
    assert [r[:3] for r in d["rows"]] == [[6, 1, pytest.approx(want["6"]["d_star"])],
                                          [12, 1, pytest.approx(want["12"]["d_star"])]]  # fmt: skip
    fl = {t["key"]: t for t in mine["tables"]}["headline_floors"]
    pred = formats.read_table(run["root"] / "pred.parquet")
    col = {c: [r[i] for r in fl["rows"]] for i, c in enumerate(fl["columns"])}
    assert col["d_S"] == WIDTHS and col["observed (nats)"] == run["made"]["floors"]["floor"]
    l6 = [f for f, layer in zip(pred["floor"], pred["layer"], strict=True) if layer == 6]
    assert col["L* layer 6"] == pytest.approx(l6)
    assert not any(c.startswith("calibrated") for c in fl["columns"])
    assert any("No calibration of this model" in line for line in mine["lines"])
    assert any("no stats file of this model" in line for line in by_teacher["EleutherAI/pythia-410m"]["lines"])
    html, md = run["html"], run["md"]
    assert html.index('id="headline"') < html.index('id="sae-measurements"')
    assert md.index("## Headline") < md.index("## SAE measurements")
    assert f"{want['6']['d_star']:,.1f}" in html[: html.index('id="sae-measurements"')]

    # several SAEs of a layer and a calibration of the run's own floors: the spread and the target answer
    root = tmp_path / "run"
    (root / "students").mkdir(parents=True)
    write_students(root / "students")
    write_stats(root / "stats-a.parquet")
    summary = formats.parquet_metadata(root / "stats-a.parquet")["summary"]
    cols = formats.read_table(root / "stats-a.parquet")
    summary["layers"]["6"]["d_star"] *= 1.5  # a second SAE of the same layers that counts more features
    summary["layers"]["12"]["d_star"] *= 1.5
    formats.write_parquet(root / "stats-b.parquet", cols, kind="kdtool.stats", provenance=prov("b"), summary=summary)
    r = invoke("predict", root / "stats-a.parquet", "--widths", ",".join(map(str, WIDTHS)), "-o", root / "pred.parquet")
    assert r.exit_code == 0, r.output
    r = invoke("calibrate", root / "students" / "floors.parquet", "--predicted", root / "pred.parquet",
               "--layer", "6", "--bootstrap", "0", "-o", root / "calib.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = report.build_report(root, registered={})
    (card,) = rep.headline
    d = {t.key: t for t in card.tables}["headline_d_star"]
    assert d.rows[0][:5] == [6, 2, pytest.approx(1.25 * want["6"]["d_star"]), pytest.approx(want["6"]["d_star"]),
                             pytest.approx(1.5 * want["6"]["d_star"])]  # fmt: skip
    fl = {t.key: t for t in card.tables}["headline_floors"]
    assert "calibrated (nats, layer 6)" in fl.columns
    cal = json.loads((root / "calib.json").read_text())["affine"]
    cal_col = [r[fl.columns.index("calibrated (nats, layer 6)")] for r in fl.rows]
    assert cal_col == pytest.approx([cal["C"] * f + cal["B"] for f in l6])
    target = [line for line in card.lines if line.startswith("Smallest width for a floor of")]
    assert len(target) == 2 and "B + 10%" in target[0] and "layer 6" in target[0]
    page = (root / "report" / "report.json").read_text()
    assert json.loads(page)["headline"]["models"][0]["lines"] == card.lines


def test_readme_excerpt_prints_the_headline_first(run):
    import subprocess
    import sys

    script = REPO / "scripts" / "readme-excerpt"
    r = subprocess.run([sys.executable, script, run["root"]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.index(f"# Headline: teacher {TEACHER}") < text.index("# Critical width d*") < text.index("# SAE meas")
    d_star = run["made"]["stats"]["layers"]["6"]["d_star"]
    assert f"{d_star:,.1f}" in text.split("# SAE meas")[0]


def test_warnings_while_drawing_go_to_stderr_not_into_the_page(run, tmp_path, monkeypatch):
    import sys
    import types

    figs = types.ModuleType("kdtool_test_fakes.warns")
    figs.fake_warn = fake_warn
    monkeypatch.setitem(sys.modules, "kdtool_test_fakes.warns", figs)
    root = tmp_path / "run"
    root.mkdir()
    shutil.copy(run["root"] / "probe.parquet", root / "probe.parquet")
    said = []
    report.build_report(
        root, registered={"probe": ("kdtool_test_fakes.warns", "fake_warn", "h")}, on_warning=said.append
    )
    assert said == ["figures/probe.png: set_bad is deprecated, drawn anyway"]
    for page in ("index.html", "README.md"):
        assert "deprecated" not in (root / "report" / page).read_text(), page
    assert json.loads((root / "report" / "report.json").read_text())["figures"][0]["warnings"] == [
        "set_bad is deprecated, drawn anyway"
    ]


def test_inputs_command_wraps_at_spaces_and_stays_whole_in_markdown(run):
    cmd = run["made"]["calib"]["provenance"]["command"]
    html, md = run["html"], run["md"]
    assert f'<td class="cmd"><code>{cmd}</code></td>' in html.replace("&#x27;", "'")
    css = html[html.index("<style>") : html.index("</style>")]
    assert "break-all" not in css and "overflow-wrap:anywhere" not in css
    assert "td.cmd code{white-space:pre-wrap;word-break:normal" in css
    assert f"`{cmd}`" in md


def test_headline_spreads_over_finished_saes_each_once():
    """An SAE measured in two stats files counts once (by its folder); train-sae's token checkpoints are left out
    of the headline's spread (they are plot sensitivity's tokens axis) and the note says how many."""
    from types import SimpleNamespace

    from kdtool.report import headline

    def stats(rel, saes):
        return SimpleNamespace(rel=rel, path=rel, summary={"saes": saes})

    final = {"layer": 12, "sae": "/run/saes/layer12", "checkpoint": False, "d_star": 100.0}
    wide = {"layer": 12, "sae": "/run/saes/layer12-x8", "checkpoint": False, "d_star": 150.0}
    snap = {"layer": 12, "sae": "/run/saes/layer12/checkpoints/tokens-1", "checkpoint": True, "d_star": 400.0}
    chosen, left_out = headline._chosen(
        [stats("stats.parquet", {"layer12": final}), stats("widths.parquet", {"layer12": final, "x8": wide}),
         stats("tokens.parquet", {"tokens-1": snap})]
    )  # fmt: skip
    assert [(a.rel, e.key) for a, e in chosen] == [("stats.parquet", "layer12"), ("widths.parquet", "x8")]
    assert left_out == 1
