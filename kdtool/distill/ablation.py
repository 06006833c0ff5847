"""The objective ablation: floors per loss and width, pooled over seeds and runs, and the verdict per width.

Question (issue 12; the paper claims its floor "persists regardless of training method, objective
function"): at each width, does any loss reach a floor below the one the other losses reach, by
more than the spread of the floors themselves?

Inputs are floors tables (`kdtool distill`, kind kdtool.distill.floors). Tables from different
runs pool when their runs are comparable: the same teacher, text, schedule, batch, sequence
length, temperature, student policy, top-k and evaluation cadence (`comparable_key`); the seed, the losses and the
widths may differ, so `--seed 0`, `--seed 1`, ... runs are seed repeats, and a run of one new loss
pools with an earlier run of kl at the same settings (a student trains exactly as it would beside
the others: tests/test_distill_losses.py). Rows repeated across tables (same loss, width, seed) count once.

Spread, per (loss, width):
  seeds        the sample std (ddof=1) of the floors over seeds, when every loss at that width has
               at least two seeds;
  evaluations  otherwise, the mean over seeds of `floor_std`: the std of the held-out KL between the
               evaluations of the floor window. It measures evaluation noise and late-training drift,
               not the spread between initialisations or data orders, so it understates the seed
               spread; it is unknown (None) when a floor rests on one evaluation.
Verdict at a width: best = the loss with the lowest mean floor, runner-up = the lowest of the
others; gap = runner-up - best. The best loss "goes below" when gap > spread(best) + spread(runner-up)
(their +-1 spread bands do not overlap); undetermined when a spread is unknown.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtool import formats

#: config fields that must agree for two runs' floors to be compared or pooled (seed, losses, widths may differ)
COMPARABLE = (
    *("temperature", "topk", "ce_weight"),  # the target and what the loss mixes in
    *("steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup"),  # the schedule and the data shape
    *("weight_decay", "betas", "eps", "grad_clip"),  # the optimiser
    *("heads", "ffn_ratio", "init_std"),  # the student policy
    # how the floor is measured: the window, its held-out batches, the evaluations averaged in it
    *("floor_fraction", "eval_batches", "eval_every"),
)
RUN_KEYS = ("teacher", "revision", "teacher_dtype", "data")


@dataclass(frozen=True)
class FloorRow:
    """One student's floor, as a floors table holds it."""

    loss: str
    width: int
    seed: int
    floor: float
    floor_std: float  # std over the floor window's evaluations
    n_evals: int
    source: str  # the table it came from


@dataclass
class LossFloor:
    """One loss at one width, pooled over seeds."""

    loss: str
    width: int
    floor: float  # mean over seeds
    spread: float | None  # see the module docstring; None = unknown
    seeds: int
    spread_source: str  # seeds | evaluations


@dataclass
class Verdict:
    """Does the best loss at this width go below the others' floor by more than the spread?"""

    width: int
    best: str
    best_floor: float
    runner_up: str
    runner_up_floor: float
    gap: float  # runner_up_floor - best_floor (>= 0)
    threshold: float | None  # spread(best) + spread(runner-up); None = unknown
    spread_source: str  # seeds | evaluations
    below: bool | None  # None = undetermined (no spread)

    def text(self) -> str:
        """The verdict in words, for tables and logs."""
        if self.below is None:
            return f"undetermined: {self.best} is {self.gap:.4g} below {self.runner_up}, no spread (one evaluation)"
        caveat = "" if self.spread_source == "seeds" else "; one seed: evaluation noise only"
        if self.below:
            return f"yes: {self.best} is {self.gap:.4g} below {self.runner_up} (spread {self.threshold:.3g}{caveat})"
        return (
            f"no: {self.best} is {self.gap:.4g} below {self.runner_up}, within the spread {self.threshold:.3g}{caveat}"
        )


