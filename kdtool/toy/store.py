"""The toy sweep's files: the part store (Parquet parts per finished configuration), resume and the merge.

Each finished configuration is written at once as part files (<output>.parts/<slug>.survival.parquet,
then <slug>.curves.parquet, then <slug>.parquet, each atomically: the rows part, written last, marks
the configuration done), so a killed sweep loses only the chunks in flight; `load` (--resume) collects
configurations whose rows and survival records (parts, or an existing output and its survival file)
were made with the same settings (kdtool.toy.config.settings_id) and refuses others; `merge`
concatenates the parts into the output, OUTPUT-stem.survival.parquet (and OUTPUT-stem.curves.parquet)
atomically and removes them. Formats: docs/formats.md.
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
SURVIVAL_KIND = "kdtool.toy.survival"
ROW_KEYS = ("n", "d_teacher", "alpha", "d_student", "seed")
_PART_SUFFIXES = (".curves.parquet", ".survival.parquet", ".parquet")


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _beside(output: Path, suffix: str) -> Path:
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + suffix)


def curves_path(output: Path) -> Path:
    """OUTPUT-stem.curves.parquet: the training curves beside the toy table (--log-curves)."""
    return _beside(output, ".curves.parquet")


def survival_path(output: Path) -> Path:
    """OUTPUT-stem.survival.parquet: the per-feature records beside the toy table."""
    return _beside(output, ".survival.parquet")


def _columns_to_numpy(cols: dict[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for name, values in cols.items():
        if name in ("role", "target"):
            out[name] = np.asarray(values, dtype=object).astype(str)
        elif name in ("n", "d_teacher", "d_student", "seed", "features_kept", "steps", "step", "feature"):
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
        self.survival: dict[str, dict] = {}

    def clear(self) -> int:
        """Forget an earlier run's parts (no --resume). Returns how many were discarded."""
        count = len(list(self.dir.glob("*.parquet"))) if self.dir.exists() else 0
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return count

    def load(self, keys: list[ToyConfigKey]) -> list[ToyConfigKey]:
        """--resume: collect finished configurations among `keys`; refuse parts made with other settings.

        A configuration is finished when its rows and its survival records are both there (an output
        written before kdtool recorded survival, or a part whose survival file is missing, is trained again).
        """
        wanted = {k.slug: k for k in keys}
        if self.output.exists():
            meta = formats.parquet_metadata(self.output)
            if meta["kind"] == KIND and (meta["summary"] or {}).get("settings") == self.settings:
                self._load_output(wanted)
            elif meta["kind"] == KIND:
                raise BadInput(
                    f"{self.output}: made with different training settings; rerun without --resume "
                    "or write to another -o"
                )
        if self.dir.exists():
            for path in sorted(self.dir.glob("*.parquet")):
                suffix = next(x for x in _PART_SUFFIXES if path.name.endswith(x))
                slug = path.name.removesuffix(suffix)
                if slug not in wanted:
                    continue
                meta = formats.parquet_metadata(path)
                if (meta["summary"] or {}).get("settings") != self.settings:
                    raise BadInput(f"{path}: made with different training settings; rerun without --resume")
                target = {".curves.parquet": self.curves, ".survival.parquet": self.survival}.get(suffix, self.rows)
                target[slug] = formats.read_table(path)
        for slug in [s for s in self.rows if s not in self.survival]:
            del self.rows[slug]  # no survival records: train it again
        return [wanted[s] for s in wanted if s in self.rows]

    def _load_output(self, wanted: dict[str, ToyConfigKey]) -> None:
        """Rows, survival records and curves of the wanted configurations from an existing output."""
        spath, cpath = survival_path(self.output), curves_path(self.output)
        scols = None
        if spath.exists():
            smeta = formats.parquet_metadata(spath)
            if smeta["kind"] == SURVIVAL_KIND and (smeta["summary"] or {}).get("settings") == self.settings:
                scols = formats.read_table(spath)
        if scols is None:
            return
        cols = formats.read_table(self.output)
        ccols = formats.read_table(cpath) if cpath.exists() else None
        for slug, k in wanted.items():
            mask, smask = _key_mask(cols, k), _key_mask(scols, k)
            if mask.any() and smask.any():
                self.rows[slug] = _select(cols, mask)
                self.survival[slug] = {c: v for c, v in _select(scols, smask).items() if c != "kept"}
                if ccols is not None and _key_mask(ccols, k).any():
                    self.curves[slug] = _select(ccols, _key_mask(ccols, k))

    def add(self, slug: str, rows: dict[str, list], curves: dict[str, list] | None, survival: dict) -> None:
        """Write one finished configuration's parts: survival records, curves, then the rows (the done marker)."""
        meta = {"settings": self.settings, "config": slug}
        self.survival[slug] = _columns_to_numpy(survival)
        formats.write_parquet(
            self.dir / f"{slug}.survival.parquet",
            self.survival[slug],
            kind=SURVIVAL_KIND + ".part",
            provenance=self.provenance,
            summary=meta,
        )
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
        elif "feature" in cols:  # survival: per seed the teacher first, then students by width; features by rank
            teacher_last = cols["role"] != "teacher"
            keys = (cols["n"], cols["d_teacher"], cols["alpha"], cols["seed"], teacher_last, cols["d_student"])
            order = np.lexsort((cols["feature"], *reversed(keys)))
        return {c: v[order] for c, v in cols.items()}

    def merge(
        self, keys: list[ToyConfigKey], summary: dict, want_curves: bool, survival: tuple[dict, dict]
    ) -> dict[str, np.ndarray]:
        """Write the output, its survival file (and curves) from every configuration of `keys`; remove the parts.

        survival = (columns, summary) of OUTPUT-stem.survival.parquet: the caller adds the `kept` column.
        """
        cols = self.table(keys, self.rows)
        scols, ssummary = survival
        formats.write_parquet(
            survival_path(self.output),
            scols,
            kind=SURVIVAL_KIND,
            provenance=self.provenance,
            summary={**ssummary, "settings": self.settings},
        )
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
