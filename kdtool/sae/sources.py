"""Where train-sae's (and stats') activations come from: the cache, or a teacher streamed through a shuffle buffer.

A source yields ({layer: [batch_tokens, d_in] float32}, position) pairs; the position is a JSON
dict from which `batches(start=position)` continues exactly (the checkpoint stores it). Both
sources' shuffles depend only on (seed, position), so a resumed run reads the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from kdtool.acts.store import ActivationStore, Position
from kdtool.errors import BadInput
from kdtool.models import LoadedModel, ModelSpec, residual_stream
from kdtool.text.tokens import DataSpec, token_batches

#: train-sae reads this cache when neither --acts nor a teacher is given
DEFAULT_ACTS = Path("acts")


class BatchSource(Protocol):
    """Where activations come from: the cache, or a model streamed through a shuffle buffer."""

    d_in: int
    info: dict  # model, dataset, seq_len, ... for cfg.json
    inputs: list  # paths for provenance

    def batches(
        self, layers: list[int], batch_tokens: int, *, seed: int, start: dict | None, one_pass: bool
    ) -> Iterator[tuple[dict, dict]]:
        """({layer: [batch_tokens, d_in] float32}, position after the batch as a JSON dict)."""
        ...

    def approx_tokens(self) -> int | None:
        """Tokens in one pass (for progress), if known."""
        ...

    def select_layers(self, requested: list[int] | None) -> list[int]:
        """The layers to train: `requested` (--layer) checked against what the source has, or its default."""
        ...


class CacheSource:
    """Batches from an activation cache written by `kdtool cache-acts` (shuffled, resumable)."""

    def __init__(self, root: str | Path, *, buffer_shards: int = 4):
        self.store = ActivationStore(root)
        self.buffer_shards = int(buffer_shards)
        self.d_in = self.store.d_model
        m = self.store.manifest
        self.info = {k: m.get(k) for k in ("model", "revision", "dataset", "seq_len", "dtype")} | {
            "acts": str(root),
            "source": "cache",
        }
        self.inputs = [Path(root) / "manifest.json"]

    def batches(self, layers, batch_tokens, *, seed, start, one_pass):
        pos = Position(**start) if start else None
        for batch, after in self.store.iter_batches(
            layers, batch_tokens, seed=seed, buffer_shards=self.buffer_shards, start=pos, epochs=1 if one_pass else None
        ):
            yield batch, after.as_dict()

    def approx_tokens(self):
        return self.store.n_tokens

    def select_layers(self, requested):
        """Default: every cached layer."""
        cached = self.store.layers
        if requested is None:
            return list(cached)
        missing = [L for L in requested if L not in cached]
        if missing:
            raise BadInput(
                f"--layer: layer(s) {missing} not in the cache "
                f"(cached: {','.join(map(str, cached))}; run `kdtool cache-acts --layers ...`)"
            )
        return requested


class ModelSource:
    """Activations straight from a teacher's forward pass through a shuffle buffer (no disk cache).

    Blocks of `block_batches` model batches (about `buffer_tokens` token positions) are run,
    their rows (all requested layers aligned) permuted with rng(seed, block) and cut into
    training batches; the rows of a block that do not fill a batch are dropped. The position is
    {"block", "offset"}: a resume re-runs only the current block's model batches (earlier ones
    are skipped by the tokenizer, without the model).
    """

    def __init__(
        self,
        teacher: LoadedModel,
        data: DataSpec,
        *,
        buffer_tokens: int = 262_144,
        batch_size: int = 8,
        drop_first: bool = True,
    ):
        self.teacher, self.data = teacher, data
        self.batch_size = int(batch_size)
        self.first = 1 if drop_first else 0
        self.per_seq = data.seq_len - self.first
        if self.per_seq < 1:
            raise BadInput("--seq-len must be >= 2 with --drop-first")
        self.block_batches = max(1, math.ceil(buffer_tokens / (self.batch_size * self.per_seq)))
        self.d_in = teacher.d_model
        self.info = {
            "model": teacher.name,
            "revision": teacher.revision,
            "dataset": data.describe()["dataset"],
            "seq_len": data.seq_len,
            "source": "stream",
            "drop_first": drop_first,
            "buffer_tokens": self.block_batches * self.batch_size * self.per_seq,
        }
        self.inputs = [p for p in (teacher.path,) if p] + data.local_inputs()

    def model_rows(self, layers: list[int], *, skip_batches: int = 0) -> Iterator[dict]:
        """{layer: [n, d] float32} per model batch, in data order (also used by `stats`)."""
        for ids in token_batches(self.data, self.teacher.tokenizer, self.batch_size, skip_batches=skip_batches):
            with torch.no_grad():  # not inference_mode: its flag would leak into the trainer across yields
                hidden = residual_stream(self.teacher.model, ids.to(self.teacher.device), None, layers)
            yield {L: hidden[L][:, self.first :, :].reshape(-1, self.d_in).float() for L in layers}

    def batches(self, layers, batch_tokens, *, seed, start, one_pass):
        block = int(start["block"]) if start else 0
        offset = int(start["offset"]) if start else 0
        rows_iter = self.model_rows(layers, skip_batches=block * self.block_batches)
        while True:
            parts = list(itertools.islice(rows_iter, self.block_batches))
            if not parts:
                return
            data = {L: torch.cat([p[L] for p in parts]) for L in layers}
            rows = data[layers[0]].shape[0]
            perm = torch.from_numpy(np.random.default_rng([seed, block, 2]).permutation(rows)).to(
                data[layers[0]].device
            )
            while offset + batch_tokens <= rows:
                sel = perm[offset : offset + batch_tokens]
                offset += batch_tokens
                yield {L: data[L][sel] for L in layers}, {"block": block, "offset": offset}
            block, offset = block + 1, 0
            if len(parts) < self.block_batches:
                return  # the data ran out

    def approx_tokens(self):
        return None

    def select_layers(self, requested):
        """No default: a model has too many layers to train them all by accident."""
        if requested is None:
            raise BadInput("--layer: say which layer(s) to train when streaming (e.g. --layer 12)")
        missing = [L for L in requested if not 0 <= L <= self.teacher.n_layers]
        if missing:
            raise BadInput(f"--layer: layer(s) {missing} not in the model")
        return requested


@dataclass
class TeacherStream:
    """A teacher to stream activations from; `load` runs only once the other options have been checked."""

    model: ModelSpec
    data: DataSpec
    load: Callable[[ModelSpec], LoadedModel]  # kdtool.models.load_model, or the CLI's logging load_teacher
    batch_size: int = 8  # sequences per teacher forward
    drop_first: bool = True  # drop position 0 of each sequence


def wants_stream(*, acts: Path | None, stream: bool, model: str | None, dataset: str | None) -> bool:
    """Whether to read a teacher instead of the cache: --stream, or implied by --model or --dataset."""
    stream = stream or model is not None or dataset is not None
    if stream and acts is not None:
        raise BadInput("--acts and --stream/--model/--dataset are two activation sources: give one")
    return stream


def open_source(
    acts: Path | None,
    teacher: TeacherStream | None,
    *,
    tokens: int | None,
    buffer_tokens: int = 262_144,
    shuffle_shards: int = 4,
) -> BatchSource:
    """train-sae's source: the teacher streamed (it needs a --tokens budget), else the cache (default acts/)."""
    if teacher is None:
        return CacheSource(acts if acts is not None else DEFAULT_ACTS, buffer_shards=shuffle_shards)
    if tokens is None:
        raise BadInput("--tokens: streaming from a teacher needs a token budget (e.g. --tokens 2M)")
    return ModelSource(
        teacher.load(teacher.model),
        teacher.data,
        buffer_tokens=buffer_tokens,
        batch_size=teacher.batch_size,
        drop_first=teacher.drop_first,
    )
