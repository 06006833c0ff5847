"""train-sae --stream's mixing buffer: the teacher's rows, shuffled across two half-buffers, never more than needed.

SAELens's activation store keeps a buffer, serves a shuffled half of it and refills that half
while training goes on; kdtool's is the same idea made deterministic (so a killed run resumes
exactly) and budgeted (so a 4K-token run forwards about 4K tokens, not a 256K-token buffer).

Rows come from the teacher in *blocks* of half the buffer. Each block is split at random into
an early and a late half; *pool* k is served as batches:

    pool 0   = early(0)
    pool k   = carry(k-1), then a shuffle of late(k-1) + early(k)      (1 <= k <= K)
    pool K+1 = carry(K), then a shuffle of late(K)                      (drain)

carry(k) are pool k's last rows that did not fill a batch (fewer than one batch): they open the
next pool, so no row is dropped and none waits more than one extra pool. A batch therefore mixes
rows from two consecutive blocks, a window of the whole buffer, as in SAELens. Every permutation
comes from (seed, chain base, block or pool index), and a pool's contents depend only on blocks
k-2..k, so a resume re-runs at most three half-buffers of the teacher.

The budget: a *chain* serves `total` batches of `batch_tokens` rows. Block K, the first whose
rows reach total x batch_tokens, is cut to the sequences still needed, so the teacher forwards
the run's tokens rounded up to one sequence (plus fewer than one batch of rows). A run continued
with a larger --tokens starts a new chain after the last model batch the previous one used.

A chain's position after each batch is {"base", "total", "pool", "served", "done"}: the model
batch block 0 starts at, the chain's batch budget, the pool, batches served from it, and batches
served by the chain.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kdtool.prefetch import Background

#: permutation streams: which shuffle a generator seeds (kept apart so no two share numbers)
_SPLIT, _POOL = 3, 4


@dataclass(frozen=True)
class Plan:
    """The arithmetic of one chain: sizes of its blocks and pools, computed without the teacher."""

    base: int  # model batch where block 0 starts
    total: int  # batches the chain serves
    batch_tokens: int  # rows per training batch
    rows_per_model_batch: int  # rows one full model batch gives (sequences x positions kept)
    rows_per_seq: int  # rows one sequence gives
    block_batches: int  # model batches per block (half the buffer)

    @property
    def block_rows(self) -> int:
        return self.block_batches * self.rows_per_model_batch

    @property
    def last_block(self) -> int:
        """K: the first block whose rows reach the chain's budget."""
        return max(0, math.ceil(self.total * self.batch_tokens / self.block_rows) - 1)

    def rows_wanted(self, k: int) -> int:
        """Rows to forward for block k (the last one cut to whole sequences still needed)."""
        if k < self.last_block:
            return self.block_rows
        need = self.total * self.batch_tokens - k * self.block_rows
        return min(self.block_rows, math.ceil(need / self.rows_per_seq) * self.rows_per_seq)

    def next_base(self, last_rows: int) -> int:
        """The model batch after the last one this chain used (a continuation's base)."""
        return self.base + self.last_block * self.block_batches + math.ceil(last_rows / self.rows_per_model_batch)


