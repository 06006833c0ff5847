"""The toy sweep (paper section 4): grid, chunks of configurations, worker processes, resumable part files.

A chunk is a list of configurations with the same n, trained as one batch: first all their
teachers (one per seed), then all their students (d_S = 1..d_T per seed) against the frozen
teachers. Each finished configuration is written at once as a part file
(<output>.parts/<slug>.parquet, atomically), so a killed sweep loses only the chunks in flight;
`resume=True` skips configurations whose part (or row in an existing output) was made with the
same settings. `merge` concatenates the parts into the output atomically and removes them.

Workers are separate processes with one torch thread each: on this 2-core machine, shared with
other jobs, two single-threaded processes beat one 2-thread process by a wide margin (OpenMP
barriers between two threads cost milliseconds per op when a core is busy elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.theory import theorem as theory
from kdtool.toy.model import (
    ToyConfigKey,
    TrainConfig,
    TrainResult,
    data_stream,
    generator_seed,
    importance,
    init_weights,
    predictions,
    sample,
    train_batch,
    train_groups,
    width_groups,
)

KIND = "kdtool.toy"
CURVES_KIND = "kdtool.toy.curves"
ROW_KEYS = ("n", "d_teacher", "alpha", "d_student", "seed")


@dataclass(frozen=True)
class Grid:
    """The sweep's axes (defaults = the paper's 48 configurations x 20 seeds)."""

    ns: tuple[int, ...] = (10, 20, 40)  # feature counts n
    d_teachers: tuple[int, ...] = (3, 5, 8, 10)  # teacher widths d_T (students: 1..d_T)
    alphas: tuple[float, ...] = (0.80, 0.90, 0.95, 0.99)  # sparsities
    seeds: int = 20  # seeds per configuration

    def __post_init__(self):
        if not self.ns or min(self.ns) < 1:
            raise BadInput(f"--n values must be >= 1, got {list(self.ns)}")
        if not self.d_teachers or min(self.d_teachers) < 1:
            raise BadInput(f"--d-teacher values must be >= 1, got {list(self.d_teachers)}")
        if not self.alphas or any(not (0.0 < a < 1.0) for a in self.alphas):
            raise BadInput(f"--alpha values must be in (0, 1), got {list(self.alphas)}")
        if self.seeds < 1:
            raise BadInput(f"--seeds must be >= 1, got {self.seeds}")
        theory.check_alpha(list(self.alphas), what="--alpha")  # warns below 1-1/e

    def keys(self) -> list[ToyConfigKey]:
        return [
            ToyConfigKey(n, d, float(a))
            for n in sorted(set(self.ns))
            for d in sorted(set(self.d_teachers))
            for a in sorted(set(self.alphas))
        ]

    def models(self, keys=None) -> int:
        """Models trained for these configurations: per seed one teacher and d_T students."""
        return self.seeds * sum(k.d_teacher + 1 for k in (keys if keys is not None else self.keys()))


def settings_id(cfg: TrainConfig, seeds: int) -> str:
    """Fingerprint of everything that changes a configuration's rows (curves excluded)."""
    d = cfg.to_dict()
    d.pop("curve_points")
    d["seeds"] = seeds
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def chunk_cost(keys: list[ToyConfigKey]) -> int:
    """Relative work of a chunk: the [S, K, B, n] tensors dominate (K = d_T + teacher)."""
    dmax = max(k.d_teacher for k in keys)
    return len(keys) * keys[0].n * (dmax + 1)


def make_chunks(keys: list[ToyConfigKey], configs_per_chunk: int) -> list[list[ToyConfigKey]]:
    """Group configurations with the same (n, d_T) (no padding), at most configs_per_chunk each; biggest first."""
    if configs_per_chunk < 1:
        raise BadInput(f"--configs-per-batch must be >= 1, got {configs_per_chunk}")
    groups: dict[tuple[int, int], list[ToyConfigKey]] = {}
    for k in keys:
        groups.setdefault((k.n, k.d_teacher), []).append(k)
    chunks = [g[i : i + configs_per_chunk] for g in groups.values() for i in range(0, len(g), configs_per_chunk)]
    return sorted(chunks, key=chunk_cost, reverse=True)  # longest first: better packing across workers


