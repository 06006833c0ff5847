"""cache-acts' job: run the teacher over packed text and write residual-stream shards.

One forward per batch gives every requested layer (`models.residual_stream`, which stops after
the deepest block needed); rows are converted to the storage dtype on the model's device and
handed to a writer thread (kdtool/acts/writer.py) that copies them to the host and fills
kdtool.acts.store's `ShardWriter` (one shard per layer in memory at most, so memory stays flat in
the number of tokens). Another thread (kdtool/prefetch.py) reads, tokenises and packs the next
two batches while the teacher runs, so only the forward is on the critical path
(scripts/bench/cache_acts measures what is left against a bare forward).

Which positions are kept: all but position 0 of each packed sequence (`drop_first`), and not
the rare "massive activation" positions whose residual norm exceeds `max_norm_ratio` x the
batch median at any cached layer (attention sinks; see `outlier_mask`).

Resume: the manifest lists complete shards only, plus `resume_from` = the batch and row where
the first row not yet in a complete shard came from. A resumed run skips to that batch
(kdtool.text.tokens.token_batches(skip_batches=...)), recomputes it with the same composition and discards
the rows already written: on CPU the continued cache is bit-for-bit the cache an uninterrupted
run writes. That needs the same --batch-size, which --resume checks with the other settings.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdtool import locks
from kdtool.acts.shuffle import TMP, clean_leftovers
from kdtool.acts.store import MANIFEST, read_manifest
from kdtool.acts.writer import BackgroundWriter, TrackedWriter
from kdtool.errors import BadInput
from kdtool.identity import data_identity, describe, model_identity
from kdtool.models import LoadedModel, check_layers, check_seq_len, residual_stream
from kdtool.parsing import parse_int_list
from kdtool.prefetch import Background
from kdtool.text.tokens import DataSpec, token_batches

ACTS_DTYPES = ("auto", "float16", "bfloat16", "float32")
#: The layers the paper measured on Pythia-410M (24 blocks): early-middle, middle, late-middle.
PAPER_LAYERS = (8, 12, 16)
LAYER_CONVENTION = (
    "hidden_states[L]: 0 = embedding output, L = residual stream after block L, "
    "n_layers = last block output after the final norm"
)
#: Keys that must match for --resume to append to an existing cache.
_RESUME_KEYS = (
    "model",
    "revision",
    "dataset",
    "split",
    "text_column",
    "seq_len",
    "seed",
    "holdout",
    "holdout_fraction",
    "shuffle_buffer",
    "txt_unit",
    "drop_first",
    "max_norm_ratio",
    "batch_size",
    "model_dtype",
)


def default_layers(n_layers: int) -> list[int]:
    """The paper's layers 8, 12, 16 when the model is deeper than 16 blocks; else ~1/3, 1/2, 2/3 of its depth.

    Absolute indices on purpose: `train-sae --layer 12` works as typed after a default
    `cache-acts` on Pythia-410M (where 12 is the middle) and on the embedded 30-block
    SmolLM2-135M (where 12 is at 40% depth and the middle is 15).
    """
    if n_layers > PAPER_LAYERS[-1]:
        return list(PAPER_LAYERS)
    if n_layers <= 1:
        return [n_layers]
    picks = {min(max(1, round(n_layers * f)), n_layers - 1) for f in (1 / 3, 1 / 2, 2 / 3)}
    return sorted(picks)


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'8,12,16', '4:20:4', 'all' (0..n_layers), 'middle' (n_layers // 2) or 'default' (see default_layers)."""
    key = str(text).strip().lower()
    if key == "all":
        return list(range(n_layers + 1))
    if key == "middle":
        return [n_layers // 2]
    if key in ("default", "paper"):
        return default_layers(n_layers)
    try:
        layers = parse_int_list(key, minimum=0)
    except BadInput as exc:
        raise BadInput(f"--layers: {exc} (or use all, middle, default)") from None
    return check_layers(layers, n_layers)


@dataclass
class CacheConfig:
    """What to cache and where (the cache-acts flags other than model and data)."""

    output: Path = Path("acts")  # cache folder (manifest.json + layer{L}/shard-*.safetensors)
    layers: list[int] = field(default_factory=list)  # hidden_states indices; empty = default_layers(n_layers)
    tokens: int = 200_000  # token positions to cache per layer (after dropping first positions)
    shard_tokens: int = 65_536  # token positions per shard file
    acts_dtype: str = "auto"  # storage dtype; auto = bfloat16 for a bf16 model, else float16
    batch_size: int = 8  # sequences per forward
    drop_first: bool = True  # skip position 0 of every packed sequence (its norm is an outlier)
    max_norm_ratio: float = 50.0  # skip positions whose norm exceeds this x the batch median at a layer (0: off)
    resume: bool = False  # continue an interrupted cache in `output`
    overwrite: bool = False  # replace an existing cache in `output`

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.acts_dtype not in ACTS_DTYPES:
            raise BadInput(f"--acts-dtype must be one of {', '.join(ACTS_DTYPES)}, got {self.acts_dtype!r}")
        if self.tokens < 1:
            raise BadInput(f"--tokens must be >= 1, got {self.tokens}")
        if self.shard_tokens < 1:
            raise BadInput(f"--shard-size must be >= 1, got {self.shard_tokens}")
        if self.max_norm_ratio < 0:
            raise BadInput(f"--max-norm-ratio must be >= 0 (0 turns the filter off), got {self.max_norm_ratio}")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.resume and self.overwrite:
            raise BadInput("--resume and --overwrite contradict each other: pick one")


def storage_dtype(acts_dtype: str, model_dtype) -> str:
    """auto: bfloat16 when the model computes in bf16 (fp16's range can overflow there), else float16."""
    if acts_dtype != "auto":
        return acts_dtype
    return "bfloat16" if str(model_dtype).endswith("bfloat16") else "float16"


@dataclass
class CacheResult:
    output: Path
    layers: list[int]
    tokens: int  # tokens per layer now in the cache
    new_tokens: int  # tokens this run added
    shards: int
    seconds: float
    exhausted: bool  # the data ran out before --tokens
    dtype: str
    dropped_outliers: int  # positions this run skipped for a norm above max_norm_ratio x the median
    model: str | None = None  # the teacher's name
    d_model: int | None = None
    finished: bool = False  # --resume found the cache done (all --tokens, or its data had run out): untouched
    forwarded: int = 0  # token positions the teacher ran on (kept, dropped, and past --tokens in the last batch)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "output": str(self.output),
            "layers": self.layers,
            "tokens": self.tokens,
            "new_tokens": self.new_tokens,
            "shards": self.shards,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "exhausted": self.exhausted,
            "dtype": self.dtype,
            "dropped_outliers": self.dropped_outliers,
            "finished": self.finished,
            "forwarded": self.forwarded,
        }

    def record(self) -> dict:
        """The run as `kdtool --json cache-acts` prints it (kind kdtool.acts.run)."""
        return {"kind": "kdtool.acts.run", **self.as_dict(), "model": self.model, "d_model": self.d_model}


