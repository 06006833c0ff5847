"""Linear probes of concepts in a model's residual stream, with a control task (paper section 7).

For each model: pool `hidden_states[L]` over each text's tokens (mean over non-padding tokens,
or the last one), then for each concept fit a logistic regression (scikit-learn, standardised
inside the training split) on stratified 80/20 splits repeated over `seeds` random states.

Control task (Hewitt & Liang 2019, "Designing and interpreting probes with control tasks"):
every source item (a chapter, a man page, a synset ...; the `item` column) gets one fixed random
label, drawn with the real labels' base rate; the same probe is trained on the same splits with
these labels. Selectivity = accuracy - control accuracy: what the representation makes
linearly available beyond what a probe of this capacity can memorise about items.
"""

from __future__ import annotations

import gc
import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kdtool import formats
from kdtool.errors import BadInput, MissingColumns
from kdtool.models import residual_stream, student_layer

POOLS = ("mean", "last")


@dataclass
class ProbeConfig:
    """How to probe (the options of `kdtool probe run`)."""

    layer: int | None = None  # hidden_states index for the teacher; None = n_layers // 2 (the middle)
    pool: Literal["mean", "last"] = "mean"  # over non-padding tokens
    seeds: int = 5  # stratified train/test splits, each with its own random state
    test_size: float = 0.2  # held-out share of each split
    seed: int = 0  # base random state: splits, control labels, subsampling
    max_length: int = 128  # tokens kept per text (longer texts are truncated)
    batch_size: int = 16  # texts per forward pass
    C: float = 1.0  # inverse L2 regularisation strength of the logistic regression
    max_iter: int = 2000  # L-BFGS iterations
    per_class: int | None = None  # subsample each concept to at most this many examples per class

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise BadInput(f"--pool must be mean or last, got {self.pool!r}")
        if self.seeds < 1:
            raise BadInput("--seeds must be >= 1")
        if not 0 < self.test_size < 1:
            raise BadInput("--test-size must be between 0 and 1")
        if self.layer is not None and self.layer < 0:
            raise BadInput("--layer must be >= 0")
        if self.max_length < 1 or self.batch_size < 1:
            raise BadInput("--max-length and --batch-size must be >= 1")
        if not (self.C > 0 and math.isfinite(self.C)):
            raise BadInput("--C must be a positive number")
        if self.per_class is not None and self.per_class < 2:
            raise BadInput("--per-class must be >= 2")


# ------------------------------------------------------------------------------ concept table
@dataclass
class ConceptTable:
    """Rows of a concepts file: text, concept, label (0/1) and the item each text came from."""

    text: list[str]
    concept: list[str]
    label: Any  # np.ndarray[int] [n]
    item: list[str]

    def concepts(self) -> list[str]:
        return list(dict.fromkeys(self.concept))  # file order

    def rows(self, concept: str) -> list[int]:
        return [i for i, c in enumerate(self.concept) if c == concept]


