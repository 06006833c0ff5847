"""Bad inputs to predict/calibrate, run through a real subprocess: exit 2, one line naming the culprit.

Every case also passes `-o` so that we can check no output (nor a temporary file) is left behind.
The subprocesses run a few at a time (they are mostly interpreter start-up). To keep the file
fast, the first SUBPROCESS cases run as real processes and the rest in-process (CliRunner, the
same error path); the real-process ones cover every kind of failure.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kdtool.formats import write_json, write_parquet

PAPER = Path(__file__).resolve().parents[1] / "kdtool" / "data" / "paper_pythia410m.csv"
PARAM = ["--features", "1000", "--alpha", "0.99"]

# (id, argv with {d} for the work folder and {out} for the output file, text the one error line must contain)
CASES = [
    ("predict-missing-file", ["predict", "{d}/nope.parquet", "--widths", "128"], "nope.parquet"),
    ("predict-folder", ["predict", "{d}", "--widths", "128"], "is a folder"),
    ("predict-empty-file", ["predict", "{d}/empty.csv", "--widths", "128"], "empty.csv"),
    ("predict-wrong-columns", ["predict", "{d}/nocol.csv", "--widths", "128"], "importance"),
    ("predict-nan", ["predict", "{d}/nan.csv", "--widths", "128"], "NaN"),
    ("predict-unknown-suffix", ["predict", "{d}/stats.xlsx", "--widths", "128"], "stats.xlsx"),
    ("predict-corrupt-parquet", ["predict", "{d}/corrupt.parquet", "--widths", "128"], "corrupt.parquet"),
    ("predict-negative-width", ["predict", *PARAM, "--widths", "128,-4"], "--widths"),
    ("predict-bad-widths-syntax", ["predict", *PARAM, "--widths", "12a"], "--widths"),
    ("predict-bad-range", ["predict", *PARAM, "--widths", "512:128"], "--widths"),
    ("predict-alpha-one", ["predict", "--features", "1000", "--alpha", "1.0", "--widths", "8"], "--alpha"),
    ("predict-alpha-negative", ["predict", "--features", "1000", "--alpha", "-0.2", "--widths", "8"], "--alpha"),
    ("predict-l0-too-big", ["predict", "--features", "100", "--l0", "150", "--widths", "8"], "--l0"),
    ("predict-no-source", ["predict", "--widths", "8"], "--features"),
    ("predict-layer-absent", ["predict", "{d}/stats.parquet", "--widths", "8", "--layer", "99"], "--layer"),
    ("predict-bad-importance", ["predict", *PARAM, "--importance", "zipf:x", "--widths", "8"], "--importance"),
    (
        "predict-not-a-calibration",
        ["predict", *PARAM, "--widths", "8", "--calibration", "{d}/other.json"],
        "other.json",
    ),
    (
        "predict-calibration-not-json",
        ["predict", *PARAM, "--widths", "8", "--calibration", "{d}/empty.csv"],
        "empty.csv",
    ),
    ("calibrate-missing-file", ["calibrate", "{d}/nope.csv"], "nope.csv"),
    ("calibrate-wrong-columns", ["calibrate", "{d}/nocol.csv"], "floor"),
    ("calibrate-negative-width", ["calibrate", "{d}/negwidth.csv"], "width"),
    ("calibrate-nan-floor", ["calibrate", "{d}/nanfloor.csv"], "NaN"),
    ("calibrate-baseline-width-absent", ["calibrate", str(PAPER), "--baseline-width", "300"], "--baseline-width"),
    ("calibrate-too-few-points", ["calibrate", "{d}/two.csv"], "at least 3"),
    ("calibrate-predicted-lacks-width", ["calibrate", "{d}/obs.csv", "--predicted", "{d}/pred.csv"], "pred.csv"),
    (
        "calibrate-two-baselines",
        ["calibrate", str(PAPER), "--baseline", "0.5", "--baseline-width", "1024"],
        "--baseline",
    ),
    ("calibrate-corrupt-parquet", ["calibrate", "{d}/corrupt.parquet"], "corrupt.parquet"),
    ("calibrate-negative-bootstrap", ["calibrate", str(PAPER), "--bootstrap", "-5"], "--bootstrap"),
]
#: this many cases run as real subprocesses (spread over both commands and all kinds of failure)
SUBPROCESS = 18
ORDER = [  # the subprocess ones first
    "predict-missing-file",
    "predict-folder",
    "predict-empty-file",
    "predict-wrong-columns",
    "predict-nan",
    "predict-unknown-suffix",
    "predict-corrupt-parquet",
    "predict-negative-width",
    "predict-bad-widths-syntax",
    "predict-alpha-one",
    "predict-layer-absent",
    "predict-not-a-calibration",
    "calibrate-missing-file",
    "calibrate-wrong-columns",
    "calibrate-nan-floor",
    "calibrate-baseline-width-absent",
    "calibrate-too-few-points",
    "calibrate-predicted-lacks-width",
]
CASES.sort(key=lambda c: ORDER.index(c[0]) if c[0] in ORDER else len(ORDER))


def _make_inputs(d: Path) -> None:
    (d / "empty.csv").write_text("")
    (d / "nocol.csv").write_text("width,loss\n128,1.0\n256,0.5\n")
    (d / "nan.csv").write_text("layer,feature,importance,alive\n12,0,0.5,true\n12,1,nan,true\n")
    (d / "stats.xlsx").write_bytes(b"PK\x03\x04 not really")
    (d / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(200)) + b"garbage")
    write_parquet(
        d / "stats.parquet",
        {"layer": [12, 12], "feature": [0, 1], "importance": [0.5, 0.1], "freq": [0.01, 0.001], "alive": [True, True]},
        kind="kdtool.stats",
    )
    write_json(d / "other.json", {"kind": "kdtool.predict", "rows": []})
    (d / "negwidth.csv").write_text("width,floor\n128,1.3\n-256,1.0\n512,0.7\n")
    (d / "nanfloor.csv").write_text("width,floor\n128,1.3\n256,nan\n512,0.7\n")
    (d / "two.csv").write_text("width,floor,predicted\n128,1.3,0.08\n256,1.0,0.04\n")
    (d / "obs.csv").write_text("width,floor\n128,1.3\n256,1.0\n512,0.7\n")
    (d / "pred.csv").write_text("layer,width,floor\n0,128,0.08\n0,256,0.04\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _make_inputs(d)
    return d


def _argv(case, d: Path):
    name, argv, _ = case
    out = d / "out" / f"{name}.json"
    return [a.format(d=d) for a in argv] + ["-o", str(out)], out


@pytest.fixture(scope="module")
def results(workdir):
    """Run the subprocess cases once (a few in parallel); map case id -> (returncode, stdout, stderr, out)."""
    from conftest import run_kdtool

    def one(case):
        args, out = _argv(case, workdir)
        proc = run_kdtool(*args, timeout=120)
        return case[0], (proc.returncode, proc.stdout, proc.stderr, out)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, CASES[:SUBPROCESS]))


def test_enough_cases():
    assert len(CASES) >= 15 and SUBPROCESS >= 15
    assert len({c[0] for c in CASES}) == len(CASES)
    assert all(c[0] in ORDER for c in CASES[:SUBPROCESS])


def _check(name, argv, needle, code, stdout, stderr, out):
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith(f"kdtool {argv[0]}: error: ")
    assert needle in lines[0], lines[0]
    assert stdout == ""
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("name,argv,needle", CASES[:SUBPROCESS], ids=[c[0] for c in CASES[:SUBPROCESS]])
def test_bad_input_subprocess(results, name, argv, needle):
    _check(name, argv, needle, *results[name])


@pytest.mark.parametrize("name,argv,needle", CASES[SUBPROCESS:], ids=[c[0] for c in CASES[SUBPROCESS:]])
def test_bad_input_in_process(cli, workdir, name, argv, needle):
    args, out = _argv((name, argv, needle), workdir)
    r = cli(*args)
    _check(name, argv, needle, r.exit_code, r.stdout, r.stderr, out)


def test_debug_shows_the_traceback(kdtool_proc, tmp_path):
    proc = kdtool_proc("--debug", "predict", "--features", "10", "--alpha", "1.5", "--widths", "8")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_low_alpha_warns_but_runs(kdtool_proc):
    proc = kdtool_proc("--json", "predict", "--features", "100", "--alpha", "0.5", "--widths", "8")
    assert proc.returncode == 0, proc.stderr
    assert "not monotone" in proc.stderr
    assert json.loads(proc.stdout)["rows"][0]["features_kept"] == 23  # floor(8 * g(0.5)) = floor(23.08)
