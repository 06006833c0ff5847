"""The on-disk activation cache that `cache-acts` writes and `train-sae`/`stats` read.

Layout (docs/formats.md):
    acts/manifest.json                      kind "kdtool.acts": model, dataset, seq_len, d_model,
                                            dtype, layers, shards [{file, tokens}], tokens, provenance
    acts/layer{L}/shard-{i:05d}.safetensors tensor "acts" [n_i, d_model]; shard i holds the same
                                            token positions for every layer

Shards are written whole (temp name, then rename) and the manifest is rewritten after each
complete shard, so a killed run leaves only complete shards listed; `--resume` continues
after the last listed shard.

Reading streams batches with a bounded shuffle buffer: the shard order is permuted per epoch,
`buffer_shards` consecutive shards are concatenated and their rows permuted. Every
permutation comes from (seed, epoch, buffer index), so a reader can resume at any batch by
loading only the buffer that batch lives in.

A cache shuffled on disk (`kdtool.acts.shuffle`, manifest key `shuffle`) is read the same way: its rows
are already in a global random order, and the window shuffle still gives every epoch different
batches at no extra cost.

torch and safetensors are imported inside the methods that read or write tensors: kdtool/info.py
describes a cache through read_manifest/manifest_summary and must not load torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput

MANIFEST = "manifest.json"
KIND = "kdtool.acts"
_DTYPES = {"float32", "float16", "bfloat16"}


def layer_dir(root: Path, layer: int) -> Path:
    return Path(root) / f"layer{layer}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class ShardWriter:
    """Collects per-layer activations and writes fixed-size shards plus the manifest.

    add({layer: tensor[n, d_model]}) appends aligned rows for every layer; close() writes
    the remainder. Memory holds at most one shard per layer.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        layers: list[int],
        d_model: int,
        dtype: str,
        shard_tokens: int,
        info: dict,
        provenance: dict,
        resume: bool = False,
    ):
        if dtype not in _DTYPES:
            raise BadInput(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.root = Path(root)
        self.layers, self.d_model, self.dtype, self.shard_tokens = list(layers), int(d_model), dtype, int(shard_tokens)
        self.info, self.provenance = dict(info), provenance
        self.shards: list[dict] = []
        if resume and (self.root / MANIFEST).exists():
            old = read_manifest(self.root)
            if old["layers"] != self.layers or old["d_model"] != self.d_model or old["dtype"] != dtype:
                raise BadInput(f"{self.root}: --resume with different layers/d_model/dtype than the cached run")
            self.shards = list(old["shards"])
        self._pending: dict[int, list] = {layer: [] for layer in self.layers}
        self._pending_n = 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def add(self, acts: dict) -> None:
        import torch  # lazy: see the module docstring

        n = None
        for layer in self.layers:
            x = acts[layer]
            if x.ndim != 2 or x.shape[1] != self.d_model:
                raise ValueError(f"layer {layer}: expected [n, {self.d_model}], got {tuple(x.shape)}")
            n = x.shape[0] if n is None else n
            self._pending[layer].append(x.detach().to("cpu", getattr(torch, self.dtype)))
        self._pending_n += n or 0
        while self._pending_n >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        import torch  # lazy: see the module docstring

        index = len(self.shards)
        for layer in self.layers:
            allrows = torch.cat(self._pending[layer]) if len(self._pending[layer]) > 1 else self._pending[layer][0]
            head, rest = allrows[:n], allrows[n:]
            self._pending[layer] = [rest] if rest.shape[0] else []
            formats.save_safetensors(
                layer_dir(self.root, layer) / shard_name(index),
                {"acts": head.clone()},
                kind="kdtool.acts.shard",
                extra={"layer": str(layer), "shard": str(index)},
            )
        self._pending_n -= n
        self.shards.append({"file": shard_name(index), "tokens": int(n)})
        self.write_manifest()

    def write_manifest(self) -> None:
        manifest = {
            "kind": KIND,
            **self.info,
            "layers": self.layers,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "shard_tokens": self.shard_tokens,
            "tokens": self.tokens,
            "shards": self.shards,
            "provenance": self.provenance,
        }
        formats.write_json(self.root / MANIFEST, manifest)

    def close(self) -> None:
        if self._pending_n:
            self._flush(self._pending_n)
        self.write_manifest()


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise BadInput(f"{root}: no {MANIFEST} (not an activation cache; run `kdtool cache-acts` first)")
    manifest = formats.read_json(path)
    if manifest.get("kind") != KIND:
        raise BadInput(f"{path}: not a kdtool activation manifest (kind={manifest.get('kind')!r})")
    return manifest


@dataclass(frozen=True)
class Position:
    """Where a reader is: resumable with O(1) work (only the current buffer is reloaded)."""

    epoch: int = 0
    buffer: int = 0
    offset: int = 0  # rows already consumed in this buffer

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "buffer": self.buffer, "offset": self.offset}


