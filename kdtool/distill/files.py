"""What a distillation run writes and reads back: curves and floors tables, student folders, checkpoints.

Kept apart from the training loop (kdtool/distill/loop.py) so each stays readable. Schemas: docs/formats.md.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from kdtool import formats
from kdtool.atomic import atomic_dir
from kdtool.distill import students as st
from kdtool.distill.config import DistillConfig
from kdtool.distill.objectives import student_name
from kdtool.distributed import Dist
from kdtool.errors import BadInput
from kdtool.identity import describe

CURVES_KIND = "kdtool.distill.curves"
FLOORS_KIND = "kdtool.distill.floors"
STUDENT_KIND = "kdtool.distill.student"  # a student folder's kdtool.json
#: config fields a --resume must agree on (eval/save cadence may change)
RESUME_FIELDS = (
    "widths",
    "temperature",
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "min_lr_ratio",
    "warmup",
    "weight_decay",
    "betas",
    "eps",
    "grad_clip",
    "ce_weight",
    "seed",
    "heads",
    "ffn_ratio",
    "init_std",
    "topk",
    "run_key",
    "losses",
    "hidden_layers",
    "hidden_weight",
    "feature_weight",
    "feature_budget",
    "feature_weighting",
)  # the features loss's --sae and --stats are compared by content, in run_key (kdtool/distill/job.py)
#: what a checkpoint written before --loss existed meant by the settings it lacks
RESUME_DEFAULTS = {
    "losses": ["kl"],
    "hidden_layers": [],
    "hidden_weight": 1.0,
    "feature_weight": 1.0,
    "feature_budget": "auto",
    "feature_weighting": "importance",
}


def curve_rows(cfg: DistillConfig, step, tokens, train_vals, ev, lrs, norms) -> list[dict]:
    """One curves.parquet row per student at `step` (NaN where there was no training step or no evaluation)."""
    nan = float("nan")
    rows = []
    for key in cfg.students:
        tv = (train_vals or {}).get(key, {})
        e = (ev or {}).get(key, {})
        rows.append(
            {
                "width": key.width,
                "step": step,
                "tokens": tokens,
                "train_kl": tv.get("kl", nan),
                "train_kl_scaled": tv.get("kl_scaled", nan),
                "train_ce": tv.get("ce", nan),
                "eval_kl": e.get("kl", nan),
                "eval_kl_scaled": e.get("kl_scaled", nan),
                "eval_raw_kl": e.get("raw_kl", nan),
                "eval_ce": e.get("ce", nan),
                "lr": lrs.get(key, nan),
                "grad_norm": norms.get(key, nan),
                "loss": key.loss,
                "train_loss": tv.get("loss", nan),
                "train_aux": tv.get("aux", nan),
            }
        )
    return rows


CURVE_COLUMNS = (
    "width",
    "step",
    "tokens",
    "train_kl",
    "train_kl_scaled",
    "train_ce",
    "eval_kl",
    "eval_kl_scaled",
    "eval_raw_kl",
    "eval_ce",
    "lr",
    "grad_norm",
    "loss",
    "train_loss",
    "train_aux",
)


def curve_columns(rows: list[dict]) -> dict[str, list]:
    """curves.parquet's columns from its rows (rows of a checkpoint from before --loss count as kl)."""
    defaults = {"loss": "kl", "train_loss": float("nan"), "train_aux": float("nan")}
    return {k: [r.get(k, defaults.get(k)) for r in rows] for k in CURVE_COLUMNS}


def floor_window(steps: int, fraction: float) -> int:
    """First step whose evaluation counts towards the floor."""
    return int(math.ceil((1.0 - fraction) * steps))


