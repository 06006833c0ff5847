"""The stats job (`kdtool stats`): SAEs in, stats.parquet's columns and per-SAE summary out.

    load_saes          each --sae (a folder of SAE folders means all of them) with the layer it reads
    open_activations   the cache, or a teacher streamed over text
    measure            one pass: per-feature statistics (kdtool/sae/accumulate.py, with the robust
                       count of kdtool/sae/robust.py); with --fidelity, the teacher again on held-out
                       text with each SAE spliced in (kdtool/sae/fidelity.py)

A stats file holds any number of SAEs, several per layer too (widths, lambdas, seeds, token
checkpoints of one layer: the sensitivity of d*), one row set per SAE told apart by the `sae`
column, a short key (kdtool.sae.summary.sae_keys). The summary keeps each SAE's numbers under
`saes` and, when every layer has one SAE, the same numbers under `layers` as before (docs/formats.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kdtool import kinds
from kdtool.acts.store import ActivationStore
from kdtool.errors import BadInput
from kdtool.formats import finite_or_none
from kdtool.models import EMBEDDED_NAME, LoadedModel, ModelSpec, check_layers
from kdtool.sae.accumulate import ALIVE_THRESHOLD, collect
from kdtool.sae.fidelity import FidelityConfig, measure_fidelity
from kdtool.sae.layouts import LoadedSAE, find_saes, load_sae
from kdtool.sae.robust import RobustConfig
from kdtool.sae.sources import DEFAULT_ACTS, ModelSource, TeacherStream
from kdtool.sae.summary import layer_view, sae_keys
from kdtool.text.tokens import DataSpec

STATS_KIND = "kdtool.stats"
DECODER_NORMS = ("fold", "raw")
#: the columns of stats' printed table (one row per SAE), after "sae" and "layer"; absent keys are left out
TABLE_KEYS = ("F", "L0", "alpha", "g", "d_star", "F_robust", "alpha_robust", "d_star_robust", "dead", "d_sae",
              "mse", "explained_variance", "tokens")  # fmt: skip
#: fidelity columns of the printed table (with --fidelity)
FIDELITY_KEYS = ("ce_clean", "ce_spliced", "ce_zero", "ce_loss_score", "kl", "kl_div_score", "ce_loss_score_mean")


@dataclass
class StatsConfig:
    """How `kdtool stats` measures (its options, parsed)."""

    alive_threshold: float = ALIVE_THRESHOLD  # a feature is alive iff its firing frequency is above this
    decoder_norm: str = "fold"  # fold: measure z_i * ||W_dec[i]|| (residual-stream units); raw: z as output
    max_tokens: int | None = None  # measure on at most this many tokens (None: all)
    chunk_tokens: int = 4096  # tokens encoded at once (memory: chunk x d_sae floats)
    device: str = "cpu"  # where the SAEs run
    robust: RobustConfig | None = field(default_factory=RobustConfig)  # the width-stable count (None: skip)
    fidelity: FidelityConfig | None = None  # run the teacher with each SAE spliced in (None: skip)

    def __post_init__(self):
        if not (0 <= self.alive_threshold < 1):
            raise BadInput(f"--alive-threshold must be in [0, 1), got {self.alive_threshold}")
        if self.decoder_norm not in DECODER_NORMS:
            raise BadInput(f"--decoder-norm must be one of {', '.join(DECODER_NORMS)}, got {self.decoder_norm!r}")


#: what --sae accepts: an SAE folder, or train-sae's output folder (its checkpoint.json marks it)
SAE_KINDS = ("kdtool.sae", "kdtool.sae.checkpoint")


def load_saes(
    given: list[Path], layers: list[int] | None = None, *, any_layer: bool = False
) -> tuple[list[Path], list[LoadedSAE]]:
    """Each --sae (a folder of SAE folders means all of them), loaded, with the layer it reads.

    `layers` (--layer) gives one layer per SAE, in order, where their files do not say; an SAE whose
    files record another layer is refused (measuring it on activations it was not trained on is
    almost always a mistake) unless `any_layer`. An SAE whose layer is still unknown is refused.
    """
    for g in given:
        kinds.expect(g, SAE_KINDS, "--sae")
    paths = [p for g in given for p in find_saes(g)]
    loaded = [load_sae(p) for p in paths]
    if layers is not None:
        if len(layers) != len(loaded):
            raise BadInput(
                f"--layer: {len(layers)} layer(s) for {len(loaded)} SAE(s) "
                f"({', '.join(str(p) for p in paths)}); give one per SAE, in order"
            )
        for s, L in zip(loaded, layers, strict=True):
            if s.layer is not None and s.layer != L and not any_layer:
                raise BadInput(
                    f"--layer {L}: {s.path} is an SAE of layer {s.layer} ({s.layer_source}); measuring it on "
                    f"layer {L}'s activations is not what it was trained on. Give --layer {s.layer}, or "
                    "--any-layer to measure it there anyway"
                )
            s.layer, s.layer_source = L, "--layer"
    unknown = [str(s.path) for s in loaded if s.layer is None]
    if unknown:
        raise BadInput(
            f"--layer: cannot tell which layer {', '.join(unknown)} reads (no layer or known hook in its "
            "config); give --layer"
        )
    return paths, loaded


@dataclass
class Activations:
    """What `stats` streams its SAEs over: {layer: [n, d]} batches, and what to record about them."""

    batches: Iterator[dict]
    d_model: int
    inputs: list  # files for provenance
    info: dict  # the summary's "source"
    total: int | None  # tokens the progress bar counts to
    teacher: LoadedModel | None = None  # the streamed teacher (fidelity reuses it)
    manifest: dict | None = None  # the cache's manifest (fidelity finds its teacher and text there)


def open_activations(
    layers: list[int], acts: Path | None, teacher: TeacherStream | None, *, max_tokens: int | None
) -> Activations:
    """The activations of `layers`: from a teacher if one is given (it needs --tokens), else from the cache."""
    if teacher is not None:
        if max_tokens is None:
            raise BadInput("--tokens: streaming from a teacher needs a token budget (e.g. --tokens 1M)")
        model = teacher.load(teacher.model)
        check_layers(layers, model.n_layers, "--layer")
        src = ModelSource(model, teacher.data, batch_size=teacher.batch_size, drop_first=teacher.drop_first)
        return Activations(src.model_rows(layers), model.d_model, src.inputs, src.info, max_tokens, teacher=model)
    root = acts if acts is not None else DEFAULT_ACTS
    kinds.expect(root, "kdtool.acts", "--acts")
    store = ActivationStore(root)
    missing = [L for L in layers if L not in store.layers]
    if missing:
        raise BadInput(
            f"--acts {root}: layer(s) {missing} not cached (cached: {store.layers}); "
            "cache them with `kdtool cache-acts --layers ...` or give --layer"
        )
    info = {k: store.manifest.get(k) for k in ("model", "revision", "dataset", "seq_len")} | {
        "acts": str(root),
        "source": "cache",
    }
    total = min(store.n_tokens, max_tokens) if max_tokens else store.n_tokens
    return Activations(
        store.iter_shards(layers), store.d_model, [root / "manifest.json"], info, total, manifest=store.manifest
    )


def recorded_acts(saes: list[LoadedSAE]) -> Path | None:
    """The activation cache the SAEs were trained on, as their cfg.json records it, if that folder is here.

    train-sae records `--acts` (as typed) in cfg.json's kdtool.source; stats run from the same folder
    finds it without --acts. None when the SAEs name no cache, name several, or it is not found.
    """
    found = set()
    for s in saes:
        source = ((s.cfg or {}).get("kdtool") or {}).get("source") or {}
        if source.get("source") != "cache" or not source.get("acts"):
            return None
        found.add(Path(source["acts"]))
    if len(found) != 1:
        return None
    root = found.pop()
    return root if (root / "manifest.json").is_file() else None


def fidelity_teacher(acts: Activations, base: ModelSpec, stream: TeacherStream | None) -> tuple[ModelSpec, DataSpec]:
    """The teacher and held-out text for --fidelity: the streamed ones, else those the cache was made from.

    `base` carries the shared model flags (--dtype, --device, --offline, ...); a cache's manifest names
    the model (the embedded default when it was) and the data, whose eval side is scored.
    """
    if stream is not None:
        return stream.model, replace(stream.data, holdout="eval")
    m = acts.manifest or {}
    if m.get("model") is None or m.get("seq_len") is None:
        raise BadInput(f"--fidelity: {acts.info.get('acts')} does not say which model and text it was made from")
    teacher = m.get("teacher") or {}
    model = None if m["model"] == EMBEDDED_NAME else (teacher.get("model_path") or m["model"])
    if model is not None and not Path(str(model)).exists() and teacher.get("model_path"):
        model = m["model"]  # the converted folder moved away: ask for the name the cache recorded
    dataset = m.get("dataset")
    data = DataSpec(
        dataset=None if str(dataset).startswith("embedded:") else dataset,
        **{
            k: m[k]
            for k in ("split", "text_column", "seq_len", "seed", "holdout_fraction", "shuffle_buffer", "txt_unit")
            if m.get(k) is not None
        },  # fmt: skip
        holdout="eval",
    )
    return replace(base, model=model, revision=m.get("revision")), data


@dataclass
class StatsResult:
    """stats.parquet's columns and summary, the notes to show, and the tokens measured."""

    columns: dict
    summary: dict
    notes: list[str]
    tokens: int
    inputs: list = field(default_factory=list)  # the files read (activations, SAEs), for provenance

    def table(self) -> dict[str, list]:
        """One row per SAE: key, layer, F, L0, alpha, g, d*, the robust count, ..., fidelity with --fidelity."""
        saes = self.summary["saes"]
        keys = [k for k in TABLE_KEYS if any(k in s for s in saes.values())]
        fidelity = [k for k in FIDELITY_KEYS if any(k in (s.get("fidelity") or {}) for s in saes.values())]
        rows: dict[str, list] = {"sae": [], "layer": []} | {k: [] for k in keys + fidelity}
        for key, info in saes.items():
            rows["sae"].append(key)
            rows["layer"].append(info["layer"])
            for k in keys:
                rows[k].append(_cell(info.get(k)))
            for k in fidelity:
                rows[k].append(_cell((info.get("fidelity") or {}).get(k)))
        return rows


