"""What a reproduction run costs, in units: bytes of each file a stage leaves, and how bytes, durations
and free disk space are shown.

Pure arithmetic on shapes (no torch): kdtool/reproduce/commands.py adds these up per stage, and
scripts/reproduce-paper prints them. Each size follows the layout its command writes (docs/formats.md),
so a change of layout there is a change here; tests/test_reproduce_paper.py checks the SAE sizes
against the files a tiny run really wrote.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

#: per-row size of stats.parquet (8 numeric columns, uncompressed upper bound)
STATS_ROW_BYTES = 64


# ---- sizes (bytes) ------------------------------------------------------------------------------
def sae_bytes(d: int, n_features: int) -> int:
    """One SAE on disk: W_enc [d, F] + W_dec [F, d] + b_enc [F] + b_pre [d], fp32."""
    return 4 * (2 * d * n_features + n_features + d)


def sae_optimizer_bytes(d: int, n_features: int) -> int:
    """Adam's two moments of every SAE parameter (fp32) + last_fired [F] int64 (the latest checkpoint only)."""
    return 2 * sae_bytes(d, n_features) + 8 * n_features


def sae_training_memory(d: int, n_features: int, n_saes: int, batch: int) -> tuple[int, int]:
    """Device memory of one train-sae run: (the SAEs' weights + gradients + Adam moments, fp32: 4 x an SAE
    each, plus last_fired; the step's scratch blocks: pre/z, dL/dz and the active mask, [batch, F] fp32 each,
    shared by every SAE: kdtool/sae/model.py)."""
    return n_saes * (4 * sae_bytes(d, n_features) + 8 * n_features), 3 * 4 * batch * n_features


def acts_bytes(tokens: int, n_layers: int, d: int, dtype_bytes: int = 2) -> int:
    """An activation cache: tokens x layers x d_model x bytes (float16/bfloat16: 2)."""
    return tokens * n_layers * d * dtype_bytes


def student_bytes(params: int) -> int:
    """A student's save_pretrained folder (fp32 safetensors)."""
    return 4 * params


def student_checkpoint_bytes(params: int) -> int:
    """distill's checkpoint/width{W}.pt: model + AdamW exp_avg + exp_avg_sq, fp32."""
    return 12 * params


def teacher_cache_bytes(train_tokens: int, eval_tokens: int, topk: int, vocab: int) -> int:
    """--teacher-cache (kdtool/distill/teacher_cache.py): per training token k ids (int32) + k log-probs (float32)
    + token, mask, rest mass; per held-out token the full log-probs [V] (float32) + token and mask."""
    return train_tokens * (8 * topk + 9) + eval_tokens * (4 * vocab + 5)


def sae_checkpoint_count(tokens: int, batch: int, every: int) -> int:
    """Checkpoint folders train-sae leaves: each milestone reached before the last step, plus the final one
    (the same rule as kdtool/sae/training.py)."""
    steps = tokens // batch
    count, seen, nxt = 0, 0, every if every else None
    for _ in range(steps):
        seen += batch
        done = seen + batch > tokens
        if nxt is not None and seen >= nxt and not done:
            count += 1
            nxt = (seen // every + 1) * every
        if done:
            break
    return count + 1


# ---- formatting ---------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    """Decimal units, as disks are sold: 1.84 TB."""
    if n is None:
        return "unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "unknown"
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h {m:02d} min"
    d, h = divmod(round(s / 3600), 24)
    return f"{d} d {h} h"


def free_bytes(folder: Path) -> int | None:
    """Free space where `folder` is (or would be) created."""
    p = folder.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None
