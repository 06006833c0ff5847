"""The toy sweep's files: the part store (one Parquet part per finished configuration), resume and the merge.

Each finished configuration is written at once as a part file (<output>.parts/<slug>.parquet,
atomically), so a killed sweep loses only the chunks in flight; `load` (--resume) collects
configurations whose part (or rows in an existing output) were made with the same settings
(kdtool.toy.config.settings_id) and refuses others; `merge` concatenates the parts into the output
(and OUTPUT-stem.curves.parquet) atomically and removes them. Formats: docs/formats.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.toy.config import ToyConfigKey

KIND = "kdtool.toy"
CURVES_KIND = "kdtool.toy.curves"
ROW_KEYS = ("n", "d_teacher", "alpha", "d_student", "seed")


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def curves_path(output: Path) -> Path:
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + ".curves.parquet")


def _columns_to_numpy(cols: dict[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for name, values in cols.items():
        if name in ("role", "target"):
            out[name] = np.asarray(values, dtype=object).astype(str)
        elif name in ("n", "d_teacher", "d_student", "seed", "features_kept", "steps", "step"):
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            out[name] = np.asarray(values, dtype=np.float64)
    return out


def _select(cols: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in cols.items()}


def _key_mask(cols, key: ToyConfigKey) -> np.ndarray:
    return (
        (cols["n"] == key.n)
        & (cols["d_teacher"] == key.d_teacher)
        & np.isclose(cols["alpha"], key.alpha, rtol=0, atol=1e-12)
    )


class PartStore:
    """Completed configurations of one sweep: part files beside the output, plus a previous output."""

    def __init__(self, output: Path, settings: str, provenance: dict):
        self.output, self.settings, self.provenance = Path(output), settings, provenance
        self.dir = parts_dir(self.output)
        self.rows: dict[str, dict] = {}  # slug -> numpy columns
        self.curves: dict[str, dict] = {}

    def clear(self) -> int:
        """Forget an earlier run's parts (no --resume). Returns how many were discarded."""
        count = len(list(self.dir.glob("*.parquet"))) if self.dir.exists() else 0
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return count

    def load(self, keys: list[ToyConfigKey]) -> list[ToyConfigKey]:
        """--resume: collect finished configurations among `keys`; refuse parts made with other settings."""
        wanted = {k.slug: k for k in keys}
        if self.output.exists():
            meta = formats.parquet_metadata(self.output)
            if meta["kind"] == KIND and (meta["summary"] or {}).get("settings") == self.settings:
                cols = formats.read_table(self.output)
                cpath = curves_path(self.output)
                ccols = formats.read_table(cpath) if cpath.exists() else None
                for slug, k in wanted.items():
                    mask = _key_mask(cols, k)
                    if mask.any():
                        self.rows[slug] = _select(cols, mask)
                        if ccols is not None and _key_mask(ccols, k).any():
                            self.curves[slug] = _select(ccols, _key_mask(ccols, k))
            elif meta["kind"] == KIND:
                raise BadInput(
                    f"{self.output}: made with different training settings; rerun without --resume "
                    "or write to another -o"
                )
        if self.dir.exists():
            for path in sorted(self.dir.glob("*.parquet")):
                slug = path.name.removesuffix(".curves.parquet").removesuffix(".parquet")
                if slug not in wanted:
                    continue
                meta = formats.parquet_metadata(path)
                if (meta["summary"] or {}).get("settings") != self.settings:
                    raise BadInput(f"{path}: made with different training settings; rerun without --resume")
                target = self.curves if path.name.endswith(".curves.parquet") else self.rows
                target[slug] = formats.read_table(path)
        return [wanted[s] for s in wanted if s in self.rows]

    def add(self, slug: str, rows: dict[str, list], curves: dict[str, list] | None) -> None:
        """Write a finished configuration's parts: its curves first, its rows last.

        The rows part is what marks the configuration done (`load`), so a kill between the two
        writes leaves it pending (trained again, curves and all), never done without its curves.
        """
        meta = {"settings": self.settings, "config": slug}
        if curves is not None:
            self.curves[slug] = _columns_to_numpy(curves)
            formats.write_parquet(
                self.dir / f"{slug}.curves.parquet",
                self.curves[slug],
                kind=CURVES_KIND + ".part",
                provenance=self.provenance,
                summary=meta,
            )
        self.rows[slug] = _columns_to_numpy(rows)
        formats.write_parquet(
            self.dir / f"{slug}.parquet", self.rows[slug], kind=KIND + ".part", provenance=self.provenance, summary=meta
        )

    def table(self, keys: list[ToyConfigKey], store: dict[str, dict]) -> dict[str, np.ndarray] | None:
        present = [store[k.slug] for k in keys if k.slug in store]
        if not present:
            return None
        cols = {c: np.concatenate([p[c] for p in present]) for c in present[0]}
        order = np.lexsort(tuple(cols[c] for c in reversed(ROW_KEYS)))
        if "step" in cols:
            order = np.lexsort((cols["step"], cols["role"], *(cols[c] for c in reversed(ROW_KEYS))))
        return {c: v[order] for c, v in cols.items()}

    def merge(self, keys: list[ToyConfigKey], summary: dict, want_curves: bool) -> dict[str, np.ndarray]:
        """Write the output (and curves) from every configuration of `keys`, then remove the parts."""
        cols = self.table(keys, self.rows)
        formats.write_parquet(
            self.output, cols, kind=KIND, provenance=self.provenance, summary={**summary, "settings": self.settings}
        )
        if want_curves:
            ccols = self.table(keys, self.curves)
            if ccols is not None:
                formats.write_parquet(
                    curves_path(self.output),
                    ccols,
                    kind=CURVES_KIND,
                    provenance=self.provenance,
                    summary={"settings": self.settings},
                )
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return cols
