"""scripts/gpu-check --dry-run lists every test marked `gpu` (found here independently, from the test files' source)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import REPO


def marked_gpu() -> set[str]:
    """Node ids (file::function) of tests marked gpu: by decorator, or by a module-level pytestmark."""
    found = set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_gpu = any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
            and "gpu" in ast.unparse(n.value)
            for n in tree.body
        )  # fmt: skip
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                marks = [ast.unparse(d) for d in node.decorator_list]
                if module_gpu or any(m.endswith("mark.gpu") for m in marks):
                    found.add(f"tests/{path.name}::{node.name}")
    return found


def test_dry_run_lists_every_gpu_test_and_the_benchmarks():
    env = {**os.environ, "KDTOOL_PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check"), "--dry-run"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    listed = {line.strip().split("[")[0] for line in r.stdout.splitlines() if "::" in line}
    expected = marked_gpu()
    assert len(expected) >= 6  # bf16 (SAE, distill), both kernels and auto on CUDA, the stream thread, cache-acts, NCCL
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))
    for step in ("gpu-tests", "train_sae", "cache_acts", "stream", "distill"):
        assert f"  {step}  " in r.stdout
    assert "KDTOOL_BENCH_DEVICE=cuda" in r.stdout and "--device cuda" in r.stdout
