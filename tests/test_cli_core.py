"""The CLI conventions every subcommand shares."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdtool import __version__
from kdtool.errors import BadInput
from kdtool.parsing import parse_count, parse_int_list


def test_version(kdtool_proc):
    r = kdtool_proc("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"kdtool {__version__}"


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from kdtool.cli.main import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'datasets', 'sklearn', 'scipy') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported at --help: {r.stdout.strip()}"


@pytest.mark.parametrize(
    "text,expected",
    [("300M", 300_000_000), ("2.5B", 2_500_000_000), ("1e6", 1_000_000), ("50k", 50_000), ("1_000", 1000)],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1.5", "-3", "3X", "nan"])
def test_parse_count_rejects(text):
    with pytest.raises(BadInput):
        parse_count(text)


def test_parse_int_list_ranges():
    assert parse_int_list("128,256,512") == [128, 256, 512]
    assert parse_int_list("64:256:64") == [64, 128, 192, 256]
    assert parse_int_list("1:3,10") == [1, 2, 3, 10]
    for bad in ("", "a,b", "5:1", "1:2:0", "0,1", "1:2:3:4"):
        with pytest.raises(BadInput):
            parse_int_list(bad)


def test_completion_scripts_are_current(cli):
    """completions/ must match what `kdtool completion SHELL` prints (regenerate with scripts/gen-completions)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "completions"
    for shell, name in (("bash", "kdtool.bash"), ("zsh", "_kdtool"), ("fish", "kdtool.fish")):
        r = cli("completion", shell)
        assert r.exit_code == 0
        assert (root / name).read_text() == r.output, f"completions/{name} is stale: run scripts/gen-completions"


def test_tab_completion_lists_subcommands(kdtool_proc):
    r = kdtool_proc(env={"_KDTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "kdtool pre", "COMP_CWORD": "1"})
    assert r.returncode == 0, r.stderr
    assert "predict" in r.stdout


def test_atomic_write_leaves_no_partial_file_and_normal_mode(tmp_path):
    import os

    from kdtool.formats import atomic_path, write_text

    target = tmp_path / "out.txt"
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_text(target, "whole")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "whole"
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask


def test_rich_table_is_not_cut_to_80_columns_off_a_terminal(cli):
    r = cli("predict", "--features", "28665", "--alpha", "0.99238", "--widths", "128,256", "--format", "table")
    assert r.exit_code == 0, r.output
    assert "features_dropped" in r.output and "…" not in r.output
    from kdtool.theory import theorem as theory

    dropped = 28665 - theory.features_kept(128, theory.g(0.99238), 28665)
    assert f" {dropped} " in r.output


def test_provenance_command_in_process_names_the_subcommand_and_options(cli, tmp_path):
    from kdtool.formats import parquet_metadata

    out = tmp_path / "p.parquet"
    assert cli("predict", "--features", "100", "--alpha", "0.9", "--widths", "2,4", "-o", out).exit_code == 0
    prov = parquet_metadata(out)["provenance"]
    assert prov["command"].startswith("kdtool predict ")
    assert "--widths=2,4" in prov["command"] and prov["params"]["features"] == 100