def _eval_sets(keys, seeds, cfg):
    import torch

    xs = []
    for k in keys:
        for s in range(seeds):
            rng = data_stream(generator_seed(cfg.base_seed, k, s, "eval"))
            xs.append(sample(rng, cfg.eval_samples, k.n, k.alpha))
    return torch.stack(xs)  # [S, E, n]


def run_chunk(keys: list[ToyConfigKey], seeds: int, cfg: TrainConfig) -> dict[str, dict]:
    """Train the teachers and students of configurations sharing n; return {slug: {"rows", "curves"}}."""
    import torch

    n = keys[0].n
    if any(k.n != n for k in keys):
        raise BadInput("a chunk must share n")
    dmax = max(k.d_teacher for k in keys)
    streams = [(k, s) for k in keys for s in range(seeds)]
    S = len(streams)
    imp = importance(n, cfg.zipf_exponent)
    alphas = [k.alpha for k, _ in streams]
    eval_x = _eval_sets(keys, seeds, cfg)

    # teachers: one per stream, width d_T padded to dmax
    Wt0 = torch.zeros(S, 1, dmax, n)
    for i, (k, s) in enumerate(streams):
        Wt0[i, 0, : k.d_teacher] = init_weights(k.d_teacher, n, generator_seed(cfg.base_seed, k, s, "init", 0))[0]
    t_res = train_batch(
        Wt0,
        torch.zeros(S, 1, n),
        alphas=alphas,
        imp=imp,
        cfg=cfg,
        eval_x=eval_x,
        data_seeds=[generator_seed(cfg.base_seed, k, s, "teacher-data") for k, s in streams],
    )
    Wt, bt = t_res.W[:, 0], t_res.b[:, 0]  # [S, dmax, n], [S, n]
    with torch.no_grad():
        eval_t = torch.cat(
            [
                torch.relu(torch.baddbmm(bt.unsqueeze(1), torch.bmm(eval_x[:, lo : lo + 1024], Wt.transpose(1, 2)), Wt))
                for lo in range(0, cfg.eval_samples, 1024)
            ],
            dim=1,
        )  # [S, E, n]

    # students: widths 1..dmax in groups of consecutive widths, each padded to its widest; width w sits
    # in slot w-1 once the groups are concatenated (a narrower config's widths > d_T stay all-zero)
    groups = []
    for widths in width_groups(range(1, dmax + 1), n, S, cfg.batch_size):
        W0 = torch.zeros(S, len(widths), widths[-1], n)
        for i, (k, s) in enumerate(streams):
            for j, w in enumerate(widths):
                if w <= k.d_teacher:
                    W0[i, j, :w] = init_weights(w, n, generator_seed(cfg.base_seed, k, s, "init", w))[0]
        groups.append((W0, torch.zeros(S, len(widths), n)))
    s_res = train_groups(
        groups,
        alphas=alphas,
        imp=imp,
        cfg=cfg,
        eval_x=eval_x,
        data_seeds=[generator_seed(cfg.base_seed, k, s, "student-data") for k, s in streams],
        teacher=(Wt, bt),
        eval_t=eval_t,
        train_on_teacher=cfg.target == "teacher",
    )
    s_res = TrainResult.concat(s_res)
    return _collect(keys, seeds, cfg, streams, t_res, s_res)


