"""Teacher loading, the residual-stream convention, and text loading/packing (kdtool.models, kdtool.text)."""

from __future__ import annotations

import gzip
import json
import threading
import time

import pytest
import torch
from tiny_models import make_model, make_model_dir

from kdtool import embedded, models
from kdtool.errors import BadInput
from kdtool.text import corpus
from kdtool.text import tokens as data

ARCHS = ("llama", "gpt_neox")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {arch: make_model_dir(tmp_path_factory.mktemp(arch), arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dirs["llama"])


# ------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_stream_equals_output_hidden_states(arch):
    model = make_model(arch, vocab_size=97, n_layers=4)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids, output_hidden_states=True).hidden_states
        assert len(ref) == 5
        for layers in ([0], [2], [1, 3], [4], [0, 1, 2, 3, 4]):
            got = models.residual_stream(model, ids, None, layers)
            assert sorted(got) == layers
            for layer in layers:
                torch.testing.assert_close(got[layer], ref[layer], rtol=0, atol=0)
    # hidden_states[n] is after the final norm, hidden_states[n-1] is not: the convention is HF's.
    assert not torch.allclose(ref[4], model(ids, output_hidden_states=True).hidden_states[3])


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_stream_stops_after_the_deepest_block(arch):
    model = make_model(arch, vocab_size=97, n_layers=4)
    blocks = models.decoder_layers(model)
    calls = [0] * len(blocks)
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)
    ]
    head_calls = []
    handles.append(model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1)))
    try:
        with torch.inference_mode():
            models.residual_stream(model, torch.zeros(1, 5, dtype=torch.long), None, [1, 2])
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1, 0, 0]  # blocks 3 and 4 never ran
    assert head_calls == []  # nor the LM head


def test_residual_stream_rejects_out_of_range_layers():
    model = make_model("llama", vocab_size=50, n_layers=2)
    with pytest.raises(BadInput, match="--layers"):
        models.residual_stream(model, torch.zeros(1, 3, dtype=torch.long), None, [3])


def test_load_model_from_a_saved_folder(model_dirs):
    for arch, folder in model_dirs.items():
        lm = models.load_model(models.ModelSpec(model=str(folder), device="cpu"))
        assert (lm.n_layers, lm.d_model) == (4, 32)
        assert lm.dtype == torch.float32 and lm.device.type == "cpu"
        assert not lm.model.training
        assert lm.tokenizer.eos_token_id is not None
        assert lm.describe()["architecture"].lower().startswith(arch.replace("_", "")[:5])


def test_model_spec_and_paths_are_checked(tmp_path):
    with pytest.raises(BadInput, match="--dtype"):
        models.ModelSpec(dtype="int8")
    with pytest.raises(BadInput, match="--device"):
        models.ModelSpec(device="gpu")
    with pytest.raises(BadInput, match="no such folder"):
        models.load_model(models.ModelSpec(model=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="config.json"):
        models.load_model(models.ModelSpec(model=str(tmp_path / "empty")))
    with pytest.raises(BadInput, match="GGUF"):
        models.load_model(models.ModelSpec(model=str(tmp_path / "nope.gguf")))
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="CUDA"):
            models.resolve_device("cuda:0")


def test_one_device_rule_for_one_process_and_for_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert models.torchrun_local_rank() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert models.torchrun_local_rank() == 1
    assert models.resolve_device("cpu", local_rank=1) == torch.device("cpu")  # gloo ranks share the CPU
    cuda = torch.cuda.is_available()
    assert models.resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    if cuda and torch.cuda.device_count() > 1:
        assert models.resolve_device("auto", local_rank=1) == torch.device("cuda:1")
        assert models.resolve_device("cuda:0", local_rank=1) == torch.device("cuda:1")  # one GPU per process
    if not cuda:
        assert models.resolve_device("auto", local_rank=1) == torch.device("cpu")
        with pytest.raises(BadInput, match="--device cuda:1: CUDA is not available"):
            models.resolve_device("cuda", local_rank=1)  # this process's GPU, which is not there


