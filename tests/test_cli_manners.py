"""The terminal a newcomer sees: help at 80 columns, pipeline order, global flags anywhere, `-o -`."""

from __future__ import annotations

import json

import pytest

from kdtool.cli import help_format, reference
from kdtool.cli.main import COMMANDS

ENTRIES = reference.walk()


@pytest.mark.parametrize("entry", [[]] + [e.path for e in ENTRIES], ids=lambda p: " ".join(["kdtool", *p]))
def test_help_fits_80_columns_without_cutting_words(entry):
    text = reference.help_text(entry, width=80)
    assert "…" not in text, f"help cut with an ellipsis:\n{text}"
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    assert "<bool>" not in text, "a flag shows a <bool> metavar as if it took a value"
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every example is one pasteable command: lines end in ` \` until its last
        if line.strip().strip("│").strip() == "Example:":
            block = []
            for nxt in lines[i + 1 :]:
                body = nxt.strip().strip("│").rstrip()
                if not body.strip():
                    break
                block.append(body)
            assert block and block[0].strip().startswith(("kdtool", "scripts/")), block
            assert all(b.endswith(" \\") for b in block[:-1]) and not block[-1].endswith("\\"), block


def test_wrap_command_never_splits_a_word_and_round_trips():
    cmd = "kdtool probe run concepts.parquet --models teacher,students/width128,students/width768 --per-class 200"
    lines = help_format.wrap_command(cmd, width=40)
    # a line is over the width only when it holds one word longer than the width
    assert all(len(line) <= 40 or " " not in line.strip().removesuffix(" \\") for line in lines)
    joined = " ".join(line.strip().removesuffix("\\").strip() for line in lines)
    assert joined == cmd
    assert help_format.examples("Example:\n" + "\n".join(lines)) == [cmd]


def test_tidy_joins_prose_keeps_layout_and_isolates_examples():
    doc = """First line.

    A paragraph hard-wrapped
    at some width.
    Example: kdtool predict --widths 1

    Table:
      a  1
      b  2
    """
    out = help_format.tidy(doc)
    assert "A paragraph hard-wrapped at some width." in out
    assert "Example:\n  kdtool predict --widths 1" in out
    assert "Table:\n  a  1\n  b  2" in out


def test_commands_are_listed_in_pipeline_order(cli):
    text = cli("--help").output
    positions = [text.index(f" {name} ") for name, _ in COMMANDS]
    assert positions == sorted(positions)
    assert [name for name, _ in COMMANDS][:6] == ["cache-acts", "train-sae", "stats", "predict", "distill", "calibrate"]


def test_completion_lists_commands_in_pipeline_order(kdtool_proc):
    r = kdtool_proc(env={"_KDTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "kdtool ", "COMP_CWORD": "1"})
    names = [line.split(",")[-1] for line in r.stdout.split() if line]
    wanted = [name for name, _ in COMMANDS]
    listed = [n for n in names if n in wanted]
    assert listed == wanted, r.stdout


@pytest.mark.parametrize("flag", ["--json", "--quiet", "--debug"])
def test_global_flags_work_after_the_subcommand(kdtool_proc, flag):
    before = kdtool_proc(flag, "predict", "--features", "100", "--alpha", "0.9", "--widths", "2,4")
    after = kdtool_proc("predict", "--features", "100", "--alpha", "0.9", "--widths", "2,4", flag)
    assert before.returncode == after.returncode == 0, after.stderr
    if flag == "--json":  # the same rows; the provenance differs only in the command line it records
        assert json.loads(after.stdout)["rows"] == json.loads(before.stdout)["rows"]
        assert json.loads(after.stdout)["kind"] == "kdtool.predict"
    else:
        assert after.stdout == before.stdout


def test_wide_tables_turn_vertical_instead_of_cutting_numbers():
    from rich.console import Console

    from kdtool.cli.common import fitted_table

    headers = ["layer", "width", "features_kept", "features_dropped", "floor", "normalized"]
    rows = [["12", "128", "3445", "25220", "0.000271828182", "1"]]
    console = Console(width=40, record=True)
    console.print(fitted_table(headers, rows, title="t", width=40))
    text = console.export_text()
    assert "…" not in text and "0.000271828182" in text and max(map(len, text.splitlines())) <= 40
    wide = Console(width=200, record=True)
    wide.print(fitted_table(headers, rows, width=200))
    assert " ".join(headers) in " ".join(wide.export_text().split())  # one header row when it fits


@pytest.mark.parametrize("fmt,check", [("csv", lambda s: s.startswith("layer,width")), ("json", json.loads)])
def test_dash_means_stdout(kdtool_proc, tmp_path, fmt, check):
    r = kdtool_proc(
        "predict", "--features", "100", "--alpha", "0.9", "--widths", "2,4", "-o", "-", "-f", fmt, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert check(r.stdout)
    assert not (tmp_path / "-").exists()


def test_dash_parquet_goes_to_a_pipe(kdtool_proc, tmp_path):
    import subprocess
    import sys

    code = "from kdtool.cli.main import run; run()"
    argv = ["predict", "--features", "100", "--alpha", "0.9", "--widths", "2,4", "-o", "-", "-f", "parquet"]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout[:4] == b"PAR1"


def test_plain_progress_logs_every_period_with_rate_and_eta(capsys):
    from kdtool.cli.common import PlainProgress

    now = [0.0]
    with PlainProgress(every=10, clock=lambda: now[0]) as bar:
        task = bar.add_task("train-sae", total=1000, rate="")
        for step in range(1, 11):
            now[0] = step * 3.0
            bar.update(task, completed=step * 100, rate=f"{100 / 3:.0f} tok/s")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train-sae: 400/1,000 (40%), 33 tok/s, elapsed 0:12, ETA 0:18"), lines
    assert len(lines) == 3 and lines[-1].startswith("train-sae: 1,000/1,000 (100%)"), lines  # at 12 s, 24 s and the end


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--features", "28665", "--l0", "218.3", "--widths", "128,256,512,768,1024"],
        ["calibrate", "--example", "paper", "--baseline-width", "1024", "-o", "calib.json"],
        ["completion", "zsh"],
    ],
)
def test_readme_examples_run_outside_the_checkout(kdtool_proc, tmp_path, argv):
    r = kdtool_proc(*argv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_readme_names_no_repo_paths_in_kdtool_commands():
    from conftest import REPO

    for line in (REPO / "README.md").read_text().splitlines():
        if line.lstrip().startswith("kdtool "):
            assert "kdtool/data" not in line, line
