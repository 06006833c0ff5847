"""The objective-ablation table of a run report: floor per loss and width, and the verdict per width.

From the run's floors tables (`distill --loss`), pooled over comparable runs and seeds, and judged by
kdtool/distill/ablation.py (how the spread is measured and what "below" means: its docstring,
docs/distill.md). One table per group of comparable runs that holds more than one loss.
"""

from __future__ import annotations

from kdtool.distill import ablation
from kdtool.report.model import FLOORS, Artifact, Table, number, of_kind

SECTION = "Objective ablation"


def objective_ablation(arts: list[Artifact]) -> list[Table]:
    """Per width: each loss's floor +- spread, the best loss, its gap to the runner-up, and the verdict."""
    floors = of_kind(arts, FLOORS)
    by_path = {a.path: a for a in floors}
    groups = ablation.group_tables([a.path for a in floors])
    out = []
    for group in groups:
        rows = ablation.pooled(group)
        lf = ablation.loss_floors(rows)
        losses = list(dict.fromkeys(f.loss for f in lf))
        if len(losses) < 2:
            continue
        judged = {v.width: v for v in ablation.verdicts(lf)}
        sources = [by_path[p].rel for p in group]
        title = "Objective ablation: floor per loss" + (f" ({', '.join(sources)})" if len(groups) > 1 else "")
        t = Table(
            "objective_ablation",
            SECTION,
            title,
            ["d_S", *losses, "best", "gap", "spread", "verdict"],
            ["int", *["pm4"] * len(losses), "text", "g3", "g3", "text"],
            sources=sources,
        )
        for w in sorted({f.width for f in lf}):
            cells = {
                f.loss: (number(f.floor), None if f.spread is None else number(f.spread)) for f in lf if f.width == w
            }
            v = judged.get(w)
            t.add(
                w,
                *(cells.get(loss, (None, None)) for loss in losses),
                v.best if v else None,
                number(v.gap) if v else None,
                number(v.threshold) if v else None,
                v.text() if v else "one loss only",
            )
        seeds = max(f.seeds for f in lf)
        how = (
            f"std over {seeds} seeds"
            if all(f.spread_source == "seeds" for f in lf)
            else "std of the held-out KL over the floor window's evaluations (one seed: it understates the spread "
            "between seeds; repeat with --seed for that)"
        )
        t.note = (
            f"floor = mean held-out KL(teacher‖student) at T over the final 10% of steps, the same metric for every "
            f"loss; ± = {how}. Verdict: the best loss goes below the runner-up when their gap exceeds the sum of "
            "their spreads. CPU-scale runs are far from convergence: a verdict here is about these runs only."
        )
        out.append(t)
    return out
