"""train-sae --normalize expected-norm: the scale's definition, folding it into the saved SAE, resume, effect on L0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic_acts import write_random

from kdtool import formats
from kdtool.acts import store as activations
from kdtool.sae.config import TrainConfig
from kdtool.sae.layouts import load_sae
from kdtool.sae.model import SparseAutoencoder
from kdtool.sae.normalise import NORM_TOKENS, fold_scale
from kdtool.sae.sources import CacheSource
from kdtool.sae.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def write_sparse(root, *, d=32, k=48, p=0.05, n=60_000, layer=3, seed=0, amplitude=40.0, offset_norm=100.0):
    """Large-norm activations from k unit directions: x = amplitude * sum_i a_i c_i u_i + offset + noise.

    a_i ~ Bernoulli(p), c_i ~ U[0.5, 1.5]; ||offset|| = offset_norm. Raw norms are ~100, like an LLM's residual stream.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(k, d, generator=g)
    u /= u.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=g)
    offset *= offset_norm / offset.norm()
    w = activations.ShardWriter(
        root, layers=[layer], d_model=d, dtype="float32", shard_tokens=20_000, info={"model": "sparse"}, provenance={}
    )
    for _ in range(0, n, 20_000):
        active = torch.rand(20_000, k, generator=g) < p
        c = torch.rand(20_000, k, generator=g) + 0.5
        w.add({layer: amplitude * ((active * c) @ u) + offset + 0.01 * amplitude * torch.randn(20_000, d, generator=g)})
    w.close()
    return root


# ---- folding ------------------------------------------------------------------------------------


