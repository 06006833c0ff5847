"""`kdtool train-sae` under torchrun: 2 CPU processes (gloo) train the SAEs of 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdtool import formats

TRAIN = (
    "--layer",
    "3,5",
    "--features",
    "48",
    "--l1",
    "0.05",
    "--target-l0",
    "6",
    "--l1-rate",
    "0.05",
    "--lr",
    "3e-3",
    "--batch-tokens",
    "512",
    "--log-every",
    "3",
    "--seed",
    "7",
    "--device",
    "cpu",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "kdtool", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def test_two_gloo_processes_match_one_and_resume(tmp_path, cli):
    from test_sae import write_random

    acts = tmp_path / "acts"
    write_random(acts, d=16, n=12_000, layers=(3, 5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cli("--quiet", "train-sae", "--acts", acts, *TRAIN, "--tokens", "10K", "-o", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    # two processes, killed-and-resumed in the middle: a first run to 5K tokens, then --resume to 10K
    first = _torchrun("train-sae", "--acts", str(acts), *TRAIN, "--tokens", "5K", "-o", str(tmp_path / "two"), "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)["kind"] == "kdtool.sae.train_summary"  # one summary (rank 0): one JSON document
    two = _torchrun(
        "train-sae", "--acts", str(acts), *TRAIN, "--tokens", "10K", "--resume", "-o", str(tmp_path / "two")
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for L in (3, 5):
        a, b = tmp_path / "one" / f"layer{L}", tmp_path / "two" / f"layer{L}"
        wa, wb = _weights(a), _weights(b)
        for name in wa:
            np.testing.assert_allclose(wb[name].numpy(), wa[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
        la, lb = formats.read_table(a / "train_log.parquet"), formats.read_table(b / "train_log.parquet")
        assert la["step"].tolist() == lb["step"].tolist() and la["tokens"].tolist() == lb["tokens"].tolist()
        for c in ("mse", "l0", "l1_term", "explained_variance", "alive_fraction", "lambda"):
            np.testing.assert_allclose(lb[c], la[c], rtol=1e-4, err_msg=c)
        assert json.loads((b / "cfg.json").read_text())["kdtool"]["tokens"] == 9_728
    meta = formats.parquet_metadata(tmp_path / "two" / "layer3" / "train_log.parquet")
    assert meta["provenance"]["config"]["world_size"] == 2


def test_batch_must_split_evenly_over_the_processes(tmp_path, cli, monkeypatch):
    from test_sae import write_random

    write_random(tmp_path / "acts", d=8, n=2_000, layers=(3,))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before joining any process group
    r = cli("train-sae", "--acts", tmp_path / "acts", "--features", "16", "--batch-tokens", "511", "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert "--batch-tokens 511 must be divisible by the 2 processes" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
def test_two_nccl_processes_match_one_on_cuda(tmp_path):
    """NCCL: one GPU per process, so it needs two; on one GPU it is skipped (scripts/gpu-check says so)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL DDP needs 2 GPUs, {torch.cuda.device_count()} visible")
    from test_sae import write_random

    acts = tmp_path / "acts"
    write_random(acts, d=16, n=12_000, layers=(3, 5))
    train = [*TRAIN[:-1], "cuda", "--tokens", "10K", "--acts", str(acts)]
    one = subprocess.run([sys.executable, "-m", "kdtool", "--quiet", "train-sae", *train, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("train-sae", *train, "-o", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    for L in (3, 5):
        a, b = _weights(tmp_path / "one" / f"layer{L}"), _weights(tmp_path / "two" / f"layer{L}")
        for k in a:
            np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=1e-3, atol=1e-4)
