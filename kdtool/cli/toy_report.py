"""What `kdtool toy` says: the human summary of a sweep or of --summarize (stderr), or its JSON (stdout).

The rendering side of kdtool/cli/toy.py: the summary dict comes from kdtool.toy.experiment /
kdtool.toy.stats; these lines name every number's definition as docs/toy.md does. The per-point
records (kept counts of every (configuration, d_S)) are in the JSON (`kdtool --json toy`), whole.
"""

from __future__ import annotations

from pathlib import Path

from kdtool.cli import common


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def report(result: dict, output: Path | None) -> None:
    """--json: the summary on stdout. Otherwise a short human summary on stderr."""
    if common.STATE.json:
        common.emit_json({"kind": "kdtool.toy.summary", **result})
        return
    fitted = result.get("fit_capacity") or {}
    if not common.STATE.quiet:
        lines = _summary_lines(result, output) + _fit_lines(fitted) + _survival_lines(result.get("survival"))
        for name in ("survival_file", "capacity_file"):
            if result.get(name):
                lines.append(f"wrote {result[name]}")
        for line in lines:
            common.log(line)
    for note in fitted.get("notes", []):
        common.warn(note)


def _agreement(label: str, r: dict) -> str:
    return (
        f"{label}Pearson r {_fmt(r['pearson_r'])}, log-log r {_fmt(r['pearson_r_loglog'])}, "
        f"MAPE {_fmt(r['mape_percent'])}%, median accuracy {_fmt(r['median_accuracy'])}, R^2 {_fmt(r['r2'])}"
    )


def _summary_lines(result: dict, output: Path | None) -> list[str]:
    lines = []
    if output is not None:
        lines.append(
            f"wrote {output}: {result['rows']} rows, {result['models']} models in {result['configs']} "
            f"configurations ({_fmt(result.get('seconds'))} s, {_fmt(result.get('models_per_second'))} "
            "models/s this run)"
        )
    lines.append(
        f"data points: {result['data_points']} of {result['points']} (config, d_S) points "
        f"[{result['data_point_rule']}]; floor = {result.get('floor_column', result['measure'])}"
    )
    lines.append(_agreement("refined (g(alpha)): ", result["refined"]))
    lines.append(_agreement("naive   (g = 1):    ", result["naive"]))
    for a, row in result["by_alpha"].items():
        lines.append(
            f"  alpha {a}: {row['points']} points, median accuracy refined {_fmt(row['median_accuracy'])}, "
            f"naive {_fmt(row['median_accuracy_naive'])}; measured / predicted median refined "
            f"{_fmt(row.get('median_measured_over_refined'))}, naive {_fmt(row.get('median_measured_over_naive'))}"
        )
    order = result.get("ordering")
    if order:
        w, a = order["falls_with_width"], order["falls_with_alpha"]
        lines.append(
            f"ranking: the floor falls with d_S in {w[0]}/{w[1]} adjacent comparisons, with alpha in {a[0]}/{a[1]}; "
            f"refined prediction below the floor at {result['underestimated_by_refined']}/{result['data_points']} "
            "data points"
        )
    bd = result["beyond_d_star"]
    lines.append(
        f"beyond d* ({bd['points']} points, formula = 0): measured floor / total mass median "
        f"{_fmt(bd['median_normalized_floor'])}, max {_fmt(bd['max_normalized_floor'])}"
    )
    return lines


def _fit_lines(fitted: dict) -> list[str]:
    """--fit-capacity: g_hat per alpha against g(alpha), and the power law across alphas."""
    lines = [
        f"  fit alpha {p['alpha']:g}: g_hat {_fmt(p['g_hat'])} vs g(alpha) {_fmt(p['g'])} "
        f"(x{_fmt(p['ratio'])}), log-rmse {_fmt(p['rmse_log_fit'])} vs {_fmt(p['rmse_log_paper_g'])} "
        f"with g(alpha), {p['points']} points"
        for p in fitted.get("per_alpha", [])
    ]
    pl = fitted.get("power_law")
    if pl:
        lines.append(
            f"  power law: g_hat = {_fmt(pl['k'])} * g(alpha)^{_fmt(pl['p'])} (R^2 on logs {_fmt(pl['r2_log'])})"
        )
    return lines


def report_check(result: dict) -> None:
    if common.STATE.json:
        common.emit_json({"kind": "kdtool.toy.convergence", **result})
        return
    for c in result["configs"]:
        common.log(
            f"  {c['config']}: max |rel. change| data {_fmt(c['max_abs_rel_floor_data'])}, "
            f"distill {_fmt(c['max_abs_rel_floor_distill'])}"
        )
    for col, o in result["overall"].items():
        common.log(
            f"{col}: {o['points']} data points, median |rel. change| {_fmt(o['median_abs_rel'])}, "
            f"max {_fmt(o['max_abs_rel'])}, mean signed {_fmt(o['mean_rel'])} "
            f"({result['steps']} vs {result['steps_doubled']} steps)"
        )
    verdict = "converged" if result["passed"] else "NOT converged"
    common.log(
        f"{verdict}: max |rel. change| of the data floor {'<' if result['passed'] else '>='} {result['threshold']:.0%}"
    )


def _survival_lines(surv: dict | None) -> list[str]:
    """Kept counts against F_S, g_meas per alpha, Eq. 2 charged on the measured kept set next to Eq. 2."""
    if not surv:
        return []
    below, points = surv["kept_below_F_S"]
    lines = [
        f"survival ({surv['kept_rule']}, threshold {surv['kept_threshold']:g}): {surv['students']} students; "
        f"seed-mean kept count below Eq. 2's F_S = floor(d_S g) at {below} of {points} points; "
        f"kept set = the top-k features in {_fmt(surv['top_k_share'])} of students"
    ]
    fit = surv["capacity"]
    for p in fit["per_alpha"]:
        lines.append(
            f"  alpha {p['alpha']:g}: g_meas {_fmt(p['g_meas'])} features/dim vs g(alpha) {_fmt(p['g'])} "
            f"(x{_fmt(p['ratio'])}; median kept/d_S {_fmt(p['median_kept_over_d'])}, strict points "
            f"{_fmt(p['g_meas_strict'])}), {p['points']} capacity-limited points"
        )
    law = fit.get("power_law")
    if law:
        lines.append(
            f"  measured capacity law: g_meas = {_fmt(law['k'])} * g(alpha)^{_fmt(law['p'])} "
            f"(R^2 on logs {_fmt(law['r2_log'])})"
        )
    pred = surv["measured_kept_predictor"]
    for where, label in (("data_points", "data points (d_S < d*)"), ("all_points", "points (all widths)")):
        score = pred[where]
        lines.append(f"  Eq. 2 on the measured kept set, {score['points']} {label}:")
        lines.append(_agreement("    measured kept: ", score["measured_kept"]))
        lines.append(_agreement("    Eq. 2 refined: ", score["refined"]))
    sens = ", ".join(f"{s['threshold']:g}: {_fmt(s['mean_kept'])}" for s in surv.get("threshold_sensitivity", []))
    lines.append(f"  mean kept count per student by threshold: {sens}")
    return lines
