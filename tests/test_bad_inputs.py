"""Bad inputs to every command, run through the real CLI: exit 2, one line naming the culprit.

Every case also passes `-o` (unless it gives its own, or the command writes nothing) so that we can
check no output (nor a temporary file) is left behind.
The subprocesses run a few at a time (they are mostly interpreter start-up). To keep the file
fast, the first SUBPROCESS cases run as real processes and the rest in-process (CliRunner, the
same error path); the real-process ones cover every kind of failure.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kdtool import formats
from kdtool.formats import write_json, write_parquet

PAPER = Path(__file__).resolve().parents[1] / "kdtool" / "data" / "paper_pythia410m.csv"
PARAM = ["--features", "1000", "--alpha", "0.99"]
TINY = ["--model", "{d}/tiny", "--layers", "1", "--tokens", "100", "--seq-len", "16"]  # cache-acts
SAE = ["--features", "32", "--batch-tokens", "512", "--tokens", "4096"]  # train-sae on {d}/acts (d 16, 8K tokens)
STUDENTS = ["--model", "{d}/tiny", "--widths", "8,16", "--heads", "head-dim:8", "--steps", "4", "--warmup", "1"]
STUDENTS += ["--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--save-every", "2"]

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
    # usage errors Typer would draw as a box (issue 14): one line too
    ("usage-output-is-a-folder", ["predict", *PARAM, "--widths", "8", "-o", "{d}"], "is a directory"),
    ("usage-completion-tcsh", ["completion", "tcsh"], "'tcsh' is not one of"),
    ("usage-unknown-command", ["bogus"], "No such command 'bogus'"),
    ("usage-unknown-option", ["predict", "--bogus"], "No such option: --bogus"),
    # text that is not text, or none (issue 14)
    ("cache-acts-binary-text", ["cache-acts", *TINY, "--dataset", "{d}/garbage.txt"], "garbage.txt: not UTF-8 text"),
    ("cache-acts-unknown-file-type", ["cache-acts", *TINY, "--dataset", "{d}/garbage.bin"], "unknown file type"),
    ("cache-acts-empty-dataset", ["cache-acts", *TINY, "--dataset", "{d}/empty.txt"], "empty.txt: no 16-token"),
    (
        "cache-acts-seq-len-beyond-positions",
        ["cache-acts", *TINY, "--dataset", "{d}/docs.txt", "--seq-len", "1024"],
        "--seq-len 1024: more than the 512 positions",
    ),
    # NaN and cut-short files are refused naming the file, never as "the loss diverged" (issue 14)
    ("stats-nan-sae-weights", ["stats", "--sae", "{d}/nan-sae", "--acts", "{d}/acts"], "nan-sae: W_enc holds NaN"),
    (
        "stats-nan-activations",
        ["stats", "--sae", "{d}/sae", "--acts", "{d}/nan-acts"],
        "shard-00001.safetensors: holds NaN",
    ),
    (
        "stats-cut-shard",
        ["stats", "--sae", "{d}/sae", "--acts", "{d}/cut-acts"],
        "shard-00000.safetensors: not a complete",
    ),
    ("stats-cut-ae-pt", ["stats", "--sae", "{d}/cut-dl/ae.pt", "--acts", "{d}/acts"], "ae.pt: not a complete PyTorch"),
    ("stats-pickle-ae-pt", ["stats", "--sae", "{d}/evil-dl/ae.pt", "--acts", "{d}/acts"], "never unpickles code"),
    ("train-sae-nan-shard", ["train-sae", "--acts", "{d}/nan-acts", *SAE], "holds NaN or infinite activations"),
    (
        "train-sae-batch-beyond-the-cache",
        ["train-sae", "--acts", "{d}/acts", "--features", "32", "--batch-tokens", "1M"],
        "--batch-tokens 1,000,000: more than the 8,000 tokens",
    ),
    (
        "train-sae-resume-cut-optimizer",
        ["train-sae", "--acts", "{d}/acts", *SAE, "--checkpoint-every", "512", "--resume", "-o", "{d}/saes-cut"],
        "optimizer.safetensors: not a complete safetensors file",
    ),
    (
        "distill-resume-cut-width-pt",
        ["distill", *STUDENTS, "--dataset", "{d}/docs.txt", "--resume", "-o", "{d}/students-cut"],
        "width16.pt: not a complete PyTorch tensor file",
    ),
    # refused before any work, with the advice that fits (issue 14)
    ("distill-empty-dataset", ["distill", *STUDENTS, "--dataset", "{d}/empty.txt"], "empty.txt: no training batch"),
    ("distill-lr-inf", ["distill", *STUDENTS, "--dataset", "{d}/docs.txt", "--lr", "inf"], "--lr must be a finite"),
    (
        "distill-read-only-output",
        ["distill", *STUDENTS, "--dataset", "{d}/docs.txt", "-o", "/sys/kdtool-students"],
        "/sys/kdtool-students: cannot write here",
    ),
    (
        "predict-read-only-output",
        ["predict", *PARAM, "--widths", "8", "-o", "/sys/kdtool.json"],
        "/sys/kdtool.json: cannot",
    ),
    (
        "probe-run-missing-model",
        ["probe", "run", "{d}/concepts.parquet", "--models", "teacher,{d}/nope", "--teacher", "{d}/tiny"],
        "--models {d}/nope: no such folder",
    ),
    ("info-pickle", ["info", "{d}/evil-dl/ae.pt"], "never unpickles code"),
]
#: cases whose command writes nothing (no -o appended); exit codes other than 2
NO_OUTPUT = {"usage-completion-tcsh", "usage-unknown-command", "info-pickle"}
#: the output each case gets when it gives none: stats writes Parquet; the rest take any name
SUFFIX = {"stats": ".parquet", "probe": ".parquet"}
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


def _make_model_inputs(d: Path) -> None:
    """A tiny model, texts, activation caches and SAEs (fine and damaged) and interrupted runs to resume."""
    import torch
    from synthetic_acts import write_random
    from tiny_models import make_model_dir

    from kdtool.sae.config import TrainConfig
    from kdtool.sae.sources import CacheSource
    from kdtool.sae.training import Trainer
    from kdtool.sae.writers import save_dictionary_learning, save_saelens

    make_model_dir(d / "tiny")
    (d / "empty.txt").write_text("")
    (d / "garbage.txt").write_bytes(bytes(range(256)) * 64)
    (d / "garbage.bin").write_text("text, but not a known file type")
    (d / "docs.txt").write_text("\n\n".join(f"Paragraph {i}: the fox jumps over {i} lazy dogs." for i in range(400)))
    for name in ("acts", "nan-acts", "cut-acts"):
        write_random(d / name, d=16, n=8_000, layers=(3,), shard=4_000)
    shard = d / "nan-acts" / "layer3" / "shard-00001.safetensors"
    x = formats.load_safetensors(shard)["acts"]
    x[7, 3] = float("nan")
    formats.save_safetensors(shard, {"acts": x}, kind="kdtool.acts.shard")
    cut = d / "cut-acts" / "layer3" / "shard-00000.safetensors"
    cut.write_bytes(cut.read_bytes()[:300])
    g = torch.Generator().manual_seed(0)
    sae = {"W_enc": torch.randn(16, 32, generator=g), "W_dec": torch.randn(32, 16, generator=g)}
    sae |= {"b_enc": torch.zeros(32), "b_dec": torch.zeros(16)}
    cfg = {"architecture": "standard", "d_in": 16, "d_sae": 32, "hook_name": "blocks.2.hook_resid_post"}
    save_saelens(d / "sae", sae, cfg=cfg)
    save_saelens(d / "nan-sae", {**sae, "W_enc": sae["W_enc"].clone().fill_(float("nan"))}, cfg=cfg)
    save_dictionary_learning(d / "cut-dl", sae, layer=3)
    (d / "cut-dl" / "ae.pt").write_bytes((d / "cut-dl" / "ae.pt").read_bytes()[:200])
    (d / "evil-dl").mkdir()
    torch.save({"bias": Evil()}, d / "evil-dl" / "ae.pt")
    write_parquet(
        d / "concepts.parquet",
        {"text": ["a b", "c d"] * 10, "concept": ["x"] * 20, "label": [0, 1] * 10},
        kind="kdtool.concepts",
    )
    # a train-sae run killed after its checkpoints, whose optimizer state a crash cut short
    tcfg = TrainConfig(layers=[3], d_in=16, d_sae=32, batch_tokens=512, tokens=4096, checkpoint_every=512)
    Trainer(tcfg, CacheSource(d / "acts"), d / "saes-cut", stop_after_steps=3).run()
    opt = sorted((d / "saes-cut" / "layer3" / "checkpoints").glob("*/optimizer.safetensors"))[-1]
    opt.write_bytes(opt.read_bytes()[:1000])
    # a distill run whose final write was lost and whose checkpoint of width 16 was cut short
    from typer.testing import CliRunner

    from kdtool.cli.main import app

    argv = [a.format(d=d) for a in (*STUDENTS, "--dataset", "{d}/docs.txt", "-o", "{d}/students-cut")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared CPU (conftest's one_thread)
    try:
        r = CliRunner().invoke(app, ["--quiet", "distill", *argv], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    (d / "students-cut" / "floors.parquet").unlink()
    width16 = d / "students-cut" / "checkpoint" / "width16.pt"
    width16.write_bytes(width16.read_bytes()[:5000])


class Evil:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("pwned",))


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
    _make_model_inputs(d)
    return d


def _argv(case, d: Path):
    name, argv, _ = case
    out = d / "out" / f"{name}{SUFFIX.get(argv[0], '.json')}"
    args = [a.format(d=d) for a in argv] + ["--quiet"]  # progress and log lines off: the error is the only line
    if name in NO_OUTPUT or "-o" in args:
        return args, out
    return args + ["-o", str(out)], out


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


def _check(name, argv, needle, code, stdout, stderr, out, d: Path):
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "weights_only=False" not in stderr
    command = " ".join(argv[:2] if argv[0] in ("probe", "plot") else argv[:1])
    prefix = "kdtool: error: " if command == "bogus" else f"kdtool {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert needle.format(d=d) in lines[0], lines[0]
    assert stdout == ""
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("name,argv,needle", CASES[:SUBPROCESS], ids=[c[0] for c in CASES[:SUBPROCESS]])
def test_bad_input_subprocess(results, workdir, name, argv, needle):
    _check(name, argv, needle, *results[name], workdir)


@pytest.mark.parametrize("name,argv,needle", CASES[SUBPROCESS:], ids=[c[0] for c in CASES[SUBPROCESS:]])
def test_bad_input_in_process(cli, workdir, name, argv, needle):
    args, out = _argv((name, argv, needle), workdir)
    r = cli(*args)
    _check(name, argv, needle, r.exit_code, r.stdout, r.stderr, out, workdir)


def test_debug_shows_the_traceback(kdtool_proc, tmp_path):
    proc = kdtool_proc("--debug", "predict", "--features", "10", "--alpha", "1.5", "--widths", "8")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_low_alpha_warns_but_runs(kdtool_proc):
    proc = kdtool_proc("--json", "predict", "--features", "100", "--alpha", "0.5", "--widths", "8")
    assert proc.returncode == 0, proc.stderr
    assert "not monotone" in proc.stderr
    assert json.loads(proc.stdout)["rows"][0]["features_kept"] == 23  # floor(8 * g(0.5)) = floor(23.08)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system (tmpfs), where root may mount one; the test is skipped elsewhere."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    import gc

    gc.collect()  # a failed run's traceback may still hold a file open in there
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # detach now, released when the last file closes


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(cli, workdir, small_disk):
    opts = ["--tokens", "20K", "--seq-len", "16", "--shard-size", "8K", "--acts-dtype", "float32"]
    model = ["--model", workdir / "tiny", "--layers", "1", "--dataset", workdir / "docs.txt"]
    r = cli("--quiet", "cache-acts", *model, *opts, "-o", small_disk / "acts")
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "no space left on device" in r.stderr and str(small_disk / "acts" / "layer1" / "shard-00000") in r.stderr
    r = cli("--quiet", "distill", *[a.format(d=workdir) for a in STUDENTS], "--dataset", workdir / "docs.txt",
            "-o", small_disk / "students")  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "no space left on device" in r.stderr and str(small_disk / "students") in r.stderr
    assert "enforce fail" not in r.stderr and r.stderr.strip().splitlines() == [r.stderr.strip()]
    leftovers = [p for p in small_disk.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not [p for p in leftovers if ".tmp" in p.name], leftovers
