"""kdtool stats: several layers in one file, the schema predict reads, options, errors, streaming from a teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import make_model_dir

from kdtool import formats
from kdtool.acts import store as activations
from kdtool.errors import BadInput
from kdtool.sae import stats as sae_stats
from kdtool.sae.sources import TeacherStream
from kdtool.sae.writers import saelens_cfg, save_kdtool

D = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sae(folder, *, d=D, f=32, layer=3, seed=0, dec_scale=1.0, dead=0):
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(f, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    b_enc = -0.5 + 0.1 * torch.randn(f, generator=g)
    if dead:
        b_enc[:dead] = -1e3
    t = {"W_enc": w_dec.t().contiguous(), "b_enc": b_enc, "W_dec": w_dec * dec_scale, "b_dec": torch.zeros(d)}
    return save_kdtool(folder, t, cfg=saelens_cfg(d, f, layer=layer), kdtool={"layer": layer}, provenance=None)


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts") / "acts"
    g = torch.Generator().manual_seed(1)
    w = activations.ShardWriter(root, layers=[3, 5], d_model=D, dtype="float16", shard_tokens=2000, info={},
                                provenance={})  # fmt: skip
    w.add({3: torch.randn(7000, D, generator=g), 5: 3 * torch.randn(7000, D, generator=g)})
    w.close()
    return root


def test_several_layers_in_one_file_that_predict_reads(cli, tmp_path, acts):
    make_sae(tmp_path / "saes" / "layer3", layer=3, dead=5)
    make_sae(tmp_path / "saes" / "layer5", layer=5, seed=1)
    out = tmp_path / "stats.parquet"
    r = cli("--json", "stats", "--sae", tmp_path / "saes", "--acts", acts, "-o", out)
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert [row["layer"] for row in printed["rows"]] == [3, 5]
    cols = formats.read_table(out)
    assert set(cols) == {"sae", "layer", "feature", "fires", "freq", "mean_act", "importance", "max_act", "alive",
                         "group", "group_importance", "counted"}  # fmt: skip
    assert list(np.unique(cols["sae"])) == ["layer3", "layer5"]
    assert cols["layer"].dtype == np.int32 and cols["fires"].dtype == np.int64 and cols["alive"].dtype == bool
    assert list(np.unique(cols["layer"])) == [3, 5] and len(cols["layer"]) == 64
    meta = formats.parquet_metadata(out)
    assert meta["kind"] == "kdtool.stats" and meta["provenance"]["params"]["command"] == "kdtool stats"
    s3 = meta["summary"]["layers"]["3"]
    assert s3 == {k: v for k, v in printed["summary"]["layers"]["3"].items()}
    assert s3["dead"] == 5 and s3["F"] == 27 and s3["tokens"] == 7000 and s3["d_in"] == D
    assert s3["alpha"] == pytest.approx(1 - s3["L0"] / s3["F"]) and s3["d_star"] == pytest.approx(s3["F"] / s3["g"])
    r = cli("--json", "predict", out, "--widths", "2,4")
    assert r.exit_code == 0, r.output
    pred = json.loads(r.stdout)
    assert {row["layer"] for row in pred["rows"]} == {3, 5}


def test_tokens_limit_and_decoder_norm(cli, tmp_path, acts):
    make_sae(tmp_path / "unit", layer=3)
    make_sae(tmp_path / "scaled", layer=3, dec_scale=2.0)
    x = torch.cat([s[3] for s in activations.ActivationStore(acts).iter_shards([3])])[:2500].float()

    def run(sae, *extra):
        r = cli("--quiet", "stats", "--sae", sae, "--acts", acts, "-o", tmp_path / "s.parquet", *extra)
        assert r.exit_code == 0, r.output
        return formats.read_table(tmp_path / "s.parquet"), formats.parquet_metadata(tmp_path / "s.parquet")

    unit, meta = run(tmp_path / "unit", "--tokens", "2500")
    assert meta["summary"]["layers"]["3"]["tokens"] == 2500
    t = _weights(tmp_path / "unit")
    z = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    np.testing.assert_array_equal(unit["fires"], (z > 0).sum(0).numpy())
    folded, _ = run(tmp_path / "scaled", "--tokens", "2500")
    raw, _ = run(tmp_path / "scaled", "--tokens", "2500", "--decoder-norm", "raw")
    np.testing.assert_allclose(folded["importance"], 4 * raw["importance"], rtol=1e-5)
    np.testing.assert_allclose(raw["importance"], unit["importance"], rtol=1e-5)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize(
    "make,extra,needle",
    [
        (lambda p: [make_sae(p / "a", d=6, layer=3)], (), "SAE expects d_in=6"),
        (lambda p: [make_sae(p / "a", layer=4)], (), "layer(s) [4] not cached"),
        (lambda p: [make_sae(p / "a", layer=3)], ("--layer", "3,5"), "2 layer(s) for 1 SAE(s)"),
        (lambda p: [make_sae(p / "a", layer=3)], ("--alive-threshold", "2"), "--alive-threshold"),
        (lambda p: [make_sae(p / "a", layer=3)], ("-o", "stats.csv"), "Parquet"),
        (lambda p: [p / "missing"], (), "no such file or folder"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(cli, tmp_path, acts, make, extra, needle):
    saes = make(tmp_path)
    args = [a for s in saes for a in ("--sae", s)]
    r = cli("stats", *args, "--acts", acts, "-o", tmp_path / "s.parquet", *extra)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("kdtool stats: error:") and needle in lines[-1], lines


def test_layer_override_and_few_tokens_warning(cli, tmp_path, acts):
    make_sae(tmp_path / "a", layer=9)
    argv = ["stats", "--sae", tmp_path / "a", "--acts", acts, "--layer", "5", "-o", tmp_path / "s.parquet"]
    r = cli(*argv)  # an SAE recorded for layer 9 on layer 5's activations: refused, naming both layers
    assert r.exit_code == 2 and "--layer 5" in r.stderr and "layer 9" in r.stderr and "--any-layer" in r.stderr
    assert not (tmp_path / "s.parquet").exists()
    r = cli(*argv, "--any-layer")
    assert r.exit_code == 0, r.output
    assert "layer from --layer" in r.stderr
    assert "cannot resolve --alive-threshold" in r.stderr  # 7000 tokens < 1 / 1e-5
    assert list(np.unique(formats.read_table(tmp_path / "s.parquet")["layer"])) == [5]


# ---- the stats job's library functions, called directly -----------------------------------------------


def test_stats_job_from_python_matches_the_command(cli, tmp_path, acts):
    make_sae(tmp_path / "saes" / "layer3", layer=3, dead=5)
    make_sae(tmp_path / "saes" / "layer5", layer=5, seed=1)
    paths, saes = sae_stats.load_saes([tmp_path / "saes"])
    assert [p.name for p in paths] == ["layer3", "layer5"] and [s.layer for s in saes] == [3, 5]
    cfg = sae_stats.StatsConfig(max_tokens=4000)
    source = sae_stats.open_activations([3, 5], acts, None, max_tokens=cfg.max_tokens)
    assert source.total == 4000 and source.d_model == D and source.info["source"] == "cache"
    seen = []
    result = sae_stats.measure(cfg, saes, source, on_progress=seen.append)
    assert seen[-1] == 4000 and result.tokens == 4000 and len(result.columns["feature"]) == 64
    assert result.summary["decoder_norm"] == "fold" and "notes" not in result.summary["layers"]["3"]
    assert any("cannot resolve --alive-threshold" in n for n in result.notes)  # 4000 tokens < 1 / 1e-5
    table = result.table()
    assert table["layer"] == [3, 5] and table["dead"][0] == 5 and table["tokens"] == [4000, 4000]
    r = cli("--json", "stats", "--sae", tmp_path / "saes", "--acts", acts, "--tokens", "4000", "-o", tmp_path / "s.pq")
    assert r.exit_code == 0, r.output
    assert [row["F"] for row in json.loads(r.stdout)["rows"]] == table["F"]


def test_stats_job_refuses_what_it_cannot_measure(tmp_path, acts):
    make_sae(tmp_path / "a", layer=3)
    with pytest.raises(BadInput, match=r"2 layer\(s\) for 1 SAE\(s\)"):
        sae_stats.load_saes([tmp_path / "a"], [3, 5])
    with pytest.raises(BadInput, match=r"an SAE of layer 3.*--any-layer"):
        sae_stats.load_saes([tmp_path / "a"], [7])
    _, saes = sae_stats.load_saes([tmp_path / "a"], [7], any_layer=True)
    assert saes[0].layer == 7 and saes[0].layer_source == "--layer"
    with pytest.raises(BadInput, match=r"layer\(s\) \[7\] not cached"):
        sae_stats.open_activations([7], acts, None, max_tokens=None)
    never = TeacherStream(model=None, data=None, load=lambda spec: pytest.fail("loaded the teacher"))
    with pytest.raises(BadInput, match="needs a token budget"):
        sae_stats.open_activations([3], None, never, max_tokens=None)
    with pytest.raises(BadInput, match="--alive-threshold"):
        sae_stats.StatsConfig(alive_threshold=1.5)
    make_sae(tmp_path / "narrow", d=6, layer=3)
    _, narrow = sae_stats.load_saes([tmp_path / "narrow"])
    with pytest.raises(BadInput, match="SAE expects d_in=6"):
        sae_stats.measure(sae_stats.StatsConfig(), narrow, sae_stats.open_activations([3], acts, None, max_tokens=None))


# ---- streaming from a teacher ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("llama"), "llama")
    corpus = tmp_path_factory.mktemp("text") / "docs.jsonl"
    docs = [f"Document {i}: the fox {'jumps' if i % 3 else 'naps'} near {i % 7} dogs." for i in range(400)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return model, corpus


def test_streamed_stats_equal_cached_stats(cli, tmp_path, teacher):
    model, corpus = teacher
    common = ("--model", model, "--dataset", corpus, "--seq-len", "32", "--batch-size", "4")
    r = cli("--quiet", "cache-acts", *common, "--layers", "2", "--tokens", "1200", "--acts-dtype", "float32",
            "-o", tmp_path / "acts")  # fmt: skip
    assert r.exit_code == 0, r.output
    make_sae(tmp_path / "sae", d=32, f=64, layer=2)
    r = cli("--quiet", "stats", "--sae", tmp_path / "sae", "--acts", tmp_path / "acts", "-o", tmp_path / "c.parquet")
    assert r.exit_code == 0, r.output
    r = cli("--quiet", "stats", "--sae", tmp_path / "sae", *common, "--tokens", "1200", "-o", tmp_path / "s.parquet")
    assert r.exit_code == 0, r.output
    cached, streamed = formats.read_table(tmp_path / "c.parquet"), formats.read_table(tmp_path / "s.parquet")
    np.testing.assert_array_equal(cached["fires"], streamed["fires"])
    np.testing.assert_allclose(cached["importance"], streamed["importance"], rtol=1e-5)
    assert formats.parquet_metadata(tmp_path / "s.parquet")["summary"]["layers"]["2"]["tokens"] == 1200


def test_train_sae_streams_from_a_teacher_and_resumes_exactly(cli, tmp_path, teacher):
    from kdtool.models import ModelSpec, load_model
    from kdtool.sae.config import TrainConfig
    from kdtool.sae.sources import ModelSource
    from kdtool.sae.training import Trainer
    from kdtool.text.tokens import DataSpec

    model, corpus = teacher
    args = ("--model", model, "--dataset", corpus, "--seq-len", "32", "--batch-size", "4", "--layer", "2",
            "--features", "64", "--batch-tokens", "128", "--tokens", "3000", "--shuffle-buffer", "500",
            "--lr", "1e-3", "--device", "cpu")  # fmt: skip
    r = cli("--quiet", "train-sae", *args, "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "a" / "layer2" / "cfg.json").read_text())
    assert cfg["kdtool"]["source"]["source"] == "stream" and cfg["kdtool"]["tokens"] == 2944
    teacher_model = load_model(ModelSpec(model=str(model), device="cpu"))
    source = ModelSource(teacher_model, DataSpec(dataset=str(corpus), seq_len=32), buffer_tokens=500, batch_size=4)
    tc = TrainConfig(layers=[2], d_in=32, d_sae=64, batch_tokens=128, tokens=3000, lr=1e-3, checkpoint_every=1000)
    Trainer(tc, source, tmp_path / "b", stop_after_steps=12).run()
    r = cli("--quiet", "train-sae", *args, "--resume", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    wa, wb = _weights(tmp_path / "a" / "layer2"), _weights(tmp_path / "b" / "layer2")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_streaming_forwards_only_what_the_run_uses_and_a_thread_changes_nothing(tmp_path, teacher):
    """A 256K-token mixing buffer for an 896-token run: the teacher runs on 29 sequences, not 8,000."""
    from kdtool.models import ModelSpec, load_model
    from kdtool.sae.config import TrainConfig
    from kdtool.sae.sources import ModelSource
    from kdtool.sae.training import Trainer
    from kdtool.text.tokens import DataSpec

    model, corpus = teacher
    lm = load_model(ModelSpec(model=str(model), device="cpu"))
    weights, forwarded = {}, {}
    for prefetch in (False, True):
        source = ModelSource(lm, DataSpec(dataset=str(corpus), seq_len=32), batch_size=4, prefetch=prefetch)
        tc = TrainConfig(layers=[2], d_in=32, d_sae=64, batch_tokens=128, tokens=1000, lr=1e-3)
        trainer = Trainer(tc, source, tmp_path / str(prefetch))
        trainer.run()
        weights[prefetch] = {k: v.clone() for k, v in trainer.runs["layer2"].sae.tensors().items()}
        forwarded[prefetch] = source.forwarded_tokens
        assert trainer.at.tokens == 896 and trainer.step_seconds > 0 and source.forward_seconds > 0
    assert forwarded[False] == forwarded[True] == 29 * 32  # 896 rows / 31 per sequence, rounded up
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])


# ---- figures ------------------------------------------------------------------------------------


def test_sae_figures(cli, tmp_path, acts):
    from kdtool.plots.style import read_figure_metadata

    r = cli("--quiet", "train-sae", "--acts", acts, "--features", "16", "--l1", "0.05", "--lr", "3e-3",
            "--batch-tokens", "500", "--log-every", "2", "-o", tmp_path / "saes")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (
        cli("--quiet", "stats", "--sae", tmp_path / "saes", "--acts", acts, "-o", tmp_path / "s.parquet").exit_code == 0
    )
    for kind, inputs in (("sae-curves", [tmp_path / "saes"]), ("layers", [tmp_path / "s.parquet"]),
                         ("sae-layers", [tmp_path / "s.parquet"]),
                         ("l0-mse", [tmp_path / "saes", tmp_path / "s.parquet"])):  # fmt: skip
        out = tmp_path / f"{kind}.png"
        r = cli("plot", kind, *inputs, "-o", out)
        assert r.exit_code == 0, r.output
        assert read_figure_metadata(out)["kind"] == f"kdtool.figure.{kind}"
    r = cli("plot", "sae-curves", tmp_path / "saes", "--layer", "4", "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "layer" in r.stderr
    r = cli("plot", "layers", tmp_path / "saes" / "layer3" / "train_log.parquet", "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "plot layers wants stats.parquet" in r.stderr


def test_stats_output_rule_and_the_cache_its_saes_record(cli, tmp_path, acts, monkeypatch):
    """No -o: nothing saved, the per-SAE rows on stdout; -o FILE: the file, rows on stderr; --json: JSON on stdout.

    An SAE that records its cache (train-sae writes kdtool.source.acts) needs no --acts."""
    monkeypatch.chdir(tmp_path)  # no ./acts here: the recorded cache must be found
    sae = tmp_path / "a"
    save_kdtool(sae, {k: v for k, v in _tensors().items()}, cfg=saelens_cfg(D, 32, layer=3),
                kdtool={"layer": 3, "source": {"source": "cache", "acts": str(acts)}}, provenance=None)  # fmt: skip
    r = cli("stats", "--sae", sae)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("sae,layer,F,") and len(r.stdout.splitlines()) == 2  # CSV in a pipe
    assert not list(tmp_path.rglob("*.parquet"))  # no stats.parquet written behind the user's back
    r = cli("stats", "--sae", sae, "-o", tmp_path / "s.parquet")
    assert r.exit_code == 0 and r.stdout == "" and "SAE statistics" in r.stderr, r.output
    assert formats.parquet_metadata(tmp_path / "s.parquet")["summary"]["source"]["acts"] == str(acts)
    r = cli("--json", "stats", "--sae", sae, "-o", tmp_path / "t.parquet")
    assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "kdtool.stats.summary"
    # kinds: an SAE folder is no cache, a stats table no SAE
    r = cli("stats", "--sae", sae, "--acts", sae)
    assert r.exit_code == 2 and "is an SAE folder" in r.stderr and "--acts wants acts/ (kdtool.acts" in r.stderr
    r = cli("stats", "--sae", tmp_path / "s.parquet", "--acts", acts)
    assert r.exit_code == 2 and "--sae wants saes/layer12/ (kdtool.sae" in r.stderr


def _tensors():
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(32, D, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    return {"W_enc": w_dec.t().contiguous(), "b_enc": -0.5 + 0.1 * torch.randn(32, generator=g), "W_dec": w_dec,
            "b_dec": torch.zeros(D)}  # fmt: skip
