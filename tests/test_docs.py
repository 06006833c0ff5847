"""Every command documents itself: help with a runnable Example, and docs/cli.md generated from --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdtool.cli import reference

ENTRIES = reference.walk()
GLOBAL = {"--json", "--quiet", "-q", "--debug", "--version", "--help", "-h"}


def _options(cmd) -> set[str]:
    out = {"--help", "-h"}
    for p in getattr(cmd, "params", []):
        out.update(getattr(p, "opts", []) or [])
        out.update(getattr(p, "secondary_opts", []) or [])
    return {o for o in out if o.startswith("-")}


def _resolve(argv: list[str]):
    """(command entry, remaining args) for `kdtool ARGV`: global flags first, then the subcommand path."""
    while argv and argv[0] in GLOBAL:
        argv = argv[1:]
    by_path = {tuple(e.path): e for e in ENTRIES}
    path: list[str] = []
    while argv and (*path, argv[0]) in by_path:
        path.append(argv[0])
        argv = argv[1:]
    return by_path.get(tuple(path)), argv


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_command_has_help_with_an_example(entry):
    if entry.doc.startswith(reference.PLACEHOLDER):
        pytest.skip(f"{entry.name} is still a placeholder")
    assert entry.doc, f"{entry.name} has no help text"
    ex = reference.examples(entry.doc)
    assert ex, f"{entry.name}: its help needs an 'Example: kdtool ...' line"
    assert any(reference.example_commands(x) for x in ex), f"{entry.name}: no example runs kdtool: {ex}"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_examples_name_real_commands_and_options(entry):
    """An example must parse against the CLI it documents: existing subcommands, existing options."""
    for example in reference.examples(entry.doc):
        for argv in reference.example_commands(example):
            target, rest = _resolve(argv)
            assert target is not None, f"{entry.name}: example names no kdtool command: {example}"
            assert not target.is_group, f"{entry.name}: example stops at a group: {example}"
            known = _options(target.command) | GLOBAL
            used = {a.split("=", 1)[0] for a in rest if a.startswith("-") and not _is_number(a)}
            unknown = used - known
            assert not unknown, f"{entry.name}: example uses unknown option(s) {sorted(unknown)}: {example}"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_example_checker_catches_a_stale_example():
    (plot,) = [e for e in ENTRIES if e.path == ["plot"]]
    target, rest = _resolve(["--json", "plot", "floor", "s.parquet", "--no-such-flag", "1"])
    assert target is plot and "--no-such-flag" not in _options(target.command)
    assert reference.example_commands("kdtool a --x 1 && scripts/x | kdtool b > out.txt") == [["a", "--x", "1"], ["b"]]


def test_cli_reference_is_current():
    want = reference.render()
    have = reference.DOC.read_text() if reference.DOC.exists() else ""
    assert have == want, "docs/cli.md is stale: run scripts/gen-docs"
    for e in ENTRIES:
        assert f"## `{e.name}`" in want


def test_reference_renders_at_a_fixed_width_without_colour():
    text = reference.help_text(["plot"])
    assert "\x1b[" not in text
    assert max(len(line) for line in text.splitlines()) <= reference.WIDTH
    assert "Example:\n   kdtool plot" in text


def test_plot_and_info_help_import_nothing_heavy():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from kdtool.cli.main import app\n"
        "for cmd in ('plot', 'info'):\n"
        "    r = CliRunner().invoke(app, [cmd, '--help'])\n"
        "    assert r.exit_code == 0, r.output\n"
        "print(','.join(m for m in ('matplotlib', 'numpy', 'pyarrow', 'torch') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_examples_need_no_checkout():
    """Help examples run from any directory: they name no path inside the repository (kdtool/..., scripts/...)."""
    for entry in ENTRIES:
        for example in reference.examples(entry.doc):
            assert "kdtool/data" not in example and "scripts/" not in example, f"{entry.name}: {example}"


def _readme_commands(text: str) -> list[str]:
    """The `kdtool ...` lines of the README's bash blocks, continuations joined and comments dropped."""
    import shlex

    out, block, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        line = pending + line.split(" #", 1)[0].strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("kdtool "):
            out.append(shlex.split(line)[1:])
    return out


def test_readme_commands_name_real_commands_and_options():
    """Every kdtool line in the README's bash blocks names a command and options that exist (issue 13)."""
    from conftest import REPO

    commands = _readme_commands((REPO / "README.md").read_text())
    assert len(commands) >= 15
    for argv in commands:
        target, rest = _resolve(argv)
        assert target is not None and not target.is_group, f"README names no kdtool command: {argv}"
        used = {a.split("=", 1)[0] for a in rest if a.startswith("-") and not _is_number(a) and a != "-"}
        unknown = used - (_options(target.command) | GLOBAL)
        assert not unknown, f"README uses unknown option(s) {sorted(unknown)}: kdtool {' '.join(argv)}"
