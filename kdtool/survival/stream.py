"""One pass over held-out text: fit every student's map on the first tokens, measure survival on the rest.

Each batch of token ids goes through the teacher once and through each student once; the rows (token
positions) then serve either the fit or the measurement, never both:

    rows 0 .. fit_tokens-1           RidgeFit.add(student rows, teacher rows)   per (student, layer)
    -- once fit_tokens rows are in:  one solve per (student, layer) -> AffineMap
    rows fit_tokens .. tokens-1      teacher SAE latents of teacher rows vs of mapped student rows
                                     -> TeacherFeatures (per layer), FeatureMatch (per model and layer)

so survival costs one teacher forward plus one forward per student per token, plus the SAE encodings,
and memory is flat in the number of tokens (accumulators are [F] and [d, d] sums). The teacher is
measured against itself with the identity map, through the same code: its reference row set.

Which positions count: position 0 of each sequence is dropped (`drop_first`, the attention-sink
position `kdtool stats` and `cache-acts` drop too), and so are "massive activation" positions whose
teacher norm is above `max_norm_ratio` x the batch median (kdtool.acts.caching.outlier_mask, the rule
cache-acts used for the SAE's training data), so the SAE reads the distribution it was trained on.

A model is anything with a `forward(ids [B, S]) -> {L: [B, S, d]}`: `hf_acts` wraps a transformers
model; a test (or issue 12's feature-prioritised students) may pass any callable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from kdtool.acts.caching import outlier_mask
from kdtool.errors import BadInput
from kdtool.models import decoder_layers, residual_stream, student_layer
from kdtool.sae.layouts import LoadedSAE
from kdtool.survival.config import SurvivalConfig
from kdtool.survival.measure import FeatureMatch, TeacherFeatures
from kdtool.survival.ridge import VALIDATE_EVERY, AffineMap, RidgeFit

Forward = Callable[[torch.Tensor], dict[int, torch.Tensor]]


@dataclass
class ModelActs:
    """A model as survival sees it: token ids in, residual-stream activations at the teacher's layers out."""

    name: str  # label in survival.parquet ("teacher", a student folder's name, ...)
    role: str  # "teacher" or "student"
    width: int  # d: its residual-stream width
    forward: Forward  # ids [B, S] -> {teacher layer L: [B, S, width]} for every layer survival asks for
    layers: dict[int, int] = field(default_factory=dict)  # teacher layer -> the model's own hidden_states index
    loss: str | None = None  # what a distilled student trained on (kdtool.json's loss label); None: not known
    seed: int | None = None  # its distill run's --seed, when kdtool.json records one


def hf_acts(
    model, name: str, role: str, layers: list[int], teacher_depth: int, width: int, *, loss=None, seed=None
) -> ModelActs:
    """A transformers model as a ModelActs: hidden_states at the same depth (kdtool.models.student_layer)."""
    depth = len(decoder_layers(model))
    own = {L: student_layer(L, teacher_depth, depth) for L in layers}
    wanted = sorted(set(own.values()))

    def forward(ids):
        hidden = residual_stream(model, ids, None, wanted)
        return {L: hidden[m] for L, m in own.items()}

    return ModelActs(name, role, width, forward, own, loss=loss, seed=seed)


@dataclass
class Measurement:
    """What the pass gathered: per layer the teacher's sums, per (model, layer) its match and map."""

    tokens_fit: int
    tokens_measured: int
    teacher: dict[int, TeacherFeatures]
    matches: dict[tuple[str, int], FeatureMatch]
    maps: dict[tuple[str, int], AffineMap]
    fire_at: dict[int, float]  # per layer: the absolute firing threshold e used
    notes: list[str]


def _latents(sae: LoadedSAE, x, scale):
    """SAE latents [n, F] in residual-stream units (z_i x ||W_dec[i]|| when rows are not unit-norm)."""
    z = sae.encode(x)
    return z if scale is None else z * scale


def _rows(acts: dict, first: int, keep) -> dict:
    """{L: [B, S, d]} -> {L: [n, d] float32}: the kept positions, in (batch, position) order."""
    return {L: h[:, first:][keep].float() for L, h in acts.items()}


