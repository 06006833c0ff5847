"""One chunk of the toy sweep: configurations sharing n, all their seeds, trained as one batched computation.

First all teachers (one per (configuration, seed)), then all students (d_S = 1..d_T per seed)
against the frozen teachers, with kdtool.toy.trainer; `run_chunk` returns each configuration's
rows (floors next to Eq. 2's predictions, kdtool.toy.predictions) and training curves, in the
columns kdtool.toy.store writes. This is the code worker processes run (kdtool.toy.sweep).
"""

from __future__ import annotations

import numpy as np
import torch

from kdtool.errors import BadInput
from kdtool.toy.config import ToyConfigKey, TrainConfig
from kdtool.toy.model import data_stream, generator_seed, importance, init_weights, sample
from kdtool.toy.predictions import predictions
from kdtool.toy.store import ROW_KEYS
from kdtool.toy.trainer import TrainResult, train_batch, train_groups, width_groups


def _eval_sets(keys, seeds, cfg):
    xs = []
    for k in keys:
        for s in range(seeds):
            rng = data_stream(generator_seed(cfg.base_seed, k, s, "eval"))
            xs.append(sample(rng, cfg.eval_samples, k.n, k.alpha))
    return torch.stack(xs)  # [S, E, n]


def run_chunk(keys: list[ToyConfigKey], seeds: int, cfg: TrainConfig) -> dict[str, dict]:
    """Train the teachers and students of configurations sharing n; return {slug: {"rows", "curves"}}."""
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
