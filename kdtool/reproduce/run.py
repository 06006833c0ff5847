"""Timing and running the plan of kdtool/reproduce/plan.py: throughputs, brief measuring runs, execution.

- `Rates`: throughputs (tokens/s for cache-acts, train-sae, stats; steps/s for distill), the
  start-up seconds of each command and the disk's write speed; read from RUN/throughput.json
  (written by `measure`) or given by the user.
- `estimate(plan, rates)`: time of each stage = start-up + amount / rate + what the brief runs did
  less often than the real one (checkpoint writes, distill's held-out evaluations).
- `measure(protocol, work)`: each heavy stage of this very plan, run twice briefly (2n then n
  tokens or steps) on this machine; rate = n / (t(2n) - t(n)) cancels the start-up.
- `execute(plan)`: the stages in order, skipping finished ones and resuming checkpointed ones.

Library code: messages go to callbacks; commands run through a `Runner` (subprocess by default,
CliRunner in tests).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtool import formats
from kdtool.errors import BadInput, RuntimeFailure
from kdtool.reproduce.plan import MEASURED, Plan, build_plan
from kdtool.reproduce.protocol import STATE_DIR, Protocol, Teacher
from kdtool.reproduce.sizes import fmt_duration
from kdtool.reproduce.stage import Stage

RATES_KIND = "kdtool.reproduce.throughput"
#: a held-out evaluation batch costs about this fraction of a training step (forward only, teacher
#: targets computed once): forward ~ 1/3 of forward + backward
EVAL_STEP_FRACTION = 1 / 3
#: a measurement whose 2n run is less than this fraction work (t(2n) - t(n)) is flagged as rough
NOISY_FRACTION = 0.2


@dataclass
class Rates:
    """Throughputs: tokens/s for cache-acts, train-sae, stats; steps/s for distill."""

    rates: dict[str, float] = field(default_factory=dict)
    startup: dict[str, float] = field(default_factory=dict)  # seconds of loading before the work starts
    disk_write: float | None = None  # bytes/s, for checkpoint writes the brief runs did not include
    source: str = ""  # "measured ..." or "given"
    settings: dict[str, Any] = field(default_factory=dict)  # what was measured (model, batch, ...)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: Path) -> Rates:
        d = formats.read_json(path)
        if d.get("kind") != RATES_KIND:
            raise BadInput(f"{path}: not a throughput file (kind {d.get('kind')!r}, expected {RATES_KIND})")
        return cls(
            d.get("rates", {}), d.get("startup", {}), d.get("disk_write"), f"measured ({path})", d.get("settings", {})
        )


def measure_settings(p: Protocol) -> dict[str, Any]:
    """The settings a throughput depends on: a file measured with others is flagged."""
    return {
        "model": p.model,
        "dataset": p.dataset,
        "layers": p.layers,
        "sae_input": p.sae_input,
        "sae_batch_tokens": p.sae_batch_tokens,
        "sae_seq_len": p.sae_seq_len,
        "expansion": p.expansion,
        "widths": p.distill["widths"],
        "heads": p.distill["heads"],
        "batch_size": p.distill["batch-size"],
        "seq_len": p.distill["seq-len"],
        "torchrun": p.torchrun,
        "device": p.device,
    }


def estimate(plan: Plan, rates: Rates) -> list[str]:
    """Fill each stage's seconds (None where a rate is missing); return notes on the assumptions.

    time = start-up + amount / rate, plus what the brief measured runs did less often than the real
    one: checkpoint writes (bytes / measured disk write rate) and distill's held-out evaluations
    (each batch ~ EVAL_STEP_FRACTION of a training step)."""
    notes = []
    if rates.settings:
        mism = [
            f"{k} {rates.settings.get(k)!r} (plan: {v!r})"
            for k, v in measure_settings(plan.protocol).items()
            if k in rates.settings and rates.settings.get(k) != v
        ]
        if mism:
            notes.append("throughput measured with other settings: " + "; ".join(mism) + "; rerun --measure")
        rough = [k for k, t in rates.settings.get("timings", {}).items() if t.get("noisy")]
        if rough:
            notes.append(
                f"rough rates for {', '.join(rough)}: the brief runs were mostly start-up (rerun --measure with "
                "larger --measure-tokens/--measure-steps)"
            )
    for s in plan.stages:
        s.seconds = None
        if not s.rate:
            s.time_note = "seconds (light)"
            continue
        r = rates.rates.get(s.rate)
        if not r:
            s.time_note = f"unknown (run with --measure or give --rate-{s.rate})"
            continue
        seconds = rates.startup.get(s.rate, 0.0) + s.amount / r
        unit = "steps/s" if s.rate == "distill" else "tokens/s"
        parts = [f"{r:,.3g} {unit}" if r < 100 else f"{r:,.0f} {unit}"]
        if s.family == "distill":
            ev = max(0, s.extra["evaluations"]) * s.extra["eval_batches"] * EVAL_STEP_FRACTION / r
            seconds += ev
            parts.append(f"evaluations ~{fmt_duration(ev)}")
        if "checkpoint_writes" in s.extra:
            n = max(0, s.extra["checkpoint_writes"])
            if rates.disk_write:
                w = n * s.extra["checkpoint_bytes"] / rates.disk_write
                seconds += w
                parts.append(f"{int(n)} more checkpoint writes ~{fmt_duration(w)}")
            elif n:
                parts.append(f"+ {int(n)} checkpoint writes (disk speed not measured)")
        if s.family == "probe":
            parts = [f"at most: {s.amount:,.0f} tokens forward at the {s.rate} rate {r:,.0f} tokens/s"]
        s.seconds = seconds
        s.time_note = "; ".join(parts)
    return notes


# ---- measuring ----------------------------------------------------------------------------------
Runner = Callable[[list[str]], int]
Clock = Callable[[], float]


def exec_argv(argv: list[str]) -> list[str]:
    """The plan's argv as this interpreter runs it: kdtool -> python -m kdtool, torchrun -> python -m
    torch.distributed.run (so the same environment is used whatever is on PATH)."""
    if argv[0] == "kdtool":
        return [sys.executable, "-m", "kdtool", *argv[1:]]
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return list(argv)


def subprocess_runner(argv: list[str]) -> int:
    """Run one command; its stdout (tables) goes to our stderr, so the plan on stdout stays clean."""
    try:
        out = sys.stderr.fileno()
    except (AttributeError, OSError):
        out = None
    return subprocess.run(exec_argv(argv), check=False, stdout=out).returncode


def _scaled(p: Protocol, out: Path, *, tokens: int, steps: int) -> Protocol:
    q = copy.deepcopy(p)
    q.out = out
    q.sae_tokens = tokens
    q.stats_tokens = tokens
    q.sae_checkpoints = 1
    q.teacher_cache = False
    q.distill = dict(p.distill, steps=steps, warmup=1, **{"eval-every": steps, "save-every": 0})
    q.trials = dict(list(p.trials.items())[:1])
    return q


def measure(
    p: Protocol,
    work: Path,
    *,
    tokens: int = 2_097_152,
    steps: int = 20,
    runner: Runner = subprocess_runner,
    clock: Clock = time.perf_counter,
    teacher: Teacher | None = None,
    on_message: Callable[[str], None] = lambda m: None,
) -> Rates:
    """Run each heavy stage twice, briefly, with this plan's settings (2n then n tokens or steps),
    in `work`. rate = n / (t(2n) - t(n)) cancels the start-up (imports, model load, first batch);
    start-up = t(n) - n / rate. The bigger run goes first, so a cold disk cache slows it and the
    rate errs on the slow side. Also times writing 256 MB (for checkpoint writes)."""
    if tokens < p.sae_batch_tokens:
        raise BadInput(f"--measure-tokens {tokens:,} is less than one SAE batch ({p.sae_batch_tokens:,})")
    if steps < 2:
        raise BadInput("--measure-steps must be >= 2")
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, dict[str, float]] = {}

    def timed(stage: Stage) -> float:
        on_message(f"measure: {stage.command}")
        t0 = clock()
        rc = runner(stage.argv)
        dt = clock() - t0
        if rc != 0:
            raise RuntimeFailure(f"--measure: `{stage.command}` failed (exit {rc}); see its output above")
        return dt

    plans = {}
    for size, (n, a) in (("big", (2 * tokens, 2 * steps)), ("small", (tokens, steps))):
        q = _scaled(p, work / size, tokens=n, steps=a)
        q.skip = ()
        plans[size] = {s.family: s for s in build_plan(q, teacher).stages}
    families = [f for f in MEASURED if f in plans["big"] and f not in p.skip]
    if p.sae_input == "cache" and "cache-acts" not in families:
        families.insert(0, "cache-acts")  # train-sae and stats read it
    if "stats" in families and "train-sae" not in families:
        families.insert(families.index("stats"), "train-sae")  # stats needs an SAE
    rates, startup = {}, {}
    for fam in families:
        t_big = timed(plans["big"][fam])
        t_small = timed(plans["small"][fam])
        n = steps if fam == "distill" else tokens
        diff = t_big - t_small
        # the work of n should be a good part of the 2n run; else start-up jitter dominates the difference
        noisy = diff < NOISY_FRACTION * t_big
        if diff <= 0:  # noise swamped the work: fall back to the pessimistic whole-run rate
            rate, start = 2 * n / t_big, 0.0
        else:
            rate = n / diff
            start = max(0.0, t_small - n / rate)
        if noisy:
            on_message(
                f"measure: {fam}: the runs took {t_big:.1f} s (2n) and {t_small:.1f} s (n), mostly start-up: the rate "
                f"is rough{'' if diff > 0 else ' (2n / t(2n), pessimistic)'}; raise --measure-tokens/--measure-steps"
            )
        rates[fam], startup[fam] = rate, start
        timings[fam] = {"n": n, "t_2n": t_big, "t_n": t_small, "noisy": noisy}
        unit = "steps/s" if fam == "distill" else "tokens/s"
        on_message(f"measure: {fam}: {rate:,.3g} {unit}, start-up {start:.1f} s")
    disk = _disk_write_rate(work)
    on_message(f"measure: disk writes {disk / 1e6:,.0f} MB/s")
    return Rates(rates, startup, disk, f"measured in {work}", dict(measure_settings(p), timings=timings))


def _disk_write_rate(folder: Path, size: int = 256 * 2**20) -> float:
    block = os.urandom(16 * 2**20)
    path = folder / ".disk-write-test"
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(size // len(block)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return size / max(dt, 1e-9)


def save_rates(rates: Rates, path: Path, provenance: dict) -> None:
    formats.write_json(path, {"kind": RATES_KIND, **rates.as_dict(), "provenance": provenance})


# ---- running ------------------------------------------------------------------------------------
def execute(
    plan: Plan,
    *,
    runner: Runner = subprocess_runner,
    on_message: Callable[[str], None] = lambda m: None,
) -> None:
    """Run the stages in order. A stage that finished before (same command) is skipped; a stage
    with a checkpoint gets --resume; a finished stage whose command changed is refused."""
    state = plan.protocol.out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(plan.stages, 1):
        marker = state / f"{s.name}.done.json"
        if marker.exists():
            before = formats.read_json(marker).get("argv")
            if before != s.argv:
                raise BadInput(
                    f"stage {s.name} already ran with another command ({shlex.join(before or [])}); "
                    f"use a new --out, or delete {marker} to run it again"
                )
            on_message(f"[{i}/{len(plan.stages)}] {s.name}: done before, skipped")
            continue
        argv = list(s.argv)
        if s.resume_marker is not None and s.resume_marker.exists():
            argv.append("--resume")
        on_message(f"[{i}/{len(plan.stages)}] {s.name}: {shlex.join(argv)}")
        t0 = time.perf_counter()
        rc = runner(argv)
        if rc != 0:
            raise RuntimeFailure(
                f"stage {s.name} failed (exit {rc}); fix the cause and rerun the same command: finished stages "
                "are skipped and train-sae/distill/cache-acts resume from their checkpoints"
            )
        formats.write_json(
            marker,
            {"kind": "kdtool.reproduce.stage", "name": s.name, "argv": s.argv, "seconds": time.perf_counter() - t0},
        )
