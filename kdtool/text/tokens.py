"""Text for the teacher: datasets, local files or the embedded corpus, tokenised and packed.

A `DataSpec` names where text comes from (the shared --dataset/--split/--text-column/--seq-len/
--streaming/--seed flags). The pipeline, each stage deterministic:

1. documents in source order (`iter_documents`): the embedded corpus (kdtool/text/corpus.py), a
   `datasets` hub name (`NAME` or `NAME:CONFIG`, streamed by default), local `.txt`, `.jsonl`,
   `.json`, `.parquet` files (`.gz` too; `.zst` if `zstandard` is installed) or a folder of
   them (sorted, recursive), or a folder written by `Dataset.save_to_disk`;
2. the hold-out split (`holdout`): a document is in the eval part iff the first 8 bytes of
   blake2b(text) / 2^64 < `holdout_fraction` (default 5%). The split depends only on the text,
   never on the seed or the order, so eval text never appears in training for any seed;
3. a seeded shuffle buffer over documents (`shuffle_buffer` documents; 0 keeps source order);
4. tokenisation in batches with the fast tokenizer (no special tokens added), EOS after each
   document, packing into `seq_len`-token sequences (documents run across sequence borders,
   as in GPT-NeoX/Pythia pre-training; a final partial sequence is dropped).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from kdtool.errors import BadInput
from kdtool.text import corpus

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
LOCAL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + (".json", ".parquet", ".pq")
COMPRESSIONS = (".gz", ".zst")
HOLDOUTS = ("train", "eval", "all")
TXT_UNITS = ("paragraph", "line", "file")
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class DataSpec:
    """Where text comes from and how it is cut (the shared --dataset/--split/... flags)."""

    dataset: str | None = None  # None = embedded corpus; hub NAME[:CONFIG]; local file or folder; save_to_disk folder
    split: str = "train"  # dataset split (hub datasets and save_to_disk DatasetDicts)
    text_column: str = "text"  # field holding the text (jsonl, parquet, datasets)
    streaming: bool = True  # stream hub datasets instead of downloading them whole
    seq_len: int = 512  # tokens per packed sequence
    seed: int = 0  # seeds the document shuffle buffer
    holdout: str = "train"  # "train" | "eval" | "all": which side of the deterministic document split
    holdout_fraction: float = 0.05  # share of documents in the eval side
    shuffle_buffer: int = 4096  # documents in the seeded shuffle buffer (0 = source order)
    txt_unit: str = "paragraph"  # how .txt files split into documents: paragraph (blank line), line, file

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise BadInput(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.holdout not in HOLDOUTS:
            raise BadInput(f"holdout must be one of {HOLDOUTS}, got {self.holdout!r}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise BadInput(f"holdout fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.shuffle_buffer < 0:
            raise BadInput(f"shuffle buffer must be >= 0, got {self.shuffle_buffer}")
        if self.txt_unit not in TXT_UNITS:
            raise BadInput(f"txt unit must be one of {TXT_UNITS}, got {self.txt_unit!r}")
        if self.dataset is not None and not str(self.dataset).strip():
            raise BadInput("--dataset is empty")
        if not self.text_column:
            raise BadInput("--text-column is empty")

    def describe(self) -> dict:
        """JSON-able summary for manifests and provenance (the embedded corpus lists its sources)."""
        out = asdict(self)
        if self.dataset is None:
            out["dataset"] = "embedded:" + "+".join(corpus.source_names())
        return out

    def local_inputs(self) -> list[Path]:
        """Local files/folders read (for provenance fingerprints); empty for hub and embedded data."""
        if self.dataset is None:
            return []
        p = Path(self.dataset).expanduser()
        return [p] if p.exists() else []


# --------------------------------------------------------------------------------------- documents


def is_eval_document(text: str, fraction: float) -> bool:
    """The hold-out rule: blake2b of the UTF-8 text, first 8 bytes as a fraction of 2^64."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    if name.endswith(".zst"):
        try:
            import zstandard  # lazy: optional, not a kdtool dependency
        except ImportError:
            raise BadInput(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(reader, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _txt_documents(path: Path, unit: str) -> Iterator[str]:
    with _open_text(path) as fh:
        if unit == "line":
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")
            return
        if unit == "file":
            text = fh.read().strip()
            if text:
                yield text
            return
        para: list[str] = []
        for line in fh:
            if line.strip():
                para.append(line.rstrip("\n"))
            elif para:
                yield "\n".join(para)
                para = []
        if para:
            yield "\n".join(para)


def _field(row, column: str, where: str) -> str | None:
    if not isinstance(row, dict):
        raise BadInput(f"{where}: expected a JSON object per line")
    if column not in row:
        fields = ", ".join(map(str, row)) or "none"
        raise BadInput(f"{where}: no field {column!r} (fields: {fields}; use --text-column)")
    value = row[column]
    return value if isinstance(value, str) else (None if value is None else str(value))


def _jsonl_documents(path: Path, column: str) -> Iterator[str]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            text = _field(row, column, f"{path}:{lineno}")
            if text:
                yield text


def _json_documents(path: Path, column: str) -> Iterator[str]:
    with _open_text(path) as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path}: not valid JSON ({exc.msg}); JSON Lines files should end in .jsonl") from None
    if isinstance(obj, dict) and isinstance(obj.get(column), list):
        rows: Iterable = ({column: v} for v in obj[column])
    elif isinstance(obj, dict) and isinstance(obj.get("rows"), list):
        rows = obj["rows"]
    elif isinstance(obj, list):
        rows = obj
    else:
        raise BadInput(f"{path}: expected a list of records or an object with a {column!r} list")
    for i, row in enumerate(rows):
        text = _field(row, column, f"{path}[{i}]")
        if text:
            yield text


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise BadInput(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from exc
    names = pf.schema_arrow.names
    if column not in names:
        raise BadInput(f"{path}: no column {column!r} (columns: {', '.join(names)}; use --text-column)")
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text if isinstance(text, str) else str(text)


#: bytes read from the start of a text file to tell text from binary data
_SNIFF_BYTES = 1 << 16


def _check_text(path: Path) -> None:
    """Refuse a .txt/.jsonl file that is not UTF-8 text (random bytes would be cached as replacement characters)."""
    with _open_text(path) as fh:
        head = fh.buffer.read(_SNIFF_BYTES) if hasattr(fh, "buffer") else b""
    try:
        head.decode("utf-8")
        ok = True
    except UnicodeDecodeError as exc:
        ok = exc.start >= len(head) - 3  # only a character cut by the sniffing window
    if b"\0" in head or not ok:
        raise BadInput(f"--dataset {path}: not UTF-8 text (binary data?)")


def _file_documents(path: Path, spec: DataSpec) -> Iterator[str]:
    suffix = _base_suffix(path)
    if suffix in TEXT_SUFFIXES + JSONL_SUFFIXES:
        _check_text(path)
    if suffix in TEXT_SUFFIXES:
        return _txt_documents(path, spec.txt_unit)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_documents(path, spec.text_column)
    if suffix == ".json":
        return _json_documents(path, spec.text_column)
    if suffix in (".parquet", ".pq"):
        return _parquet_documents(path, spec.text_column)
    raise BadInput(f"--dataset {path}: unknown file type (use {', '.join(LOCAL_SUFFIXES)}, optionally .gz)")


def _is_data_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and _base_suffix(path) in LOCAL_SUFFIXES


def _disk_documents(folder: Path, spec: DataSpec) -> Iterator[str]:
    import datasets  # lazy: a second or more to import, only for save_to_disk folders and hub datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise BadInput(f"--dataset {folder}: cannot load_from_disk ({str(exc).splitlines()[0]})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise BadInput(f"--split {spec.split}: not in {folder} (splits: {', '.join(ds)})")
        ds = ds[spec.split]
    if spec.text_column not in ds.column_names:
        raise BadInput(f"--text-column {spec.text_column}: not in {folder} (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns([spec.text_column]).iter(batch_size=1024):
        for text in batch[spec.text_column]:
            if text:
                yield text


def _hub_documents(spec: DataSpec) -> Iterator[str]:
    import datasets  # lazy: see _disk_documents

    name, _, config = str(spec.dataset).partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=spec.split, streaming=spec.streaming)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(
            f"--dataset {spec.dataset}: not a local file or folder, and the hub load failed ({first})"
        ) from exc
    checked = False
    for row in ds:
        if not checked:
            if spec.text_column not in row:
                raise BadInput(f"--text-column {spec.text_column}: not in {spec.dataset} (columns: {', '.join(row)})")
            checked = True
        text = row[spec.text_column]
        if text:
            yield text


def iter_documents(spec: DataSpec) -> Iterator[str]:
    """Every document of the source in its own order, before the hold-out split and shuffle."""
    if spec.dataset is None:
        return (text for _, text in corpus.embedded_corpus())
    path = Path(str(spec.dataset)).expanduser()
    if path.is_file():
        return _file_documents(path, spec)
    if path.is_dir():
        if any((path / m).is_file() for m in _DATASET_MARKERS):
            return _disk_documents(path, spec)
        files = sorted(p for p in path.rglob("*") if _is_data_file(p))
        if not files:
            raise BadInput(
                f"--dataset {path}: folder has no {', '.join(LOCAL_SUFFIXES)} files and is not a save_to_disk dataset"
            )
        return (text for f in files for text in _file_documents(f, spec))
    text = str(spec.dataset)
    looks_local = text.startswith((".", "/", "~")) or _base_suffix(path) in LOCAL_SUFFIXES or text.count("/") > 1
    if looks_local:
        raise BadInput(f"--dataset {text}: no such file or folder")
    return _hub_documents(spec)


def _shuffled(docs: Iterator[str], size: int, seed: int) -> Iterator[str]:
    """A bounded shuffle buffer: fill `size` documents, then emit a random one per new arrival."""
    if size <= 1:
        yield from docs
        return
    rng = random.Random(seed)
    buf: list[str] = []
    for doc in docs:
        if len(buf) < size:
            buf.append(doc)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = doc
    rng.shuffle(buf)
    yield from buf


def iter_texts(spec: DataSpec) -> Iterator[str]:
    """Documents after the hold-out split and the seeded shuffle buffer."""
    docs = iter_documents(spec)
    if spec.holdout != "all":
        want_eval = spec.holdout == "eval"
        docs = (d for d in docs if is_eval_document(d, spec.holdout_fraction) == want_eval)
    return _shuffled(docs, spec.shuffle_buffer, spec.seed)


# --------------------------------------------------------------------------------------- tokens


def _chunks(items: Iterator[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def separator_id(tokenizer) -> int:
    """The token put after every document: the tokenizer's EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise BadInput("the tokenizer has no EOS token to put between documents")
    return int(eos)


def iter_sequences(spec: DataSpec, tokenizer, *, docs_per_call: int = 64) -> Iterator[list[int]]:
    """Packed `seq_len`-token sequences: documents tokenised without special tokens, EOS after each."""
    eos = separator_id(tokenizer)
    n = spec.seq_len
    buf: list[int] = []
    start = 0
    for chunk in _chunks(iter_texts(spec), docs_per_call):
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            buf.extend(ids)
            buf.append(eos)
        while len(buf) - start >= n:
            yield buf[start : start + n]
            start += n
        if start:
            del buf[:start]
            start = 0


def token_batches(
    spec: DataSpec, tokenizer, batch_size: int, *, skip_batches: int = 0, drop_last: bool = False
) -> Iterator[torch.LongTensor]:
    """LongTensor [batch_size, seq_len] batches of packed sequences (the last may be smaller unless drop_last).

    skip_batches drops that many whole batches first without building tensors (resume: the
    tokenizer still runs, but it is far cheaper than the model).
    """
    if batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {batch_size}")
    to_skip = skip_batches * batch_size
    rows: list[list[int]] = []
    for seq in iter_sequences(spec, tokenizer):
        if to_skip:
            to_skip -= 1
            continue
        rows.append(seq)
        if len(rows) == batch_size:
            yield torch.tensor(rows, dtype=torch.long)
            rows = []
    if rows and not drop_last:
        yield torch.tensor(rows, dtype=torch.long)
