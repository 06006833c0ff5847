"""Out-of-core global shuffle of an activation cache (`kdtool cache-acts --shuffle` / `--shuffle-only`).

`cache-acts` writes rows in document order, and the reader only mixes rows within a window of a
few shards, so a training batch sees a few documents' worth of windows. This rewrites the cache
in one seeded, uniformly random global order, with memory bounded by about one bucket of one
layer (never the whole cache):

1. scatter: row j of shard i gets a bucket key from rng(seed, 0, i), uniform in 0..B-1 with
   B = ceil(tokens / bucket_tokens); the shard's rows are grouped by key (stably) and appended to
   B raw bucket files per layer. The keys are drawn once per shard and used for every layer.
2. gather: bucket b of a layer is loaded, permuted with rng(seed, 1, b) and cut into shards of
   `shard_tokens` rows, buckets one after another (a shard may straddle two buckets).

Uniform keys then a uniform permutation within each bucket give a uniform random permutation of
all rows (buckets are the high digits of a random sort key). Every layer gets the same keys and
the same within-bucket permutations, so row r is still the same token at every layer; the cache
stores no other per-row data.

Atomic: buckets and new shards are written under ROOT/.shuffle-tmp/; the new shards are then
moved into ROOT/layer{L}/ under new names (shard-{i:05d}-shuffled.safetensors) and the manifest,
rewritten atomically with the new shard list and a `shuffle` record, is the commit point; the
old shards are deleted after it. A kill before the commit leaves the original cache as it was, a
kill after it the shuffled one; `clean_leftovers` (run by the next shuffle, --resume or
--overwrite) removes the temp folder and shard files the manifest does not list. Disk: about one
more cache's size while it runs (bucket files are deleted as they are consumed).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdtool import formats, locks
from kdtool.acts import store
from kdtool.atomic import rename
from kdtool.errors import BadInput, RuntimeFailure

TMP = ".shuffle-tmp"
METHOD = "two-pass bucket scatter (uniform keys, then a permutation per bucket)"
#: Default rows per bucket: 1M rows of d_model 1024 in float16 are 2 GiB per bucket.
BUCKET_TOKENS = 1 << 20
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def shuffled_name(index: int) -> str:
    return f"shard-{index:05d}-shuffled.safetensors"


@dataclass
class ShuffleResult:
    root: Path
    tokens: int  # rows per layer
    layers: list[int]
    buckets: int
    max_bucket_rows: int  # the largest bucket (rows of one layer held in pass 2)
    peak_rows: int  # the most rows (of one layer) held in memory at once, both passes
    shards: int
    seconds: float
    skipped: bool = False  # already shuffled with this seed: nothing done

    def as_dict(self) -> dict:
        return {
            "acts": str(self.root),
            "tokens": self.tokens,
            "layers": self.layers,
            "buckets": self.buckets,
            "max_bucket_rows": self.max_bucket_rows,
            "peak_rows": self.peak_rows,
            "shards": self.shards,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
        }


class _Held:
    """Counts the rows held in memory (instrumentation for the memory bound)."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def add(self, n: int) -> None:
        self.now += int(n)
        self.peak = max(self.peak, self.now)

    def drop(self, n: int) -> None:
        self.now -= int(n)


def is_complete(manifest: dict) -> bool:
    """Finished caching: the `complete` flag, or (older caches) all target_tokens cached."""
    if "complete" in manifest:
        return bool(manifest["complete"])
    target = manifest.get("target_tokens")
    return target is not None and int(manifest.get("tokens") or 0) >= int(target)


def clean_leftovers(root: str | Path) -> None:
    """Remove what a killed shuffle leaves: the temp folder and shard files the manifest does not list."""
    root = Path(root)
    shutil.rmtree(root / TMP, ignore_errors=True)
    if not (root / store.MANIFEST).exists():
        return
    manifest = store.read_manifest(root)
    listed = {s["file"] for s in manifest.get("shards", [])}
    for layer in manifest.get("layers", []):
        for f in store.layer_dir(root, layer).glob("shard-*.safetensors"):
            if f.name not in listed:
                f.unlink()


