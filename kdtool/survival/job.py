"""`kdtool survival`'s job, callable from Python: which teacher features each student keeps.

Two entry points, both driven by one `SurvivalConfig`:

- `survival(teacher, students, saes, batches, cfg)` works on models in memory: each a
  kdtool.survival.stream.ModelActs (any callable from token ids to layer activations), so a test
  can plant a student, and issue 12 can score students trained with another loss without saving them;
- `survival_files(inputs, cfg)` loads the teacher, the SAEs (any layout kdtool reads), the students
  (a `kdtool distill` folder of width{W}/ and width{W}-{loss}/ models and/or model folders) and the held-out text, runs
  `survival`, and writes survival.parquet (docs/formats.md) atomically.

The pipeline: stream.measure (one pass: fit the maps, then measure), ranking (importance ranks and
F_S from a stats file or from the same tokens), summary (per-feature rows and the per-width table).
Definitions and caveats: docs/survival.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kdtool import formats
from kdtool import provenance as _provenance
from kdtool.distill.objectives import DEFAULT as DEFAULT_LOSS
from kdtool.distill.objectives import NAMES
from kdtool.errors import BadInput
from kdtool.kinds import expect
from kdtool.models import ModelSpec, load_model
from kdtool.sae.layouts import LoadedSAE
from kdtool.sae.stats import load_saes
from kdtool.survival import ranking as rk
from kdtool.survival import summary as sm
from kdtool.survival.config import SurvivalConfig
from kdtool.survival.stream import ModelActs, hf_acts, measure
from kdtool.text.tokens import DataSpec, token_batches

Notify = Callable[[str], None]


@dataclass
class SurvivalResult:
    columns: dict  # survival.parquet's columns (summary.COLUMNS)
    summary: dict  # its summary metadata: rows (per layer and model), layers, tokens, config, notes
    provenance: dict | None = None

    @property
    def rows(self) -> list[dict]:
        return self.summary["rows"]


def survival(
    teacher: ModelActs,
    students: list[ModelActs],
    saes: list[LoadedSAE],
    batches: Iterable,
    cfg: SurvivalConfig,
    *,
    stats: str | Path | None = None,
    device="cpu",
    on_progress: Callable[[int], None] | None = None,
) -> SurvivalResult:
    """Survival of every SAE feature in every student (and the teacher, identity map) on `batches` of token ids.

    saes: one per layer, each with its `layer` set. stats: a `kdtool stats` file for the importance
    ranks and alpha; without it they are measured on the measurement tokens.
    """
    if not students:
        raise BadInput("--students: no student to measure (give a `kdtool distill` folder or model folders)")
    by_layer = {}
    for sae in saes:
        if sae.layer in by_layer:
            raise BadInput(f"--sae: two SAEs for layer {sae.layer}; survival reads one SAE per layer")
        if sae.d_in != teacher.width:
            raise BadInput(f"{sae.path}: SAE expects d_in={sae.d_in} but the teacher has d_model={teacher.width}")
        by_layer[sae.layer] = sae.to(device)
    m = measure(teacher, students, by_layer, batches, cfg, device=device, on_progress=on_progress)
    notes, parts, rows, layers = list(m.notes), [], [], {}
    models = [teacher, *sorted(students, key=lambda s: student_order(s.width, s.loss, s.seed, s.name))]
    for L, sae in sorted(by_layer.items()):
        if stats is not None:
            ranking = rk.from_stats(stats, L, sae.d_sae, sae.path)
        else:
            ranking = rk.measured(L, m.teacher[L].importance(), m.tokens_measured)
        g_value, why = ranking.capacity(cfg.capacity)
        notes += why
        fires = m.teacher[L].fires.cpu().numpy()
        layers[str(L)] = {"sae": str(sae.path), "d_sae": sae.d_sae, "F": ranking.n_alive, "alpha": ranking.alpha}
        layers[str(L)] |= {"g": g_value, "importance_source": ranking.source, "fire_at": m.fire_at[L]}
        for model in models:
            match = m.matches[(model.name, L)].result(m.teacher[L])
            cols, row = sm.model_rows(ranking, fires, match, model, g_value, cfg)
            amap = m.maps[(model.name, L)]
            row |= {"ridge": amap.ridge, "ridge_penalty": amap.penalty}
            row["ridge_validation"] = {f"{r:g}": v for r, v in amap.validation.items()}
            parts.append(cols)
            rows.append(row)
    summary = {
        "rows": rows,
        "layers": layers,
        "tokens": {"fit": m.tokens_fit, "measured": m.tokens_measured},
        "importance_source": "stats" if stats is not None else "measured",
        "config": cfg.as_dict(),
        "notes": notes,
    }
    return SurvivalResult(sm.concat(parts), summary)


@dataclass(frozen=True)
class SurvivalInputs:
    """What `kdtool survival` reads: the teacher, its SAEs, the students, the held-out text."""

    saes: tuple[Path, ...]  # --sae: SAE folders (any layout) or folders of them; one SAE per layer
    students: tuple[Path, ...]  # --students: `kdtool distill` output folders and/or model folders
    teacher: ModelSpec = field(default_factory=ModelSpec)  # the shared --model/--dtype/--device/... flags
    data: DataSpec = field(default_factory=DataSpec)  # the shared --dataset/... flags; only its eval hold-out is read
    stats: Path | None = None  # --stats: importance ranks and alpha; None: measured on the same tokens
    layers: tuple[int, ...] | None = None  # --layer: one per SAE, overriding their files
    output: Path = Path("survival.parquet")  # -o


#: a `kdtool distill` student folder: width{W} (kl) or width{W}-{loss slug} (kdtool/distill/objectives.py)
STUDENT_FOLDER = re.compile(r"width(\d+)(?:-([a-z0-9.-]+))?")


def _loss_rank(loss: str | None) -> int:
    """--help order of the loss names (kl first); a student of unknown loss after every known one."""
    base = (loss or "").partition(":")[0]
    return NAMES.index(base) if base in NAMES else len(NAMES)


def student_order(width: int, loss: str | None, seed: int | None, name: str) -> tuple:
    """Students narrowest first; at one width kl first, then the other losses in --help order, then by seed."""
    return (width, _loss_rank(loss), -1 if seed is None else seed, name)


def find_students(path: str | Path) -> list[Path]:
    """A model folder as itself; a `kdtool distill` folder as every student it wrote (width{W}/ for kl,
    width{W}-{loss}/ for the others), narrowest first, kl first at each width."""
    p = Path(path)
    if (p / "config.json").is_file():
        return [p]
    if p.is_dir():
        subs = [s for s in p.iterdir() if STUDENT_FOLDER.fullmatch(s.name) and (s / "config.json").is_file()]
        if subs:
            return sorted(subs, key=_folder_order)
        raise BadInput(f"--students {p}: no width{{W}}[-{{loss}}]/ student folders and no config.json (a model folder)")
    why = "not a folder (give the distill run's folder)" if p.exists() else "no such folder"
    raise BadInput(f"--students {p}: {why}")


def _folder_order(folder: Path) -> tuple:
    return student_order(int(STUDENT_FOLDER.fullmatch(folder.name)[1]), *student_identity(folder), folder.name)


def student_identity(path: Path) -> tuple[str | None, int | None]:
    """(loss label, seed) of a student folder from its kdtool.json (`kdtool distill` writes the loss and the
    seed in its floors row); a distill student from before --loss existed trained on kl; a model folder
    without kdtool.json is (None, None)."""
    info_path = Path(path) / "kdtool.json"
    if not info_path.is_file():
        return None, None
    try:
        info = formats.read_json(info_path)
    except (OSError, ValueError):
        return None, None
    if not isinstance(info, dict) or info.get("kind") != "kdtool.distill.student":
        return None, None
    floor = info.get("floor") if isinstance(info.get("floor"), dict) else {}
    objective = info.get("objective") if isinstance(info.get("objective"), dict) else {}
    loss = objective.get("loss") or floor.get("loss") or DEFAULT_LOSS
    seed = floor.get("seed", (info.get("provenance") or {}).get("seed"))
    return str(loss), None if seed is None else int(seed)


def _load_students(paths: list[Path], spec: ModelSpec, teacher, layers: list[int], notify: Notify) -> list[ModelActs]:
    """Each student folder as a ModelActs at the teacher's layers (same device and dtype as the teacher)."""
    names = [p.name for p in paths]
    if len(set(names)) != len(names):  # two distill runs both have width64/: name them by path
        names = [str(p) for p in paths]
    out = []
    for path, name in zip(paths, names, strict=True):
        student = load_model(dataclasses.replace(spec, model=str(path)), notify=notify)
        if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
            raise BadInput(f"--students {path}: its tokenizer is not the teacher's (a student of another teacher?)")
        loss, seed = student_identity(path)
        trained = "" if loss is None else f", loss {loss}" + ("" if seed is None else f", seed {seed}")
        notify(f"student {name}: width {student.d_model}, {student.n_layers} blocks{trained}")
        out.append(
            hf_acts(student.model, name, "student", layers, teacher.n_layers, student.d_model, loss=loss, seed=seed)
        )
    return out