def split(block_rows: int, seed: int, base: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block k's (early, late) row indices: a seeded random half each (early gets the odd row)."""
    perm = torch.from_numpy(np.random.default_rng([seed, base, k, _SPLIT]).permutation(block_rows))
    half = (block_rows + 1) // 2
    return perm[:half], perm[half:]


def pool_order(n_fresh: int, seed: int, base: int, k: int) -> torch.Tensor:
    """The shuffle of pool k's fresh rows (its carry goes first, unshuffled)."""
    return torch.from_numpy(np.random.default_rng([seed, base, k, _POOL]).permutation(n_fresh))


def pool_sizes(plan: Plan, block_rows: list[int]) -> list[tuple[int, int]]:
    """(carry rows in, total rows) of pools 0..K+1, from the blocks' row counts."""
    sizes = []
    carry = 0
    for k in range(len(block_rows) + 1):
        early = (block_rows[k] + 1) // 2 if k < len(block_rows) else 0
        late = block_rows[k - 1] // 2 if k > 0 else 0
        n = carry + late + early
        sizes.append((carry, n))
        carry = n % plan.batch_tokens
    return sizes


def prefetch_blocks(produce: Iterator[dict], device: torch.device) -> Background:
    """Runs a block producer one block ahead on a thread, so the teacher works while the SAE trains.

    On a GPU the producer runs on its own CUDA stream and waits for its kernels before handing a
    block over; the consumer marks the tensors as used on its own stream, so the caching allocator
    does not recycle them under it.
    """
    if device.type != "cuda":
        return Background(produce, name="kdtool-teacher", context=torch.no_grad)
    stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def on_stream():
        with torch.no_grad(), torch.cuda.stream(stream):
            yield

    def receive(block: dict) -> None:
        for t in block.values():
            if isinstance(t, torch.Tensor):
                t.record_stream(torch.cuda.current_stream(device))

    return Background(
        produce, name="kdtool-teacher", context=on_stream, ready=lambda _: stream.synchronize(), receive=receive
    )


def serve(
    plan: Plan,
    blocks: Iterator[dict],
    *,
    seed: int,
    layers: list[int],
    start: dict | None = None,
) -> Iterator[tuple[dict, dict]]:
    """({layer: [batch_tokens, d]}, position) for the chain's batches, from `start` (a position) or its beginning.

    `blocks` yields {"rows": n_k, layer: [n_k, d], ...} for blocks max(0, pool - 2), ... in order,
    each with plan.rows_wanted(k) rows unless the data ran out (then it is the last).
    """
    bt = plan.batch_tokens
    p, s, done = (int(start[k]) for k in ("pool", "served", "done")) if start else (0, 0, 0)
    first = max(0, p - 2)
    rows: list[int] = [plan.block_rows] * first  # blocks before `first` are full (only the last can be short)
    held: dict[int, dict] = {}
    ended = False  # no block after the last in `rows`

    def fetch_through(k: int) -> None:
        nonlocal ended
        while not ended and len(rows) <= k:
            block = next(blocks, None)
            if block is None or block["rows"] == 0:
                ended = True
                return
            held[len(rows)] = block
            rows.append(block["rows"])
            ended = len(rows) - 1 >= plan.last_block or block["rows"] < plan.rows_wanted(len(rows) - 1)

    k0 = max(0, p - 1)  # the first pool built: pool p needs pool p-1's carry
    fetch_through(k0)
    c_known = pool_sizes(plan, rows[:k0])[k0][0] if k0 else 0  # carry into pool k0 (its rows are not needed)
    carry: dict | None = None
    for k in range(k0, 1 << 62):
        fetch_through(k)
        if k > len(rows):
            return
        parts: dict = {L: [] for L in layers}
        if 1 <= k <= len(rows):
            _, late = split(rows[k - 1], seed, plan.base, k - 1)
            for L in layers:
                parts[L].append(held[k - 1][L][late.to(held[k - 1][L].device)])
        if k < len(rows):
            early, _ = split(rows[k], seed, plan.base, k)
            for L in layers:
                parts[L].append(held[k][L][early.to(held[k][L].device)])
        n_fresh = sum(t.shape[0] for t in parts[layers[0]])
        order = pool_order(n_fresh, seed, plan.base, k)
        fresh = {L: torch.cat(parts[L])[order.to(parts[L][0].device)] if n_fresh else None for L in layers}
        c = carry[layers[0]].shape[0] if carry is not None else (c_known if k == k0 else 0)
        size = c + n_fresh
        if k >= p:  # pool k0 < p is only rebuilt for its carry
            pool = {L: torch.cat([carry[L], fresh[L]]) if carry is not None and n_fresh else fresh[L] for L in layers}
            if carry is not None and not n_fresh:
                pool = carry
            served = s if k == p else 0
            while (served + 1) * bt <= size and done < plan.total:
                batch = {L: pool[L][served * bt : (served + 1) * bt] for L in layers}
                served += 1
                done += 1
                yield batch, {"base": plan.base, "total": plan.total, "pool": k, "served": served, "done": done}
        if done >= plan.total or (ended and k >= len(rows)):
            return  # the budget is served, or the drain pool after the last block
        used = (size // bt) * bt  # carry(k): rows [used, size) of the pool
        if size == used:
            carry = None
        elif used >= c:  # the usual case: pool k's own carry (< bt rows, at its front) was served
            carry = {L: fresh[L][used - c :] for L in layers}
        else:  # a pool smaller than one batch passes everything on (its carry is real: see Plan.block_batches)
            carry = {L: torch.cat([t for t in (carry[L][used:], fresh[L]) if t is not None]) for L in layers}
        held.pop(k - 1, None)