class ActivationStore:
    """Read side of the cache: streamed, shuffled, aligned batches for one or several layers."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.layers: list[int] = list(self.manifest["layers"])
        self.d_model: int = int(self.manifest["d_model"])
        self.shards: list[dict] = list(self.manifest["shards"])
        self.n_tokens: int = sum(s["tokens"] for s in self.shards)
        if not self.shards:
            raise BadInput(f"{self.root}: the activation cache has no complete shard")

    def check_layers(self, layers: list[int]) -> None:
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise BadInput(f"{self.root}: layer(s) {missing} not cached (cached: {self.layers})")

    def load_shard(self, layer: int, index: int):
        """One shard as float32 [n, d_model]; BadInput naming it when it is cut short or holds NaN/inf.

        The finiteness check costs one pass over memory already loaded; without it a NaN row reaches
        train-sae as "the loss diverged" and stats as NaN importances.
        """
        import torch  # lazy: see the module docstring

        path = layer_dir(self.root, layer) / self.shards[index]["file"]
        if not path.exists():
            raise BadInput(f"{path}: shard listed in the manifest is missing")
        tensors = formats.load_safetensors(path)
        if "acts" not in tensors:
            raise BadInput(f"{path}: no tensor 'acts' (not an activation shard)")
        x = tensors["acts"].float()
        if not bool(torch.isfinite(x).all()):
            raise BadInput(f"{path}: holds NaN or infinite activations; re-cache it (cache-acts --overwrite)")
        return x

    def iter_shards(self, layers: list[int]) -> Iterator[dict]:
        """Every token once, in order: {layer: [n, d]} per shard (for `stats`)."""
        self.check_layers(layers)
        for i in range(len(self.shards)):
            yield {layer: self.load_shard(layer, i) for layer in layers}

    def iter_batches(
        self,
        layers: list[int],
        batch_tokens: int,
        *,
        seed: int = 0,
        buffer_shards: int = 4,
        start: Position | None = None,
        epochs: int | None = None,
    ) -> Iterator[tuple[dict, Position]]:
        """Shuffled batches {layer: [batch_tokens, d]} with the Position *after* each batch.

        Batches never straddle buffers (a buffer's last rows that do not fill a batch are
        dropped), so positions stay simple and exact. epochs=None loops forever.
        """
        import torch  # lazy: see the module docstring

        self.check_layers(layers)
        pos = start or Position()
        n_shards = len(self.shards)
        k = max(1, min(buffer_shards, n_shards))
        n_buffers = (n_shards + k - 1) // k
        epoch = pos.epoch
        while epochs is None or epoch < epochs:
            order = np.random.default_rng([seed, epoch]).permutation(n_shards)
            first_buffer = pos.buffer if epoch == pos.epoch else 0
            for b in range(first_buffer, n_buffers):
                idx = order[b * k : (b + 1) * k]
                data = {layer: torch.cat([self.load_shard(layer, int(i)) for i in idx]) for layer in layers}
                rows = data[layers[0]].shape[0]
                perm = torch.from_numpy(np.random.default_rng([seed, epoch, b, 1]).permutation(rows))
                offset = pos.offset if (epoch == pos.epoch and b == pos.buffer) else 0
                while offset + batch_tokens <= rows:
                    sel = perm[offset : offset + batch_tokens]
                    offset += batch_tokens
                    yield {layer: data[layer][sel] for layer in layers}, Position(epoch, b, offset)
            epoch += 1


def manifest_summary(root: str | Path) -> dict:
    """A short description for `kdtool info`."""
    m = read_manifest(root)
    shuffle = m.get("shuffle")
    return {k: m.get(k) for k in ("model", "dataset", "seq_len", "d_model", "dtype", "layers", "tokens")} | {
        "shards": len(m.get("shards", [])),
        "order": f"shuffled (seed {shuffle.get('seed')})" if shuffle else "document order",
    }


def dumps_position(pos: Position) -> str:
    return json.dumps(pos.as_dict())