def _load_raw(root: Path, layer: int, shard: dict, dtype: str, d_model: int) -> np.ndarray:
    """A shard's rows as raw bytes [n, d_model * itemsize] (any dtype, bf16 included)."""
    path = store.layer_dir(root, layer) / shard["file"]
    if not path.exists():
        raise BadInput(f"{path}: shard listed in the manifest is missing")
    x = formats.load_safetensors(path)["acts"]
    if str(x.dtype).removeprefix("torch.") != dtype or tuple(x.shape) != (shard["tokens"], d_model):
        raise BadInput(
            f"{path}: holds {str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}, "
            f"the manifest says {dtype} ({shard['tokens']}, {d_model})"
        )
    return x.contiguous().view(torch.uint8).numpy()


def _save_rows(path: Path, raw: np.ndarray, dtype: str, layer: int, index: int, seed: int) -> None:
    acts = torch.from_numpy(np.ascontiguousarray(raw)).view(getattr(torch, dtype))
    formats.save_safetensors(
        path,
        {"acts": acts},
        kind="kdtool.acts.shard",
        extra={"layer": str(layer), "shard": str(index), "shuffle_seed": str(seed)},
    )


def check_shufflable(root: str | Path, seed: int) -> dict:
    """The manifest of a finished cache that can be shuffled with `seed` (BadInput otherwise)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise BadInput(f"--output {root}: not a folder (an activation cache is a folder)")
    manifest = store.read_manifest(root)
    if not manifest.get("shards"):
        raise BadInput(f"{root}: the activation cache has no complete shard; nothing to shuffle")
    if not is_complete(manifest):
        raise BadInput(
            f"{root}: unfinished cache ({int(manifest.get('tokens') or 0):,} of "
            f"{int(manifest.get('target_tokens') or 0):,} tokens); finish it with `kdtool cache-acts --resume` "
            "(same options) before shuffling"
        )
    for layer in manifest.get("layers", []):
        for shard in manifest["shards"]:
            path = store.layer_dir(root, layer) / shard["file"]
            if not path.is_file():
                raise BadInput(f"{path}: shard listed in the manifest is missing")
    done = manifest.get("shuffle")
    if done and int(done.get("seed", -1)) != int(seed):
        raise BadInput(
            f"{root}: already shuffled with seed {done.get('seed')}; re-cache it (--overwrite) to shuffle "
            f"with seed {seed}"
        )
    return manifest


def shuffle_cache(
    root: str | Path,
    *,
    seed: int = 0,
    bucket_tokens: int = BUCKET_TOKENS,
    provenance: dict | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> ShuffleResult:
    """Shuffle the finished cache in `root` in place (see the module docstring); returns what was done.

    As the cache's only writer (kdtool/locks.py): a second shuffle or a caching run into it is refused.
    """
    with locks.claim(root, command=(provenance or {}).get("command")):
        return _shuffle_cache(Path(root), seed, bucket_tokens, provenance, on_progress)


def _shuffle_cache(root: Path, seed, bucket_tokens, provenance, on_progress) -> ShuffleResult:
    if bucket_tokens < 1:
        raise BadInput(f"--shuffle-bucket must be >= 1, got {bucket_tokens}")
    manifest = check_shufflable(root, seed)
    layers = list(manifest["layers"])
    shards = list(manifest["shards"])
    n = sum(int(s["tokens"]) for s in shards)
    started = time.perf_counter()
    if manifest.get("shuffle"):
        s = manifest["shuffle"]
        return ShuffleResult(root, n, layers, s.get("buckets", 0), 0, 0, len(shards), 0.0, skipped=True)
    clean_leftovers(root)
    dtype, d_model = manifest["dtype"], int(manifest["d_model"])
    shard_tokens = int(manifest.get("shard_tokens") or max(int(s["tokens"]) for s in shards))
    n_buckets = max(1, math.ceil(n / bucket_tokens))
    cache_bytes = sum((store.layer_dir(root, L) / s["file"]).stat().st_size for L in layers for s in shards)
    free = shutil.disk_usage(root).free
    if free < cache_bytes * 1.02:
        raise RuntimeFailure(
            f"{root}: shuffling needs about {cache_bytes / 2**30:.2f} GiB free beside the cache, "
            f"{free / 2**30:.2f} GiB free"
        )
    tmp = root / TMP
    held = _Held()
    total_steps = 2 * len(shards) * len(layers)
    step = 0

    # Pass 1: scatter every shard's rows into bucket files (same keys for every layer).
    counts = np.zeros(n_buckets, dtype=np.int64)
    for L in layers:
        (tmp / "buckets" / f"layer{L}").mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        keys = np.random.default_rng([seed, 0, i]).integers(n_buckets, size=int(shard["tokens"]))
        order = np.argsort(keys, kind="stable")
        per = np.bincount(keys, minlength=n_buckets)
        ends = np.cumsum(per)
        counts += per
        for L in layers:
            raw = _load_raw(root, L, shard, dtype, d_model)
            held.add(len(raw))
            grouped = raw[order]
            held.add(len(grouped))
            del raw
            held.drop(len(order))
            for b in np.flatnonzero(per):
                with open(tmp / "buckets" / f"layer{L}" / f"b{b:06d}.bin", "ab") as fh:
                    fh.write(grouped[ends[b] - per[b] : ends[b]].data)
            del grouped
            held.drop(len(order))
            step += 1
            if on_progress is not None:
                on_progress("scatter", step, total_steps)

    # Pass 2: per layer, per bucket: permute, cut into shards of shard_tokens rows.
    sizes = [shard_tokens] * (n // shard_tokens) + ([n % shard_tokens] if n % shard_tokens else [])
    new_shards = [{"file": shuffled_name(k), "tokens": t} for k, t in enumerate(sizes)]
    row_bytes = d_model * _ITEMSIZE[dtype]
    for L in layers:
        out_dir = tmp / f"layer{L}"
        out_dir.mkdir(parents=True, exist_ok=True)
        carry, index = None, 0
        for b in range(n_buckets):
            path = tmp / "buckets" / f"layer{L}" / f"b{b:06d}.bin"
            if not counts[b]:
                continue
            bucket = np.fromfile(path, dtype=np.uint8)
            if bucket.size != counts[b] * row_bytes:
                raise RuntimeFailure(f"{path}: {bucket.size} bytes, expected {counts[b] * row_bytes} (disk full?)")
            bucket = bucket.reshape(-1, row_bytes)
            held.add(len(bucket))
            perm = np.random.default_rng([seed, 1, b]).permutation(len(bucket))
            at = 0
            while at < len(bucket):
                want = sizes[index] - (0 if carry is None else len(carry))
                piece = bucket[perm[at : at + want]]
                held.add(len(piece))
                at += len(piece)
                if carry is not None:
                    joined = np.concatenate([carry, piece])
                    held.add(len(joined))
                    held.drop(len(carry) + len(piece))
                    piece, carry = joined, None
                if len(piece) == sizes[index]:
                    _save_rows(out_dir / new_shards[index]["file"], piece, dtype, L, index, seed)
                    held.drop(len(piece))
                    index += 1
                else:
                    carry = piece  # the rest of this shard comes from the next bucket
            held.drop(len(bucket))
            del bucket
            path.unlink()
        if carry is not None or index != len(sizes):
            raise RuntimeFailure(f"{root}: shuffle of layer {L} wrote {index} of {len(sizes)} shards")
        step += len(shards)
        if on_progress is not None:
            on_progress("gather", step, total_steps)

    # Commit: move the new shards beside the old ones, then swap the manifest atomically.
    for L in layers:
        for s in new_shards:
            rename(tmp / f"layer{L}" / s["file"], store.layer_dir(root, L) / s["file"])
    seconds = time.perf_counter() - started
    record = {
        "seed": int(seed),
        "method": METHOD,
        "buckets": n_buckets,
        "bucket_tokens": int(bucket_tokens),
        "max_bucket_rows": int(counts.max()),
        "unshuffled_shards": len(shards),
        "seconds": round(seconds, 3),
    }
    if provenance is not None:
        record["provenance"] = provenance
    formats.write_json(root / store.MANIFEST, {**manifest, "shards": new_shards, "shuffle": record})
    clean_leftovers(root)
    return ShuffleResult(root, n, layers, n_buckets, int(counts.max()), held.peak, len(new_shards), seconds)
