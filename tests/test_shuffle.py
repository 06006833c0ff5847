"""On-disk shuffle of an activation cache: same rows, aligned layers, seeded, mixed, bounded memory, atomic."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from tiny_models import make_model_dir

from kdtool.acts import shuffle
from kdtool.acts import store as activations
from kdtool.errors import BadInput

LAYERS = (1, 4)


def write_cache(root, *, n=5000, d=8, shard=600, dtype="float32", complete=True, seed=0):
    """Row j of layer L = [j, L, noise...]: column 0 names the original position (exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    w = activations.ShardWriter(
        root,
        layers=list(LAYERS),
        d_model=d,
        dtype=dtype,
        shard_tokens=shard,
        info={"model": "synthetic", "target_tokens": n, "complete": complete},
        provenance={},
    )
    for lo in range(0, n, 700):  # batches that straddle shards, as cache-acts hands them over
        hi = min(n, lo + 700)
        idx = torch.arange(lo, hi, dtype=torch.float32)[:, None]
        w.add(
            {L: torch.cat([idx, torch.full_like(idx, L), torch.randn(hi - lo, d - 2, generator=g)], 1) for L in LAYERS}
        )
    if complete:
        w.close()
    return root


def read_all(root):
    store = activations.ActivationStore(root)
    return {L: torch.cat([s[L] for s in store.iter_shards([L])]) for L in store.layers}


def test_same_rows_aligned_across_layers_and_mixed(tmp_path):
    root = write_cache(tmp_path / "acts")
    before = read_all(root)
    res = shuffle.shuffle_cache(root, seed=3, bucket_tokens=700)
    after = read_all(root)
    assert res.buckets == 8 and res.tokens == 5000 and not res.skipped
    idx = after[1][:, 0].long()
    assert torch.equal(after[4][:, 0].long(), idx)  # row r is the same token at every layer
    assert sorted(idx.tolist()) == list(range(5000))  # a permutation: every row once
    for L in LAYERS:
        assert torch.equal(after[L], before[L][idx])  # the whole row moved, bit for bit (so the multiset is kept)
    # consecutive rows come from far-apart positions (before: always neighbours)
    near = (idx[1:] - idx[:-1]).abs() <= 10
    assert float(near.float().mean()) < 0.02
    assert len(set((idx[:600] // 600).tolist())) == 9  # the first shard draws on every original shard
    m = activations.read_manifest(root)
    assert [s["tokens"] for s in m["shards"]] == [600] * 8 + [200]
    assert m["shuffle"]["seed"] == 3 and "bucket" in m["shuffle"]["method"] and m["shuffle"]["buckets"] == 8
    assert activations.manifest_summary(root)["order"] == "shuffled (seed 3)"
    for L in LAYERS:  # nothing left but the listed shards
        assert sorted(f.name for f in (root / f"layer{L}").iterdir()) == [s["file"] for s in m["shards"]]
    assert not (root / shuffle.TMP).exists()
    # the reader streams it as before
    batch, _ = next(activations.ActivationStore(root).iter_batches([1, 4], 256, seed=0))
    assert torch.equal(batch[1][:, 0], batch[4][:, 0])


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    orders = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        root = write_cache(tmp_path / name)
        shuffle.shuffle_cache(root, seed=seed, bucket_tokens=1000)
        orders.append(read_all(root)[1][:, 0].long())
    assert torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[0], orders[2])
    assert float((orders[0] == orders[2]).float().mean()) < 0.01


def test_bfloat16_rows_survive_byte_for_byte(tmp_path):
    root = write_cache(tmp_path / "acts", n=1200, shard=256, dtype="bfloat16")
    before = read_all(root)
    shuffle.shuffle_cache(root, seed=0, bucket_tokens=300)
    after = read_all(root)
    for L in LAYERS:  # as a multiset of rows: sort both by every column
        a = np.unique(before[L].numpy(), axis=0)
        b = np.unique(after[L].numpy(), axis=0)
        assert np.array_equal(a, b) and len(b) == 1200
    assert activations.read_manifest(root)["dtype"] == "bfloat16"


def test_memory_stays_about_one_bucket(tmp_path):
    n, d, shard, bucket = 40_000, 16, 1000, 2000
    root = write_cache(tmp_path / "acts", n=n, d=d, shard=shard)
    tracemalloc.start()  # numpy registers its buffers with tracemalloc
    try:
        tracemalloc.reset_peak()
        res = shuffle.shuffle_cache(root, seed=0, bucket_tokens=bucket)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.buckets == 20 and res.max_bucket_rows < 1.2 * bucket
    assert res.peak_rows <= res.max_bucket_rows + 2 * shard  # the instrumented count
    layer_bytes = n * d * 4
    assert peak < 0.25 * layer_bytes, (peak, layer_bytes)  # measured: far below one layer, let alone the cache
    assert peak < 2 * (res.max_bucket_rows + 2 * shard) * d * 4
    assert sorted(read_all(root)[4][:, 0].long().tolist()) == list(range(n))


def test_a_killed_shuffle_leaves_the_cache_usable_and_a_rerun_finishes(tmp_path, monkeypatch):
    root = write_cache(tmp_path / "acts")
    before, manifest = read_all(root), activations.read_manifest(root)
    real_save, saved = shuffle._save_rows, []

    def dying_save(*args):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(1)
        real_save(*args)

    monkeypatch.setattr(shuffle, "_save_rows", dying_save)
    with pytest.raises(KeyboardInterrupt):
        shuffle.shuffle_cache(root, seed=0, bucket_tokens=700)
    monkeypatch.setattr(shuffle, "_save_rows", real_save)
    assert (root / shuffle.TMP).exists()  # leftovers ...
    assert activations.read_manifest(root) == manifest  # ... but the cache is the original one
    for L in LAYERS:
        assert torch.equal(read_all(root)[L], before[L])
    shuffle.shuffle_cache(root, seed=0, bucket_tokens=700)
    assert not (root / shuffle.TMP).exists()
    assert sorted(read_all(root)[1][:, 0].long().tolist()) == list(range(5000))

    # killed right after the commit: the shuffled cache is complete, the old shards are only leftovers
    other = write_cache(tmp_path / "other")
    monkeypatch.setattr(shuffle, "clean_leftovers", lambda root: None)
    shuffle.shuffle_cache(other, seed=0, bucket_tokens=700)
    assert list((other / "layer1").glob("shard-00000.safetensors"))  # the old file is still there
    assert torch.equal(read_all(other)[1], read_all(root)[1])  # same seed, same order, read from the new files


def test_library_refuses_unfinished_and_reshuffle_with_another_seed(tmp_path):
    unfinished = write_cache(tmp_path / "u", complete=False)
    with pytest.raises(BadInput, match="unfinished cache"):
        shuffle.shuffle_cache(unfinished)
    root = write_cache(tmp_path / "acts", n=900)
    shuffle.shuffle_cache(root, seed=0, bucket_tokens=300)
    assert shuffle.shuffle_cache(root, seed=0).skipped  # same seed: nothing to do
    with pytest.raises(BadInput, match="already shuffled with seed 0"):
        shuffle.shuffle_cache(root, seed=1)


@pytest.mark.parametrize(
    "case,needle",
    [
        ("empty", "not an activation cache"),
        ("missing", "listed in the manifest is missing"),
        ("unfinished", "unfinished"),
    ],
)
def test_shuffle_only_bad_inputs_give_one_line(cli, tmp_path, case, needle):
    target = tmp_path / "acts"
    if case == "empty":
        target.mkdir()
    elif case == "missing":
        write_cache(target)
        (target / "layer4" / "shard-00003.safetensors").unlink()
    else:
        write_cache(target, complete=False)
    r = cli("cache-acts", "--shuffle-only", "-o", target)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    docs = [f"Document {i}: the {'cat' if i % 3 else 'owl'} reads {i % 7} long books." for i in range(200)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return make_model_dir(tmp_path_factory.mktemp("llama"), "llama"), path


def test_cache_acts_shuffle_then_train_sae_stats_and_info_read_it(cli, tmp_path, tiny):
    model, text = tiny
    base = ["cache-acts", "--model", model, "--dataset", text, "--layers", "1,2", "--tokens", "3000"]
    base += ["--seq-len", "32", "--batch-size", "4", "--shard-size", "512", "--acts-dtype", "float32"]
    plain, shuf = tmp_path / "plain", tmp_path / "shuf"
    assert cli("--quiet", *base, "-o", plain).exit_code == 0
    r = cli("--json", *base, "-o", shuf, "--shuffle", "--shuffle-bucket", "1K", "--shuffle-seed", "7")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "kdtool.acts.run" and out["tokens"] == 3000 and out["shuffle"]["buckets"] == 3
    a, b = read_all(plain), read_all(shuf)
    # the same (layer 1, layer 2) row pairs as a multiset (text repeats, so some rows occur twice)
    pairs = [np.unique(torch.cat([x[1], x[2]], 1).numpy(), axis=0, return_counts=True) for x in (a, b)]
    assert all(np.array_equal(p, q) for p, q in zip(pairs[0], pairs[1], strict=True))
    assert not torch.equal(a[1], b[1])
    assert activations.read_manifest(shuf)["shuffle"]["provenance"]["seed"] == 7

    r = cli("--json", "info", shuf)
    assert json.loads(r.stdout)["files"][0]["summary"]["order"] == "shuffled (seed 7)"
    r = cli("--quiet", "--json", *base, "-o", shuf, "--resume", "--shuffle", "--shuffle-seed", "7")
    assert r.exit_code == 0 and json.loads(r.stdout)["shuffle"]["skipped"] is True  # scripts can always pass both
    r = cli(*[("6000" if x == "3000" else x) for x in base], "-o", shuf, "--resume")
    assert r.exit_code == 2 and "shuffled" in r.stderr  # it cannot grow

    train = ["--layer", "1,2", "--features", "32", "--batch-tokens", "256", "--tokens", "2K", "--lr", "1e-2"]
    r = cli("--quiet", "train-sae", "--acts", shuf, *train, "-o", tmp_path / "saes")
    assert r.exit_code == 0, r.output
    r = cli("--json", "stats", "--sae", tmp_path / "saes", "--acts", shuf, "-o", tmp_path / "stats.parquet")
    assert r.exit_code == 0, r.output
    assert [row["layer"] for row in json.loads(r.stdout)["rows"]] == [1, 2]

    shutil.rmtree(shuf)  # --shuffle-only on the plain cache gives the same rows as --shuffle at caching time
    r = cli("--quiet", "cache-acts", "--shuffle-only", "-o", plain, "--shuffle-bucket", "1K", "--shuffle-seed", "7")
    assert r.exit_code == 0, r.output
    assert torch.equal(read_all(plain)[2], b[2])
