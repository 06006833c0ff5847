"""kdtool cache-acts on tiny in-process models: exact activations, exact resume, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_model_dir

from kdtool.acts import caching
from kdtool.acts import store as activations
from kdtool.errors import BadInput
from kdtool.models import ModelSpec, load_model
from kdtool.text import tokens as data


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {arch: make_model_dir(tmp_path_factory.mktemp(arch), arch) for arch in ("llama", "gpt_neox")}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    docs = [f"Paragraph {i}: the fox {'jumps' if i % 2 else 'sleeps'} over {i % 5} lazy dogs." for i in range(300)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _load_cache(root):
    store = activations.ActivationStore(root)
    return store, {layer: torch.cat([s[layer] for s in store.iter_shards([layer])]) for layer in store.layers}


def _reference(model_dir, corpus_file, layers, seq_len, batch_size, n_tokens, drop_first, ratio=0.0):
    """hidden_states of a plain HF forward over the same packed batches (norm filter re-implemented here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    spec = data.DataSpec(dataset=str(corpus_file), seq_len=seq_len)
    rows = {layer: [] for layer in layers}
    got = 0
    with torch.inference_mode():
        for batch in data.token_batches(spec, tok, batch_size):
            hs = model(batch, output_hidden_states=True).hidden_states
            kept = [hs[layer][:, 1 if drop_first else 0 :, :].reshape(-1, hs[layer].shape[-1]) for layer in layers]
            keep = torch.ones(kept[0].shape[0], dtype=torch.bool)
            for h in kept if ratio else []:
                norms = h.norm(dim=1)
                keep &= norms <= ratio * norms.median()
            for layer, h in zip(layers, kept, strict=True):
                rows[layer].append(h[keep])
            got += rows[layers[0]][-1].shape[0]
            if got >= n_tokens:
                break
    return {layer: torch.cat(r)[:n_tokens] for layer, r in rows.items()}


@pytest.mark.parametrize("arch,drop_first,ratio", [("llama", True, 0.0), ("gpt_neox", False, 1.1)])
def test_cached_activations_equal_output_hidden_states(cli, tmp_path, model_dirs, corpus_file, arch, drop_first, ratio):
    out = tmp_path / "acts"
    opts = "--layers 1,2 --tokens 700 --seq-len 32 --batch-size 4 --shard-size 256 --acts-dtype float32".split()
    first = "--drop-first" if drop_first else "--keep-first"
    opts += [first, "--max-norm-ratio", str(ratio)]
    r = cli("--quiet", "cache-acts", "--model", model_dirs[arch], "--dataset", corpus_file, *opts, "-o", out)
    assert r.exit_code == 0, r.output
    store, cached = _load_cache(out)
    assert store.layers == [1, 2] and store.n_tokens == 700
    assert [s["tokens"] for s in store.shards] == [256, 256, 188]
    manifest = activations.read_manifest(out)
    assert manifest["seq_len"] == 32 and manifest["drop_first"] is drop_first and manifest["d_model"] == 32
    assert manifest["provenance"]["params"]["layers"] == "1,2"
    ref = _reference(model_dirs[arch], corpus_file, [1, 2], 32, 4, 700, drop_first, ratio)
    for layer in (1, 2):
        torch.testing.assert_close(cached[layer], ref[layer], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cache_acts_on_cuda_matches_the_cpu_cache(cli, tmp_path, model_dirs, corpus_file):
    """On a GPU (the writer thread copies the rows to the host): the same cache as on CPU, within fp32 rounding."""
    opts = "--layers 1,2 --tokens 700 --seq-len 32 --batch-size 4 --acts-dtype float32 --dtype float32".split()
    for device in ("cpu", "cuda"):
        r = cli("--quiet", "cache-acts", "--model", model_dirs["llama"], "--dataset", corpus_file, *opts,
                "--device", device, "-o", tmp_path / device)  # fmt: skip
        assert r.exit_code == 0, r.output
    _, cpu = _load_cache(tmp_path / "cpu")
    _, gpu = _load_cache(tmp_path / "cuda")
    for layer in (1, 2):
        torch.testing.assert_close(gpu[layer], cpu[layer], rtol=1e-3, atol=1e-4)


def test_resume_after_a_kill_gives_identical_shards(cli, tmp_path, model_dirs, corpus_file, monkeypatch):
    # A tight norm filter makes the rows kept per batch vary: resume must follow the recorded batch/row.
    opts = "--layers 1,3 --tokens 1000 --seq-len 24 --batch-size 3 --shard-size 200 --max-norm-ratio 1.1".split()
    args = ["cache-acts", "--model", model_dirs["llama"], "--dataset", corpus_file, *opts]
    full = tmp_path / "full"
    r = cli("--json", *args, "-o", full)
    assert r.exit_code == 0 and json.loads(r.stdout)["dropped_outliers"] > 0  # the filter did drop rows

    killed = tmp_path / "killed"
    real_flush = activations.ShardWriter._flush
    flushed = []

    def dying_flush(self, n):
        if len(flushed) == 2:
            raise KeyboardInterrupt  # the run dies while shard 2 is due
        flushed.append(n)
        real_flush(self, n)

    monkeypatch.setattr(activations.ShardWriter, "_flush", dying_flush)
    r = cli("--quiet", *args, "-o", killed)
    assert r.exit_code == 130
    monkeypatch.setattr(activations.ShardWriter, "_flush", real_flush)
    assert [s["tokens"] for s in activations.read_manifest(killed)["shards"]] == [200, 200]
    (killed / "layer1" / ".shard-00002.safetensors.abc.tmp").write_bytes(b"half a shard")  # as SIGKILL leaves it

    r = cli("--quiet", *args, "-o", killed)
    assert r.exit_code == 2 and "--resume" in r.stderr  # no silent overwrite
    r = cli("--quiet", *args, "-o", killed, "--resume", "--batch-size", "3")
    assert r.exit_code == 0, r.output
    assert not list((killed / "layer1").glob(".*.tmp"))
    _, a = _load_cache(full)
    _, b = _load_cache(killed)
    for layer in (1, 3):
        assert torch.equal(a[layer], b[layer])  # bit for bit
    assert activations.read_manifest(full)["shards"] == activations.read_manifest(killed)["shards"]


def test_outlier_mask_drops_massive_positions_at_every_layer():
    g = torch.Generator().manual_seed(0)
    hidden = {layer: torch.randn(2, 6, 8, generator=g) for layer in (4, 8)}
    hidden[8][1, 3] *= 500  # a massive activation at one position of one layer
    keep = caching.outlier_mask(hidden, 1, 50.0)  # [2, 5] after dropping position 0
    assert keep.shape == (2, 5) and keep.sum() == 9 and not keep[1, 2]
    assert caching.outlier_mask(hidden, 0, 1000.0).all()


def test_resume_refuses_a_different_configuration(cli, tmp_path, model_dirs, corpus_file):
    opts = "--layers 2 --tokens 100 --seq-len 16".split()
    base = ["cache-acts", "--model", model_dirs["llama"], "--dataset", corpus_file, *opts, "-o", tmp_path / "a"]
    assert cli("--quiet", *base).exit_code == 0
    r = cli("--quiet", *base[:-2], "--seq-len", "32", "-o", tmp_path / "a", "--resume")
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "seq_len" in r.stderr
    r = cli(*base, "--tokens", "150", "--resume")  # same config, more tokens: continues
    assert r.exit_code == 0
    assert activations.ActivationStore(tmp_path / "a").n_tokens == 150
    r = cli(*base, "--overwrite", "--layers", "1")
    assert r.exit_code == 0 and activations.read_manifest(tmp_path / "a")["layers"] == [1]
    assert not (tmp_path / "a" / "layer2").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--layers", "5"], "--layers"),
        (["--layers", "x"], "--layers"),
        (["--tokens", "lots"], "--tokens"),
        (["--dataset", "no/such/file.jsonl"], "no such file"),
        (["--model", "./missing-model"], "--model"),
        (["--text-column", "body"], "body"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(cli, tmp_path, model_dirs, corpus_file, extra, needle):
    opts = ["--tokens", "50", "--seq-len", "16", "-o", tmp_path / "acts"]
    args = ["cache-acts", "--model", model_dirs["llama"], "--dataset", corpus_file, *opts]
    r = cli("--quiet", *args, *extra)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtool cache-acts: error:") and needle in lines[0]


def test_running_out_of_data_warns_and_keeps_what_it_has(cli, tmp_path, model_dirs, corpus_file):
    opts = "--tokens 10M --seq-len 64 --batch-size 16 --layers middle".split()
    r = cli("cache-acts", "--model", model_dirs["gpt_neox"], "--dataset", corpus_file, *opts, "-o", tmp_path / "acts")
    assert r.exit_code == 0, r.output
    assert "ran out" in r.stderr
    store = activations.ActivationStore(tmp_path / "acts")
    assert store.layers == [2] and 0 < store.n_tokens < 10_000_000


def test_json_summary_on_stdout(cli, tmp_path, model_dirs, corpus_file):
    opts = "--tokens 64 --seq-len 16 --layers all".split()
    r = cli(
        "--json", "cache-acts", "--model", model_dirs["llama"], "--dataset", corpus_file, *opts, "-o", tmp_path / "a"
    )
    assert r.exit_code == 0
    summary = json.loads(r.stdout)
    assert summary["layers"] == [0, 1, 2, 3, 4] and summary["tokens"] == 64 and summary["dtype"] == "float16"
    assert summary["dropped_outliers"] == 0  # random tiny models have no massive activations


def test_layer_choices():
    assert caching.default_layers(24) == [8, 12, 16]  # Pythia-410M: the paper's layers
    assert caching.default_layers(30) == [8, 12, 16]  # embedded SmolLM2-135M: train-sae --layer 12 works
    assert caching.default_layers(6) == [2, 3, 4]
    assert caching.default_layers(2) == [1]
    assert caching.parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert caching.parse_layers("middle", 30) == [15]
    assert caching.parse_layers("16,8,12,8", 24) == [8, 12, 16]
    assert caching.parse_layers("2:6:2", 24) == [2, 4, 6]
    with pytest.raises(BadInput, match="--layers"):
        caching.parse_layers("25", 24)


def test_prepare_output_decides_what_happens_to_an_existing_cache(tmp_path):
    root = tmp_path / "acts"
    info = {key: "same" for key in caching._RESUME_KEYS}
    cfg = caching.CacheConfig(output=root, tokens=100, shard_tokens=10)
    assert caching.prepare_output(root, info, cfg, [1], "float16") == {"batch": 0, "row": 0}  # nothing there
    w = activations.ShardWriter(root, layers=[1], d_model=4, dtype="float16", shard_tokens=10,
                                info={**info, "resume_from": {"batch": 3, "row": 2}}, provenance={})  # fmt: skip
    w.add({1: torch.zeros(25, 4)})  # two complete shards listed; five rows still pending
    with pytest.raises(BadInput, match="--resume to continue it or --overwrite"):
        caching.prepare_output(root, info, cfg, [1], "float16")
    resume = caching.CacheConfig(output=root, tokens=100, shard_tokens=10, resume=True)
    assert caching.prepare_output(root, info, resume, [1], "float16") == {"batch": 3, "row": 2}
    with pytest.raises(BadInput, match="different seq_len"):
        caching.prepare_output(root, {**info, "seq_len": 64}, resume, [1], "float16")
    with pytest.raises(BadInput, match="--layers"):
        caching.prepare_output(root, info, resume, [1, 2], "float16")
    overwrite = caching.CacheConfig(output=root, tokens=100, shard_tokens=10, overwrite=True)
    assert caching.prepare_output(root, info, overwrite, [1], "float16") == {"batch": 0, "row": 0}
    assert not (root / "manifest.json").exists() and not list(root.glob("layer1/shard-*"))


def test_cache_result_record_is_the_json_summary(tmp_path, model_dirs, corpus_file):
    cfg = caching.CacheConfig(output=tmp_path / "acts", layers=[1], tokens=40, shard_tokens=16, batch_size=2)
    teacher = load_model(ModelSpec(model=str(model_dirs["llama"]), device="cpu"))
    result = caching.cache_activations(teacher, data.DataSpec(dataset=str(corpus_file), seq_len=16), cfg, provenance={})
    record = result.record()
    assert record["kind"] == "kdtool.acts.run" and record["model"] == teacher.name and record["d_model"] == 32
    assert {k: record[k] for k in result.as_dict()} == result.as_dict() and record["tokens"] == 40


@pytest.mark.pretrained
def test_defaults_on_the_embedded_teacher_leave_what_train_sae_reads(cli, tmp_path, monkeypatch):
    """`kdtool cache-acts` with defaults (here fewer tokens): the embedded SmolLM2, layers 8,12,16, acts/."""
    monkeypatch.chdir(tmp_path)
    r = cli("--quiet", "cache-acts", "--tokens", "600", "--seq-len", "64", "--shard-size", "256")
    assert r.exit_code == 0, r.output
    store = activations.ActivationStore(tmp_path / "acts")
    assert store.layers == [8, 12, 16] and store.d_model == 576 and store.n_tokens == 600
    assert store.manifest["dataset"].startswith("embedded:") and store.manifest["dtype"] == "float16"
    batch, _ = next(store.iter_batches([12], 128, seed=0))
    norms = batch[12].norm(dim=1)
    assert batch[12].shape == (128, 576) and torch.isfinite(norms).all() and norms.min() > 0