def comparable_key(path: str | os.PathLike) -> str:
    """What must match for two floors tables to pool: their runs' settings, as a string (the path itself when
    the table records none, so a hand-made table stands alone)."""
    summary = formats.parquet_metadata(path).get("summary") if formats.is_parquet(path) else None
    cfg = summary.get("config") if isinstance(summary, dict) else None
    if not isinstance(cfg, dict):
        return f"file:{Path(path).resolve()}"
    run = dict(cfg.get("run_key") or {})
    if isinstance(run.get("data"), dict):  # the data's shuffle seed is --seed: a seed repeat, not another run
        run["data"] = {k: v for k, v in run["data"].items() if k != "seed"}
    key = {k: cfg.get(k) for k in COMPARABLE} | {k: run.get(k) for k in RUN_KEYS}
    return repr(sorted(key.items()))


def read_rows(path: str | os.PathLike) -> list[FloorRow]:
    """A floors table's rows (tables from before --loss: loss kl; seed from the column, else the run's config)."""
    cols = formats.read_table(path, required=("width", "floor"))
    n = len(cols["width"])
    summary = formats.parquet_metadata(path).get("summary") if formats.is_parquet(path) else None
    cfg_seed = ((summary or {}).get("config") or {}).get("seed", 0) if isinstance(summary, dict) else 0
    losses = [str(x) for x in cols["loss"]] if "loss" in cols else ["kl"] * n
    seeds = [int(x) for x in cols["seed"]] if "seed" in cols else [int(cfg_seed)] * n
    std = formats.numeric_column(cols, "floor_std", path) if "floor_std" in cols else np.zeros(n)
    evals = [int(x) for x in cols["n_evals"]] if "n_evals" in cols else [2] * n
    floor = formats.numeric_column(cols, "floor", path)
    width = formats.numeric_column(cols, "width", path, positive=True).astype(int)
    return [
        FloorRow(losses[i], int(width[i]), seeds[i], float(floor[i]), float(std[i]), evals[i], str(path))
        for i in range(n)
    ]


def group_tables(paths: list[Path]) -> list[list[Path]]:
    """The tables in groups that pool (comparable runs), in the order first seen."""
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(comparable_key(p), []).append(Path(p))
    return list(groups.values())


def pooled(paths: list[Path]) -> list[FloorRow]:
    """The rows of comparable tables, each (loss, width, seed) once (the first table's)."""
    seen, out = set(), []
    for p in paths:
        for row in read_rows(p):
            if (row.loss, row.width, row.seed) not in seen:
                seen.add((row.loss, row.width, row.seed))
                out.append(row)
    return out


def loss_floors(rows: list[FloorRow]) -> list[LossFloor]:
    """Mean floor and spread per (loss, width), losses in first-seen order, widths ascending."""
    losses = list(dict.fromkeys(r.loss for r in rows))
    widths = sorted({r.width for r in rows})
    out = []
    for w in widths:
        at = {loss: [r for r in rows if r.width == w and r.loss == loss] for loss in losses}
        at = {k: v for k, v in at.items() if v}
        by_seeds = all(len({r.seed for r in v}) >= 2 for v in at.values())
        for loss, rs in at.items():
            floors = np.array([r.floor for r in rs])
            if by_seeds:
                spread, source = float(floors.std(ddof=1)), "seeds"
            else:
                known = all(r.n_evals >= 2 for r in rs)
                spread, source = (float(np.mean([r.floor_std for r in rs])) if known else None), "evaluations"
            out.append(LossFloor(loss, w, float(floors.mean()), spread, len({r.seed for r in rs}), source))
    return out


def verdicts(floors: list[LossFloor]) -> list[Verdict]:
    """One verdict per width where at least two losses have a floor."""
    out = []
    for w in sorted({f.width for f in floors}):
        at = sorted((f for f in floors if f.width == w and math.isfinite(f.floor)), key=lambda f: f.floor)
        if len(at) < 2:
            continue
        best, second = at[0], at[1]
        known = best.spread is not None and second.spread is not None
        threshold = best.spread + second.spread if known else None
        gap = second.floor - best.floor
        below = (gap > threshold) if known else None
        out.append(
            Verdict(w, best.loss, best.floor, second.loss, second.floor, gap, threshold, best.spread_source, below)
        )
    return out


def several_losses(paths: list[Path]) -> bool:
    """True when the tables hold floors of more than one loss (an ablation to show)."""
    return len({r.loss for p in paths for r in read_rows(p)}) > 1