def measure(
    teacher: ModelActs,
    students: list[ModelActs],
    saes: dict[int, LoadedSAE],
    batches: Iterable[torch.Tensor],
    cfg: SurvivalConfig,
    *,
    device="cpu",
    on_progress: Callable[[int], None] | None = None,
) -> Measurement:
    """Read cfg.tokens kept positions from `batches`; fit the maps on the first cfg.fit_tokens, measure on the rest.

    The firing threshold is cfg.fire_threshold x the teacher's RMS residual norm on the fit tokens
    (kdtool/survival/measure.py).
    """
    tokens, fit_tokens = cfg.tokens, cfg.fit_tokens
    names = [teacher.name, *(s.name for s in students)]
    if len(set(names)) != len(names):
        raise BadInput(f"--students: two models share a name ({', '.join(names)}); give distinct folders")
    layers = sorted(saes)
    first = 1 if cfg.drop_first else 0
    scales = {}
    for L, sae in saes.items():
        norms = sae.W_dec.norm(dim=1)
        scales[L] = None if torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-4) else norms
    fits = {(s.name, L): RidgeFit(s.width, teacher.width, device) for s in students for L in layers}
    feats = {L: TeacherFeatures(saes[L].d_sae, teacher.width, device) for L in layers}
    matches = {(m.name, L): FeatureMatch(saes[L].d_sae, device) for m in (teacher, *students) for L in layers}
    maps: dict[tuple[str, int], AffineMap] = {
        (teacher.name, L): AffineMap.identity(teacher.width, device) for L in layers
    }
    sq_norm = dict.fromkeys(layers, 0.0)  # sum of ||y||^2 over the fit rows, for the firing threshold
    fire_at: dict[int, float] = {}
    seen = seen_seqs = 0
    with torch.no_grad():
        for ids in batches:
            if seen >= tokens:
                break
            ids = ids.to(device)
            t_acts = teacher.forward(ids)
            keep = (
                outlier_mask(t_acts, first, cfg.max_norm_ratio)
                if cfg.max_norm_ratio > 0
                else torch.ones(ids.shape[0], ids.shape[1] - first, dtype=torch.bool, device=ids.device)
            )  # [B, S - first]
            y = _rows(t_acts, first, keep)  # {L: [n, d_T]}
            xs = {s.name: _rows(s.forward(ids), first, keep) for s in students}  # {name: {L: [n, d_S]}}
            n = min(int(keep.sum()), tokens - seen)
            a = min(max(fit_tokens - seen, 0), n)  # rows of this batch that go to the fit
            if a:  # fold 1 (the ridge's validation rows): every VALIDATE_EVERY-th sequence of the fit split
                seq = seen_seqs + keep.nonzero(as_tuple=True)[0][:a]  # [a] the sequence of each fit row
                held = (seq % VALIDATE_EVERY) == VALIDATE_EVERY - 1
                for (name, L), fit in fits.items():
                    fit.add(xs[name][L][:a][~held], y[L][:a][~held], 0)
                    fit.add(xs[name][L][:a][held], y[L][:a][held], 1)
            seen_seqs += ids.shape[0]
            for L in layers:
                sq_norm[L] += float(y[L][:a].square().sum(dtype=torch.float64))
            seen += n
            if a and seen >= fit_tokens:
                maps.update({key: fit.solve(cfg.ridge) for key, fit in fits.items()})
                fire_at = {L: cfg.fire_threshold * (sq_norm[L] / fit_tokens) ** 0.5 for L in layers}
            for start in range(a, n, cfg.chunk_tokens):
                stop = min(n, start + cfg.chunk_tokens)
                for L in layers:
                    yc = y[L][start:stop]  # [c, d_T]
                    z = _latents(saes[L], yc, scales[L])  # [c, F]
                    e = fire_at[L]
                    feats[L].update(z, yc, e)
                    matches[(teacher.name, L)].update(z, z, yc, yc, e)
                    for s in students:
                        y_hat = maps[(s.name, L)](xs[s.name][L][start:stop])  # [c, d_T]
                        matches[(s.name, L)].update(z, _latents(saes[L], y_hat, scales[L]), yc, y_hat, e)
            if on_progress is not None:
                on_progress(seen)
    if seen <= fit_tokens:
        raise BadInput(
            f"--tokens: the held-out text gave only {seen:,} token(s), not enough to fit the map on {fit_tokens:,} "
            "and measure on the rest; lower --tokens or give more text (--dataset)"
        )
    notes = []
    if seen < tokens:
        notes.append(
            f"the held-out text ran out: measured on {seen - fit_tokens:,} tokens, not {tokens - fit_tokens:,}"
        )
    return Measurement(fit_tokens, seen - fit_tokens, feats, matches, maps, fire_at, notes)