def compute_floors(cfg: DistillConfig, curves: dict[str, list], models=None) -> dict[str, list]:
    """Floor per student: mean (and sample std) of the held-out evaluations in the final 10% of steps."""
    start = floor_window(cfg.steps, cfg.floor_fraction)
    l_arr = np.asarray(curves["loss"], dtype=object)
    s_arr = np.asarray(curves["step"])
    out: dict[str, list] = {
        k: []
        for k in (
            "width",
            "params",
            "non_embedding_params",
            "floor",
            "floor_std",
            "floor_scaled",
            "raw_kl",
            "raw_kl_std",
            "eval_ce",
            "n_evals",
            "steps",
            "tokens",
            "temperature",
            "layers",
            "heads",
            "ffn",
            "topk",
            "loss",
            "seed",
        )
    }
    for key in cfg.students:
        w = key.width
        mine = (np.asarray(curves["width"]) == w) & (l_arr == key.loss)
        sel = mine & (s_arr >= start) & (s_arr > 0) & np.isfinite(np.asarray(curves["eval_kl"], float))
        kl = np.asarray(curves["eval_kl"], float)[sel]
        raw = np.asarray(curves["eval_raw_kl"], float)[sel]
        ce = np.asarray(curves["eval_ce"], float)[sel]
        n = int(sel.sum())
        out["width"].append(int(w))
        if models is not None:
            counts = st.param_counts(models[key])
            desc = st.describe(models[key].config)
        else:
            counts, desc = {"params": 0, "non_embedding_params": 0}, {"layers": 0, "heads": 0, "ffn": 0}
        out["params"].append(counts["params"])
        out["non_embedding_params"].append(counts["non_embedding_params"])
        floor = float(kl.mean()) if n else float("nan")
        out["floor"].append(floor)
        out["floor_std"].append(float(kl.std(ddof=1)) if n > 1 else 0.0)
        out["floor_scaled"].append(cfg.temperature**2 * floor)
        out["raw_kl"].append(float(raw.mean()) if n else float("nan"))
        out["raw_kl_std"].append(float(raw.std(ddof=1)) if n > 1 else 0.0)
        out["eval_ce"].append(float(ce.mean()) if n else float("nan"))
        out["n_evals"].append(n)
        out["steps"].append(int(s_arr[mine].max()))
        out["tokens"].append(int(np.asarray(curves["tokens"])[mine].max()))
        out["temperature"].append(float(cfg.temperature))
        out["layers"].append(int(desc["layers"]))
        out["heads"].append(int(desc["heads"]))
        out["ffn"].append(int(desc["ffn"]))
        out["topk"].append(int(cfg.topk))
        out["loss"].append(key.loss)
        out["seed"].append(int(cfg.seed))
    return out


def few_evaluations(cfg: DistillConfig, floors: dict[str, list]) -> str | None:
    """A warning when some floor averages fewer than two evaluations (floor_std needs two), else None."""
    few = sorted({n for n in floors["n_evals"] if n < 2})
    if not few:
        return None
    start = floor_window(cfg.steps, cfg.floor_fraction)
    return (
        f"each floor averages {few[0]} evaluation(s) (steps >= {start}); floor_std needs two or more: "
        f"use --eval-every <= {max(1, (cfg.steps - start) // 2)}"
    )


# ---------------------------------------------------------------------------------------------
# files


def write_outputs(out: Path, cfg: DistillConfig, modules, objectives, tokenizer, curves, floors, provenance) -> None:
    """One folder per student (atomic swap; its maps and objective inside), curves.parquet and floors.parquet.

    modules: {StudentKey: kdtool.distill.matching.Student}; objectives: {StudentKey: what it trained on}.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "config": cfg.as_dict(),
        "floor_from_step": floor_window(cfg.steps, cfg.floor_fraction),
        "names": {
            "floor": "per-token KL(teacher||student) at T, nats (paper's per-token KL)",
            "floor_scaled": "T^2 x floor",
            "raw_kl": "T^2 x KL summed over a sequence (paper's raw)",
        },
    }
    for i, key in enumerate(cfg.students):
        row = {k: v[i] for k, v in floors.items()}
        info = {"kind": STUDENT_KIND, "floor": row, "provenance": provenance}
        if key.loss != "kl" or len(cfg.losses) > 1:
            info["objective"] = objectives[key]
        _save_student(out / student_name(key), modules[key], tokenizer, info, provenance)
    formats.write_parquet(out / "curves.parquet", curves, kind=CURVES_KIND, provenance=provenance, summary=summary)
    formats.write_parquet(out / "floors.parquet", floors, kind=FLOORS_KIND, provenance=provenance, summary=summary)


def _save_student(final: Path, module, tokenizer, info: dict, provenance) -> None:
    hf_logging.disable_progress_bar()  # library code: no tqdm bars on stderr
    with atomic_dir(final) as tmp:
        module.lm.save_pretrained(tmp)
        for weights in tmp.glob("*.safetensors"):  # the weights say how they were made, as every kdtool file does
            formats.stamp_safetensors(weights, kind="kdtool.distill.student.weights", provenance=info.get("provenance"))
        module.save_maps(tmp, provenance)  # after the stamp: the maps carry their own kind
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        formats.write_json(tmp / "kdtool.json", info)


def _rng_state() -> dict:
    st = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(st[1].astype("int64")),
            "pos": int(st[2]),
            "has_gauss": int(st[3]),
            "cached": float(st[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path, cfg: DistillConfig, modules, optims, scheds, step, tokens_seen, rows_log, d: Dist
) -> None:
    """checkpoint/: one file per student (model, maps, optimizer, scheduler) + state.pt (step, data position,
    RNG, curves so far). Written to a new folder and swapped in (atomic.atomic_dir), so a kill never
    leaves half a checkpoint."""
    if not d.main:
        return
    with atomic_dir(out / "checkpoint") as tmp:
        for key, m in modules.items():
            blob = {"model": m.lm.state_dict(), "optim": optims[key].state_dict(), "sched": scheds[key].state_dict()}
            if m.maps:
                blob["maps"] = m.maps.state_dict()
            torch.save(blob, tmp / f"{student_name(key)}.pt")
        torch.save(
            {
                "step": step,
                "data_position": step,
                "tokens_seen": tokens_seen,
                "curves": rows_log,
                "config": cfg.as_dict(),
                "world": d.world,
                "rng": _rng_state(),
            },
            tmp / "state.pt",
        )
        formats.write_json(  # what the folder is, for `kdtool info` (the .pt files load only with weights_only=True)
            tmp / "checkpoint.json",
            {
                "kind": "kdtool.distill.checkpoint",
                "step": step,
                "widths": sorted({key.width for key in modules}),
                "students": [student_name(key) for key in modules],
                "use": "kdtool distill --resume continues from here; delete the folder to reclaim its space",
                "config": cfg.as_dict(),
            },
        )


def load_checkpoint(out: Path, cfg: DistillConfig, modules, optims, scheds, device) -> dict | None:
    """Restore every student's model/maps/optimizer/scheduler and the RNG; None when there is no checkpoint."""
    folder = out / "checkpoint"  # a kill mid-swap left it aside: kdtool.locks.claim has put it back
    if not (folder / "state.pt").exists():
        return None
    state = _load(folder / "state.pt", "cpu")
    _check_same_run(state["config"], cfg, folder)
    for key in cfg.students:
        blob = _load(folder / f"{student_name(key)}.pt", device)
        modules[key].lm.load_state_dict(blob["model"])
        if modules[key].maps:
            modules[key].maps.load_state_dict(blob["maps"])
        optims[key].load_state_dict(blob["optim"])
        scheds[key].load_state_dict(blob["sched"])
    _set_rng_state(state["rng"])
    return state


