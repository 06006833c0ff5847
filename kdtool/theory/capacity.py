"""Capacity models for Eq. 2: how many features per dimension a student keeps, F_S = floor(d_S * g_hat(alpha)).

The paper's model is g_hat = g(alpha) (Eq. 1). Trained toy models keep far fewer features than that
(docs/toy.md), so `kdtool predict --capacity` takes other models, named so that every output can say
which one it used:

    paper        g_hat = g(alpha) = 1 / ((1-alpha) ln(1/(1-alpha)))       (the default)
    naive        g_hat = 1: one feature per dimension
    power:K,P    g_hat = K * g(alpha)^P                                   (K > 0; P = 1, K = 1 is the paper's)
    FILE         a capacity file (kind kdtool.capacity) holding one of the above with what it was fitted on

An independent audit of the toy fits g_hat = 1.03 g(alpha)^0.53 for Zipf importances: an example of
`power:1.03,0.53` (docs/theory.md), not a default. `kdtool toy --fit-capacity` writes a capacity file;
a survival measurement on a language model can write the same format (`document` builds it, with
per-alpha values where they were measured). Format: docs/formats.md.

numpy only: `kdtool predict` must start fast.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdtool import formats, kinds
from kdtool.errors import BadInput
from kdtool.theory import theorem as theory

KIND = "kdtool.capacity"
Model = Literal["paper", "naive", "power"]
FORMULAS = {
    "paper": "g_hat = g(alpha) = 1 / ((1-alpha) ln(1/(1-alpha)))",
    "naive": "g_hat = 1",
    "power": "g_hat = k * g(alpha)^p",
}


@dataclass(frozen=True)
class CapacityModel:
    """One capacity model: g_hat(alpha), and where it came from (a spec typed by the user or a capacity file)."""

    model: Model = "paper"
    k: float = 1.0  # power: the factor K
    p: float = 1.0  # power: the exponent P
    file: str | None = None  # the capacity file it was read from
    fitted_on: dict[str, Any] | None = None  # the file's account of what it was fitted on
    per_alpha: list[dict[str, Any]] = field(default_factory=list)  # the file's measured values per alpha

    def __post_init__(self) -> None:
        if self.model not in FORMULAS:
            raise BadInput(f"unknown capacity model {self.model!r} (use paper, naive or power)")
        if self.model == "power" and not (_positive(self.k) and math.isfinite(self.p)):
            raise BadInput(f"power capacity needs K > 0 and a finite P, got K={self.k}, P={self.p}")

    def g_hat(self, alpha: float) -> float:
        """Features per dimension at sparsity alpha (warns below 1 - 1/e, where g(alpha) is not monotone)."""
        if self.model == "naive":
            return 1.0
        g = float(theory.g(alpha))
        return g if self.model == "paper" else self.k * g**self.p

    @property
    def spec(self) -> str:
        """The model as --capacity would take it: paper, naive or power:K,P."""
        return self.model if self.model != "power" else f"power:{self.k:.6g},{self.p:.6g}"

    @property
    def label(self) -> str:
        """What outputs print: the spec, and the file it came from."""
        return self.spec if self.file is None else f"{self.spec} from {self.file}"

    def describe(self) -> dict[str, Any]:
        """The model as predict's summary records it."""
        out: dict[str, Any] = {"model": self.model, "formula": FORMULAS[self.model], "spec": self.spec}
        if self.model == "power":
            out.update({"k": self.k, "p": self.p})
        if self.file is not None:
            out.update({"file": self.file, "fitted_on": self.fitted_on})
        return out


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def parse(spec: str) -> CapacityModel:
    """--capacity: paper | naive | power:K,P | a capacity file (a path that exists)."""
    text = str(spec).strip()
    if text in ("paper", "naive"):
        return CapacityModel(text)  # type: ignore[arg-type]
    if text.startswith("power:"):
        bits = text.removeprefix("power:").split(",")
        try:
            k, p = (float(b) for b in bits)
        except ValueError:
            raise BadInput(f"--capacity {text!r}: use power:K,P with two numbers, e.g. power:1.03,0.53") from None
        if not _positive(k) or not math.isfinite(p):
            raise BadInput(f"--capacity {text!r}: K must be > 0 and P finite")
        return CapacityModel("power", k=k, p=p)
    if Path(text).is_file():
        return read(text)
    raise BadInput(
        f"--capacity {text!r}: not paper, naive or power:K,P, and no such capacity file "
        "(kdtool toy --fit-capacity writes one)"
    )


def read(path: str | os.PathLike) -> CapacityModel:
    """A capacity file (kind kdtool.capacity) as a model; BadInput naming the file when it is not one."""
    kinds.expect(path, KIND, "--capacity", allow_unmarked=False)
    obj = formats.read_json(path)
    model = obj.get("model")
    params = obj.get("params") if isinstance(obj.get("params"), dict) else {}
    try:
        k, p = float(params.get("k", 1.0)), float(params.get("p", 1.0))
    except (TypeError, ValueError):
        raise BadInput(f"{path}: params k and p must be numbers, got {params}") from None
    if model not in FORMULAS:
        raise BadInput(f"{path}: unknown capacity model {model!r} (paper, naive or power)")
    per_alpha = obj.get("per_alpha") if isinstance(obj.get("per_alpha"), list) else []
    return CapacityModel(model, k=k, p=p, file=str(path), fitted_on=obj.get("fitted_on"), per_alpha=per_alpha)


def document(
    model: CapacityModel, *, fitted_on: dict[str, Any], per_alpha: list[dict[str, Any]], provenance: dict | None
) -> dict[str, Any]:
    """The JSON object of a capacity file (docs/formats.md): the model, its parameters and its evidence.

    fitted_on says what was measured (source command, input file, method, points, alphas, rules);
    per_alpha lists {alpha, g, g_hat, points, ...} where a value was measured at that alpha.
    """
    params = {"k": model.k, "p": model.p} if model.model == "power" else {}
    return {
        "kind": KIND,
        "model": model.model,
        "formula": FORMULAS[model.model],
        "params": params,
        "spec": model.spec,
        "fitted_on": fitted_on,
        "per_alpha": per_alpha,
        "provenance": provenance,
    }


def write(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Write a capacity file atomically."""
    formats.write_json(path, doc)
