"""scripts/repo_env.py: the repository's Python scripts find the checkout's .venv from a plain shell."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import repo_env


def test_returns_when_the_modules_import_here(monkeypatch):
    monkeypatch.setattr(repo_env.os, "execv", lambda *a: pytest.fail("must not re-exec"))
    repo_env.ensure(__file__, ("json",))


def test_re_executes_the_script_under_the_checkouts_venv(tmp_path, monkeypatch):
    script = tmp_path / "scripts" / "tool"
    script.parent.mkdir()
    script.write_text("")
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    calls = []

    class Execd(Exception):  # a real execv never returns
        pass

    def execv(path, argv):
        calls.append((path, argv))
        raise Execd

    monkeypatch.setattr(repo_env.os, "execv", execv)
    monkeypatch.setattr(sys, "argv", [str(script), "--dry-run"])
    with pytest.raises(Execd):
        repo_env.ensure(str(script), ("no_such_module_kdtool_test",))
    assert calls == [(venv_python, [str(venv_python), str(script), "--dry-run"])]


def test_without_a_venv_it_exits_with_one_line_saying_how_to_get_one(tmp_path, capsys):
    script = tmp_path / "scripts" / "tool"
    script.parent.mkdir()
    with pytest.raises(SystemExit) as stop:
        repo_env.ensure(str(script), ("no_such_module_kdtool_test",))
    message = str(stop.value.code)
    assert message.startswith("tool: this Python") and "no_such_module_kdtool_test" in message
    assert "scripts/test or scripts/demo" in message and "\n" not in message