def test_gguf_conversion_runs_once_under_concurrent_first_use(tmp_path, monkeypatch):
    """Two callers at once: one conversion, both get the finished folder, no temp folder left."""
    calls = []

    def fake(gguf, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the second caller to arrive while the first converts
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_dequantise", fake)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    dest = tmp_path / "home" / "models" / "m"
    results = []
    threads = [threading.Thread(target=lambda: results.append(embedded.convert_gguf(src, dest))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [dest, dest]
    assert embedded.is_converted(dest) and (dest / "config.json").exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def boom(gguf, out):
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "_dequantise", boom)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    dest = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError):
        embedded.convert_gguf(src, dest)
    assert not dest.exists()
    assert [p for p in dest.parent.iterdir() if p.is_dir()] == []


@pytest.mark.pretrained
def test_embedded_default_teacher_is_a_real_language_model():
    lm = models.load_model(models.ModelSpec(device="cpu"))
    assert (lm.n_layers, lm.d_model) == (30, 576)
    text = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid."
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = lm.model(ids, labels=ids, output_hidden_states=True)
        got = models.residual_stream(lm.model, ids, None, [15])
    torch.testing.assert_close(got[15], out.hidden_states[15], rtol=0, atol=0)
    # A uniform guess costs ln(49152) = 10.8 nats; a working dequantised model is far below that.
    assert out.loss.item() < 4.0


# ------------------------------------------------------------------------------------------ data


def _docs(n):
    return [f"Document number {i} talks about topic {i % 7} and nothing else." for i in range(n)]


def _spec(path, **kw):
    kw.setdefault("holdout", "all")
    kw.setdefault("shuffle_buffer", 0)
    return data.DataSpec(dataset=str(path), **kw)


def test_local_formats_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(30)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "d.json").write_text(json.dumps([{"text": d} for d in docs]))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps({"body": d}) + "\n" for d in docs)
    for name in ("d.jsonl", "d.json", "d.parquet", "d.txt"):
        assert list(data.iter_texts(_spec(tmp_path / name))) == docs, name
    assert list(data.iter_texts(_spec(tmp_path / "g.jsonl.gz", text_column="body"))) == docs
    assert list(data.iter_texts(_spec(tmp_path / "d.txt", txt_unit="file"))) == ["\n\n".join(docs)]


def test_folders_and_save_to_disk(tmp_path):
    import datasets

    docs = _docs(20)
    folder = tmp_path / "many"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:]))
    (folder / "sub" / "a.txt").write_text("\n\n".join(docs[:10]))
    (folder / "notes.csv").write_text("ignored,file\n")
    # sorted paths: b.jsonl before sub/a.txt
    assert list(data.iter_texts(_spec(folder))) == docs[10:] + docs[:10]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": docs}),
            "test": datasets.Dataset.from_dict({"content": docs[:3]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "disk"))
    assert list(data.iter_texts(_spec(tmp_path / "disk", text_column="content"))) == docs
    assert list(data.iter_texts(_spec(tmp_path / "disk", text_column="content", split="test"))) == docs[:3]
    with pytest.raises(BadInput, match="--split"):
        list(data.iter_texts(_spec(tmp_path / "disk", text_column="content", split="validation")))


