"""kdtool probe run: pooled hidden states, logistic-regression probes, control task, the CLI and Fig. 8."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tiny_models import tiny_lm

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.probe import job as probe_job
from kdtool.probe import probes as probe

WORDS = [f"w{i}" for i in range(24)]
VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "zebra": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def probe_lm(hidden: int = 64, seed: int = 0):
    """A random 4-block Llama (2 heads, untied) over VOCAB, with its special tokens' ids."""
    return tiny_lm(
        seed=seed,
        vocab=len(VOCAB),
        width=hidden,
        heads=2,
        kv_heads=2,
        positions=64,
        tied=False,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
    )


@pytest.fixture(scope="module")
def lm():
    return probe_lm(), tiny_tokenizer()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A 'teacher' (Llama, d=64) and a narrower 'student' (d=32, same depth) as HF folders."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    for name, hidden in (("teacher", 64), ("width32", 32)):
        probe_lm(hidden=hidden, seed=hidden).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def planted_texts(n: int, seed: int = 0):
    """Texts of random words; label 1 texts contain 'zebra' twice (linearly visible in mean-pooled states)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        label = i % 2
        if label:
            for _ in range(2):
                words[rng.randrange(len(words))] = "zebra"
        texts.append(" ".join(words))
        labels.append(label)
    return texts, np.asarray(labels)


def test_pooling_matches_hidden_states_and_ignores_padding(lm):
    import torch

    model, tok = lm
    texts = ["w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10", "zebra w3"]
    for pool in ("mean", "last"):
        batched = probe.pooled_states(model, tok, texts, layer=2, pool=pool, batch_size=3)
        single = probe.pooled_states(model, tok, texts, layer=2, pool=pool, batch_size=1)
        np.testing.assert_allclose(batched, single, atol=1e-5)  # padding never leaks into the pool
        for i, t in enumerate(texts):
            ids = torch.tensor([tok(t)["input_ids"]])
            with torch.no_grad():
                hs = model(ids, output_hidden_states=True).hidden_states[2][0]  # [T, d]
            want = hs.mean(0) if pool == "mean" else hs[-1]
            np.testing.assert_allclose(single[i], want.numpy(), atol=1e-5)


def test_planted_concept_is_decodable_and_random_labels_are_not(lm):
    model, tok = lm
    texts, y = planted_texts(160)
    X = probe.pooled_states(model, tok, texts, layer=2)
    items = [f"t{i}" for i in range(len(texts))]
    cfg = probe.ProbeConfig(seeds=4)
    planted = probe.probe_concept(X, y, items, cfg, "zebra")
    assert planted["accuracy"] > 0.9
    assert planted["selectivity"] > 0.3
    assert 0.3 < planted["control_accuracy"] < 0.7  # one random label per text: nothing to memorise
    y_rand = np.random.default_rng(1).integers(0, 2, len(texts))
    noise = probe.probe_concept(X, y_rand, items, cfg, "noise")
    assert 0.3 < noise["accuracy"] < 0.7
    assert abs(noise["selectivity"]) < 0.2


def test_control_task_catches_memorisable_items():
    """When the features identify the item, the control task is learnable and selectivity drops to ~0."""
    rng = np.random.default_rng(0)
    n_items, per_item = 10, 30
    item_codes = rng.normal(size=(n_items, 16)) * 3
    items = [f"doc{i}" for i in range(n_items) for _ in range(per_item)]
    X = np.repeat(item_codes, per_item, axis=0) + rng.normal(size=(n_items * per_item, 16)) * 0.1
    y = np.asarray([i % 2 for i in range(n_items) for _ in range(per_item)])  # the label is the item's parity
    res = probe.probe_concept(X, y, items, probe.ProbeConfig(seeds=3), "by-item")
    assert res["accuracy"] > 0.95
    assert res["control_accuracy"] > 0.95  # memorising items is enough for any item-level labelling
    assert res["selectivity"] < 0.05


def test_control_labels_fixed_per_item_and_order_free():
    items = ["a", "b", "a", "c", "b", "d"] * 20
    labels = np.asarray([0, 1] * 60)
    yc = probe.control_labels(items, labels, seed=3, salt="x")
    for it in set(items):
        assert len({int(v) for v, i in zip(yc, items, strict=True) if i == it}) == 1
    perm = list(reversed(range(len(items))))
    yc2 = probe.control_labels([items[i] for i in perm], labels[perm], seed=3, salt="x")
    assert [int(v) for v in yc2] == [int(yc[i]) for i in perm]
    many = probe.control_labels([str(i) for i in range(4000)], np.asarray([1] * 1000 + [0] * 3000), seed=0)
    assert 0.2 < many.mean() < 0.3  # the real labels' base rate


def test_config_validation():
    for bad in ({"pool": "max"}, {"seeds": 0}, {"test_size": 1.0}, {"C": 0}, {"per_class": 1}):
        with pytest.raises(Exception, match="--"):
            probe.ProbeConfig(**bad)
    assert probe.student_layer(12, 24, 24) == 12
    assert probe.student_layer(12, 24, 12) == 6
    assert probe.default_layer(30) == 15


def write_concepts(path, n_per_class=30, seed=0):
    texts, y = planted_texts(2 * n_per_class, seed)
    rng = np.random.default_rng(seed)
    rows = [
        {"text": t, "concept": "zebra", "label": int(v), "item": f"z{i}"}
        for i, (t, v) in enumerate(zip(texts, y, strict=True))
    ]
    rows += [
        {"text": t, "concept": "noise", "label": int(rng.integers(0, 2)), "item": f"n{i}"}
        for i, t in enumerate(planted_texts(2 * n_per_class, seed + 1)[0])
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_probe_run_teacher_and_student(cli, tmp_path, saved_models):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process: probe run itself must turn transformers' bars off
    concepts = write_concepts(tmp_path / "concepts.jsonl")
    out = tmp_path / "probe.parquet"
    student = saved_models / "width32"
    args = (
        "probe",
        "run",
        concepts,
        "--models",
        f"teacher,{student}",
        "--teacher",
        saved_models / "teacher",
        "--seeds",
        "3",
        "--format",
        "csv",
        "--device",
        "cpu",
    )
    r = cli(*args, "-o", out)
    assert r.exit_code == 0, r.output
    assert "Loading weights" not in r.stderr and "%|" not in r.stderr, r.stderr  # no transformers bar off a TTY
    cols = formats.read_table(out)
    assert list(cols["model"]) == ["teacher", "teacher", str(student), str(student)]
    assert list(cols["role"]) == ["teacher", "teacher", "student", "student"]
    assert sorted(set(cols["width"].tolist())) == [32, 64]
    assert set(cols["layer"].tolist()) == {2}  # teacher middle (4 blocks -> 2), same depth in the student
    acc = dict(zip(zip(cols["concept"], cols["model"], strict=True), cols["accuracy"], strict=True))
    assert acc[("zebra", "teacher")] > 0.85 and acc[("zebra", str(student))] > 0.85
    assert acc[("noise", "teacher")] < 0.75
    np.testing.assert_allclose(cols["selectivity"], cols["accuracy"] - cols["control_accuracy"])
    meta = formats.parquet_metadata(out)
    assert meta["kind"] == "kdtool.probe" and meta["provenance"]["params"]["seeds"] == 3
    lines = r.stdout.strip().splitlines()  # the table on stdout (CSV in a pipe)
    assert lines[0].startswith("concept,model,width,layer,accuracy") and len(lines) == 5

    again = tmp_path / "again.parquet"
    r2 = cli(*args, "-o", again)
    assert r2.exit_code == 0
    np.testing.assert_array_equal(formats.read_table(again)["accuracy"], cols["accuracy"])  # seeded

    fig = tmp_path / "probe.png"
    r3 = cli("plot", "probe", out, "-o", fig)
    assert r3.exit_code == 0, r3.output
    assert fig.stat().st_size > 10_000


def test_model_entries_resolve_teacher_and_students():
    entries = probe_job.model_entries(["teacher", "s/width8"], teacher="org/big", device="cpu")
    assert [(e.name, e.role) for e in entries] == [("teacher", "teacher"), ("s/width8", "student")]
    alias = probe_job.model_entries(["org/big", "s/width8"], teacher="org/big")  # the teacher by its own name
    assert [(e.name, e.role) for e in alias] == [("teacher", "teacher"), ("s/width8", "student")]
    assert [e.role for e in probe_job.model_entries(["s/a", "s/b"])] == ["student", "student"]
    for names, teacher, message in (
        ([], None, "at least one"),
        (["teacher", "teacher"], None, "twice"),
        (["teacher", "org/big"], "org/big", "same model"),
    ):
        with pytest.raises(BadInput, match=message):
            probe_job.model_entries(names, teacher=teacher)
    with pytest.raises(BadInput, match="--device"):
        probe_job.model_entries(["teacher"], device="tpu")


def test_probe_file_writes_the_table_and_reports_events(tmp_path, saved_models):
    concepts = write_concepts(tmp_path / "c.jsonl", n_per_class=12)
    out = tmp_path / "probe.parquet"
    events = []
    result = probe_job.probe_file(
        concepts,
        ["teacher"],
        probe.ProbeConfig(seeds=2, pool="last"),
        out,
        teacher=str(saved_models / "teacher"),
        only=["zebra"],
        device="cpu",
        provenance=lambda **kw: {"made_by": "test", **kw},
        callback=events.append,
    )
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and events[0] == {"event": "start", "concepts": 1, "texts": 24, "models": 1}
    assert kinds[1] == "model" and "batch" in kinds and kinds[-1] == "result"
    assert result.columns["concept"] == ["zebra"] and result.columns["pool"] == ["last"]
    assert result.summary["teacher"] == str(saved_models / "teacher") and result.summary["concepts"] == ["zebra"]
    meta = formats.parquet_metadata(out)
    assert meta["kind"] == "kdtool.probe" and meta["provenance"]["made_by"] == "test"
    assert meta["provenance"]["config"]["pool"] == "last"
    assert formats.read_table(out)["accuracy"].tolist() == result.columns["accuracy"]


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"text": "w1", "concept": "a", "label": 2}], "label"),
        ([{"text": "w1", "concept": "a"}], "missing column"),
        ([{"text": "w1", "concept": "a", "label": 1}, {"text": "w2", "concept": "a", "label": 0}], "at least 2"),
    ],
)
def test_cli_probe_rejects_bad_concepts(cli, tmp_path, rows, message):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("probe", "run", path, "--models", "teacher", "-o", tmp_path / "p.parquet")
    assert r.exit_code == 2
    assert "c.jsonl" in r.stderr and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_probe_option_errors(cli, tmp_path):
    concepts = write_concepts(tmp_path / "c.jsonl", n_per_class=5)
    r = cli("probe", "run", concepts, "--concepts", "nope", "-o", tmp_path / "p.parquet")
    assert r.exit_code == 2 and "nope" in r.stderr
    r = cli("probe", "run", concepts, "-o", tmp_path / "p.csv")
    assert r.exit_code == 2 and "--output" in r.stderr
    r = cli("probe", "run", concepts, "--models", "teacher,teacher", "-o", tmp_path / "p.parquet")
    assert r.exit_code == 2 and "twice" in r.stderr


def test_plot_probe_layers_and_bad_input(cli, tmp_path):
    cols = {k: [] for k in ("concept", "model", "role", "width", "layer", "accuracy", "accuracy_std", "selectivity")}
    for layer in (4, 8):
        for model, role, width in (("teacher", "teacher", 64), ("s/width16", "student", 16)):
            for concept in ("a", "b"):
                for k, v in zip(cols, (concept, model, role, width, layer, 0.9, 0.01, 0.4), strict=True):
                    cols[k].append(v)
    path = tmp_path / "p.parquet"
    formats.write_parquet(path, cols, kind="kdtool.probe")
    r = cli("plot", "probe", path, "-o", tmp_path / "f.png")
    assert r.exit_code == 2 and "--layer" in r.stderr  # two layers per (concept, model): must pick one
    r = cli("plot", "probe", path, "--layer", "8", "-o", tmp_path / "f.png")
    assert r.exit_code == 0, r.stderr
    r = cli("plot", "probe", path, "--layer", "5", "-o", tmp_path / "f.png")
    assert r.exit_code == 2 and "layer" in r.stderr
    formats.write_parquet(tmp_path / "bad.parquet", {"concept": ["a"], "model": ["t"]}, kind="kdtool.probe")
    r = cli("plot", "probe", tmp_path / "bad.parquet", "-o", tmp_path / "g.png")
    assert r.exit_code == 2 and "missing column" in r.stderr