def survival_files(
    inputs: SurvivalInputs,
    cfg: SurvivalConfig,
    *,
    load_teacher: Callable[[ModelSpec], object] | None = None,
    provenance: Callable[..., dict] = _provenance.make,
    notify: Notify | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> SurvivalResult:
    """Load everything `inputs` names, measure survival, write inputs.output (Parquet, kind kdtool.survival)."""
    say = notify or (lambda _msg: None)
    if not formats.is_parquet(inputs.output):
        raise BadInput(f"--output {inputs.output}: survival is written as Parquet (.parquet)")
    if inputs.stats is not None:
        if not Path(inputs.stats).is_file():
            raise BadInput(f"--stats {inputs.stats}: no such file")
        expect(inputs.stats, "kdtool.stats", "--stats")
    for given in inputs.students:
        # a student folder, or a distill run's folder (known by its floors table); a model folder records no kind
        expect(given, ("kdtool.distill.student", "kdtool.distill.floors"), "--students")
    _, saes = load_saes(list(inputs.saes), None if inputs.layers is None else list(inputs.layers))
    student_paths = [p for given in inputs.students for p in find_students(given)]
    if not student_paths:
        raise BadInput("--students: give a `kdtool distill` folder or model folders")
    loaded = (load_teacher or (lambda spec: load_model(spec, notify=say)))(inputs.teacher)
    layers = sorted({s.layer for s in saes})
    bad = [L for L in layers if not 0 <= L <= loaded.n_layers]
    if bad:
        raise BadInput(
            f"--sae/--layer: layer(s) {bad} out of range: the teacher has hidden_states[0..{loaded.n_layers}]"
        )
    teacher_spec = dataclasses.replace(inputs.teacher, device=str(loaded.device))
    students = _load_students(student_paths, teacher_spec, loaded, layers, say)
    teacher = hf_acts(loaded.model, "teacher", "teacher", layers, loaded.n_layers, loaded.d_model)
    data = dataclasses.replace(inputs.data, holdout="eval")  # never measure on the students' training text
    batches = token_batches(data, loaded.tokenizer, cfg.batch_size)
    result = survival(
        teacher, students, saes, batches, cfg, stats=inputs.stats, device=loaded.device, on_progress=on_progress
    )
    result.summary["teacher"] = loaded.describe()
    result.summary["data"] = data.describe()
    result.summary["students"] = {s.name: str(p) for s, p in zip(students, student_paths, strict=True)}
    files = [*(s.path for s in saes), *student_paths, *data.local_inputs()]
    result.provenance = provenance(
        inputs=files + ([Path(inputs.stats)] if inputs.stats is not None else []),
        seed=data.seed,
        config={"survival": cfg.as_dict(), "data": data.describe(), "teacher": loaded.describe()},
    )
    formats.write_parquet(
        inputs.output, result.columns, kind=sm.KIND, provenance=result.provenance, summary=result.summary
    )
    return result