def _remove_cache(root: Path) -> None:
    """Delete the files a cache consists of (and nothing else)."""
    manifest = root / MANIFEST
    shutil.rmtree(root / TMP, ignore_errors=True)  # a killed shuffle's buckets and new shards
    for layer_dir in root.glob("layer*"):
        if layer_dir.is_dir():
            for f in layer_dir.glob("shard-*.safetensors"):
                f.unlink()
            if not any(layer_dir.iterdir()):
                layer_dir.rmdir()
    if manifest.exists():
        manifest.unlink()


#: resume keys compared by content when the cache recorded it (kdtool/identity.py): name as typed -> identity
_IDENTITY_KEYS = {"model": "model_identity", "dataset": "data_identity"}


def _check_resume(root: Path, info: dict, cfg: CacheConfig, layers: list[int], dtype: str) -> None:
    old = read_manifest(root)
    for key in _RESUME_KEYS:
        ident = _IDENTITY_KEYS.get(key)
        if ident in old:  # the same model or text under another path spelling resumes; another one does not
            if old[ident].get("fingerprint") != info[ident].get("fingerprint"):
                raise BadInput(
                    f"{root}: --resume with another {key} than the cached run (cached: {old.get(key)!r}, "
                    f"{describe(old[ident])}; now: {info.get(key)!r}, {describe(info[ident])}); "
                    "use another --output or --overwrite"
                )
            continue
        if old.get(key) != info.get(key):
            raise BadInput(
                f"{root}: --resume with a different {key} ({info.get(key)!r}) than the cached run "
                f"({old.get(key)!r}); use another --output or --overwrite"
            )
    if old.get("layers") != layers:
        raise BadInput(f"{root}: --resume with --layers {layers} but the cache holds {old.get('layers')}")
    if old.get("dtype") != dtype:
        raise BadInput(f"{root}: --resume with --acts-dtype {dtype} but the cache holds {old.get('dtype')}")
    if old.get("shard_tokens") != cfg.shard_tokens:
        raise BadInput(
            f"{root}: --resume with --shard-size {cfg.shard_tokens} but the cache uses {old.get('shard_tokens')}"
        )