def _cell(v):
    return finite_or_none(v) if isinstance(v, float) else v


def measure(
    cfg: StatsConfig,
    saes: list[LoadedSAE],
    acts: Activations,
    *,
    on_progress: Callable[[int], None] | None = None,
    fidelity: tuple[LoadedModel | Callable[[], LoadedModel], DataSpec] | None = None,
    on_fidelity_progress: Callable[[int], None] | None = None,
) -> StatsResult:
    """Stream `acts` through every SAE (each at its layer); with `fidelity` = (teacher or its loader, held-out
    text), score each SAE spliced into the teacher. Returns stats.parquet's columns and summary."""
    for s in saes:
        if s.d_in != acts.d_model:
            raise BadInput(
                f"{s.path}: SAE expects d_in={s.d_in} but the activations have d_model={acts.d_model} "
                "(an SAE for another model?)"
            )
    keys = sae_keys([s.path for s in saes])
    order = sorted(range(len(saes)), key=lambda i: (saes[i].layer, i))  # rows and entries by layer, then as given
    accs = collect(
        [(saes[i].layer, saes[i]) for i in order],
        acts.batches,
        chunk_tokens=cfg.chunk_tokens,
        max_tokens=cfg.max_tokens,
        fold_decoder_norm=cfg.decoder_norm == "fold",
        robust=cfg.robust,
        device=cfg.device,
        on_progress=on_progress,
    )
    several = len({s.layer for s in saes}) != len(saes)  # then notes name the SAE, not just its layer
    parts, entries, notes = [], {}, []
    for i, (layer, acc) in zip(order, accs, strict=True):
        cols, info = acc.result(layer, cfg.alive_threshold)
        parts.append({"sae": np.full(len(cols["feature"]), keys[i], dtype=object)} | cols)
        notes += [f"{keys[i]}: {note}" if several else note for note in info.pop("notes")]
        entries[keys[i]] = info
    summary = {"saes": entries}
    if (view := layer_view(entries)) is not None:
        summary["layers"] = view
    summary |= {"source": acts.info, "decoder_norm": cfg.decoder_norm}
    if cfg.robust is not None:
        summary["robust"] = cfg.robust.describe()
    if fidelity is not None and cfg.fidelity is not None:
        teacher, data = fidelity
        teacher = teacher if isinstance(teacher, LoadedModel) else teacher()
        means = {layer: acc.mean_x() for layer, acc in accs}
        result = measure_fidelity(
            teacher, data, [(keys[i], saes[i]) for i in order], means, cfg.fidelity, on_progress=on_fidelity_progress
        )
        for key, metrics in result.saes.items():
            entries[key]["fidelity"] = metrics | {"dead_fraction": entries[key]["dead_fraction"]}
        summary["fidelity"] = result.info
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return StatsResult(columns, summary, notes, accs[0][1].tokens)


