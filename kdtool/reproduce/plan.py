"""What a reproduction run will do: the plan of kdtool commands, each with its token counts and disk.

`build_plan(protocol, teacher)` turns a `Protocol` (kdtool/reproduce/protocol.py) into `Stage`s
(kdtool/reproduce/stage.py) in order: cache-acts (with --sae-input cache), one train-sae and one stats
per SAE trial, predict, distill, calibrate, concepts, probe and the report. Each stage carries its
argv, the tokens it processes and the bytes it leaves; kdtool/reproduce/commands.py writes them, and
kdtool/reproduce/run.py fills in the times and runs them.

Library code: no printing, no sys.exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdtool.reproduce.commands import (
    calibrate_stage,
    data_opts,
    distill_stage,
    predict_stage,
    probe_stages,
    report_stage,
    sae_stages,
    teacher_opts,
)
from kdtool.reproduce.protocol import Protocol, Teacher, teacher_shape
from kdtool.reproduce.sizes import acts_bytes, fmt_bytes, sae_training_memory
from kdtool.reproduce.stage import Stage

PLAN_KIND = "kdtool.reproduce.plan"
#: the stages whose time is measured; probe is derived from the stats rate, the rest take seconds
MEASURED = ("cache-acts", "train-sae", "stats", "distill")


@dataclass
class Plan:
    protocol: Protocol
    teacher: Teacher
    stages: list[Stage]
    notes: list[str]

    def totals(self) -> dict[str, Any]:
        final = sum(s.disk_bytes for s in self.stages)
        peak = final + max((s.peak_extra for s in self.stages), default=0)
        secs = [s.seconds for s in self.stages if s.rate]
        known = all(x is not None for x in secs)
        return {
            "disk_bytes": final,
            "disk_peak_bytes": peak,
            "teacher_download_bytes": 2 * self.teacher.params,
            "seconds": sum(x for x in secs if x is not None) if known else None,
            "seconds_known": sum(x for x in secs if x is not None),
            "stages_without_time": [s.name for s in self.stages if s.rate and s.seconds is None],
        }

    def as_dict(self) -> dict[str, Any]:
        t = self.teacher
        return {
            "kind": PLAN_KIND,
            "protocol": self.protocol.as_dict(),
            "teacher": {
                "model": self.protocol.model,
                "d_model": t.d_model,
                "n_layers": t.n_layers,
                "vocab": t.vocab,
                "params": t.params,
                "students": {str(w): c for w, c in t.students.items()},
                "config_source": t.source,
            },
            "stages": [s.as_dict() for s in self.stages],
            "totals": self.totals(),
            "notes": self.notes,
        }


def build_plan(p: Protocol, teacher: Teacher | None = None) -> Plan:
    """Every stage of the protocol, in order, with its command, token counts and disk."""
    t = teacher or teacher_shape(p)
    notes = list(p.notes)
    seed = p.seed or None
    if p.sae_input == "cache":
        source = {"acts": str(p.out / "acts")}
    else:
        source = {**teacher_opts(p), **data_opts(p), "seq_len": p.sae_seq_len, "batch_size": p.teacher_batch}
        cache = acts_bytes(p.sae_tokens, len(p.layers), t.d_model)
        notes.append(
            f"SAE input: streaming (the teacher runs inside train-sae and stats, nothing is cached). A cache "
            f"(--sae-input cache) would need {fmt_bytes(cache)} ({p.sae_tokens:,} tokens x {len(p.layers)} layers "
            f"x {t.d_model} x 2 bytes) and run the teacher once instead of {len(p.trials)} times."
        )
    if "train-sae" not in p.skip:
        F = int(round(p.expansion * t.d_model))
        held, scratch = sae_training_memory(t.d_model, F, len(p.layers), p.sae_batch_tokens)
        notes.append(
            f"train-sae memory on the device: {fmt_bytes(held)} for {len(p.layers)} SAEs (weights, gradients, "
            f"Adam moments, fp32) + {fmt_bytes(scratch)} of step blocks ({p.sae_batch_tokens:,} x {F:,} fp32 x 3)"
            + (" + the teacher" if p.sae_input == "stream" else "")
        )
    stages = [
        *sae_stages(p, t, source, seed),
        *[predict_stage(p, name) for name in p.trials],
        distill_stage(p, t, seed),
        *[calibrate_stage(p, name) for name in p.trials],
        *probe_stages(p, seed),
        report_stage(p),
    ]
    if p.revision:
        notes.append("probe has no --revision: it loads the teacher's default revision")
    return Plan(p, t, [s for s in stages if s.family not in p.skip], notes)