def _manifest_info(teacher: LoadedModel, data: DataSpec, cfg: CacheConfig) -> dict:
    """What the manifest records about the run (the keys in _RESUME_KEYS must match on --resume)."""
    described = data.describe()
    return {
        "model": teacher.name,
        "model_identity": teacher.identity or model_identity(teacher.path or teacher.name, teacher.revision),
        "revision": teacher.revision,
        "dataset": described["dataset"],
        "data_identity": data_identity(described, data.local_inputs()),
        "split": data.split,
        "text_column": data.text_column,
        "seq_len": data.seq_len,
        "seed": data.seed,
        "holdout": data.holdout,
        "holdout_fraction": data.holdout_fraction,
        "shuffle_buffer": data.shuffle_buffer,
        "txt_unit": data.txt_unit,
        "drop_first": cfg.drop_first,
        "max_norm_ratio": cfg.max_norm_ratio,
        "model_dtype": str(teacher.dtype).removeprefix("torch."),
        "batch_size": cfg.batch_size,
        "target_tokens": cfg.tokens,
        "complete": False,  # true once the run has finished (all target_tokens, or the data ran out)
        "layer_convention": LAYER_CONVENTION,
        "teacher": teacher.describe(),
        "data": described,
    }


def prepare_output(root: Path, info: dict, cfg: CacheConfig, layers: list[int], dtype: str) -> dict:
    """Decide what happens to a cache already in `root`; returns where the run starts ({"batch", "row"}).

    No cache: start at the beginning. A cache and --resume: check that it is the same run and
    continue after its last complete shard. A cache and --overwrite: delete it and start over.
    A cache and neither: refuse.
    """
    start = {"batch": 0, "row": 0}
    if not (root / MANIFEST).exists():
        return start
    if cfg.overwrite:
        _remove_cache(root)
        return start
    if not cfg.resume:
        raise BadInput(
            f"--output {root}: already holds an activation cache; use --resume to continue it or "
            "--overwrite to replace it"
        )
    _check_resume(root, info, cfg, layers, dtype)
    old = read_manifest(root)
    if old["shards"] and "resume_from" not in old:
        raise BadInput(f"{root}: this cache has no resume point (written by an older kdtool); use --overwrite")
    if old.get("shuffle") and int(old.get("tokens") or 0) < cfg.tokens:
        raise BadInput(
            f"{root}: this cache is shuffled; it cannot grow (new rows would stay in document order): "
            "use --overwrite or another --output"
        )
    clean_leftovers(root)  # a killed shuffle's temp folder and unlisted shards
    return old.get("resume_from", start)


def outlier_mask(hidden: dict, first: int, ratio: float):
    """[B, S - first] bool: positions to keep, i.e. whose norm is <= ratio x the batch median at every layer.

    Massive activations (attention sinks on the first weak tokens, e.g. an early newline) reach
    100x the median norm in SmolLM2 and Llama-family models; one such row outweighs thousands of
    ordinary ones in an SAE's squared error. ratio <= 0 keeps everything.
    """
    keep = None
    for h in hidden.values():
        norms = h[:, first:, :].float().norm(dim=-1)  # [B, S - first]
        ok = norms <= ratio * norms.median()
        keep = ok if keep is None else keep & ok
    return keep


