"""The toy sweep (paper section 4): chunks of configurations run in worker processes, written as they finish.

A chunk is a list of configurations with the same (n, d_T), trained as one batch
(kdtool.toy.chunk.run_chunk); `run_sweep` runs the pending chunks, biggest first, and hands each
finished configuration to the part store (kdtool.toy.store) at once. `convergence_check` trains a
sample of configurations at T and 2T steps and compares their floors.

Workers are separate processes with one torch thread each: on this 2-core machine, shared with
other jobs, two single-threaded processes beat one 2-thread process by a wide margin (OpenMP
barriers between two threads cost milliseconds per op when a core is busy elsewhere).

torch is imported lazily here, where the training runs (`_worker_init`, `_timed_chunk` and the
single-process path), not at the top: the parent of the worker processes only schedules chunks and
writes Parquet, and importing torch would cost it ~190 MB resident and ~2 s of a shared core
(measured). kdtool.toy.chunk, which the workers run, imports torch at its top.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace

import numpy as np

from kdtool.errors import BadInput
from kdtool.toy.config import Grid, ToyConfigKey, TrainConfig, student_widths
from kdtool.toy.store import PartStore
from kdtool.workers import die_with_parent, stop_pool


def chunk_cost(keys: list[ToyConfigKey], widths_spec: str | tuple[int, ...] = "teacher") -> int:
    """Relative work of a chunk, from the trainer's cost model (kdtool.toy.trainer): each model of width d costs
    ~ n (4 + d) per stream and step; every stream of the chunk trains the union of its widths and a teacher.

    With widths beyond d_T (--student-widths to-dstar, up to 27 at n = 80) the width term dominates: counting
    models alone made the ETA of such a sweep start 2x too long (measured)."""
    trained = set().union(*(student_widths(k, widths_spec) for k in keys))
    d_teacher = max(k.d_teacher for k in keys)
    return len(keys) * keys[0].n * (sum(4 + w for w in trained) + 4 + d_teacher)


def make_chunks(
    keys: list[ToyConfigKey], configs_per_chunk: int, widths_spec: str | tuple[int, ...] = "teacher"
) -> list[list[ToyConfigKey]]:
    """Group configurations with the same (n, d_T) (no padding), at most configs_per_chunk each; biggest first."""
    if configs_per_chunk < 1:
        raise BadInput(f"--configs-per-batch must be >= 1, got {configs_per_chunk}")
    groups: dict[tuple[int, int], list[ToyConfigKey]] = {}
    for k in keys:
        groups.setdefault((k.n, k.d_teacher), []).append(k)
    chunks = [g[i : i + configs_per_chunk] for g in groups.values() for i in range(0, len(g), configs_per_chunk)]
    # longest first: better packing across workers
    return sorted(chunks, key=lambda c: chunk_cost(c, widths_spec), reverse=True)


def _worker_init(parent: int):
    """In each worker: die with the parent (kdtool/workers.py), ignore the terminal's Ctrl-C, one thread."""
    die_with_parent(parent)
    import torch  # lazy: see the module docstring

    torch.set_num_threads(1)


def _timed_chunk(keys, seeds, cfg, widths_spec="teacher"):
    from kdtool.toy.chunk import run_chunk  # lazy (it imports torch): see the module docstring

    t0 = time.perf_counter()
    return run_chunk(keys, seeds, cfg, widths_spec), time.perf_counter() - t0


def run_tasks(
    tasks: list[tuple],
    *,
    workers: int,
    on_result: Callable[[int, dict, float], None],
) -> float:
    """Run (chunk, seeds, cfg[, widths_spec]) tasks, in worker processes when workers > 1; on_result(task index,
    result, seconds) is called in this process as each finishes (in completion order). Returns wall seconds."""
    t0 = time.perf_counter()
    workers = max(1, min(int(workers), len(tasks)))
    if workers == 1:
        import torch  # lazy: see the module docstring

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, task in enumerate(tasks):
                result, seconds = _timed_chunk(*task)
                on_result(i, result, seconds)
        finally:
            torch.set_num_threads(before)
        return time.perf_counter() - t0

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_timed_chunk, *task): i for i, task in enumerate(tasks)}
        for fut in as_completed(futures):
            result, seconds = fut.result()
            on_result(futures[fut], result, seconds)
    except BaseException:  # Ctrl-C, SIGTERM (kdtool/cli/signals.py raises it here), a failed chunk
        stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    return time.perf_counter() - t0


