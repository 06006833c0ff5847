"""train-sae: the paper's SAE (loss form, unit-norm decoder, controller), ground-truth recovery, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic_acts import write_random

from kdtool import formats
from kdtool.acts import store as activations
from kdtool.errors import BadInput
from kdtool.sae.config import TrainConfig, check_processes, sae_width
from kdtool.sae.layouts import load_sae
from kdtool.sae.model import L1Controller, SparseAutoencoder, clip_grad_norm, forward_backward, loss_value
from kdtool.sae.sources import CacheSource, TeacherStream, open_source, wants_stream
from kdtool.sae.training import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def write_ground_truth(root, *, d=64, k=32, p=0.04, n=300_000, layer=3, seed=0, noise=0.01):
    """Activations built from k known unit directions: x = sum_i a_i c_i u_i + noise + offset.

    a_i ~ Bernoulli(p) independently, c_i ~ U[0.5, 1.5]. True alpha = 1 - p, true L0 = k p.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(k, d, generator=g)
    u /= u.norm(dim=1, keepdim=True)
    offset = 0.3 * torch.randn(d, generator=g)
    w = activations.ShardWriter(
        root,
        layers=[layer],
        d_model=d,
        dtype="float32",
        shard_tokens=25_000,
        info={"model": "ground-truth"},
        provenance={},
    )
    for _ in range(0, n, 25_000):
        active = torch.rand(25_000, k, generator=g) < p
        c = torch.rand(25_000, k, generator=g) + 0.5
        w.add({layer: (active * c) @ u + offset + noise * torch.randn(25_000, d, generator=g)})
    w.close()
    return u


# ---- the loss and its gradients -----------------------------------------------------------------


