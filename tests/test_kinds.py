"""Every file kind kdtool writes is registered (kdtool/kinds.py), and inputs of the wrong kind are refused by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdtool import formats, kinds
from kdtool.errors import BadInput

PACKAGE = Path(kinds.__file__).resolve().parent
WRITTEN = re.compile(r"""(?:KIND\s*=\s*|kind\s*=\s*|"kind":\s*)"(kdtool\.[a-z_.]+)\"""")


def kinds_in_source() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        found.update(WRITTEN.findall(path.read_text()))
    return found


def test_the_source_scan_finds_kinds():
    assert {"kdtool.stats", "kdtool.predict", "kdtool.calibration"} <= kinds_in_source()


def test_every_written_kind_is_registered():
    missing = sorted(kinds_in_source() - set(kinds.KINDS))
    assert not missing, f"register these in kdtool/kinds.py: {missing}"


def test_kind_of_reads_each_container(tmp_path):
    formats.write_parquet(tmp_path / "p.parquet", {"a": [1]}, kind="kdtool.predict")
    formats.write_json(tmp_path / "c.json", {"kind": "kdtool.calibration"})
    (tmp_path / "sae").mkdir()
    formats.write_json(tmp_path / "sae" / "cfg.json", {"d_in": 2, "kdtool": {"layer": 3}})
    (tmp_path / "plain.csv").write_text("width,floor\n1,2\n")
    assert kinds.kind_of(tmp_path / "p.parquet") == "kdtool.predict"
    assert kinds.kind_of(tmp_path / "c.json") == "kdtool.calibration"
    assert kinds.kind_of(tmp_path / "sae") == "kdtool.sae"
    assert kinds.kind_of(tmp_path / "plain.csv") is None
    assert kinds.kind_of(tmp_path / "missing") is None


def test_expect_names_the_file_what_it_is_and_what_was_wanted(tmp_path):
    formats.write_parquet(tmp_path / "predict.parquet", {"a": [1]}, kind="kdtool.predict")
    with pytest.raises(BadInput) as e:
        kinds.expect(tmp_path / "predict.parquet", "kdtool.calibration", "--calibration")
    msg = str(e.value)
    assert "predict.parquet is a prediction table (kdtool.predict, from `kdtool predict`)" in msg
    assert "--calibration wants calib.json (kdtool.calibration, from `kdtool calibrate`)" in msg
    (tmp_path / "plain.csv").write_text("width,floor\n1,2\n")
    assert kinds.expect(tmp_path / "plain.csv", "kdtool.distill.floors", "OBSERVED") is None
    with pytest.raises(BadInput, match="records no kdtool kind"):
        kinds.expect(tmp_path / "plain.csv", "kdtool.distill.floors", "OBSERVED", allow_unmarked=False)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["predict", "--features", "9", "--alpha", "0.9", "--widths", "2", "-c", "{predict}"], "--calibration wants"),
        (["calibrate", "{predict}"], "OBSERVED wants students/floors.parquet"),
        (["predict", "{predict}", "--widths", "2"], "STATS wants stats.parquet"),
    ],
)
def test_commands_check_the_kind_of_their_inputs(kdtool_proc, tmp_path, argv, message):
    predict = tmp_path / "predict.parquet"
    formats.write_parquet(predict, {"width": [1]}, kind="kdtool.predict")
    r = kdtool_proc(*[a.format(predict=predict) for a in argv])
    assert r.returncode == 2
    assert message in r.stderr and "kdtool.predict" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train-sae", "--acts", "{folder}"], "--acts wants acts/"),
        (["stats", "--sae", "{predict}"], "--sae wants saes/layer12/"),
        (["probe", "run", "{predict}"], "CONCEPTS wants concepts.parquet"),
        (["toy", "--summarize", "{predict}"], "--summarize wants toy.parquet"),
        (["distill", "--teacher-cache", "{folder}", "--steps", "2"], "--teacher-cache wants teacher-cache/"),
    ],
)
def test_every_input_checks_its_kind(kdtool_proc, tmp_path, argv, message):
    predict = tmp_path / "predict.parquet"
    formats.write_parquet(predict, {"width": [1]}, kind="kdtool.predict")
    folder = tmp_path / "calib-folder"  # a folder whose marker says it is something else
    folder.mkdir()
    formats.write_json(folder / "manifest.json", {"kind": "kdtool.calibration"})
    r = kdtool_proc(*[a.format(predict=predict, folder=folder) for a in argv], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_every_plot_kind_refuses_a_wrong_kind_of_file(cli, tmp_path):
    from kdtool.plots import registry

    assert set(registry.ACCEPTS) == set(registry.KINDS) - {"report"}, "give each plot kind its ACCEPTS entry"
    candidates = ["kdtool.predict", "kdtool.toy", "kdtool.distill.floors"]
    for kind, accepted in registry.ACCEPTS.items():
        assert set(accepted) <= set(kinds.KINDS), kind
        wrong = next(k for k in candidates if k not in accepted)
        path = tmp_path / f"{wrong}.parquet"
        formats.write_parquet(path, {"width": [1]}, kind=wrong)
        r = cli("plot", kind, path, "-o", tmp_path / "x.png")
        assert r.exit_code == 2, (kind, r.output)
        assert f"is {kinds.describe(wrong)}; plot {kind} wants" in r.stderr, r.stderr


def test_plot_floor_refuses_observed_floors(cli, tmp_path):
    floors = tmp_path / "floors.parquet"
    formats.write_parquet(floors, {"width": [8], "floor": [1.0]}, kind="kdtool.distill.floors")
    r = cli("plot", "floor", floors, "-o", tmp_path / "x.png")
    assert r.exit_code == 2
    assert "floors.parquet is a distillation floors table (kdtool.distill.floors" in r.stderr
    assert "plot floor wants stats.parquet (kdtool.stats" in r.stderr and "predict.parquet (kdtool.predict" in r.stderr