def run_sweep(
    grid: Grid,
    cfg: TrainConfig,
    store: PartStore,
    *,
    workers: int = 1,
    configs_per_chunk: int = 1,
    pending: list[ToyConfigKey] | None = None,
    on_done: Callable[[ToyConfigKey, int, float], None] | None = None,
) -> float:
    """Train every pending configuration; each finished one goes to `store` at once. Returns wall seconds.

    on_done(key, models trained, seconds of its chunk / configs in it) is called per finished configuration.
    """
    keys = grid.keys() if pending is None else pending
    chunks = make_chunks(keys, configs_per_chunk, grid.student_widths)

    def finish(i, result, seconds):
        for k in chunks[i]:
            part = result[k.slug]
            store.add(k.slug, part["rows"], part["curves"], part["survival"])
            if on_done is not None:
                on_done(k, grid.models([k]), seconds / len(chunks[i]))

    tasks = [(chunk, grid.seeds, cfg, grid.student_widths) for chunk in chunks]
    return run_tasks(tasks, workers=workers, on_result=finish)


def sample_configs(keys: list[ToyConfigKey], count: int) -> list[ToyConfigKey]:
    """An evenly spread, deterministic sample of configurations (all of them if count >= len)."""
    if count >= len(keys):
        return list(keys)
    idx = np.unique(np.round(np.linspace(0, len(keys) - 1, count)).astype(int))
    return [keys[i] for i in idx]


def convergence_check(
    keys: list[ToyConfigKey],
    seeds: int,
    cfg: TrainConfig,
    *,
    workers: int = 1,
    on_done: Callable[[], None] | None = None,
    widths_spec: str | tuple[int, ...] = "teacher",
) -> dict:
    """Train `keys` at cfg.steps and at 2x steps (same seeds, data streams and inits); compare the floors.

    For every data point (refined prediction > 0) the relative change of the seed-mean floor,
    (floor(T) - floor(2T)) / floor(2T), is reported for the data loss and the distillation loss.
    """
    cfg2 = replace(cfg, steps=2 * cfg.steps, curve_points=0)
    cfg1 = replace(cfg, curve_points=0)
    tasks = [([k], seeds, c, widths_spec) for k in keys for c in (cfg1, cfg2)]
    results: dict[tuple[str, int], dict] = {}

    def collect(i, result, seconds):
        chunk, _, c, _ = tasks[i]
        results[(chunk[0].slug, c.steps)] = result[chunk[0].slug]["rows"]
        if on_done is not None:
            on_done()

    seconds = run_tasks(tasks, workers=workers, on_result=collect)
    per_config, points, all_rel = [], [], {"floor_data": [], "floor_distill": []}
    for k in keys:
        a, b = results[(k.slug, cfg1.steps)], results[(k.slug, cfg2.steps)]
        widths = np.asarray(a["d_student"])
        pred = np.asarray(a["pred_refined"])
        entry = {"config": k.label, "n": k.n, "d_teacher": k.d_teacher, "alpha": k.alpha}
        for col in ("floor_data", "floor_distill"):
            rel = []
            for w in sorted(set(widths.tolist())):
                sel = widths == w
                f1, f2 = float(np.mean(np.asarray(a[col])[sel])), float(np.mean(np.asarray(b[col])[sel]))
                change = (f1 - f2) / f2 if f2 > 0 else float("nan")
                if col == "floor_data":
                    points.append(
                        {
                            "n": k.n,
                            "d_teacher": k.d_teacher,
                            "alpha": k.alpha,
                            "d_student": w,
                            "data_point": bool(pred[sel][0] > 0),
                            "floor": f1,
                            "floor_doubled": f2,
                            "rel_change": change,
                        }
                    )
                if pred[sel][0] > 0:
                    rel.append(change)
            all_rel[col].extend(rel)
            entry[f"max_abs_rel_{col}"] = float(np.nanmax(np.abs(rel))) if rel else None
        per_config.append(entry)
    overall = {}
    for col, rel in all_rel.items():
        r = np.abs(np.asarray(rel, dtype=np.float64))
        overall[col] = {
            "points": int(len(r)),
            "median_abs_rel": float(np.nanmedian(r)) if len(r) else None,
            "max_abs_rel": float(np.nanmax(r)) if len(r) else None,
            "mean_rel": float(np.nanmean(rel)) if len(r) else None,
        }
    return {
        "steps": cfg1.steps,
        "steps_doubled": cfg2.steps,
        "seeds": seeds,
        "configs": per_config,
        "points": points,
        "overall": overall,
        "threshold": 0.02,
        "passed": bool(
            overall["floor_data"]["max_abs_rel"] is not None and overall["floor_data"]["max_abs_rel"] < 0.02
        ),
        "seconds": seconds,
    }


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