def run(
    cfg: StatsConfig,
    given: list[Path],
    layers: list[int] | None,
    acts: Path | None,
    stream: TeacherStream | None,
    *,
    base_spec: ModelSpec | None = None,
    load: Callable[[ModelSpec], LoadedModel] | None = None,
    on_sae: Callable[[LoadedSAE], None] | None = None,
    on_progress: Callable[[int | None, int], None] | None = None,
    on_fidelity_progress: Callable[[int, int], None] | None = None,
    any_layer: bool = False,
) -> StatsResult:
    """The whole `kdtool stats`: load the SAEs, open their activations, measure, and with cfg.fidelity
    score them in the teacher (`load`ed from `base_spec` and the cache's manifest, or the streamed one).

    on_progress(total, tokens) and on_fidelity_progress(total, tokens) report the two passes.
    Without `acts` or `stream`, the cache the SAEs record (recorded_acts), else ./acts.
    """
    paths, saes = load_saes(given, layers, any_layer=any_layer)
    for s in saes:
        (on_sae or (lambda s: None))(s)
    if acts is None and stream is None:
        acts = recorded_acts(saes)
    source = open_activations(sorted({s.layer for s in saes}), acts, stream, max_tokens=cfg.max_tokens)
    fidelity, notes = None, []
    m = source.manifest or {}
    if cfg.fidelity is not None and "drop_first" in m:  # splice the positions the cache (and so the SAE) saw
        cfg = replace(cfg, fidelity=replace(cfg.fidelity, drop_first=bool(m["drop_first"]),
                                            max_norm_ratio=float(m.get("max_norm_ratio") or 0)))  # fmt: skip
    if cfg.fidelity is not None:
        spec, data = fidelity_teacher(source, base_spec or ModelSpec(), stream)
        was, now = (source.manifest or {}).get("dataset"), data.describe()["dataset"]
        if was is not None and data.dataset is None and was != now:
            notes.append(f"--fidelity: the cache was made from {was}, the embedded corpus is now {now}; "
                         "its held-out side is scored")  # fmt: skip
        if source.teacher is not None:
            fidelity = (source.teacher, data)
        else:
            if load is None:
                raise BadInput("--fidelity needs a way to load the teacher")
            fidelity = (lambda: load(replace(spec, device=cfg.device)), data)
    report = on_progress or (lambda total, n: None)
    report_fid = on_fidelity_progress or (lambda total, n: None)
    want = cfg.fidelity.tokens if cfg.fidelity is not None else 0
    result = measure(
        cfg,
        saes,
        source,
        on_progress=lambda n: report(source.total, n),
        fidelity=fidelity,
        on_fidelity_progress=lambda n: report_fid(want, n),
    )
    result.inputs = [*source.inputs, *paths]
    result.notes += notes
    return result
