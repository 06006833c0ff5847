"""Which SAE trial each layer of a run's stats files measures, told from how its SAE was trained.

A trial is one set of training settings applied to a run's layers: lambda or the L0 controller,
width, seeds, learning rate, batch, normalisation, teacher, data and training tokens (the authors'
three trials A, B and C differ in lambda only). Each layer entry of a stats file records them
(`trained`, kdtool/sae/record.py). File names are never used: two trials' layers may sit in one
file, and one trial's layers in several. A layer without a record (an SAE of another layout, or a
stats file older than the record) is a trial of its own per file, labelled as such.

A trial whose lambda settings equal a preset of kdtool/data/presets/paper-sae-trials.toml (and
trained on raw activations, as the presets mean) is named after it: "A (dense)". Others are
described: "lambda 3e-4", "L0 -> 150 from lambda 5e-4 (rate 0.01)". When several trials share a
description, the settings that tell them apart are added ("A (dense), d_sae 4,096").
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.parsing import short_float
from kdtool.reproduce import presets
from kdtool.reproduce.stage import compact
from kdtool.sae.record import FIELDS
from kdtool.sae.summary import entries


@functools.cache
def _paper_trials() -> dict:
    """The preset trials of kdtool/data/presets/paper-sae-trials.toml, parsed once per process (read only)."""
    return presets.load("paper-sae-trials")["trials"]


#: what a label names after the lambda settings, in this order, when they tell trials apart
_DETAIL = ("d_sae", "tokens", "init_seed", "data_seed", "normalize", "lr", "batch_tokens", "model", "dataset")


@dataclass
class TrialLayer:
    """One layer of a trial: its stats summary and the file it came from."""

    layer: int
    summary: dict
    path: Path


@dataclass
class Trial:
    """The layers measured of one training run's settings."""

    key: str  # canonical JSON of the training record (or of the file, without one): what `select` matches
    record: dict | None
    preset: str | None  # the matching preset trial of paper-sae-trials.toml ("A"), if any
    label: str
    layers: list[TrialLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return list(dict.fromkeys(t.path for t in self.layers))

    def values(self, key: str) -> list[float]:
        """One metric of the stats summaries, layer by layer (NaN where missing)."""
        out = []
        for t in self.layers:
            v = t.summary.get(key)
            out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
        return out

    def headline(self) -> dict[str, float]:
        """The project page's headline card: layers, mean alpha, mean L0, mean g, mean d*, total dead of all
        latents (NaN where no layer has the number; means over the layers that have it)."""
        dead, total = self.values("dead"), self.values("d_sae")
        pairs = [(d, n) for d, n in zip(dead, total, strict=True) if math.isfinite(d) and math.isfinite(n)]
        n_dead, n_all = sum(d for d, _ in pairs), sum(n for _, n in pairs)
        return {
            "layers": len(self.layers),
            "mean_alpha": _mean(self.values("alpha")),
            "mean_l0": _mean(self.values("L0")),
            "mean_g": _mean(self.values("g")),
            "mean_d_star": _mean(self.values("d_star")),
            "total_dead": n_dead if pairs else math.nan,
            "total_latents": n_all if pairs else math.nan,
            "dead_fraction": n_dead / n_all if pairs and n_all else math.nan,
        }


def _mean(values: list[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else math.nan


def layer_entries(path: Path) -> list[tuple[int, dict]]:
    """(layer, summary) of every SAE entry a stats file's metadata holds (kdtool/sae/summary.py: old and new forms)."""
    meta = formats.parquet_metadata(path)
    if meta.get("kind") != "kdtool.stats":
        raise BadInput(f"{path}: not a `kdtool stats` file (kind {meta.get('kind')!r})")
    # every SAE of the file (several per layer too: each width or lambda is its own trial), but not train-sae's
    # token checkpoints: an earlier state of a trial (the tokens axis of `plot sensitivity`), not a trial
    return [(e.layer, e.info) for e in entries(meta.get("summary")) if not e.info.get("checkpoint")]


def record_of(entry: dict) -> dict | None:
    """The training record of one layer entry, None without one.

    The SAE folder the entry names is not read instead: its path was relative to wherever `stats` ran,
    and the folder may hold another SAE by now; a wrong trial would be worse than none.
    """
    return entry["trained"] if isinstance(entry.get("trained"), dict) else None


def preset_trial(record: dict | None) -> str | None:
    """The preset trial (paper-sae-trials.toml) with these lambda settings, on raw activations; None otherwise."""
    if not record or record.get("normalize", "none") != "none" or not isinstance(record.get("l1"), (int, float)):
        return None
    have = record.get("target_l0")
    for name, opts in _paper_trials().items():
        want = opts.get("target-l0")
        if not math.isclose(record["l1"], float(opts["l1"]), rel_tol=1e-9):
            continue
        if (want is None) != (have is None) or (want is not None and float(want) != float(have)):
            continue
        if want is None or math.isclose(float(opts.get("l1-rate", 0.01)), record.get("l1_rate") or 0, rel_tol=1e-9):
            return name
    return None


def trials(paths: list[Path]) -> list[Trial]:
    """The trials measured in these stats files, in preset order (A, B, C, ...) then by label."""
    found: dict[str, Trial] = {}
    for path in paths:
        path = Path(path)
        for layer, entry in layer_entries(path):
            record = record_of(entry)
            key = _key(record) if record else json.dumps({"file": str(path)})
            trial = found.get(key)
            if trial is None:
                preset = preset_trial(record)
                trial = found[key] = Trial(key, record, preset, _describe(record, preset, path))
            if any(t.layer == layer for t in trial.layers):
                trial.notes.append(f"{path}: layer {layer} measured again; the first measurement is kept")
                continue
            trial.layers.append(TrialLayer(layer, entry, path))
    out = list(found.values())
    for t in out:
        t.layers.sort(key=lambda x: x.layer)
    _tell_apart(out)
    order = list(_paper_trials())
    out.sort(key=lambda t: (order.index(t.preset) if t.preset in order else len(order), t.label))
    return out


def select(paths: list[Path], key: str | None) -> list[Trial]:
    """The trials of these files; only the one with `key` when given (BadInput when none has it)."""
    found = trials(paths)
    if key is None:
        return found
    chosen = [t for t in found if t.key == key]
    if not chosen:
        raise BadInput(f"no trial {key} in {', '.join(str(p) for p in paths)}")
    return chosen


def _key(record: dict) -> str:
    return json.dumps({k: record.get(k) for k in FIELDS}, sort_keys=True)


def _describe(record: dict | None, preset: str | None, path: Path) -> str:
    if record is None:
        return f"{path.name} (no training record)"
    if preset is not None:
        name = _paper_trials()[preset].get("name")
        return f"{preset} ({name})" if name else preset
    lam = _num(record.get("l1"))
    if record.get("target_l0") is not None:
        text = f"L0 -> {_num(record['target_l0'])} from lambda {lam} (rate {_num(record.get('l1_rate'))})"
    else:
        text = f"lambda {lam}"
    return text + (f" on x / s ({record['normalize']})" if record.get("normalize", "none") != "none" else "")


def _tell_apart(found: list[Trial]) -> None:
    """Add to labels shared by several trials the settings in which those trials differ."""
    by_label: dict[str, list[Trial]] = {}
    for t in found:
        by_label.setdefault(t.label, []).append(t)
    for same in by_label.values():
        if len(same) < 2 or any(t.record is None for t in same):
            continue
        differ = [k for k in _DETAIL if len({json.dumps(t.record.get(k)) for t in same}) > 1]
        for t in same:
            t.label += "".join(f", {k} {_value(k, t.record.get(k))}" for k in differ)


def _value(key: str, v: Any) -> str:
    if key == "tokens" and isinstance(v, int):
        return compact(v)
    if key in ("d_sae", "batch_tokens") and isinstance(v, int):
        return f"{v:,}"
    return _num(v) if isinstance(v, float) else str(v)


def _num(v: Any) -> str:
    return short_float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
