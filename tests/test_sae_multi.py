"""train-sae with several SAEs per layer side by side: each equals the SAE trained alone (bit for bit on
CPU), the folders are self-describing, checkpoints and --resume cover all of them, and every reader
(stats, info, the report's discovery, SAELens-layout loaders) takes them as ordinary SAE folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic_acts import write_random
from test_sae import _log_without_time as _log
from test_sae import _weights

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.parsing import short_float
from kdtool.plots.sae import _run_name, read_logs
from kdtool.sae.config import SAESpec, TrainConfig, run_name
from kdtool.sae.layouts import find_saes, load_sae
from kdtool.sae.sources import CacheSource
from kdtool.sae.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

#: options shared by every run below: 2 layers of d = 16, batches of 512, a log row every 3 steps
BASE = ("--layer", "3,5", "--lr", "3e-3", "--batch-tokens", "512", "--log-every", "3", "--seed", "7")


@pytest.fixture
def acts(tmp_path):
    return write_random(tmp_path / "acts", d=16, n=12_000, layers=(3, 5))


def assert_same_sae(a, b):
    """Weights and train_log (all but the wall-clock column) identical, bit for bit."""
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), (a, b, name)
    la, lb = _log(a), _log(b)
    assert set(la) == set(lb)
    for c in la:
        np.testing.assert_array_equal(la[c], lb[c], err_msg=f"{a} vs {b}: {c}")


def test_side_by_side_equals_alone_bit_for_bit(cli, tmp_path, acts):
    """Two widths x two starting lambdas under the L0 controller (each SAE steers its own lambda), against
    the four runs of one SAE each; then two initialisation seeds against --init-seed alone."""
    multi = tmp_path / "multi"
    common = ("--acts", acts, *BASE, "--target-l0", "4", "--l1-rate", "0.05", "--tokens", "10K")
    r = cli("--quiet", "train-sae", *common, "--expansion", "2,4", "--l1", "0.05,0.2", "-o", multi)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in multi.iterdir() if p.is_dir())
    assert names == sorted(f"layer{L}-x{e}-lambda{lam}" for L in (3, 5) for e in (2, 4) for lam in ("0.05", "0.2"))
    lambdas = set()
    for e, F in ((2, 32), (4, 64)):
        for lam in ("0.05", "0.2"):
            alone = tmp_path / f"alone-{e}-{lam}"
            r = cli("--quiet", "train-sae", *common, "--features", str(F), "--l1", lam, "-o", alone)
            assert r.exit_code == 0, r.output
            for L in (3, 5):
                assert_same_sae(multi / f"layer{L}-x{e}-lambda{lam}", alone / f"layer{L}")
                cfg = json.loads((multi / f"layer{L}-x{e}-lambda{lam}" / "cfg.json").read_text())
                sae = cfg["kdtool"]["sae"]
                assert cfg["d_sae"] == F and sae["expansion"] == e and sae["l1"] == float(lam)
                assert sae["init_seed"] == 7 and sae["data_seed"] == 7 and sae["seed"] == 7000 + L
                assert len(sae["trained_beside"]) == 3 and sae["name"] not in sae["trained_beside"]
                lambdas.add(round(cfg["kdtool"]["l1_final"], 12))
    assert len(lambdas) == 8  # eight controllers, each at its own lambda

    seeds = tmp_path / "seeds"
    common = ("--acts", acts, *BASE, "--features", "32", "--l1", "0.1", "--tokens", "6K")
    assert cli("--quiet", "train-sae", *common, "--init-seed", "7,3", "-o", seeds).exit_code == 0
    assert cli("--quiet", "train-sae", *common, "--init-seed", "3", "-o", tmp_path / "s3").exit_code == 0
    assert_same_sae(seeds / "layer3-seed3", tmp_path / "s3" / "layer3")
    assert_same_sae(seeds / "layer5-seed3", tmp_path / "s3" / "layer5")
    assert not torch.equal(_weights(seeds / "layer3-seed3")["W_enc"], _weights(seeds / "layer3-seed7")["W_enc"])


def test_checkpoints_and_resume_cover_every_sae(cli, tmp_path, acts):
    opts = ("--acts", acts, *BASE, "--expansion", "2,3", "--l1", "0.1", "--tokens", "12K")
    r = cli("--quiet", "train-sae", *opts, "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    cfg = TrainConfig(
        layers=[3, 5], d_in=16, d_sae=[32, 48], l1=0.1, lr=3e-3, batch_tokens=512, log_every=3, seed=7,
        tokens=12_000, checkpoint_every=2_000,
    )  # fmt: skip
    Trainer(cfg, CacheSource(acts), tmp_path / "b", stop_after_steps=13).run()  # killed after step 13
    pointer = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert pointer["step"] == 12 and pointer["saes"] == ["layer3-x2", "layer3-x3", "layer5-x2", "layer5-x3"]
    for name in pointer["saes"]:
        state = json.loads((tmp_path / "b" / name / "checkpoints" / pointer["dir"] / "state.json").read_text())
        assert state["name"] == name and state["sae"]["d_sae"] == (32 if name.endswith("x2") else 48)

    # a changed set of SAEs is refused, naming both sets
    again = ("--checkpoint-every", "2K", "--resume", "-o", tmp_path / "b")
    r = cli("--quiet", "train-sae", *opts, "--expansion", "2", *again)
    assert r.exit_code == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "holds the SAEs layer3-x2, layer3-x3, layer5-x2, layer5-x3" in err[0]
    assert "asks for layer3, layer5" in err[0]
    r = cli("--quiet", "train-sae", *opts, "--l1", "0.1,0.2", *again)
    assert r.exit_code == 2 and "layer3-x2-lambda0.1" in r.stderr

    r = cli("--quiet", "train-sae", *opts, *again)
    assert r.exit_code == 0, r.output
    for name in pointer["saes"]:
        assert_same_sae(tmp_path / "a" / name, tmp_path / "b" / name)
        ckpts = sorted((tmp_path / "b" / name / "checkpoints").iterdir())
        assert [c.name for c in ckpts if (c / "optimizer.safetensors").exists()] == [ckpts[-1].name]


def test_every_reader_takes_the_folders(cli, tmp_path, acts):
    out = tmp_path / "saes"
    r = cli("--json", "train-sae", "--acts", acts, *BASE, "--expansion", "2,4", "--l1", "0.1", "--tokens", "4K",
            "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [(row["layer"], row["d_sae"], row["sae"]) for row in rows] == [
        (3, 32, str(out / "layer3-x2")), (3, 64, str(out / "layer3-x4")),
        (5, 32, str(out / "layer5-x2")), (5, 64, str(out / "layer5-x4")),
    ]  # fmt: skip
    assert [p.name for p in find_saes(out)] == ["layer3-x2", "layer3-x4", "layer5-x2", "layer5-x4"]
    sae = load_sae(out / "layer5-x4")
    assert sae.layout == "kdtool" and sae.layer == 5 and sae.d_sae == 64
    cfg = json.loads((out / "layer5-x4" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.4.hook_resid_post" and cfg["architecture"] == "standard"
    # stats measures one of them like any SAE folder
    r = cli("--json", "stats", "--acts", acts, "--sae", out / "layer5-x4", "-o", tmp_path / "s.parquet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"][0]["d_sae"] == 64
    r = cli("--json", "info", out / "layer3-x2")
    assert r.exit_code == 0, r.output
    log = formats.parquet_metadata(out / "layer3-x2" / "train_log.parquet")
    assert log["kind"] == "kdtool.sae.train_log" and log["summary"]["sae"] == "layer3-x2"
    # the training-curve figure takes the run folder: four logs, by layer, each named apart
    logs = read_logs([out], {})
    assert [(layer, _run_name(path)) for layer, _, path in logs] == [
        (3, "saes x2"), (3, "saes x4"), (5, "saes x2"), (5, "saes x4"),
    ]  # fmt: skip
    assert cli("plot", "sae-curves", out, "-o", tmp_path / "curves.png").exit_code == 0


def test_names_and_config_validation():
    specs = [SAESpec(F, lam, s) for F in (64, 128) for lam in (3e-4, 8e-5) for s in (0, 1)]
    assert run_name(12, specs[0], specs, 16) == "layer12-x4-lambda3e-4-seed0"
    assert run_name(12, specs[0], specs[:1], 16) == "layer12"
    odd = [SAESpec(40, 1.0, 0), SAESpec(64, 1.0, 0)]
    assert [run_name(3, s, odd, 16) for s in odd] == ["layer3-x2.5", "layer3-x4"]
    odd = [SAESpec(41, 1.0, 0), SAESpec(64, 1.0, 0)]
    assert run_name(3, odd[0], odd, 16) == "layer3-f41"
    assert [short_float(x) for x in (3e-4, 2.5e-5, 0.05, 1.0, 8e-4)] == ["3e-4", "2.5e-5", "0.05", "1", "8e-4"]

    cfg = TrainConfig(layers=[3], d_in=16, d_sae=[32], l1=[0.1])  # one value is stored as a scalar
    assert cfg.d_sae == 32 and cfg.l1 == 0.1 and cfg.as_dict()["init_seed"] is None
    assert [n for n, _, _ in cfg.runs()] == ["layer3"]
    cfg = TrainConfig(layers=[3, 5], d_in=16, d_sae=[32, 64], l1=0.1, init_seed=[0, 1], seed=9)
    assert [n for n, _, _ in cfg.runs()][:4] == ["layer3-x2-seed0", "layer3-x2-seed1", "layer3-x4-seed0",
                                                 "layer3-x4-seed1"]  # fmt: skip
    with pytest.raises(BadInput, match=r"--l1: repeated values"):
        TrainConfig(layers=[3], d_in=16, d_sae=32, l1=[0.1, 0.1])
    with pytest.raises(BadInput, match="--target-l0 needs a starting --l1"):
        TrainConfig(layers=[3], d_in=16, d_sae=32, l1=[0.1, 0.0], target_l0=4)


def test_force_clears_the_previous_runs_other_folders(cli, tmp_path, acts):
    out = tmp_path / "saes"
    opts = ("--acts", acts, "--layer", "3", "--batch-tokens", "512", "--tokens", "2K", "--features", "32")
    assert cli("--quiet", "train-sae", *opts, "-o", out).exit_code == 0
    r = cli("--quiet", "train-sae", *opts, "--l1", "0.1,0.2", "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr and (out / "layer3").exists()
    assert cli("--quiet", "train-sae", *opts, "--l1", "0.1,0.2", "--overwrite", "-o", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "layer3-lambda0.1", "layer3-lambda0.2"]
