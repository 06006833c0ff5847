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
