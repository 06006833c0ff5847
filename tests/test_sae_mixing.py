"""train-sae --stream's mixing buffer (kdtool/sae/mixing.py): budgeted, mixed, exact on resume, same with a thread."""

from __future__ import annotations

import json

import pytest
import torch

from kdtool.sae.mixing import Plan, prefetch_blocks, serve

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_blocks(plan: Plan, first: int, data_rows: int, forwarded: list | None = None):
    """Blocks whose rows are their global row numbers (one column), as a teacher would give them."""
    row0 = plan.base * plan.rows_per_model_batch + first * plan.block_rows
    for k in range(first, plan.last_block + 1):
        n = max(0, min(plan.rows_wanted(k), data_rows - row0))
        if forwarded is not None:
            forwarded.append(n)
        yield {"rows": n, 7: torch.arange(row0, row0 + n, dtype=torch.float32).unsqueeze(1)}
        if n < plan.rows_wanted(k):
            return
        row0 += plan.block_rows


def run_chain(plan, *, seed=5, start=None, data_rows=10**9, prefetch=False, forwarded=None):
    first = max(0, start["pool"] - 2) if start else 0
    blocks = fake_blocks(plan, first, data_rows, forwarded)
    if prefetch:
        blocks = iter(prefetch_blocks(blocks, torch.device("cpu")))
    return [(b[7][:, 0].long().tolist(), pos) for b, pos in serve(plan, blocks, seed=seed, layers=[7], start=start)]


def plan_for(total, *, bt=8, per_seq=3, seqs=2, block_batches=4, base=0):
    return Plan(base, total, bt, per_seq * seqs, per_seq, block_batches)


def test_serves_the_budget_from_no_more_rows_than_it_needs():
    plan = plan_for(25)  # 25 batches of 8 = 200 rows; blocks of 24 rows
    forwarded = []
    out = run_chain(plan, forwarded=forwarded)
    assert len(out) == 25 and out[-1][1]["done"] == 25
    rows = [r for batch, _ in out for r in batch]
    assert len(rows) == len(set(rows)) == 200  # every row at most once
    assert sum(forwarded) == 201  # 200 rounded up to whole 3-row sequences
    assert max(rows) <= 200
    # a tiny run forwards a tiny block, not the buffer
    forwarded = []
    assert len(run_chain(plan_for(1, block_batches=100), forwarded=forwarded)) == 1 and forwarded == [9]


def test_batches_mix_rows_from_two_blocks():
    plan = plan_for(30)
    out = run_chain(plan)
    mixed = sum(len({r // plan.block_rows for r in batch}) >= 2 for batch, _ in out)
    assert mixed >= len(out) // 2  # pools 1..K draw from late(k-1) and early(k)
    assert [batch for batch, _ in out] != [batch for batch, _ in run_chain(plan, seed=6)]  # the seed matters


@pytest.mark.parametrize("cut", [1, 3, 4, 9, 14, 20, 24])
def test_resume_from_any_batch_continues_exactly(cut):
    plan = plan_for(25)
    whole = run_chain(plan)
    resumed = run_chain(plan, start=json.loads(json.dumps(whole[cut - 1][1])))  # a position survives JSON
    assert resumed == whole[cut:]


def test_the_data_running_out_ends_the_chain_with_every_row_served():
    plan = plan_for(50)
    out = run_chain(plan, data_rows=100)  # 100 rows: 12 batches, 4 rows left over
    rows = [r for batch, _ in out for r in batch]
    assert len(out) == 12 and len(set(rows)) == 96 and max(rows) < 100


def test_a_thread_gives_the_same_batches():
    plan = plan_for(25)
    assert run_chain(plan, prefetch=True) == run_chain(plan)
    start = run_chain(plan)[9][1]
    assert run_chain(plan, start=start, prefetch=True) == run_chain(plan, start=start)


def test_a_producer_error_reaches_the_consumer():
    def broken():
        yield {"rows": 3, 7: torch.zeros(3, 1)}
        raise RuntimeError("teacher failed")

    with pytest.raises(RuntimeError, match="teacher failed"):
        list(prefetch_blocks(broken(), torch.device("cpu")))


@pytest.mark.gpu
def test_prefetching_on_a_cuda_stream_gives_the_same_batches():
    """The teacher's thread runs on its own CUDA stream; the batches are those of the synchronous run."""
    plan = plan_for(25)

    def on_gpu(blocks):
        for b in blocks:
            yield {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}

    sync = [
        (b[7][:, 0].long().tolist(), p) for b, p in serve(plan, on_gpu(fake_blocks(plan, 0, 10**9)), seed=5, layers=[7])
    ]
    threaded = prefetch_blocks(on_gpu(fake_blocks(plan, 0, 10**9)), torch.device("cuda"))
    got = [(b[7][:, 0].long().tolist(), p) for b, p in serve(plan, iter(threaded), seed=5, layers=[7])]
    assert got == sync == run_chain(plan)