def _check_same_run(saved: dict, cfg: DistillConfig, folder: Path) -> None:
    """Refuse a --resume whose settings, teacher or text differ from the checkpoint's (both values shown)."""
    now = cfg.as_dict()
    saved = {k: saved.get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_FIELDS}  # older checkpoints lack some
    diff = [k for k in RESUME_FIELDS if _norm(saved.get(k)) != _norm(now.get(k))]
    if diff:
        shown = ", ".join(_difference(k, saved.get(k), now.get(k)) for k in diff[:3])
        raise BadInput(f"--resume: {folder} was made with other settings ({shown}); use the same options or a new -o")


def _difference(key: str, saved, now) -> str:
    """One differing setting for a message; the teacher and text by their identities (kdtool/identity.py)."""
    if key == "run_key" and isinstance(saved, dict) and isinstance(now, dict):
        parts = []
        for k in sorted(set(saved) | set(now)):
            a, b = saved.get(k), now.get(k)
            if _norm(a) != _norm(b):
                a, b = (_shown(x) for x in (a, b))
                parts.append(f"{k}: checkpoint {a} vs now {b}")
        return ", ".join(parts)
    return f"{key}: checkpoint {saved!r} vs now {now!r}"


def _shown(v) -> str:
    """An identity by its fingerprint and what it is; a dict of identities (the features loss's) each so."""
    if isinstance(v, dict) and "fingerprint" in v:
        return describe(v)
    if isinstance(v, dict) and v and all(isinstance(x, dict) and "fingerprint" in x for x in v.values()):
        return "{" + ", ".join(f"{k}: {describe(x)}" for k, x in v.items()) + "}"
    return repr(v)


def finished_run(out: Path, cfg: DistillConfig) -> dict | None:
    """--resume of a run that is done and whole: {floors, curves, provenance} as written; else None.

    None also when an output is missing (a kill during the final write): the loop then rewrites
    them from the final checkpoint. A finished run resumed with other settings is refused like any.
    """
    folder = out / "checkpoint"
    if not (folder / "state.pt").exists():
        return None
    state = _load(folder / "state.pt", "cpu")
    _check_same_run(state["config"], cfg, folder)
    students = (out / student_name(key) / "kdtool.json" for key in cfg.students)
    outputs = [out / "curves.parquet", out / "floors.parquet", *students]
    if int(state["step"]) < cfg.steps or not all(p.is_file() for p in outputs):
        return None
    floors, curves = (formats.read_table(out / name) for name in ("floors.parquet", "curves.parquet"))
    return {
        "floors": {k: v.tolist() for k, v in floors.items()},
        "curves": {k: v.tolist() for k, v in curves.items()},
        "provenance": formats.parquet_metadata(out / "floors.parquet")["provenance"],
        "step": int(state["step"]),
    }


def _load(path: Path, device):
    try:
        return formats.load_torch(path, map_location=device)
    except BadInput as exc:  # names the file: cut short, or not tensors
        raise BadInput(f"--resume: {exc}; use --overwrite to start over") from None


def _norm(v):
    if isinstance(v, (tuple, list)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v