def _collect(keys, seeds, cfg, streams, t_res, s_res) -> dict[str, dict]:
    out: dict[str, dict] = {}
    index = {ks: i for i, ks in enumerate(streams)}
    for k in keys:
        widths = np.arange(1, k.d_teacher + 1)
        pred = predictions(k.n, k.alpha, widths, cfg.zipf_exponent)
        rows: dict[str, list] = {c: [] for c in ROW_KEYS}
        extra: dict[str, list] = {
            c: []
            for c in (
                "floor_data",
                "floor_distill",
                "teacher_floor",
                "train_loss_final",
                "pred_refined",
                "pred_naive",
                "features_kept",
            )
        }
        curves: dict[str, list] = {c: [] for c in (*ROW_KEYS, "role", "step", "loss", "loss_data")}
        for s in range(seeds):
            i = index[(k, s)]
            for j, w in enumerate(widths):
                for c, v in zip(ROW_KEYS, (k.n, k.d_teacher, k.alpha, int(w), s), strict=True):
                    rows[c].append(v)
                extra["floor_data"].append(float(s_res.floor_data[i, j]))
                extra["floor_distill"].append(float(s_res.floor_distill[i, j]))
                extra["teacher_floor"].append(float(t_res.floor_data[i, 0]))
                extra["train_loss_final"].append(float(s_res.final_train_loss[i, j]))
                extra["pred_refined"].append(float(pred["pred_refined"][j]))
                extra["pred_naive"].append(float(pred["pred_naive"][j]))
                extra["features_kept"].append(int(pred["features_kept"][j]))
            for role, res, slots in (
                ("teacher", t_res, [(0, k.d_teacher)]),
                ("student", s_res, [(j, int(w)) for j, w in enumerate(widths)]),
            ):
                for step, (obj, data) in sorted(res.curves.items()):
                    for j, w in slots:
                        for c, v in zip(ROW_KEYS, (k.n, k.d_teacher, k.alpha, w, s), strict=True):
                            curves[c].append(v)
                        curves["role"].append(role)
                        curves["step"].append(step + 1)
                        curves["loss"].append(float(obj[i, j]))
                        curves["loss_data"].append(float(data[i, j]))
        m = len(rows["n"])
        rows.update(extra)
        rows.update(
            {
                "g": [pred["g"]] * m,
                "d_star": [pred["d_star"]] * m,
                "total_mass": [pred["total_mass"]] * m,
                "steps": [cfg.steps] * m,
                "target": [cfg.target] * m,
            }
        )
        out[k.slug] = {"rows": rows, "curves": curves if cfg.curve_points else None}
    return out


def _worker_init():
    import torch

    torch.set_num_threads(1)


def _timed_chunk(keys, seeds, cfg):
    t0 = time.perf_counter()
    return run_chunk(keys, seeds, cfg), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Part files, resume and merge
# ----------------------------------------------------------------------------------------------


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def curves_path(output: Path) -> Path:
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + ".curves.parquet")