def test_folded_sae_on_raw_activations_is_s_times_the_trained_sae_on_x_over_s():
    d, F, s = 12, 40, 37.5
    sae = SparseAutoencoder.initialise(d, F, seed=3, b_pre=0.2 * torch.randn(d))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(F))  # some latents on, some off
    x = 60 * torch.randn(500, d) + 40  # raw: norms in the hundreds
    folded = SparseAutoencoder(d, F)
    folded.load_tensors(fold_scale(sae.tensors(), s))
    z_raw, z_n = folded.encode(x), sae.encode(x / s)
    assert 0.1 < float((z_n > 0).float().mean()) < 0.9
    torch.testing.assert_close(z_raw, s * z_n, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(folded.decode(z_raw), s * sae.decode(z_n), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(folded.W_enc, sae.W_enc, rtol=0, atol=0)  # weights untouched, decoder rows unit
    torch.testing.assert_close(folded.W_dec, sae.W_dec, rtol=0, atol=0)
    assert all(torch.equal(v, sae.tensors()[k]) for k, v in fold_scale(sae.tensors(), 1.0).items())


def _first_batches_scale(acts, layer, cfg):
    """s as documented: mean ||x|| / sqrt(d_in) over the first ceil(NORM_TOKENS / batch_tokens) training batches."""
    n = math.ceil(NORM_TOKENS / cfg.batch_tokens)
    norms = []
    for i, (batch, _) in enumerate(CacheSource(acts).batches([layer], cfg.batch_tokens, seed=cfg.seed, start=None,
                                                             one_pass=False)):  # fmt: skip
        if i == n:
            break
        norms.append(batch[layer].double().norm(dim=1))
    return float(torch.cat(norms).mean()) / math.sqrt(cfg.d_in), len(norms) * cfg.batch_tokens


def test_scale_is_the_mean_norm_and_a_planted_factor_100_leaves_training_unchanged(tmp_path):
    a = write_random(tmp_path / "a", d=16, n=10_000, offset=2.0)
    b = write_random(tmp_path / "b", d=16, n=10_000, offset=2.0, scale=100.0)
    cfg = TrainConfig(layers=[3], d_in=16, d_sae=48, l1=0.05, lr=3e-3, batch_tokens=1024, tokens=20 * 1024,
                      log_every=5, seed=1, normalize="expected-norm")  # fmt: skip
    runs = {}
    for name, acts in (("a", a), ("b", b)):
        trainer = Trainer(cfg, CacheSource(acts), tmp_path / f"saes-{name}")
        trainer.run()
        runs[name] = trainer
        want, tokens = _first_batches_scale(acts, 3, cfg)
        assert trainer.runs["layer3"].scale == pytest.approx(want, rel=1e-6) and tokens == NORM_TOKENS
        kd = json.loads((tmp_path / f"saes-{name}" / "layer3" / "cfg.json").read_text())["kdtool"]
        assert kd["normalize"]["method"] == "expected-norm" and kd["normalize"]["scale"] == trainer.runs["layer3"].scale
        assert kd["normalize"]["estimated_on_tokens"] == NORM_TOKENS
    sa, sb = runs["a"].runs["layer3"].scale, runs["b"].runs["layer3"].scale
    assert sb / sa == pytest.approx(100, rel=1e-6)
    # the normalised inputs are the same up to float rounding, so the trained SAEs are too
    ta, tb = runs["a"].runs["layer3"].sae.tensors(), runs["b"].runs["layer3"].sae.tensors()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-3, atol=1e-4)
    # ... and the saved ones differ by the scale in the biases only
    wa, wb = (load_file(str(tmp_path / f"saes-{n}" / "layer3" / "sae_weights.safetensors")) for n in "ab")
    torch.testing.assert_close(wb["W_dec"], wa["W_dec"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(wb["b_dec"], 100 * wa["b_dec"], rtol=1e-3, atol=1e-2)
    la, lb = runs["a"].runs["layer3"].rows, runs["b"].runs["layer3"].rows
    assert [r["l0"] for r in la] == pytest.approx([r["l0"] for r in lb], rel=1e-3)
    assert [r["explained_variance"] for r in la] == pytest.approx([r["explained_variance"] for r in lb], rel=1e-4)
    # the log is in raw units: 100x the activations is 10^4 x the squared error and the loss
    assert [r["mse"] * 1e4 for r in la] == pytest.approx([r["mse"] for r in lb], rel=1e-3)
    assert [r["loss"] * 1e4 for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-3)
    for r in la:
        assert r["loss"] == pytest.approx(r["mse"] + r["l1_term"])


def test_saved_sae_reads_raw_activations(tmp_path, cli):
    acts = write_random(tmp_path / "acts", d=16, n=10_000, offset=3.0, scale=50.0)
    r = cli("--quiet", "train-sae", "--acts", acts, "--features", "48", "--l1", "0.05", "--lr", "1e-2", "--tokens",
            "80K", "--batch-tokens", "1024", "--normalize", "expected-norm", "-o", tmp_path / "saes")  # fmt: skip
    assert r.exit_code == 0, r.output
    folder = tmp_path / "saes" / "layer3"
    cfg = json.loads((folder / "cfg.json").read_text())
    s = cfg["kdtool"]["normalize"]["scale"]
    assert s > 50 and cfg["normalize_activations"] == "none"  # folded: SAELens readers apply no scaling
    assert cfg["kdtool"]["normalize"]["l1_raw_equivalent"] == pytest.approx(0.05 * s)
    meta = formats.safetensors_header(folder / "sae_weights.safetensors")["metadata"]
    assert meta["normalize"] == "expected-norm" and float(meta["activation_scale"]) == s
    # rebuild the trained (unfolded) SAE from the folded file: the loader's SAE on raw x is s x it on x / s
    loaded = load_sae(folder)
    t = load_file(str(folder / "sae_weights.safetensors"))
    trained = SparseAutoencoder(16, 48)
    trained.load_tensors({**t, "b_enc": t["b_enc"] / s, "b_dec": t["b_dec"] / s})
    x = next(iter(CacheSource(acts).batches([3], 2048, seed=5, start=None, one_pass=True)))[0][3]
    z = loaded.encode(x)
    torch.testing.assert_close(z, s * trained.encode(x / s), rtol=1e-4, atol=1e-3 * s)
    torch.testing.assert_close(loaded.decode(z), s * trained.decode(trained.encode(x / s)), rtol=1e-4, atol=1e-3 * s)
    # the reconstruction is good in raw units, as the log says (explained variance is unit-free)
    ev = 1 - float((loaded.decode(z) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    log = formats.read_table(folder / "train_log.parquet")
    assert ev == pytest.approx(log["explained_variance"][-1], abs=0.1) and ev > 0.5
    mse = float((loaded.decode(z) - x).pow(2).sum(dim=1).mean())
    assert mse == pytest.approx(log["mse"][-1], rel=0.5)  # raw units (a normalised mse would be s^2 smaller)


# ---- resume -------------------------------------------------------------------------------------

TRAIN = ("--layer", "3,5", "--features", "48", "--l1", "0.05", "--lr", "3e-3", "--batch-tokens", "512",
         "--log-every", "3", "--seed", "7", "--normalize", "expected-norm")  # fmt: skip


def _weights(folder):
    return load_file(str(folder / "sae_weights.safetensors"))


def test_resume_with_normalisation_is_bit_for_bit(cli, tmp_path):
    acts = write_random(tmp_path / "acts", d=16, n=20_000, layers=(3, 5), offset=1.0, scale=30.0)
    r = cli("--quiet", "train-sae", "--acts", acts, *TRAIN, "--tokens", "40K", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    cfg = TrainConfig(layers=[3, 5], d_in=16, d_sae=48, l1=0.05, lr=3e-3, batch_tokens=512, log_every=3, seed=7,
                      tokens=40_000, checkpoint_every=10_000, normalize="expected-norm")  # fmt: skip
    # killed after 70 steps: past the 64 batches the scale was estimated on, checkpoint at step 59
    Trainer(cfg, CacheSource(acts), tmp_path / "b", stop_after_steps=70).run()
    pointer = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert pointer["step"] == 59 and not (tmp_path / "b" / "layer3" / "cfg.json").exists()
    # the checkpoint's SAE folder is folded (reads raw activations); its optimizer file keeps the trained biases
    ck = tmp_path / "b" / "layer3" / "checkpoints" / f"tokens-{59 * 512:012d}"
    state = json.loads((ck / "state.json").read_text())
    opt = load_file(str(ck / "optimizer.safetensors"))
    torch.testing.assert_close(_weights(ck)["b_dec"], state["activation_scale"] * opt["train.b_dec"])
    r = cli("--quiet", "train-sae", "--acts", acts, *TRAIN, "--tokens", "40K", "--checkpoint-every", "10K",
            "--resume", "-o", tmp_path / "b")  # fmt: skip
    assert r.exit_code == 0, r.output
    for L in (3, 5):
        wa, wb = _weights(tmp_path / "a" / f"layer{L}"), _weights(tmp_path / "b" / f"layer{L}")
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (L, name)
        ca, cb = (json.loads((tmp_path / x / f"layer{L}" / "cfg.json").read_text())["kdtool"] for x in "ab")
        assert ca["normalize"] == cb["normalize"] and ca["normalize"]["scale"] != 1.0
        la, lb = (formats.read_table(tmp_path / x / f"layer{L}" / "train_log.parquet") for x in "ab")
        for c in la:
            if c != "elapsed_s":
                np.testing.assert_array_equal(la[c], lb[c])
    # the scale is part of what the run computes: resuming without it is refused
    r = cli("train-sae", "--acts", acts, *TRAIN[:-2], "--tokens", "45K", "--resume", "-o", tmp_path / "b")
    assert r.exit_code == 2 and "normalize: 'expected-norm' -> 'none'" in r.stderr


def test_checkpoints_from_before_the_option_resume_as_none(cli, tmp_path):
    acts = write_random(tmp_path / "acts", d=16, n=6_000)
    base = ("--quiet", "train-sae", "--acts", acts, "--features", "32", "--batch-tokens", "512", "-o", tmp_path / "s")
    assert cli(*base, "--tokens", "3K").exit_code == 0
    pointer = tmp_path / "s" / "checkpoint.json"
    old = json.loads(pointer.read_text())
    del old["config"]["normalize"]  # written before --normalize existed
    pointer.write_text(json.dumps(old))
    ck = tmp_path / "s" / "layer3" / "checkpoints" / f"tokens-{old['tokens']:012d}"
    assert not any(k.startswith("train.") for k in load_file(str(ck / "optimizer.safetensors")))  # as before
    r = cli(*base, "--tokens", "5K", "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "layer3" / "cfg.json").read_text())["kdtool"]["normalize"]["scale"] == 1.0


# ---- the point of it ----------------------------------------------------------------------------


def test_a_fixed_lambda_sparsifies_large_norm_activations_only_when_normalised(tmp_path):
    """Raw norms ~100 (s ~ 20): the L1 gradient lambda is small next to the squared error's, which grows with s.

    On x / s the same lambda acts like lambda * s on raw x: L0 must fall well below the raw run's,
    with both SAEs still reconstructing (the sparsity is not a dead SAE's).
    """
    acts = write_sparse(tmp_path / "acts")
    last = {}
    for norm in ("none", "expected-norm"):
        cfg = TrainConfig(layers=[3], d_in=32, d_sae=64, l1=0.5, lr=1e-2, batch_tokens=1024, tokens=120_000,
                          log_every=10, seed=0, normalize=norm)  # fmt: skip
        trainer = Trainer(cfg, CacheSource(acts), tmp_path / norm)
        trainer.run()
        last[norm] = trainer.runs["layer3"].rows[-1]
        assert last[norm]["explained_variance"] > 0.8, (norm, last[norm])
    assert trainer.runs["layer3"].scale > 10
    assert last["expected-norm"]["l0"] < 0.4 * last["none"]["l0"], last
