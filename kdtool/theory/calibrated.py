"""Using a calibration (predict --calibration): read calib.json, pick a fit, map L* to nats with a band.

A calibration maps one SAE's importance units to nats (floor = C L* + B, paper section 6.3);
`scale_mismatch` flags a prediction that is not the one the calibration was fit on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from kdtool.errors import BadInput
from kdtool.formats import read_json

#: the kind calib.json carries (written by `kdtool calibrate -o`).
KIND = "kdtool.calibration"


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read calib.json and check it is one."""
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"{p}: is a folder, expected calib.json")
    obj = read_json(p)
    if obj.get("kind") != KIND:
        raise BadInput(f"{p}: not a calibration file (kind={obj.get('kind')!r}; make one with kdtool calibrate -o)")
    return obj


def fit_params(calib: dict[str, Any], fit: str, path: str | os.PathLike = "calibration") -> dict[str, Any]:
    """C, B and bootstrap samples of one of the floor-scale fits (linear has B = 0)."""
    if fit not in ("linear", "affine", "affine_fixed"):
        raise BadInput(f"--fit: {fit!r} cannot map a predicted floor to nats (use affine, affine_fixed or linear)")
    entry = calib.get(fit)
    if not isinstance(entry, dict) or "C" not in entry:
        reason = entry.get("skipped") if isinstance(entry, dict) else "missing"
        raise BadInput(f"{path}: has no {fit} fit ({reason})")
    c = float(entry["C"])
    b = float(entry.get("B", 0.0))
    samples = (entry.get("bootstrap") or {}).get("samples") or {}
    cs = np.asarray(samples.get("C", []), dtype=np.float64)
    if fit == "affine":
        bs = np.asarray(samples.get("B", []), dtype=np.float64)
    else:
        bs = np.full(cs.shape, b)
    if cs.shape != bs.shape:
        raise BadInput(f"{path}: {fit} bootstrap samples of C and B differ in length")
    return {"fit": fit, "C": c, "B": b, "C_samples": cs, "B_samples": bs}


def calibrated_floor(params: dict[str, Any], floors: np.ndarray):
    """floor_kl = C L* + B; band = 2.5th / 97.5th percentiles of C_b L* + B_b over bootstrap samples b.

    The band is pointwise (per width) and reflects the fit's parameter uncertainty only.
    Without samples the band is None.
    """
    floors = np.asarray(floors, dtype=np.float64)
    mid = params["C"] * floors + params["B"]
    cs, bs = params["C_samples"], params["B_samples"]
    if cs.size == 0:
        return mid, None, None
    curves = cs[:, None] * floors[None, :] + bs[:, None]  # [samples, widths]
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    return mid, lo, hi


def scale_mismatch(calib: dict[str, Any], widths, floors, *, rtol: float = 0.05) -> list[str]:
    """Widths where this prediction differs from the predicted floor the calibration was fit on.

    A calibration maps one SAE's importance units to nats; applied to another it is meaningless.
    """
    fitted = {int(p["width"]): p.get("predicted") for p in calib.get("points", []) if p.get("predicted") is not None}
    out = []
    for w_, f_ in zip(np.asarray(widths).tolist(), np.asarray(floors).tolist(), strict=True):
        ref = fitted.get(int(w_))
        if ref is not None and not math.isclose(f_, ref, rel_tol=rtol, abs_tol=1e-12):
            out.append(f"width {w_}: predicted floor {f_:.4g} here vs {ref:.4g} in the calibration")
    return out
