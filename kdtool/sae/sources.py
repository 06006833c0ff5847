"""Where train-sae's (and stats') activations come from: the cache, or a teacher streamed through a mixing buffer.

A source yields ({layer: [batch_tokens, d_in] float32}, position) pairs; the position is a JSON
dict from which `batches(start=position)` continues exactly (the checkpoint stores it). Both
sources' shuffles depend only on (seed, position), so a resumed run reads the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from kdtool.acts.store import ActivationStore, Position
from kdtool.errors import BadInput, RuntimeFailure
from kdtool.identity import data_identity
from kdtool.models import LoadedModel, ModelSpec, check_seq_len, residual_stream
from kdtool.sae.mixing import Plan, prefetch_blocks, serve
from kdtool.text.tokens import DataSpec, token_batches

#: train-sae reads this cache when neither --acts nor a teacher is given
DEFAULT_ACTS = Path("acts")


class BatchSource(Protocol):
    """Where activations come from: the cache, or a model streamed through a shuffle buffer."""

    d_in: int
    info: dict  # model, dataset, seq_len, ... for cfg.json
    inputs: list  # paths for provenance

    def batches(
        self,
        layers: list[int],
        batch_tokens: int,
        *,
        seed: int,
        start: dict | None,
        one_pass: bool,
        limit: int | None = None,
    ) -> Iterator[tuple[dict, dict]]:
        """({layer: [batch_tokens, d_in] float32}, position after the batch as a JSON dict).

        limit: the batches the run will still take, when known; a teacher forwards no more than that.
        """
        ...

    def approx_tokens(self) -> int | None:
        """Tokens in one pass (for progress), if known."""
        ...

    def select_layers(self, requested: list[int] | None) -> list[int]:
        """The layers to train: `requested` (--layer) checked against what the source has, or its default."""
        ...

    def check_batch(self, batch_tokens: int) -> None:
        """BadInput when no batch of `batch_tokens` rows can be formed (batches never straddle buffers)."""
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
            "model_identity": m.get("model_identity"),  # what the model and text are (kdtool/identity.py)
            "data_identity": m.get("data_identity"),
            "cache": cache_fingerprint(m),
        }
        self.inputs = [Path(root) / "manifest.json"]

    def batches(self, layers, batch_tokens, *, seed, start, one_pass, limit=None):
        pos = Position(**start) if start else None
        for batch, after in self.store.iter_batches(
            layers, batch_tokens, seed=seed, buffer_shards=self.buffer_shards, start=pos, epochs=1 if one_pass else None
        ):
            yield batch, after.as_dict()

    def approx_tokens(self):
        return self.store.n_tokens

    def check_batch(self, batch_tokens):
        sizes = sorted((int(s["tokens"]) for s in self.store.shards), reverse=True)
        most = sum(sizes[: self.buffer_shards])  # the rows of the biggest buffer the reader mixes
        if batch_tokens > self.store.n_tokens:
            raise BadInput(
                f"--batch-tokens {batch_tokens:,}: more than the {self.store.n_tokens:,} tokens in {self.store.root}"
            )
        if batch_tokens > most:
            raise BadInput(
                f"--batch-tokens {batch_tokens:,}: more than the {most:,} rows read at once "
                f"(--shuffle-shards {self.buffer_shards} shards); raise --shuffle-shards or lower --batch-tokens"
            )

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


def cache_fingerprint(manifest: dict) -> str:
    """A short hash of what decides a cache's rows: its shards, layers, dtype, width and on-disk shuffle.

    train-sae's checkpoint records it, so a resume on a cache that was rebuilt or grown (other shards,
    so other batches) is refused even when the folder has the same name.
    """
    keys = ("shards", "layers", "d_model", "dtype", "seq_len", "drop_first", "max_norm_ratio", "model_identity")
    what = {k: manifest.get(k) for k in keys} | {"shuffle_seed": (manifest.get("shuffle") or {}).get("seed")}
    return "sha256:" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ModelSource:
    """Activations straight from a teacher's forward pass through a mixing buffer (no disk cache).

    kdtool/sae/mixing.py lays out the rows: blocks of half `buffer_tokens` token positions, each
    split at random between two pools, so a batch mixes two blocks; the teacher forwards only the
    rows the run will use (the `limit` train-sae passes). With `prefetch` (default: on a GPU) a
    thread runs the teacher one block ahead while the SAEs train. `forward_seconds` and
    `forwarded_tokens` say what the teacher cost, for the final report.
    """

    def __init__(
        self,
        teacher: LoadedModel,
        data: DataSpec,
        *,
        buffer_tokens: int = 262_144,
        batch_size: int = 8,
        drop_first: bool = True,
        prefetch: bool | None = None,
    ):
        check_seq_len(teacher.model.config, data.seq_len, teacher.name)
        self.teacher, self.data = teacher, data
        self.batch_size = int(batch_size)
        self.first = 1 if drop_first else 0
        self.per_seq = data.seq_len - self.first
        if self.per_seq < 1:
            raise BadInput("--seq-len must be >= 2 with --drop-first")
        self.buffer_tokens = int(buffer_tokens)
        self.prefetch = teacher.device.type == "cuda" if prefetch is None else bool(prefetch)
        self.d_in = teacher.d_model
        self.info = {
            "model": teacher.name,
            "model_identity": teacher.identity,
            "revision": teacher.revision,
            "dataset": data.describe()["dataset"],
            "data_identity": data_identity(data.describe(), data.local_inputs()),
            "seq_len": data.seq_len,
            "source": "stream",
            "drop_first": drop_first,
            "buffer_tokens": self.buffer_tokens,
            "buffer": "mixing: two half-buffers per batch (kdtool/sae/mixing.py)",
        }
        self.inputs = [p for p in (teacher.path,) if p] + data.local_inputs()
        self.forward_seconds = 0.0  # the teacher's forward passes (on the prefetch thread, if any)
        self.forwarded_tokens = 0  # token positions the teacher ran on

    def model_rows(self, layers: list[int], *, skip_batches: int = 0) -> Iterator[dict]:
        """{layer: [n, d] float32} per model batch, in data order (also used by `stats`)."""
        for ids in token_batches(self.data, self.teacher.tokenizer, self.batch_size, skip_batches=skip_batches):
            yield self._forward(ids, layers)

    def _forward(self, ids: torch.Tensor, layers: list[int]) -> dict:
        dev = self.teacher.device
        started = time.perf_counter()
        with torch.no_grad():  # not inference_mode: its flag would leak into the trainer across yields
            hidden = residual_stream(self.teacher.model, ids.to(dev), None, layers)
            rows = {L: hidden[L][:, self.first :, :].reshape(-1, self.d_in).float() for L in layers}
        bad = [L for L, x in rows.items() if not bool(torch.isfinite(x).all())]
        if bad:  # not "the loss diverged": the teacher's own numbers overflowed
            raise RuntimeFailure(
                f"layer(s) {bad}: the teacher's activations hold NaN or infinite values (try --dtype float32)"
            )
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        self.forward_seconds += time.perf_counter() - started
        self.forwarded_tokens += ids.numel()
        return rows

    def plan(self, base: int, total: int, batch_tokens: int) -> Plan:
        """A chain's layout: half the buffer per block, and at least two batches (so every pool serves one)."""
        per_batch = self.batch_size * self.per_seq
        half = max(math.ceil(self.buffer_tokens / 2 / per_batch), math.ceil(2 * batch_tokens / per_batch))
        return Plan(base, total, batch_tokens, per_batch, self.per_seq, half)

    def _blocks(self, plan: Plan, layers: list[int], first: int) -> Iterator[dict]:
        """Blocks first..K of the chain, each cut to plan.rows_wanted(k) rows; a short one when the data runs out."""
        skip = plan.base + first * plan.block_batches
        ids_iter = token_batches(self.data, self.teacher.tokenizer, self.batch_size, skip_batches=skip)
        for k in range(first, plan.last_block + 1):
            want, have, parts = plan.rows_wanted(k), 0, []
            for ids in ids_iter:
                n_seq = min(ids.shape[0], math.ceil((want - have) / self.per_seq))  # only the sequences needed
                parts.append(self._forward(ids[:n_seq], layers))
                have += n_seq * self.per_seq
                if have >= want:
                    break
            block = {L: torch.cat([p[L] for p in parts]) for L in layers} if parts else {}
            yield {"rows": have, **block}
            if have < want:
                return  # the data ran out

    def batches(self, layers, batch_tokens, *, seed, start, one_pass, limit=None):
        if limit is None:
            raise BadInput("--tokens: streaming from a teacher needs a token budget (e.g. --tokens 2M)")
        pos = dict(start) if start else None
        if pos is not None and "base" not in pos:
            raise BadInput(
                "--resume: this checkpoint's stream position comes from an older kdtool (before the mixing "
                "buffer); start over with --overwrite"
            )
        left = int(limit)
        while left > 0:
            if pos is None or pos["done"] >= pos["total"]:  # a new chain, after the previous one's last model batch
                old = self.plan(pos["base"], pos["total"], batch_tokens) if pos else None
                base = old.next_base(old.rows_wanted(old.last_block)) if old else 0
                plan, resume_at = self.plan(base, left, batch_tokens), None
            else:
                plan, resume_at = self.plan(pos["base"], pos["total"], batch_tokens), pos
            first = max(0, resume_at["pool"] - 2) if resume_at else 0
            produce = self._blocks(plan, layers, first)
            feeder = prefetch_blocks(produce, self.teacher.device) if self.prefetch else None
            try:
                for batch, position in serve(plan, iter(feeder or produce), seed=seed, layers=layers, start=resume_at):
                    pos = position
                    left -= 1
                    yield batch, position
            finally:
                if feeder is not None:
                    feeder.close()
            if pos is None or pos["done"] < pos["total"]:
                return  # the data ran out

    def approx_tokens(self):
        return None

    def check_batch(self, batch_tokens):
        rows = self.info["buffer_tokens"]
        if batch_tokens > rows:
            raise BadInput(f"--batch-tokens {batch_tokens:,}: more than the {rows:,} rows of a --shuffle-buffer")

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