def _columns_to_numpy(cols: dict[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for name, values in cols.items():
        if name in ("role", "target"):
            out[name] = np.asarray(values, dtype=object).astype(str)
        elif name in ("n", "d_teacher", "d_student", "seed", "features_kept", "steps", "step"):
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            out[name] = np.asarray(values, dtype=np.float64)
    return out


def _select(cols: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in cols.items()}


def _key_mask(cols, key: ToyConfigKey) -> np.ndarray:
    return (
        (cols["n"] == key.n)
        & (cols["d_teacher"] == key.d_teacher)
        & np.isclose(cols["alpha"], key.alpha, rtol=0, atol=1e-12)
    )


class PartStore:
    """Completed configurations of one sweep: part files beside the output, plus a previous output."""

    def __init__(self, output: Path, settings: str, provenance: dict):
        self.output, self.settings, self.provenance = Path(output), settings, provenance
        self.dir = parts_dir(self.output)
        self.rows: dict[str, dict] = {}  # slug -> numpy columns
        self.curves: dict[str, dict] = {}

    def clear(self) -> int:
        """Forget an earlier run's parts (no --resume). Returns how many were discarded."""
        count = len(list(self.dir.glob("*.parquet"))) if self.dir.exists() else 0
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return count

    def load(self, keys: list[ToyConfigKey]) -> list[ToyConfigKey]:
        """--resume: collect finished configurations among `keys`; refuse parts made with other settings."""
        wanted = {k.slug: k for k in keys}
        if self.output.exists():
            meta = formats.parquet_metadata(self.output)
            if meta["kind"] == KIND and (meta["summary"] or {}).get("settings") == self.settings:
                cols = formats.read_table(self.output)
                cpath = curves_path(self.output)
                ccols = formats.read_table(cpath) if cpath.exists() else None
                for slug, k in wanted.items():
                    mask = _key_mask(cols, k)
                    if mask.any():
                        self.rows[slug] = _select(cols, mask)
                        if ccols is not None and _key_mask(ccols, k).any():
                            self.curves[slug] = _select(ccols, _key_mask(ccols, k))
            elif meta["kind"] == KIND:
                raise BadInput(
                    f"{self.output}: made with different training settings; rerun without --resume "
                    "or write to another -o"
                )
        if self.dir.exists():
            for path in sorted(self.dir.glob("*.parquet")):
                slug = path.name.removesuffix(".curves.parquet").removesuffix(".parquet")
                if slug not in wanted:
                    continue
                meta = formats.parquet_metadata(path)
                if (meta["summary"] or {}).get("settings") != self.settings:
                    raise BadInput(f"{path}: made with different training settings; rerun without --resume")
                target = self.curves if path.name.endswith(".curves.parquet") else self.rows
                target[slug] = formats.read_table(path)
        return [wanted[s] for s in wanted if s in self.rows]

    def add(self, slug: str, rows: dict[str, list], curves: dict[str, list] | None) -> None:
        self.rows[slug] = _columns_to_numpy(rows)
        meta = {"settings": self.settings, "config": slug}
        formats.write_parquet(
            self.dir / f"{slug}.parquet", self.rows[slug], kind=KIND + ".part", provenance=self.provenance, summary=meta
        )
        if curves is not None:
            self.curves[slug] = _columns_to_numpy(curves)
            formats.write_parquet(
                self.dir / f"{slug}.curves.parquet",
                self.curves[slug],
                kind=CURVES_KIND + ".part",
                provenance=self.provenance,
                summary=meta,
            )

    def table(self, keys: list[ToyConfigKey], store: dict[str, dict]) -> dict[str, np.ndarray] | None:
        present = [store[k.slug] for k in keys if k.slug in store]
        if not present:
            return None
        cols = {c: np.concatenate([p[c] for p in present]) for c in present[0]}
        order = np.lexsort(tuple(cols[c] for c in reversed(ROW_KEYS)))
        if "step" in cols:
            order = np.lexsort((cols["step"], cols["role"], *(cols[c] for c in reversed(ROW_KEYS))))
        return {c: v[order] for c, v in cols.items()}

    def merge(self, keys: list[ToyConfigKey], summary: dict, want_curves: bool) -> dict[str, np.ndarray]:
        """Write the output (and curves) from every configuration of `keys`, then remove the parts."""
        cols = self.table(keys, self.rows)
        formats.write_parquet(
            self.output, cols, kind=KIND, provenance=self.provenance, summary={**summary, "settings": self.settings}
        )
        if want_curves:
            ccols = self.table(keys, self.curves)
            if ccols is not None:
                formats.write_parquet(
                    curves_path(self.output),
                    ccols,
                    kind=CURVES_KIND,
                    provenance=self.provenance,
                    summary={"settings": self.settings},
                )
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return cols


def run_tasks(
    tasks: list[tuple[list[ToyConfigKey], int, TrainConfig]],
    *,
    workers: int,
    on_result: Callable[[int, dict, float], None],
) -> float:
    """Run (chunk, seeds, cfg) tasks, in worker processes when workers > 1; on_result(task index, result, seconds)
    is called in this process as each finishes (in completion order). Returns wall seconds."""
    t0 = time.perf_counter()
    workers = max(1, min(int(workers), len(tasks)))
    if workers == 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, task in enumerate(tasks):
                result, seconds = _timed_chunk(*task)
                on_result(i, result, seconds)
        finally:
            torch.set_num_threads(before)
        return time.perf_counter() - t0

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    try:
        futures = {pool.submit(_timed_chunk, *task): i for i, task in enumerate(tasks)}
        for fut in as_completed(futures):
            result, seconds = fut.result()
            on_result(futures[fut], result, seconds)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
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
    chunks = make_chunks(keys, configs_per_chunk)

    def finish(i, result, seconds):
        for k in chunks[i]:
            store.add(k.slug, result[k.slug]["rows"], result[k.slug]["curves"])
            if on_done is not None:
                on_done(k, grid.seeds * (k.d_teacher + 1), seconds / len(chunks[i]))

    return run_tasks([(chunk, grid.seeds, cfg) for chunk in chunks], workers=workers, on_result=finish)


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
) -> dict:
    """Train `keys` at cfg.steps and at 2x steps (same seeds, data streams and inits); compare the floors.

    For every data point (refined prediction > 0) the relative change of the seed-mean floor,
    (floor(T) - floor(2T)) / floor(2T), is reported for the data loss and the distillation loss.
    """
    from dataclasses import replace

    cfg2 = replace(cfg, steps=2 * cfg.steps, curve_points=0)
    cfg1 = replace(cfg, curve_points=0)
    tasks = [([k], seeds, c) for k in keys for c in (cfg1, cfg2)]
    results: dict[tuple[str, int], dict] = {}

    def collect(i, result, seconds):
        chunk, _, c = tasks[i]
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
            for w in range(1, k.d_teacher + 1):
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