def cache_activations(
    teacher: LoadedModel,
    data: DataSpec,
    cfg: CacheConfig,
    *,
    provenance: dict,
    on_progress: Callable[[int, int], None] | None = None,
) -> CacheResult:
    """Cache hidden_states[L] for cfg.layers over `data` into cfg.output; returns what was done."""
    layers = check_layers(cfg.layers or default_layers(teacher.n_layers), teacher.n_layers)
    first = 1 if cfg.drop_first else 0
    if data.seq_len - first < 1:
        raise BadInput("--seq-len must be >= 2 with --drop-first")
    dtype = storage_dtype(cfg.acts_dtype, teacher.dtype)
    root = cfg.output
    if root.exists() and not root.is_dir():
        raise BadInput(f"--output {root}: exists and is not a folder")
    check_seq_len(teacher.model.config, data.seq_len, teacher.name)
    with locks.claim(root, command=provenance.get("command")):  # the cache's only writer until it is done
        return _cache(teacher, data, cfg, layers, first, dtype, provenance, on_progress)


def _cache(teacher, data, cfg, layers, first, dtype, provenance, on_progress) -> CacheResult:
    root = cfg.output
    info = _manifest_info(teacher, data, cfg)
    resume_from = prepare_output(root, info, cfg, layers, dtype)
    writer = TrackedWriter(
        root,
        layers=layers,
        d_model=teacher.d_model,
        dtype=dtype,
        shard_tokens=cfg.shard_tokens,
        info=info,
        provenance=provenance,
        resume=cfg.resume,
    )
    start_tokens = done = writer.tokens
    started = time.perf_counter()
    old = read_manifest(root) if cfg.resume and (root / MANIFEST).exists() else {}
    ran_out = old.get("complete") and done < int(old.get("target_tokens") or 0)  # its data had run out
    if done >= cfg.tokens or ran_out:  # a finished cache: left as it is (not a byte rewritten)
        return CacheResult(
            root, layers, done, 0, len(writer.shards), 0.0, bool(ran_out), dtype, 0, teacher.name, teacher.d_model,
            finished=True,
        )  # fmt: skip
    # Restart at the batch holding the first row not in a complete shard; recomputing that whole
    # batch keeps its composition (and so every float and the outlier medians) as in the first run.
    batch_index, discard = int(resume_from["batch"]), int(resume_from["row"])
    writer.next_batch = batch_index
    start_row = done - discard  # absolute row of this batch's first kept row
    torch_dtype = getattr(torch, dtype)
    bg = BackgroundWriter(writer)
    # the next batches are read, tokenised and packed on a thread while the teacher runs
    batches = Background(token_batches(data, teacher.tokenizer, cfg.batch_size, skip_batches=batch_index), depth=2)
    exhausted, ok, dropped, forwarded = True, False, 0, 0
    try:
        with torch.inference_mode():
            for batch in batches:
                hidden = residual_stream(teacher.model, batch.to(teacher.device), None, layers)
                forwarded += batch.numel()
                keep = outlier_mask(hidden, first, cfg.max_norm_ratio) if cfg.max_norm_ratio > 0 else None
                rows = {}
                for layer in layers:
                    h = hidden[layer][:, first:, :]  # [B, S - first, d]
                    h = h.reshape(-1, h.shape[-1])  # [B * (S - first), d], sequence-major
                    rows[layer] = h if keep is None else h[keep.reshape(-1)]
                n = next(iter(rows.values())).shape[0]
                dropped += 0 if keep is None else int(keep.numel() - n)
                lo, hi = discard, min(n, discard + cfg.tokens - done)
                if hi > lo:  # converted on the teacher's device; the writer thread copies them to the host
                    acts = {layer: r[lo:hi].to(torch_dtype) for layer, r in rows.items()}
                    bg.add(batch_index, start_row, n, acts)
                    done += hi - lo
                    if on_progress is not None:
                        on_progress(done, cfg.tokens)
                start_row += n
                batch_index += 1
                discard = 0
                if done >= cfg.tokens:
                    exhausted = False
                    break
        ok = done > 0  # no row at all: no cache (an empty "complete" one would fool train-sae)
    finally:
        batches.close()
        bg.finish(close=ok)
    if not ok:
        what = f"--dataset {data.dataset}" if data.dataset is not None else "the embedded corpus"
        raise BadInput(f"{what}: no {data.seq_len}-token sequence of text in it (empty, or not text?); nothing cached")
    seconds = time.perf_counter() - started
    return CacheResult(
        root,
        layers,
        writer.tokens,
        writer.tokens - start_tokens,
        len(writer.shards),
        seconds,
        exhausted,
        dtype,
        dropped,
        model=teacher.name,
        d_model=teacher.d_model,
        forwarded=forwarded,
    )
