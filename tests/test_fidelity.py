"""stats --fidelity: the spliced forward replaces the hidden state; the metrics equal a hand computation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_model_dir, tiny_lm

from kdtool import formats
from kdtool.models import ModelSpec, decoder_layers, load_model
from kdtool.report.discover import discover
from kdtool.report.tables_sae import sae_fidelity
from kdtool.sae.fidelity import FidelityConfig, clean_forward, measure_fidelity, spliced_forward
from kdtool.sae.layouts import load_sae
from kdtool.sae.writers import saelens_cfg, save_kdtool
from kdtool.text.tokens import DataSpec, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _replaced(model, ids, layer, value):
    """Reference: a full forward whose hidden_states[layer] is replaced by a hook (no stubs, every block runs)."""
    blocks = decoder_layers(model)
    if layer == 0:
        h = blocks[0].register_forward_pre_hook(lambda m, args, kw: ((value, *args[1:]), kw), with_kwargs=True)
    elif layer == len(blocks):
        h = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: (value, *args[1:]))
    else:
        h = blocks[layer - 1].register_forward_hook(
            lambda m, args, out: (value, *out[1:]) if isinstance(out, tuple) else value
        )
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        h.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("layer", [0, 2, 4])
def test_spliced_forward_equals_a_forward_with_the_hidden_state_replaced(arch, layer):
    model = tiny_lm(arch, vocab=64, layers=4, width=32, heads=4)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, hidden, tails = clean_forward(model, ids, [layer])
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        torch.testing.assert_close(logits, ref.logits)
        torch.testing.assert_close(hidden[layer], ref.hidden_states[layer])
        value = hidden[layer] + 0.5 * torch.randn(hidden[layer].shape, generator=torch.Generator().manual_seed(1))
        got = spliced_forward(model, ids, layer, value, tails.get(layer))
        want = _replaced(model, ids, layer, value)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - logits).abs().max() > 1e-3  # the splice changed something
        torch.testing.assert_close(model(input_ids=ids).logits, logits)  # the model is whole again afterwards


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("llama"), "llama")
    corpus = tmp_path_factory.mktemp("text") / "docs.jsonl"
    docs = [f"Document {i}: the fox {'jumps' if i % 3 else 'naps'} near {i % 7} dogs." for i in range(600)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return model, corpus


def _sae(folder, d=32, f=64, layer=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(f, d, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    t = {"W_enc": w.t().contiguous(), "b_enc": -0.05 * torch.ones(f), "W_dec": w, "b_dec": 0.1 * torch.randn(d)}
    save_kdtool(folder, t, cfg=saelens_cfg(d, f, layer=layer), kdtool={"layer": layer}, provenance=None)
    return load_sae(folder)


def test_fidelity_metrics_equal_a_hand_computation(tmp_path, teacher):
    model_dir, corpus = teacher
    lm = load_model(ModelSpec(model=str(model_dir), device="cpu"))
    sae = _sae(tmp_path / "sae")
    data = DataSpec(dataset=str(corpus), seq_len=16, holdout="eval", holdout_fraction=0.3)
    mean = torch.randn(32, generator=torch.Generator().manual_seed(3))
    cfg = FidelityConfig(tokens=60, batch_size=2, max_norm_ratio=0)
    res = measure_fidelity(lm, data, [("a", sae)], {2: mean}, cfg)
    got = res.saes["a"]

    # by hand: full forwards with hooks, torch's own cross_entropy and kl_div, over positions 1..S-2
    sums = {k: 0.0 for k in ("clean", "sae", "zero", "mean", "kl_sae", "kl_zero", "kl_mean")}
    n, sse, xs = 0, 0.0, []
    with torch.no_grad():
        for ids in token_batches(data, lm.tokenizer, 2):
            out = lm.model(input_ids=ids, output_hidden_states=True)
            h = out.hidden_states[2]
            x = h[:, 1:].reshape(-1, 32)
            x_hat = sae.decode(sae.encode(x))
            recon = h.clone()
            recon[:, 1:] = x_hat.view(h.shape[0], -1, 32)
            variants = {"sae": recon, "zero": torch.cat([h[:, :1], torch.zeros_like(h[:, 1:])], 1),
                        "mean": torch.cat([h[:, :1], mean.expand_as(h[:, 1:])], 1)}  # fmt: skip
            tgt = ids[:, 2:].reshape(-1)
            lc = out.logits[:, 1:-1].reshape(-1, out.logits.shape[-1])
            sums["clean"] += float(F.cross_entropy(lc, tgt, reduction="sum"))
            for name, v in variants.items():
                lv = _replaced(lm.model, ids, 2, v)[:, 1:-1].reshape(-1, lc.shape[-1])
                sums[name] += float(F.cross_entropy(lv, tgt, reduction="sum"))
                sums["kl_" + name] += float(
                    F.kl_div(lv.log_softmax(-1), lc.log_softmax(-1), log_target=True, reduction="sum")
                )
            n += tgt.numel()
            sse += float((x - x_hat).square().sum())
            xs.append(x)
            if n >= 60:
                break
    x = torch.cat(xs).double()
    ev = 1 - sse / float((x - x.mean(0)).square().sum())
    ce = {k: sums[k] / n for k in ("clean", "sae", "zero", "mean")}
    assert got["tokens"] == n and res.info["sequences"] * 14 == n
    assert got["ce_clean"] == pytest.approx(ce["clean"], rel=1e-5)
    assert got["ce_spliced"] == pytest.approx(ce["sae"], rel=1e-5)
    assert got["ce_zero"] == pytest.approx(ce["zero"], rel=1e-5)
    assert got["ce_mean"] == pytest.approx(ce["mean"], rel=1e-5)
    assert got["kl"] == pytest.approx(sums["kl_sae"] / n, rel=1e-4, abs=1e-7)
    assert got["kl_zero"] == pytest.approx(sums["kl_zero"] / n, rel=1e-4)
    assert got["ce_loss_score"] == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-4)
    assert got["ce_loss_score_mean"] == pytest.approx((ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"]), rel=1e-4)
    kz, ks = sums["kl_zero"] / n, sums["kl_sae"] / n
    assert got["kl_div_score"] == pytest.approx((kz - ks) / kz, rel=1e-4)
    assert got["explained_variance"] == pytest.approx(ev, rel=1e-4)
    assert res.info["cost_ratio"] > 1


def test_stats_fidelity_from_a_cache_records_it_everywhere(cli, tmp_path, teacher, monkeypatch):
    from kdtool.cli import common as cli_common

    monkeypatch.setattr(cli_common, "LOG_EVERY_S", 0.0)  # every progress update logs a plain line
    model_dir, corpus = teacher
    common = ("--model", model_dir, "--dataset", corpus, "--seq-len", "16", "--batch-size", "4")
    r = cli("--quiet", "cache-acts", *common, "--layers", "2", "--tokens", "900", "--acts-dtype", "float32",
            "-o", tmp_path / "acts")  # fmt: skip
    assert r.exit_code == 0, r.output
    _sae(tmp_path / "sae")
    out = tmp_path / "stats.parquet"
    r = cli("--json", "stats", "--sae", tmp_path / "sae", "--acts", tmp_path / "acts", "--fidelity",
            "--fidelity-tokens", "100", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    progress = [line for line in r.stderr.splitlines() if line.startswith(("stats: ", "fidelity: "))]
    assert progress and not [line for line in progress if ": 0/" in line]  # one task per phase, none left at 0
    assert not [line for line in progress if "(10" in line and "(100%)" not in line]  # never past 100%
    row = json.loads(r.stdout)["rows"][0]
    fid = formats.parquet_metadata(out)["summary"]["saes"]["sae"]["fidelity"]
    assert row["ce_loss_score"] == pytest.approx(fid["ce_loss_score"]) and fid["tokens"] >= 100
    assert fid["kl_zero"] > 0 and 0 <= fid["dead_fraction"] <= 1  # (a random model: CE_zero may be below CE_clean)
    info = formats.parquet_metadata(out)["summary"]["fidelity"]
    assert info["data"]["holdout"] == "eval" and info["model"] == str(model_dir)
    (table,) = sae_fidelity(discover(tmp_path)[0])  # the report's fidelity table
    assert table.rows[0][table.columns.index("CE score")] == pytest.approx(fid["ce_loss_score"])
    assert cli("plot", "layers", out, "-o", tmp_path / "card.png").exit_code == 0  # the card's CE/KL score columns
    r = cli("info", out)
    assert r.exit_code == 0 and "fidelity.ce_loss_score" in r.stdout
