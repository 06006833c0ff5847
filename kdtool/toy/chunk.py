"""One chunk of the toy sweep: configurations sharing n, all their seeds, trained as one batched computation.

First all teachers (one per (configuration, seed)), then all students (the widths of
kdtool.toy.config.student_widths, per seed) against the frozen teachers, with kdtool.toy.trainer;
`run_chunk` returns each configuration's rows (floors next to Eq. 2's predictions,
kdtool.toy.predictions), its per-feature survival records (each feature's part of every model's
floor and its error relative to its variance; kdtool.toy.survival reads them) and training curves,
in the columns kdtool.toy.store writes. This is the code worker processes run (kdtool.toy.sweep).
"""

from __future__ import annotations

import numpy as np
import torch

from kdtool.errors import BadInput
from kdtool.toy.config import ToyConfigKey, TrainConfig, student_widths
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


def run_chunk(
    keys: list[ToyConfigKey], seeds: int, cfg: TrainConfig, widths_spec: str | tuple[int, ...] = "teacher"
) -> dict[str, dict]:
    """Train the teachers and students of configurations sharing n; {slug: {"rows", "survival", "curves"}}.

    widths_spec is --student-widths (kdtool.toy.config.student_widths), resolved per configuration.
    """
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

    # students: the union of the configurations' widths, in groups of consecutive ones, each padded to its
    # widest; width w sits in slot `slot[w]` once the groups are concatenated (a width that another
    # configuration of the chunk does not train stays all-zero there: a zero W gets zero gradient)
    wanted = {k.slug: student_widths(k, widths_spec) for k in keys}
    all_widths = sorted(set().union(*wanted.values()))
    slot = {w: j for j, w in enumerate(all_widths)}
    groups = []
    for widths in width_groups(all_widths, n, S, cfg.batch_size):
        W0 = torch.zeros(S, len(widths), widths[-1], n)
        for i, (k, s) in enumerate(streams):
            for j, w in enumerate(widths):
                if w in wanted[k.slug]:
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
    variance = eval_x.to(torch.float64).var(dim=1, unbiased=False).numpy()  # [S, n] held-out variance of x_i
    index = {ks: i for i, ks in enumerate(streams)}
    out = {}
    for k in keys:
        models = [(s, index[(k, s)], w, slot[w]) for s in range(seeds) for w in wanted[k.slug]]
        out[k.slug] = {
            "rows": _rows(k, cfg, models, t_res, s_res),
            "survival": _survival(k, seeds, models, index, t_res, s_res, imp.numpy(), variance),
            "curves": _curves(k, seeds, models, index, t_res, s_res) if cfg.curve_points else None,
        }
    return out


def _rows(k: ToyConfigKey, cfg: TrainConfig, models, t_res, s_res) -> dict[str, list]:
    """One row per student (seed-major, widths ascending): floors next to Eq. 2's predictions."""
    widths = sorted({w for _, _, w, _ in models})
    pred = predictions(k.n, k.alpha, widths, cfg.zipf_exponent)
    at = {w: j for j, w in enumerate(widths)}
    rows: dict[str, list] = {c: [] for c in ROW_KEYS}
    for s, _, w, _ in models:
        for c, v in zip(ROW_KEYS, (k.n, k.d_teacher, k.alpha, w, s), strict=True):
            rows[c].append(v)
    m = len(models)
    rows.update(
        {
            "floor_data": [float(s_res.floor_data[i, j]) for _, i, _, j in models],
            "floor_distill": [float(s_res.floor_distill[i, j]) for _, i, _, j in models],
            "teacher_floor": [float(t_res.floor_data[i, 0]) for _, i, _, _ in models],
            "train_loss_final": [float(s_res.final_train_loss[i, j]) for _, i, _, j in models],
            "pred_refined": [float(pred["pred_refined"][at[w]]) for _, _, w, _ in models],
            "pred_naive": [float(pred["pred_naive"][at[w]]) for _, _, w, _ in models],
            "features_kept": [int(pred["features_kept"][at[w]]) for _, _, w, _ in models],
            "g": [pred["g"]] * m,
            "d_star": [pred["d_star"]] * m,
            "total_mass": [pred["total_mass"]] * m,
            "steps": [cfg.steps] * m,
            "target": [cfg.target] * m,
        }
    )
    return rows


#: columns of a configuration's survival records, in the order written (docs/formats.md)
SURVIVAL_COLUMNS = (*ROW_KEYS, "role", "feature", "importance", "loss", "share", "rel_error")


def _survival(k: ToyConfigKey, seeds: int, models, index, t_res, s_res, imp, variance) -> dict[str, np.ndarray]:
    """Per model (each seed's teacher, then its students) and feature i = 1..n (the importance rank):
    loss = I_i * held-out squared error of x_i (these sum to the model's floor_data), share = loss / floor_data,
    rel_error = squared error / held-out variance of x_i (1 - R^2; NaN where x_i never fires in the held-out set).
    """
    blocks = [("teacher", s, index[(k, s)], k.d_teacher, t_res.feature_mse[index[(k, s)], 0]) for s in range(seeds)]
    blocks += [("student", s, i, w, s_res.feature_mse[i, j]) for s, i, w, j in models]
    n, count = k.n, len(blocks)
    mse = np.stack([b[4].numpy() for b in blocks])  # [models, n]
    var = np.stack([variance[b[2]] for b in blocks])
    loss = mse * imp.astype(np.float64)
    total = loss.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, loss / total, 0.0)
        rel = np.where(var > 0, mse / np.where(var > 0, var, 1.0), np.nan)
    cols = {
        "n": np.full(count * n, k.n, dtype=np.int64),
        "d_teacher": np.full(count * n, k.d_teacher, dtype=np.int64),
        "alpha": np.full(count * n, k.alpha, dtype=np.float64),
        "d_student": np.repeat([b[3] for b in blocks], n).astype(np.int64),
        "seed": np.repeat([b[1] for b in blocks], n).astype(np.int64),
        "role": np.repeat([b[0] for b in blocks], n).astype(object).astype(str),
        "feature": np.tile(np.arange(1, n + 1, dtype=np.int64), count),
        "importance": np.tile(imp.astype(np.float64), count),
        "loss": loss.ravel(),
        "share": share.ravel(),
        "rel_error": rel.ravel(),
    }
    return {c: cols[c] for c in SURVIVAL_COLUMNS}


def _curves(k: ToyConfigKey, seeds: int, models, index, t_res, s_res) -> dict[str, list]:
    """Training curves: per seed the teacher's, then each student's, at the logged steps."""
    curves: dict[str, list] = {c: [] for c in (*ROW_KEYS, "role", "step", "loss", "loss_data")}
    for s in range(seeds):
        i = index[(k, s)]
        slots = [(j, w) for s2, _, w, j in models if s2 == s]
        for role, res, where in (("teacher", t_res, [(0, k.d_teacher)]), ("student", s_res, slots)):
            for step, (obj, data) in sorted(res.curves.items()):
                for j, w in where:
                    for c, v in zip(ROW_KEYS, (k.n, k.d_teacher, k.alpha, w, s), strict=True):
                        curves[c].append(v)
                    curves["role"].append(role)
                    curves["step"].append(step + 1)
                    curves["loss"].append(float(obj[i, j]))
                    curves["loss_data"].append(float(data[i, j]))
    return curves
