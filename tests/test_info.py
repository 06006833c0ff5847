"""`kdtool info`: any artifact's kind, shape/schema, summary and provenance; one-line errors for bad files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from kdtool import formats, info

PROV = {
    "kdtool_version": "0.1.0",
    "command": "kdtool stats acts --sae saes",
    "seed": 7,
    "created": "2026-01-01T00:00:00+00:00",
    "inputs": [{"path": "acts", "size": 10, "files": 2}],
}


def _info_json(cli, *paths):
    r = cli("--json", "info", *paths)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["files"]


def _sae_tensors(d_in=8, d_sae=32):
    rng = np.random.default_rng(0)
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": np.zeros(d_sae, np.float32),
        "b_dec": np.zeros(d_in, np.float32),
    }


def test_kdtool_parquet_shows_kind_schema_summary_provenance(cli, tmp_path):
    p = tmp_path / "stats.parquet"
    importance = np.array([0.5, 0.25, 0.0, 0.125])
    summary = {"layers": {"12": {"F": 3, "L0": 1.5, "alpha": 0.5}}}
    formats.write_parquet(
        p,
        {"layer": np.full(4, 12, np.int32), "importance": importance, "alive": np.array([True, True, False, True])},
        kind="kdtool.stats",
        provenance=PROV,
        summary=summary,
    )
    (d,) = _info_json(cli, p)
    assert d["kind"] == "kdtool.stats" and d["format"] == "parquet"
    assert d["shape"]["rows"] == 4 and d["shape"]["columns"] == 3
    cols = {c["name"]: c for c in d["schema"]}
    assert cols["importance"]["max"] == 0.5 and cols["importance"]["mean"] == pytest.approx(importance.mean())
    assert cols["alive"]["true"] == 3 and cols["layer"]["type"] == "int32"
    assert d["summary"] == summary and d["provenance"] == PROV

    r = cli("info", p)
    assert r.exit_code == 0
    for needle in (
        "kdtool.stats",
        "4 rows",
        "importance",
        "layers.12.alpha",
        "kdtool stats acts --sae saes",
        "seed",
        "acts",
    ):
        assert needle in r.stdout, needle


def test_a_new_parquet_kind_needs_no_code(cli, tmp_path):
    p = tmp_path / "future.parquet"
    formats.write_parquet(
        p,
        {"step": np.arange(5), "loss": np.linspace(2, 1, 5)},
        kind="kdtool.future.thing",
        provenance=PROV,
        summary={"best": 1.0},
    )
    (d,) = _info_json(cli, p)
    assert d["kind"] == "kdtool.future.thing" and d["summary"] == {"best": 1.0}
    assert [c["name"] for c in d["schema"]] == ["step", "loss"] and d["schema"][1]["min"] == 1.0


def test_plain_parquet_and_csv(cli, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1.0, 2.0, float("nan")], "name": ["a", "b", "a"]}), tmp_path / "plain.parquet")
    (tmp_path / "t.csv").write_text("width,floor\n128,1.32\n256,1.008\n")
    plain, csv = _info_json(cli, tmp_path / "plain.parquet", tmp_path / "t.csv")
    assert plain["kind"] is None and plain["provenance"] is None
    x, name = plain["schema"]
    assert x["max"] == 2.0 and x["nan_or_inf"] == 1 and name["distinct"] == 2
    assert csv["format"] == "csv" and csv["shape"] == {"rows": 2, "columns": 2}
    assert csv["schema"][0]["min"] == 128 and csv["schema"][1]["max"] == 1.32
    r = cli("info", tmp_path / "plain.parquet")
    assert "(none: not written by kdtool)" in r.stdout and "(none recorded)" in r.stdout


def test_safetensors_header_only(cli, tmp_path):
    p = tmp_path / "w.safetensors"
    save_file(_sae_tensors(), str(p), metadata={"kdtool.kind": "kdtool.sae", "kdtool": json.dumps(PROV), "layer": "12"})
    save_file({"a": np.zeros((2, 3), np.float16)}, str(tmp_path / "plain.safetensors"))
    d, plain = _info_json(cli, p, tmp_path / "plain.safetensors")
    assert d["kind"] == "kdtool.sae" and d["provenance"] == PROV and d["metadata"] == {"layer": "12"}
    assert d["shape"]["tensors"] == 4 and d["shape"]["parameters"] == 8 * 32 * 2 + 32 + 8
    assert {t["name"]: t["shape"] for t in d["schema"]}["W_enc"] == [8, 32]
    assert plain["kind"] is None and plain["schema"] == [{"name": "a", "dtype": "F16", "shape": [2, 3]}]


def test_kdtool_json_and_table_json(cli, tmp_path):
    calib = {
        "kind": "kdtool.calibration",
        "linear": {"C": 19.2, "r2": -1.98},
        "affine": {"C": 8.96, "B": 0.623},
        "points": [{"width": 128, "observed": 1.32}],
        "provenance": PROV,
    }
    (tmp_path / "calib.json").write_text(json.dumps(calib))
    table = {
        "kind": "kdtool.predict",
        "rows": [{"width": 128, "floor": 0.08}, {"width": 256, "floor": 0.04}],
        "summary": {"capacity": "paper"},
        "provenance": PROV,
    }
    (tmp_path / "pred.json").write_text(json.dumps(table))
    c, t = _info_json(cli, tmp_path / "calib.json", tmp_path / "pred.json")
    assert c["kind"] == "kdtool.calibration" and c["provenance"] == PROV
    assert c["summary"]["linear"] == {"C": 19.2, "r2": -1.98} and c["summary"]["points"] == "[1 x dict]"
    assert t["kind"] == "kdtool.predict" and t["shape"] == {"rows": 2, "columns": 2}
    assert t["schema"][1]["max"] == 0.08 and t["summary"] == {"capacity": "paper"}
    r = cli("info", tmp_path / "calib.json")
    assert "linear.C" in r.stdout and "19.2" in r.stdout


def test_activation_cache_and_sae_folders(cli, tmp_path):
    acts = tmp_path / "acts"
    (acts / "layer12").mkdir(parents=True)
    manifest = {
        "kind": "kdtool.acts",
        "model": "tiny",
        "dataset": "austen",
        "seq_len": 64,
        "d_model": 8,
        "dtype": "float32",
        "layers": [12],
        "shard_tokens": 100,
        "tokens": 150,
        "shards": [
            {"file": "shard-00000.safetensors", "tokens": 100},
            {"file": "shard-00001.safetensors", "tokens": 50},
        ],
        "provenance": PROV,
    }
    (acts / "manifest.json").write_text(json.dumps(manifest))

    saes = tmp_path / "saes"
    for layer in (8, 12):  # kdtool layout: SAELens files + a kdtool section in cfg.json
        folder = saes / f"layer{layer}"
        folder.mkdir(parents=True)
        save_file(
            _sae_tensors(),
            str(folder / "sae_weights.safetensors"),
            metadata={"kdtool.kind": "kdtool.sae", "kdtool": json.dumps(PROV)},
        )
        (folder / "cfg.json").write_text(
            json.dumps({"d_in": 8, "d_sae": 32, "architecture": "standard", "kdtool": {"layer": layer}})
        )
    sparsify = tmp_path / "sparsify"
    sparsify.mkdir()
    save_file(
        {
            "encoder.weight": np.zeros((32, 8), np.float32),
            "encoder.bias": np.zeros(32, np.float32),
            "W_dec": np.zeros((32, 8), np.float32),
            "b_dec": np.zeros(8, np.float32),
        },
        str(sparsify / "sae.safetensors"),
    )
    (sparsify / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 32, "k": 4}))

    a, one, many, sp = _info_json(cli, acts, saes / "layer12", saes, sparsify)
    assert a["kind"] == "kdtool.acts" and a["shape"]["tokens"] == 150 and a["shape"]["shards"] == 2
    assert a["summary"]["model"] == "tiny" and a["provenance"] == PROV
    assert one["format"] == "sae folder (kdtool)" and one["summary"]["d_sae"] == 32 and one["provenance"] == PROV
    assert one["summary"]["kdtool"] == {"layer": 12}
    assert many["shape"] == {"saes": 2} and [m["name"] for m in many["schema"]] == ["layer12", "layer8"]
    assert sp["format"] == "sae folder (sparsify)" and sp["summary"]["k"] == 4 and sp["kind"] == "sae"


def test_figure_provenance_round_trip(cli, tmp_path):
    fig = tmp_path / "cap.svg"
    assert cli("plot", "calibration-normalized", _calib(tmp_path), "-o", fig).exit_code == 0
    (d,) = _info_json(cli, fig)
    assert d["kind"] == "kdtool.figure.calibration-normalized"
    assert d["provenance"]["inputs"][0]["path"].endswith("calib.json")


def _calib(tmp_path):
    p = tmp_path / "calib.json"
    p.write_text(
        json.dumps(
            {
                "kind": "kdtool.calibration",
                "points": [
                    {"width": w, "observed": o, "predicted": x}
                    for w, o, x in ((128, 1.32, 0.0795), (256, 1.008, 0.04), (512, 0.733, 0.0111))
                ],
            }
        )
    )
    return p


BAD = {
    "missing.parquet": None,
    "corrupt.parquet": b"PAR1 not really",
    "magic-only.pq": b"PAR1",
    "empty.json": b"",
    "broken.json": b'{"kind": ',
    "header-only.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{}",
    "huge-header.safetensors": b"\xff\xff\xff\xff\xff\xff\x00\x00{}",
    "unknown.bin": b"\x00\x01",
    "ragged.csv": b"a,b\n1,2\n3\n",
    "notpng.png": b"GIF89a",
    "empty-folder": "dir",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_exit_2_with_one_line_and_no_stdout(cli, tmp_path, name):
    good = tmp_path / "good.csv"
    good.write_text("x\n1\n")
    p = tmp_path / name
    if BAD[name] == "dir":
        p.mkdir()
    elif BAD[name] is not None:
        p.write_bytes(BAD[name])
    r = cli("info", good, p)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kdtool info: error: {p}"), r.stderr
    assert r.stdout == "", "nothing is printed when any file is bad"


def test_truncated_safetensors_is_refused(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file(_sae_tensors(), str(p))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(Exception, match="truncated safetensors"):
        info.describe(p)


def test_describing_files_loads_neither_torch_nor_matplotlib():
    """info.describe reads figures and tables without the heavy libraries (torch only for .pt files)."""
    code = (
        "import sys\n"
        "from kdtool import info\n"
        "print(','.join(m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