def _reference_loss(t: dict, x: torch.Tensor, lam: float) -> torch.Tensor:
    """Written out independently: ||h - h_hat||^2 summed over dims + lambda * sum over features, batch mean."""
    z = torch.relu((x - t["b_pre"]) @ t["W_enc"] + t["b_enc"])
    h_hat = z @ t["W_dec"] + t["b_pre"]
    per_token = ((x - h_hat) ** 2).sum(dim=1) + lam * z.sum(dim=1)
    return per_token.mean()


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_gradients_are_those_of_the_papers_loss(kernel):
    d, F, B, lam = 12, 40, 300, 0.37
    sae = SparseAutoencoder.initialise(d, F, seed=3, b_pre=0.1 * torch.randn(d))
    with torch.no_grad():
        sae.b_enc.sub_(0.4)  # a mix of active and inactive latents
    x = torch.randn(B, d) * 1.5
    ref = {
        k: v.detach().clone().requires_grad_(True)
        for k, v in {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_pre": sae.b_pre}.items()
    }
    loss = _reference_loss(ref, x, lam)
    loss.backward()
    loss = loss.detach()
    st = forward_backward(sae, x, lam, kernel=kernel)
    assert st.sparse == (kernel == "sparse")
    assert float((st.sse + lam * st.l1_sum) / B) == pytest.approx(float(loss), rel=1e-5)
    assert float(loss_value(sae, x, lam).detach()) == pytest.approx(float(loss), rel=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(getattr(sae, name).grad, ref[name].grad, rtol=1e-4, atol=1e-5)
    # the L1 term is a sum over features: doubling lambda adds lambda * (active count) / B to each b_enc grad
    fires = st.fires.clone()
    g1 = sae.b_enc.grad.clone()
    forward_backward(sae, x, 2 * lam, kernel=kernel)
    torch.testing.assert_close(sae.b_enc.grad - g1, lam * fires.float() / B, rtol=1e-4, atol=1e-6)


def test_dense_and_sparse_kernels_agree_on_a_sparse_batch():
    d, F, B = 16, 256, 512
    sae = SparseAutoencoder.initialise(d, F, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(-1.2)  # ~5% active
    x = torch.randn(B, d)
    grads = {}
    for kernel in ("dense", "sparse"):
        st = forward_backward(sae, x, 0.01, kernel=kernel)
        grads[kernel] = ({n: p.grad.clone() for n, p in sae.named_parameters()}, st)
    assert 0 < grads["dense"][1].nnz < 0.2 * B * F
    assert torch.equal(grads["dense"][1].fires, grads["sparse"][1].fires)
    for n in grads["dense"][0]:
        torch.testing.assert_close(grads["dense"][0][n], grads["sparse"][0][n], rtol=1e-4, atol=1e-6)


def test_decoder_rows_are_unit_norm_after_every_step_and_grads_orthogonal(tmp_path):
    write_random(tmp_path / "acts", d=16, n=20_000)
    cfg = TrainConfig(layers=[3], d_in=16, d_sae=48, l1=0.05, lr=1e-2, batch_tokens=512, log_every=1)
    seen = []
    trainer = None

    def on_step(tokens, step, row):
        W = trainer.runs["layer3"].sae.W_dec.detach()
        seen.append(float((W.norm(dim=1) - 1).abs().max()))

    trainer = Trainer(cfg, CacheSource(tmp_path / "acts"), tmp_path / "saes", on_step=on_step)
    trainer.run()
    assert len(seen) == 39 and max(seen) < 1e-5
    sae = trainer.runs["layer3"].sae
    forward_backward(sae, torch.randn(64, 16), 0.05)
    sae.project_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-5 * sae.W_dec.grad.norm(dim=1).max()


@pytest.mark.parametrize("scale", [1e-3, 10.0, float("nan")])
def test_clip_grad_norm_gives_torchs_numbers_bit_for_bit(scale):
    """Unclipped (the multiply by 1.0 skipped), clipped, and a non-finite norm (NaN everywhere, as torch)."""
    torch.manual_seed(0)
    shapes = [(16, 48), (48,), (48, 16), (16,)]
    mine, theirs = ([torch.nn.Parameter(torch.zeros(s)) for s in shapes] for _ in range(2))
    for a, b in zip(mine, theirs, strict=True):
        a.grad = torch.randn(a.shape) * scale
        b.grad = a.grad.clone()
    clip_grad_norm(mine, 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a.grad, b.grad) or (a.grad.isnan().all() and b.grad.isnan().all())


def test_controller_law_and_validation():
    c = L1Controller(l1=1e-3, target_l0=10, rate=0.1, warmup_steps=4, ema=0.0)
    assert [c.value(s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    c.update(40, step=1)  # warmup: watches only
    assert c.l1 == 1e-3 and c.l0_running == 40
    c.update(40, step=4)
    assert c.l1 == pytest.approx(1e-3 * 4**0.1)
    c.update(2.5, step=5)
    assert c.l1 == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="target-l0"):
        L1Controller(l1=1e-3, target_l0=-1)
    with pytest.raises(ValueError, match="--target-l0 needs"):
        L1Controller(l1=0.0, target_l0=5)


# ---- end to end through the CLI ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt") / "acts"
    u = write_ground_truth(root)
    return root, u


def test_train_sae_recovers_known_directions_and_stats_recovers_f_and_alpha(cli, tmp_path, ground_truth):
    acts, u = ground_truth
    k, p = u.shape[0], 0.04
    r = cli(
        "--quiet",
        "train-sae",
        "--acts",
        acts,
        "--layer",
        "3",
        "--features",
        k,
        "--l1",
        "0.3",
        "--lr",
        "1e-2",
        "--batch-tokens",
        "1024",
        "--tokens",
        "300K",
        "--seed",
        "0",
        "-o",
        tmp_path / "saes",
    )
    assert r.exit_code == 0, r.output
    sae = load_sae(tmp_path / "saes" / "layer3")
    assert sae.layout == "kdtool" and sae.layer == 3 and sae.d_sae == k
    cos = u @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).t()  # [true, learned]
    best = cos.max(dim=1).values
    assert float(best.median()) >= 0.9, best
    r = cli("--json", "stats", "--sae", tmp_path / "saes" / "layer3", "--acts", acts, "-o", tmp_path / "stats.parquet")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    s = out["summary"]["layers"]["3"]
    assert abs(s["F"] - k) <= 0.1 * k
    assert s["L0"] == pytest.approx(k * p, rel=0.15)
    assert s["alpha"] == pytest.approx(1 - p, rel=0.03)
    assert s["d_star"] == pytest.approx(s["F"] / s["g"])
    cols = formats.read_table(tmp_path / "stats.parquet")
    assert int(cols["alive"].sum()) == s["F"] and cols["fires"].sum() / s["tokens"] == pytest.approx(s["L0"])
    log = formats.read_table(tmp_path / "saes" / "layer3" / "train_log.parquet")
    assert set(log) >= {
        "step",
        "tokens",
        "mse",
        "l1_term",
        "loss",
        "l0",
        "alive_fraction",
        "explained_variance",
        "lambda",
        "lr",
    }
    assert log["mse"][-1] < 0.2 * log["mse"][0] and log["explained_variance"][-1] > 0.9
    np.testing.assert_allclose(log["loss"], log["mse"] + log["l1_term"])


def test_controller_reaches_its_target_l0(cli, tmp_path, ground_truth):
    acts, _ = ground_truth
    target = 4.0
    r = cli(
        "--quiet",
        "train-sae",
        "--acts",
        acts,
        "--layer",
        "3",
        "--features",
        "64",
        "--l1",
        "0.01",
        "--target-l0",
        target,
        "--l1-rate",
        "0.01",
        "--lr",
        "1e-2",
        "--batch-tokens",
        "1024",
        "--tokens",
        "900K",
        "--log-every",
        "50",
        "-o",
        tmp_path / "saes",
    )
    assert r.exit_code == 0, r.output
    log = formats.read_table(tmp_path / "saes" / "layer3" / "train_log.parquet")
    assert log["l0"][0] > 5 * target  # it started far away
    assert log["l0"][-1] == pytest.approx(target, rel=0.10)
    assert log["lambda"][-1] != pytest.approx(0.01, rel=0.1)  # lambda moved
    cfg = json.loads((tmp_path / "saes" / "layer3" / "cfg.json").read_text())
    assert cfg["kdtool"]["controller"]["target_l0"] == target and cfg["kdtool"]["l1_final"] == pytest.approx(
        log["lambda"][-1], rel=1e-3
    )


# ---- resume -------------------------------------------------------------------------------------


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def _log_without_time(folder):
    cols = formats.read_table(folder / "train_log.parquet")
    cols.pop("elapsed_s")
    return cols


TRAIN = (
    "--layer",
    "3,5",
    "--features",
    "48",
    "--l1",
    "0.05",
    "--lr",
    "3e-3",
    "--batch-tokens",
    "512",
    "--log-every",
    "3",
    "--seed",
    "7",
)


def test_resume_after_a_kill_is_bit_for_bit(cli, tmp_path):
    write_random(tmp_path / "acts", d=16, n=20_000, layers=(3, 5))
    acts = tmp_path / "acts"
    r = cli("--quiet", "train-sae", "--acts", acts, *TRAIN, "--tokens", "30K", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    # the same run killed after 31 steps (checkpoints every 5K tokens = ~10 steps), then resumed
    cfg = TrainConfig(
        layers=[3, 5],
        d_in=16,
        d_sae=48,
        l1=0.05,
        lr=3e-3,
        batch_tokens=512,
        log_every=3,
        seed=7,
        tokens=30_000,
        checkpoint_every=5_000,
    )
    Trainer(cfg, CacheSource(acts), tmp_path / "b", stop_after_steps=31).run()
    pointer = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert pointer["step"] == 30 and not (tmp_path / "b" / "layer3" / "cfg.json").exists()
    r = cli(
        "--quiet",
        "train-sae",
        "--acts",
        acts,
        *TRAIN,
        "--tokens",
        "30K",
        "--checkpoint-every",
        "5K",
        "--resume",
        "-o",
        tmp_path / "b",
    )
    assert r.exit_code == 0, r.output
    for L in (3, 5):
        wa, wb = _weights(tmp_path / "a" / f"layer{L}"), _weights(tmp_path / "b" / f"layer{L}")
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (L, name)
        la, lb = _log_without_time(tmp_path / "a" / f"layer{L}"), _log_without_time(tmp_path / "b" / f"layer{L}")
        for c in la:
            np.testing.assert_array_equal(la[c], lb[c])
    # older checkpoints keep their SAE, only the latest keeps the optimizer state
    ckpts = sorted((tmp_path / "b" / "layer3" / "checkpoints").iterdir())
    assert len(ckpts) == 6 and all((c / "sae_weights.safetensors").exists() for c in ckpts)
    assert [c.name for c in ckpts if (c / "optimizer.safetensors").exists()] == [ckpts[-1].name]
    # a finished run continues with a bigger budget
    r = cli("--quiet", "train-sae", "--acts", acts, *TRAIN, "--tokens", "35K", "--resume", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "layer3" / "cfg.json").read_text())["kdtool"]["tokens"] == 34_816


def test_resume_and_overwrite_guards(cli, tmp_path):
    write_random(tmp_path / "acts", d=16, n=6_000)
    base = (
        "train-sae",
        "--acts",
        tmp_path / "acts",
        "--features",
        "32",
        "--batch-tokens",
        "512",
        "-o",
        tmp_path / "saes",
    )
    r = cli(*base, "--resume")  # nothing to resume: a fresh start, said so (scripts can always pass --resume)
    assert r.exit_code == 0 and "no checkpoint" in r.stderr and "starting from the beginning" in r.stderr
    r = cli(*base)
    assert r.exit_code == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr and "finished" in r.stderr
    r = cli(*base, "--resume", "--l1", "0.5")
    assert r.exit_code == 2 and "l1: 0.0008 -> 0.5" in r.stderr
    assert cli("--quiet", *base, "--force", "--l1", "0.5").exit_code == 0
    cfg = json.loads((tmp_path / "saes" / "layer3" / "cfg.json").read_text())
    assert cfg["kdtool"]["l1"] == 0.5 and cfg["d_sae"] == 32 and cfg["architecture"] == "standard"
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["provenance"]["params"]["command"] == "kdtool train-sae"


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--layer", "4"), "layer(s) [4] not in the cache"),
        (("--batch-tokens", "lots"), "--batch-tokens"),
        (("--tokens", "100"), "less than one batch"),
        (("--precision", "bf16", "--device", "cpu"), "bf16 needs a CUDA"),
        (("--target-l0", "5", "--l1", "0"), "--target-l0 needs a starting --l1"),
        (("--acts", "nowhere"), "no manifest.json"),
    ],
)
def test_bad_options_exit_2_with_one_line(cli, tmp_path, args, needle):
    write_random(tmp_path / "acts", d=16, n=5_000)
    acts = () if "--acts" in args else ("--acts", tmp_path / "acts")
    r = cli("train-sae", *acts, "--features", "32", "--batch-tokens", "512", *args, "-o", tmp_path / "saes")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtool train-sae: error:") and needle in lines[0], lines


@pytest.mark.gpu
def test_bf16_matmuls_on_gpu_track_fp32(tmp_path):
    """--precision bf16 (GPU only): fp32 master weights, bf16 products; the run must match fp32 closely."""
    write_random(tmp_path / "acts", d=16, n=20_000)
    logs = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(layers=[3], d_in=16, d_sae=64, l1=0.05, lr=3e-3, batch_tokens=1024, device="cuda",
                          precision=precision)  # fmt: skip
        trainer = Trainer(cfg, CacheSource(tmp_path / "acts"), tmp_path / precision)
        trainer.run()
        W = trainer.runs["layer3"].sae.W_dec
        assert W.dtype == torch.float32 and float((W.norm(dim=1) - 1).abs().max()) < 1e-5
        logs[precision] = trainer.runs["layer3"].rows[-1]
    assert logs["bf16"]["mse"] == pytest.approx(logs["fp32"]["mse"], rel=0.1)
    assert logs["bf16"]["l0"] == pytest.approx(logs["fp32"]["l0"], rel=0.1)


# ---- the library pieces behind train-sae, called directly ------------------------------------------


def test_source_choice_and_layer_selection(tmp_path):
    write_random(tmp_path / "acts", d=16, n=5_000, layers=(3, 5))
    assert wants_stream(acts=None, stream=False, model=None, dataset=None) is False
    assert wants_stream(acts=None, stream=False, model=None, dataset="docs.jsonl") is True  # implied
    with pytest.raises(BadInput, match="two activation sources"):
        wants_stream(acts=tmp_path / "acts", stream=False, model="m", dataset=None)
    src = open_source(tmp_path / "acts", None, tokens=None, shuffle_shards=2)
    assert isinstance(src, CacheSource) and src.d_in == 16 and src.buffer_shards == 2
    assert src.select_layers(None) == [3, 5] and src.select_layers([5]) == [5]
    with pytest.raises(BadInput, match=r"layer\(s\) \[4\] not in the cache \(cached: 3,5"):
        src.select_layers([4])
    never = TeacherStream(model=None, data=None, load=lambda spec: pytest.fail("loaded the teacher"))
    with pytest.raises(BadInput, match="needs a token budget"):  # refused before the (slow) teacher load
        open_source(None, never, tokens=None)


def test_sae_width_and_process_split():
    assert sae_width(16, features=40, expansion=32.0) == 40
    assert sae_width(576, features=None, expansion=4.0) == 2304
    with pytest.raises(BadInput, match="--expansion must be > 0"):
        sae_width(16, features=None, expansion=0.0)
    check_processes(512, 4)
    with pytest.raises(BadInput, match="divisible by the 3 processes"):
        check_processes(512, 3)


def test_train_returns_the_summary_table(tmp_path):
    write_random(tmp_path / "acts", d=16, n=6_000)
    cfg = TrainConfig(layers=[3], d_in=16, d_sae=32, batch_tokens=512, log_every=2)
    trainer = train(cfg, CacheSource(tmp_path / "acts"), tmp_path / "saes")
    table = trainer.summary()
    assert list(table) == ["layer", "tokens", "steps", "mse", "explained_variance", "l0", "alive_fraction",
                           "lambda", "d_sae", "l1", "init_seed", "sae"]  # fmt: skip
    assert (table["d_sae"], table["l1"], table["init_seed"]) == ([32], [cfg.l1], [cfg.seed])
    at = trainer.at
    assert at.step > 0 and at.tokens == at.step * 512
    assert table["layer"] == [3] and table["tokens"] == [at.tokens] and table["steps"] == [at.step]
    assert table["sae"] == [str(tmp_path / "saes" / "layer3")]
    assert table["mse"] == [trainer.runs["layer3"].rows[-1]["mse"]] and table["lambda"] == [cfg.l1]
    with pytest.raises(BadInput, match="holds a train-sae run"):  # prepare_output guards the folder
        train(cfg, CacheSource(tmp_path / "acts"), tmp_path / "saes")


# ---- a resumed run never steps past --tokens, and repairs what a kill cut short ---------------------


def _files(folder):
    """Every file under `folder` (relative path -> bytes), checkpoint folders included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("tokens", ["10000", "10240"])  # not a multiple of the batch, and a multiple
def test_resume_of_a_finished_run_leaves_it_as_it_is(cli, tmp_path, tokens):
    write_random(tmp_path / "acts", d=16, n=20_000, layers=(3, 5))
    args = ("train-sae", "--acts", tmp_path / "acts", *TRAIN, "--tokens", tokens, "-o", tmp_path / "s")
    assert cli("--quiet", *args).exit_code == 0
    before = _files(tmp_path / "s")
    steps = json.loads((tmp_path / "s" / "checkpoint.json").read_text())["step"]
    assert steps == int(tokens) // 512  # 19 steps of 512 for 10000: the 20th would pass --tokens
    r = cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "left as it is" in r.stderr
    assert _files(tmp_path / "s") == before  # not a byte rewritten, no extra step or log row


def test_resume_rewrites_final_folders_a_kill_cut_short(cli, tmp_path):
    write_random(tmp_path / "acts", d=16, n=20_000, layers=(3, 5))
    args = ("train-sae", "--acts", tmp_path / "acts", *TRAIN, "--tokens", "10240", "-o", tmp_path / "s")
    assert cli("--quiet", *args).exit_code == 0
    ref = {L: _files(tmp_path / "s" / f"layer{L}") for L in (3, 5)}
    # what kills during the final write left (issue 14): a folder without cfg.json, one with only its log
    (tmp_path / "s" / "layer3" / "cfg.json").unlink()
    (tmp_path / "s" / "layer5" / "cfg.json").unlink()
    (tmp_path / "s" / "layer5" / "sae_weights.safetensors").unlink()
    r = cli(*args)
    assert r.exit_code == 2 and "--resume" in r.stderr
    r = cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "rewrote them from the last checkpoint" in r.stderr
    for L in (3, 5):
        now = _files(tmp_path / "s" / f"layer{L}")
        assert now.keys() == ref[L].keys()
        wa, wb = _weights(tmp_path / "s" / f"layer{L}"), ref[L]["sae_weights.safetensors"]
        from safetensors.torch import load as load_bytes

        for name, t in load_bytes(wb).items():
            assert torch.equal(wa[name], t), (L, name)
        log = formats.read_table(tmp_path / "s" / f"layer{L}" / "train_log.parquet")
        assert list(log["step"]) == [3, 6, 9, 12, 15, 18, 20]
    assert (
        cli(
            "--quiet", "stats", "--acts", tmp_path / "acts", "--sae", tmp_path / "s", "-o", tmp_path / "st.parquet"
        ).exit_code
        == 0
    )


def test_a_run_killed_before_its_first_checkpoint_starts_over_with_resume(cli, tmp_path):
    write_random(tmp_path / "acts", d=16, n=20_000, layers=(3, 5))
    args = ("train-sae", "--acts", tmp_path / "acts", *TRAIN, "--tokens", "6K", "-o")
    assert cli("--quiet", *args, tmp_path / "a").exit_code == 0
    # a kill (or a full disk) during the first checkpoint: a partial checkpoint folder, no checkpoint.json
    partial = tmp_path / "b" / "layer3" / "checkpoints" / "tokens-000000005632"
    partial.mkdir(parents=True)
    (partial / "sae_weights.safetensors").write_bytes(b"\0" * 10)
    r = cli(*args, tmp_path / "b")
    assert r.exit_code == 2 and "before its first checkpoint" in r.stderr and "--resume" in r.stderr
    r = cli("--quiet", *args, tmp_path / "b", "--resume")
    assert r.exit_code == 0, r.output
    for L in (3, 5):
        wa, wb = _weights(tmp_path / "a" / f"layer{L}"), _weights(tmp_path / "b" / f"layer{L}")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_sae_manners_overwrite_progress_and_a_next_hint_that_runs(cli, tmp_path, monkeypatch):
    """--overwrite is the word (--force a hidden alias); off a TTY, common.progress's plain lines with rate and
    ETA; the table on stderr; the "next:" command works as printed (stats finds the cache in cfg.json)."""
    import shlex

    from kdtool.cli import common

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "LOG_EVERY_S", 0.0)
    write_random(tmp_path / "cache", d=16, n=6_000)
    base = ("train-sae", "--acts", "cache", "--features", "32", "--batch-tokens", "512", "-o", "run/saes")
    r = cli(*base)
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and "train-sae" in r.stderr  # a folder writer: its table on stderr
    plain = [line for line in r.stderr.splitlines() if line.startswith("train-sae: ") and "%)" in line]
    assert len(plain) >= 2 and all("tok/s" in p and "elapsed" in p for p in plain) and "ETA" in plain[0]
    assert cli(*base).exit_code == 2
    assert cli("--quiet", *base, "--overwrite").exit_code == 0
    assert cli("--quiet", *base, "--force").exit_code == 0  # the old name still works
    assert "--force" not in cli("train-sae", "--help").output
    hint = [line for line in r.stderr.splitlines() if line.startswith("next: ")]
    assert len(hint) == 1, r.stderr
    argv = shlex.split(hint[0].removeprefix("next: "))
    assert argv[:2] == ["kdtool", "stats"] and "--acts" not in argv
    r = cli(*argv[1:])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "stats.parquet").exists()