def test_bad_data_inputs_name_the_file_or_option(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        list(data.iter_texts(_spec(tmp_path / "missing.jsonl")))
    (tmp_path / "x.jsonl").write_text('{"content": "hi"}\n')
    with pytest.raises(BadInput, match=r"x\.jsonl:1: no field 'text'"):
        list(data.iter_texts(_spec(tmp_path / "x.jsonl")))
    (tmp_path / "y.jsonl").write_text("{not json\n")
    with pytest.raises(BadInput, match=r"y\.jsonl:1"):
        list(data.iter_texts(_spec(tmp_path / "y.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="folder has no"):
        list(data.iter_texts(_spec(tmp_path / "empty")))
    with pytest.raises(BadInput, match="--seq-len"):
        data.DataSpec(seq_len=1)


def test_holdout_split_is_disjoint_complete_and_seed_free(tmp_path):
    docs = _docs(2000)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train = set(data.iter_texts(_spec(path, holdout="train")))
    evals = set(data.iter_texts(_spec(path, holdout="eval")))
    assert train.isdisjoint(evals) and train | evals == set(docs)
    assert 0.03 < len(evals) / len(docs) < 0.07  # 5% by default
    assert set(data.iter_texts(_spec(path, holdout="eval", seed=5, shuffle_buffer=64))) == evals
    bigger = set(data.iter_texts(_spec(path, holdout="eval", holdout_fraction=0.2)))
    assert evals < bigger  # a larger fraction only adds documents


def test_shuffle_buffer_is_seeded(tmp_path):
    docs = _docs(300)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    a = list(data.iter_texts(_spec(path, shuffle_buffer=50, seed=1)))
    b = list(data.iter_texts(_spec(path, shuffle_buffer=50, seed=1)))
    c = list(data.iter_texts(_spec(path, shuffle_buffer=50, seed=2)))
    assert a == b and a != c and sorted(a) == sorted(docs) and a != docs


def test_packing_puts_eos_between_documents(tmp_path, tokenizer):
    docs = _docs(40)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = _spec(path, seq_len=16)
    seqs = list(data.iter_sequences(spec, tokenizer))
    eos = tokenizer.eos_token_id
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert all(len(s) == 16 for s in seqs)
    assert [t for s in seqs for t in s] == stream[: 16 * len(seqs)]
    assert len(stream) - 16 * len(seqs) < 16  # only the final partial sequence is dropped
    batches = list(data.token_batches(spec, tokenizer, 3))
    assert all(b.shape == (3, 16) for b in batches[:-1]) and batches[-1].shape[0] <= 3
    assert torch.equal(torch.cat(batches), torch.tensor(seqs))
    skipped = list(data.token_batches(spec, tokenizer, 3, skip_batches=2))
    assert torch.equal(torch.cat(skipped), torch.tensor(seqs[6:]))
    assert all(b.shape[0] == 3 for b in data.token_batches(spec, tokenizer, 3, drop_last=True))


# ------------------------------------------------------------------------------------------ embedded corpus


def test_embedded_corpus_falls_back_to_the_standard_library(tmp_path, monkeypatch):
    monkeypatch.setenv("KDTOOL_HOME", str(tmp_path))
    first = [next(iter(corpus.embedded_corpus())) for _ in range(2)]
    assert first[0] == first[1]  # deterministic
    names = {name for name, _ in _take(corpus.embedded_corpus(), 200)}
    assert names == {"stdlib-topics", "stdlib-docstrings"}
    assert data.DataSpec().describe()["dataset"] == "embedded:stdlib-topics+stdlib-docstrings"


def _take(it, n):
    out = []
    for item in it:
        out.append(item)
        if len(out) >= n:
            break
    return out


def test_interleaving_keeps_every_prefix_mixed(tmp_path, monkeypatch):
    """Each source advances in proportion to its size: after a short prefix both sources appear."""
    monkeypatch.setenv("KDTOOL_HOME", str(tmp_path))
    seen = [name for name, _ in _take(corpus.embedded_corpus(), 40)]
    assert seen.count("stdlib-topics") >= 3 and seen.count("stdlib-docstrings") >= 3


def test_man_to_text_strips_groff():
    src = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n.BR ls (1)\n'
    text = corpus.man_to_text(src)
    assert "comment" not in text and "\\f" not in text and ".TH" not in text
    assert "NAME" in text and "ls - list directory contents" in text and "ls(1)" in text


def test_fetched_debian_sources_are_read_when_present():
    present = corpus.source_names()
    if "austen" not in present:
        pytest.skip("scripts/fetch-corpus has not run on this machine")
    name, text = next((n, t) for n, t in corpus.embedded_corpus() if n == "austen")
    assert "Dashwood" in text or "Jane Austen" in text
