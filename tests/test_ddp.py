"""`kdtool distill` under torchrun: 2 CPU processes (gloo) give the floors of 1 process, with several losses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from kdtool import formats

ARGS = (
    "--widths",
    "8,16",
    "--heads",
    "head-dim:8",
    "--steps",
    "8",
    "--warmup",
    "1",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--eval-every",
    "2",
    "--eval-batches",
    "2",
    "--lr",
    "3e-3",
    "--device",
    "cpu",
    "--save-every",
    "4",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path, cli):
    from test_distill import make_teacher_dir, make_text

    model = make_teacher_dir(tmp_path / "model")
    text = make_text(tmp_path / "text.txt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # two losses: the hidden students' maps train through DDP too (their gradients must be averaged)
    common = ("--model", str(model), "--dataset", str(text), *ARGS, "--loss", "kl,hidden")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cli("--quiet", "distill", *common, "-o", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "kdtool",
            "--quiet",
            "distill",
            *common,
            "--format",  # the floors table on stdout (without it, a folder writer's table goes to stderr)
            "csv",
            "-o",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    f1 = formats.read_table(tmp_path / "one" / "floors.parquet")
    f2 = formats.read_table(tmp_path / "two" / "floors.parquet")
    assert f1["width"].tolist() == f2["width"].tolist() == [8, 8, 16, 16]
    assert f2["loss"].tolist() == ["kl", "hidden"] * 2
    np.testing.assert_allclose(f2["floor"], f1["floor"], rtol=1e-4)
    np.testing.assert_allclose(f2["raw_kl"], f1["raw_kl"], rtol=1e-4)
    assert f2["tokens"].tolist() == f1["tokens"].tolist()  # both processes' tokens are counted
    meta = formats.parquet_metadata(tmp_path / "two" / "floors.parquet")
    assert meta["provenance"]["config"]["world_size"] == 2
    # one set of outputs (rank 0), one floors table on stdout (--format csv)
    assert two.stdout.count("width") == 1
    from safetensors.torch import load_file

    m1, m2 = (load_file(tmp_path / run / "width16-hidden" / "residual_map.safetensors") for run in ("one", "two"))
    for name in m1:  # the map's gradients were averaged across the ranks like the student's
        np.testing.assert_allclose(m2[name].numpy(), m1[name].numpy(), rtol=1e-3, atol=1e-5)
    assert (tmp_path / "two" / "checkpoint" / "state.pt").exists()


@pytest.mark.gpu
def test_bf16_autocast_on_cuda(tmp_path):
    """On a GPU the students run under bf16 autocast and still learn (floors finite, below the start)."""
    from test_distill import make_teacher_dir, make_text

    model = make_teacher_dir(tmp_path / "model")
    text = make_text(tmp_path / "text.txt")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdtool",
            "--quiet",
            "distill",
            "--model",
            str(model),
            "--dataset",
            str(text),
            *ARGS[:-4],
            "--device",
            "cuda",
            "-o",
            str(tmp_path / "gpu"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    curves = formats.read_table(tmp_path / "gpu" / "curves.parquet")
    first = curves["eval_kl"][curves["step"] == 0]
    floors = formats.read_table(tmp_path / "gpu" / "floors.parquet")
    assert np.all(np.isfinite(floors["floor"])) and np.all(floors["floor"] < first)