def read_concepts(path, *, only: list[str] | None = None, per_class: int | None = None, seed: int = 0):
    """Read a concepts file (Parquet/CSV/JSONL: text, concept, label [, item]); checks labels are 0/1."""
    cols = formats.read_table(path, required=("text", "concept", "label"))
    try:
        label = np.asarray(cols["label"], dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInput(f"{path}: column 'label' must be 0/1") from None
    if not np.all(np.isin(label, (0.0, 1.0))):
        raise BadInput(f"{path}: column 'label' must be 0/1 (found {sorted(set(label.tolist()) - {0.0, 1.0})[:3]})")
    text = [str(t) for t in cols["text"]]
    if any(not t.strip() for t in text):
        raise BadInput(f"{path}: column 'text' has empty rows")
    concept = [str(c) for c in cols["concept"]]
    # Without an item column each distinct text is its own item (the control label is then per text).
    item = [str(i) for i in cols["item"]] if "item" in cols else list(text)
    table = ConceptTable(text, concept, label.astype(np.int64), item)
    if only:
        missing = [c for c in only if c not in set(concept)]
        if missing:
            raise MissingColumns(
                f"{path}: no rows for concept(s) {', '.join(missing)} (has: {', '.join(table.concepts())})"
            )
        keep = [i for i, c in enumerate(concept) if c in set(only)]
        table = _subset(table, keep)
    if per_class is not None:
        table = _subset(table, _subsample(table, per_class, seed))
    for c in table.concepts():
        y = table.label[table.rows(c)]
        if min(int(y.sum()), int(len(y) - y.sum())) < 2:
            raise BadInput(f"{path}: concept {c!r} needs at least 2 examples of each label")
    return table


def _subset(t: ConceptTable, keep: list[int]) -> ConceptTable:
    return ConceptTable(
        [t.text[i] for i in keep], [t.concept[i] for i in keep], t.label[keep], [t.item[i] for i in keep]
    )


def _subsample(t: ConceptTable, per_class: int, seed: int) -> list[int]:
    keep = []
    for c in t.concepts():
        rows = np.asarray(t.rows(c))
        for lab in (0, 1):
            idx = rows[t.label[rows] == lab]
            rng = np.random.default_rng([seed, _stable(c), lab])
            keep += sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    return sorted(keep)


def _stable(s: str) -> int:
    """A process-independent integer for a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


# ------------------------------------------------------------------------------ features
def default_layer(n_layers: int) -> int:
    """The middle of the residual stream (Pythia-410M, 24 blocks -> 12, the paper's layer)."""
    return n_layers // 2


def pooled_states(
    model,
    tokenizer,
    texts: list[str],
    *,
    layer: int,
    pool: str = "mean",
    max_length: int = 128,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
):
    """[n, d_model] float32 numpy: hidden_states[layer] pooled over each text's tokens.

    Texts are tokenised one by one (truncated to max_length), sorted by length and right-padded
    in batches so little compute goes to padding; padding never enters the pool.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    for i, seq in enumerate(ids):
        if not seq:
            raise BadInput(f"text {i} ({texts[i][:40]!r}) has no tokens")
    device = next(model.parameters()).device
    out = np.zeros((len(texts), 0), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            hidden = residual_stream(model, input_ids, mask, layers=[layer])[layer].float()  # [B, T, d]
            if pool == "mean":
                m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                pooled = (hidden * m).sum(1) / m.sum(1)  # [B, d]
            else:
                pooled = hidden[torch.arange(len(chunk), device=device), mask.sum(1) - 1]  # [B, d]
            if out.shape[1] == 0:
                out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            out[chunk] = pooled.cpu().numpy()
            if on_batch is not None:
                on_batch(len(chunk))
    if not np.all(np.isfinite(out)):
        raise BadInput(f"hidden_states[{layer}] has NaN or infinite values (try --dtype float32)")
    return out


# ------------------------------------------------------------------------------ probes
def control_labels(items: list[str], labels, seed: int = 0, salt: str = ""):
    """One fixed random label per distinct item, drawn with the labels' base rate (Hewitt & Liang).

    Each item's label depends only on (seed, salt, item): not on row order or on the other items."""
    rate = float(np.mean(labels))
    per_item = {}
    for item in sorted(set(items)):
        rng = np.random.default_rng([seed, _stable(salt), _stable(item)])
        per_item[item] = int(rng.random() < rate)
    return np.asarray([per_item[i] for i in items], dtype=np.int64)


def _fit_score(X_train, y_train, X_test, y_test, C: float, max_iter: int) -> float:
    if len(np.unique(y_train)) < 2:  # a control split can draw one class only: predict it
        return float(np.mean(y_test == y_train[0]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    clf.fit(X_train, y_train)
    return float(clf.score(X_test, y_test))


def probe_concept(X, y, items: list[str], cfg: ProbeConfig, concept: str = "") -> dict[str, float]:
    """Accuracy, control accuracy (mean and std over cfg.seeds splits) and selectivity for one concept."""
    y = np.asarray(y)
    n_min = int(min(y.sum(), len(y) - y.sum()))
    if n_min < 2:
        raise BadInput(f"concept {concept!r}: needs at least 2 examples of each label")
    yc = control_labels(items, y, seed=cfg.seed, salt=concept)
    splitter = StratifiedShuffleSplit(n_splits=cfg.seeds, test_size=cfg.test_size, random_state=cfg.seed)
    acc, ctl = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is an option; the score is what counts
        for train, test in splitter.split(X, y):
            acc.append(_fit_score(X[train], y[train], X[test], y[test], cfg.C, cfg.max_iter))
            ctl.append(_fit_score(X[train], yc[train], X[test], yc[test], cfg.C, cfg.max_iter))
    ddof = 1 if len(acc) > 1 else 0
    return {
        "accuracy": float(np.mean(acc)),
        "accuracy_std": float(np.std(acc, ddof=ddof)),
        "control_accuracy": float(np.mean(ctl)),
        "control_accuracy_std": float(np.std(ctl, ddof=ddof)),
        "selectivity": float(np.mean(acc) - np.mean(ctl)),
        "n": int(len(y)),
        "n_test": int(len(test)),
    }


@dataclass
class ModelEntry:
    """One model to probe: its label in the output, its role, and how to load it."""

    name: str  # as given in --models (e.g. 'teacher', 'students/width128')
    role: Literal["teacher", "student"]
    load: Callable[[], Any]  # -> kdtool.models.LoadedModel (model, tokenizer, n_layers, d_model)


COLUMNS = (
    "concept",
    "model",
    "role",
    "width",
    "layer",
    "pool",
    "accuracy",
    "accuracy_std",
    "control_accuracy",
    "control_accuracy_std",
    "selectivity",
    "n",
    "n_test",
)


def run(
    table: ConceptTable,
    models: list[ModelEntry],
    cfg: ProbeConfig,
    *,
    on_model: Callable[[str, int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> dict[str, list]:
    """Probe every concept of `table` on every model; returns the probe.parquet columns.

    Models are loaded one at a time and dropped after use. Each distinct text is encoded once per
    model. The teacher's layer (cfg.layer or its middle) fixes the depth used for the students.
    """
    texts = list(dict.fromkeys(table.text))
    index = {t: i for i, t in enumerate(texts)}
    rows_of = {c: table.rows(c) for c in table.concepts()}
    out: dict[str, list] = {k: [] for k in COLUMNS}
    teacher_layers = None
    ordered = sorted(models, key=lambda m: m.role != "teacher")  # teacher first: it fixes the depth
    for entry in ordered:
        loaded = entry.load()
        n_layers = loaded.n_layers
        if entry.role == "teacher":
            teacher_layers = n_layers
            layer = cfg.layer if cfg.layer is not None else default_layer(n_layers)
        elif teacher_layers is None:  # students only: each at its own middle (or --layer)
            layer = cfg.layer if cfg.layer is not None else default_layer(n_layers)
        else:
            base = cfg.layer if cfg.layer is not None else default_layer(teacher_layers)
            layer = student_layer(base, teacher_layers, n_layers)
        if not 0 <= layer <= n_layers:
            raise BadInput(f"--layer {layer}: {entry.name} has hidden_states[0..{n_layers}]")
        if on_model is not None:
            on_model(entry.name, len(texts))
        feats = pooled_states(
            loaded.model,
            loaded.tokenizer,
            texts,
            layer=layer,
            pool=cfg.pool,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            on_batch=on_batch,
        )
        width = int(loaded.d_model)
        del loaded
        gc.collect()
        for concept, rows in rows_of.items():
            X = feats[[index[table.text[i]] for i in rows]]
            res = probe_concept(X, table.label[rows], [table.item[i] for i in rows], cfg, concept)
            row = {
                "concept": concept,
                "model": entry.name,
                "role": entry.role,
                "width": width,
                "layer": int(layer),
                "pool": cfg.pool,
                **res,
            }
            for k in COLUMNS:
                out[k].append(row[k])
            if on_result is not None:
                on_result(row)
    return out


def config_dict(cfg: ProbeConfig) -> dict[str, Any]:
    return asdict(cfg)
