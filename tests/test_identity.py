"""--resume checks contents, not names (kdtool/identity.py): another model or cache is refused with both
values shown, the same model under another path spelling is accepted."""

from __future__ import annotations

import json

import pytest
from synthetic_acts import write_random
from tiny_models import make_model_dir

from kdtool import identity
from kdtool.acts import store as activations
from kdtool.sae.config import TrainConfig
from kdtool.sae.sources import CacheSource
from kdtool.sae.training import Trainer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny Llamas of one architecture (same file names and sizes), other weights."""
    root = tmp_path_factory.mktemp("models")
    return make_model_dir(root / "tiny", seed=0), make_model_dir(root / "other", seed=1)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    docs = [f"Paragraph {i}: the fox {'jumps' if i % 2 else 'sleeps'} over {i % 5} lazy dogs." for i in range(300)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_a_model_is_known_by_its_content(models, tmp_path):
    tiny, other = models
    a = identity.model_identity(str(tiny))
    assert identity.model_identity(f"{tiny.parent}/./{tiny.name}/") == a  # another spelling: the same model
    b = identity.model_identity(str(other))
    assert [w[:2] for w in a["weights"]] == [w[:2] for w in b["weights"]]  # same names and sizes ...
    assert a["fingerprint"] != b["fingerprint"]  # ... other weights: another model
    hub = identity.model_identity("EleutherAI/pythia-410m")
    assert hub["revision"] == "main" and identity.model_identity("EleutherAI/pythia-410m", "step1000") != hub
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 20_000)
    assert identity.model_identity(str(gguf))["source"] == "gguf"
    assert "(hub EleutherAI/pythia-410m@main)" in identity.describe(hub)


def test_a_text_is_known_by_its_content(text, tmp_path):
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(text.read_bytes())
    desc = {"dataset": str(text), "split": "train", "text_column": "text", "txt_unit": "paragraph", "seq_len": 16}
    a = identity.data_identity(desc, [text])
    assert identity.data_identity({**desc, "dataset": str(copy)}, [copy])["dataset"] != a["dataset"]  # file name
    assert identity.data_identity({**desc, "seq_len": 32}, [text]) == a  # how it is cut: compared on its own
    copy.write_text(text.read_text().replace("fox", "cat"))
    assert identity.data_identity(desc, [copy])["fingerprint"] != a["fingerprint"]


def _kill_cache_acts(cli, monkeypatch, args):
    """cache-acts killed while its third shard is due (as in test_cache_acts)."""
    real = activations.ShardWriter._flush
    done = []

    def dying(self, n):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(n)
        real(self, n)

    monkeypatch.setattr(activations.ShardWriter, "_flush", dying)
    r = cli("--quiet", *args)
    monkeypatch.setattr(activations.ShardWriter, "_flush", real)
    assert r.exit_code == 130


def test_an_sae_or_stats_file_is_known_by_its_content(tmp_path):
    """The features loss's --sae and --stats (distill's run_key): contents, not paths or locks."""
    import shutil

    a = tmp_path / "a" / "layer3-x8"
    a.mkdir(parents=True)
    (a / "cfg.json").write_text("{}")
    (a / "sae_weights.safetensors").write_bytes(b"w" * 100)
    b = tmp_path / "b" / "moved"
    shutil.copytree(a, b)
    (b.parent / ".moved.lock").write_text("{}")
    (b / ".sae_weights.safetensors.abcd1234.tmp").write_bytes(b"half")
    ia, ib = identity.files_identity(a), identity.files_identity(b)
    assert ia["fingerprint"] == ib["fingerprint"] and "moved" not in json.dumps(ib)
    (b / "sae_weights.safetensors").write_bytes(b"v" * 100)
    assert identity.files_identity(b)["fingerprint"] != ia["fingerprint"]
    assert (
        identity.files_identity(a / "cfg.json")["fingerprint"] == identity.files_identity(b / "cfg.json")["fingerprint"]
    )


def test_cache_acts_resume_refuses_another_model_and_accepts_another_spelling(cli, tmp_path, models, text, monkeypatch):
    tiny, other = models
    opts = ["--dataset", text, "--layers", "1", "--tokens", "800", "--seq-len", "16", "--shard-size", "200"]
    _kill_cache_acts(cli, monkeypatch, ["cache-acts", "--model", tiny, *opts, "-o", tmp_path / "acts"])
    r = cli("cache-acts", "--model", other, *opts, "-o", tmp_path / "acts", "--resume")
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert "another model than the cached run" in line and str(tiny) in line and str(other) in line
    fp_a, fp_b = (identity.model_identity(str(m))["fingerprint"] for m in (tiny, other))
    assert fp_a in line and fp_b in line
    assert len(activations.read_manifest(tmp_path / "acts")["shards"]) == 2  # nothing of `other` mixed in
    spelled = f"{tiny.parent}/./{tiny.name}/"
    r = cli("--quiet", "cache-acts", "--model", spelled, *opts, "-o", tmp_path / "acts", "--resume")
    assert r.exit_code == 0, r.output
    assert activations.ActivationStore(tmp_path / "acts").n_tokens == 800


def test_train_sae_resume_refuses_a_cache_that_was_replaced(cli, tmp_path):
    acts = tmp_path / "acts"
    write_random(acts, d=16, n=8_000, layers=(3,))
    cfg = TrainConfig(layers=[3], d_in=16, d_sae=32, batch_tokens=512, tokens=6_000, checkpoint_every=1_000)
    Trainer(cfg, CacheSource(acts), tmp_path / "saes", stop_after_steps=4).run()  # killed after 2 checkpoints
    moved = tmp_path / "moved-acts"
    acts.rename(moved)  # the same cache elsewhere: resumes
    train = ["train-sae", "--layer", "3", "--features", "32", "--batch-tokens", "512", "--tokens", "6000"]
    r = cli("--quiet", *train, "--checkpoint-every", "1000", "--acts", moved, "-o", tmp_path / "saes", "--resume")
    assert r.exit_code == 0, r.output
    # the cache rebuilt under the same name with other rows: refused, both values shown
    write_random(tmp_path / "acts2", d=16, n=8_000, layers=(3,), seed=5, shard=4_000)
    cfg2 = TrainConfig(layers=[3], d_in=16, d_sae=32, batch_tokens=512, tokens=6_000, checkpoint_every=1_000)
    Trainer(cfg2, CacheSource(moved), tmp_path / "saes2", stop_after_steps=4).run()
    r = cli(*train, "--checkpoint-every", "1000", "--acts", tmp_path / "acts2", "-o", tmp_path / "saes2", "--resume")
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert "the activations are not those of the checkpointed run" in line and "cache: checkpoint 'sha256:" in line
    assert line.count("sha256:") == 2
