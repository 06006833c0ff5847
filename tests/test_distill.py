"""kdtool distill: losses named as the paper uses them, the training loop, floors, resume, teacher cache."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tokenizer, tiny_config, tiny_lm
from transformers import AutoModelForCausalLM

from kdtool import formats
from kdtool.distill import job
from kdtool.distill import loop as distill
from kdtool.distill.cohort import Students, lr_factor
from kdtool.distill.config import DistillConfig
from kdtool.distill.data import Cursor, repeating, text_streams
from kdtool.distill.files import few_evaluations
from kdtool.distill.loop import Teacher, rank_rows, train_step
from kdtool.distill.losses import FullTarget, LossSums, ce_per_token, kl_per_token, teacher_target
from kdtool.distill.objectives import StudentKey
from kdtool.distill.teacher_cache import TeacherCache
from kdtool.distributed import Dist
from kdtool.errors import BadInput, RuntimeFailure

VOCAB, SEQ, BATCH = 96, 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_teacher(arch: str = "gpt_neox"):
    """A random teacher with peaked outputs (large init std), so a narrow student cannot copy it."""
    cfg = tiny_config(arch, vocab=VOCAB, layers=2, width=48, heads=4, kv_heads=2, ffn=96, positions=64, init_std=0.3)
    return cfg, tiny_lm(config=cfg)


DATA = torch.randint(0, VOCAB, (64, BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def train_batches(skip):
    return iter(DATA[skip:48])


def eval_batches():
    return iter(DATA[48:])


def small_cfg(**kw):
    base = dict(
        widths=[8, 32],
        steps=12,
        warmup=2,
        batch_size=BATCH,
        seq_len=SEQ,
        eval_every=4,
        eval_batches=2,
        heads="head-dim:8",
        lr=3e-3,
        save_every=0,
        init_std="0.02",
    )
    return DistillConfig(**(base | kw))


class CountingTeacher(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, **kw):
        self.calls += 1
        return self.model(**kw)


# ------------------------------------------------------------------------------------------ losses


def test_kl_matches_definition_and_masks_padding():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11)
    T = 2.0
    kl = kl_per_token(s, teacher_target(t, T), T)
    p, logq = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
    expected = (p * (p.log() - logq)).sum(-1)
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(kl, F.kl_div(logq, p, reduction="none").sum(-1))
    assert torch.all(kl >= -1e-6)
    assert kl_per_token(t, teacher_target(t, T), T).abs().max() < 1e-5  # student == teacher
    # padding: masked positions do not change the sums, whatever the logits there
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    s2 = s.clone()
    s2[1, 3:] += 100
    a = (kl_per_token(s, teacher_target(t, T), T) * mask).sum()
    b = (kl_per_token(s2, teacher_target(t, T), T) * mask).sum()
    torch.testing.assert_close(a, b)


def test_named_values_relate_as_in_table3():
    """raw = T^2 x KL summed over positions; per-token = raw / (S T^2): the paper's 2,703 -> 1.320 at S=512."""
    s = LossSums(kl_sum=1.320 * 512 * 32, tokens=512 * 32, sequences=32, ce_sum=3.0 * 511 * 32, ce_tokens=511 * 32)
    v = s.values(2.0)
    assert v["kl"] == pytest.approx(1.320)
    assert v["kl_scaled"] == pytest.approx(4 * 1.320)
    assert v["raw_kl"] == pytest.approx(1.320 * 2048)  # 2,703.4 (Table 3)
    assert v["ce"] == pytest.approx(3.0)


def test_ce_skips_padding_pairs():
    logits = torch.randn(1, 4, 7)
    tokens = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[True, True, True, False]])
    ce, valid = ce_per_token(logits, tokens, mask)
    assert valid.tolist() == [[True, True, False]]
    torch.testing.assert_close(ce[0, 0], F.cross_entropy(logits[0, :1], tokens[0, 1:2]))


def test_topk_kl_is_a_lower_bound_and_exact_at_k_vocab_minus_1():
    torch.manual_seed(1)
    t, s, T = torch.randn(3, 6, 20) * 2, torch.randn(3, 6, 20), 2.0
    full = kl_per_token(s, teacher_target(t, T), T)
    prev = None
    for k in (1, 4, 10, 19):
        approx = kl_per_token(s, teacher_target(t, T, topk=k), T)
        assert torch.all(approx <= full + 1e-5)
        if prev is not None:
            assert torch.all(approx >= prev - 1e-5)  # a finer partition keeps more of the KL
        prev = approx
    torch.testing.assert_close(prev, full)  # k = V-1: the rest bin is one token


def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, warmup=10, steps=110, min_lr_ratio=0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10], strict=True))
    assert all(a >= b for a, b in zip(f[10:-1], f[11:], strict=True))
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(110, warmup=10, steps=110, min_lr_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(warmup=12), "--warmup"),
        (dict(widths=[8, 8]), "repeated"),
        (dict(temperature=0), "--temperature"),
        (dict(heads="bad"), "--heads"),
    ],
)
def test_config_errors_name_the_option(kw, message):
    with pytest.raises(BadInput, match=message):
        small_cfg(**kw)


# ------------------------------------------------------------------------------------------ training


def test_run_outputs_floors_and_is_deterministic(tmp_path):
    tc, teacher = tiny_teacher()
    counting = CountingTeacher(teacher)
    cfg = small_cfg()
    r1 = distill.run(
        cfg,
        teacher_config=tc,
        teacher=counting,
        train_batches=train_batches,
        eval_batches=eval_batches,
        out_dir=tmp_path / "a",
        provenance={"test": 1},
    )
    # one teacher forward per training batch for all widths; eval targets computed once and kept
    assert counting.calls == cfg.steps + cfg.eval_batches
    r2 = distill.run(
        cfg, teacher_config=tc, teacher=teacher, train_batches=train_batches, eval_batches=eval_batches, out_dir=None
    )
    assert r1.floors["floor"] == r2.floors["floor"]
    np.testing.assert_array_equal(np.asarray(r1.curves["train_kl"]), np.asarray(r2.curves["train_kl"]))
    # floor = mean held-out KL over evaluations at step >= 0.9 x steps (steps 11..12 -> only step 12 here)
    c = r1.curves
    for i, w in enumerate(cfg.widths):
        sel = [
            c["eval_kl"][j]
            for j in range(len(c["width"]))
            if c["width"][j] == w and c["step"][j] >= 11 and not math.isnan(c["eval_kl"][j])
        ]
        assert r1.floors["floor"][i] == pytest.approx(np.mean(sel))
        assert r1.floors["floor_scaled"][i] == pytest.approx(4 * r1.floors["floor"][i])
        assert r1.floors["raw_kl"][i] == pytest.approx(r1.floors["floor"][i] * SEQ * 4, rel=1e-6)
    # training lowers the KL
    first = [c["eval_kl"][j] for j in range(len(c["width"])) if c["step"][j] == 0]
    assert all(f > fl for f, fl in zip(first, r1.floors["floor"], strict=True))
    # files: floors readable by calibrate as is, curves with the columns, students reloadable
    floors = formats.read_table(
        tmp_path / "a" / "floors.parquet",
        required=("width", "floor", "floor_std", "params", "non_embedding_params", "raw_kl", "steps"),
    )
    assert floors["width"].tolist() == [8, 32]
    meta = formats.parquet_metadata(tmp_path / "a" / "floors.parquet")
    assert meta["kind"] == "kdtool.distill.floors" and meta["provenance"] == {"test": 1}
    curves = formats.read_table(
        tmp_path / "a" / "curves.parquet", required=("width", "step", "tokens", "train_kl", "eval_kl", "eval_ce", "lr")
    )
    assert curves["tokens"].max() == cfg.steps * BATCH * SEQ
    from kdtool.theory.calibration import load_points

    pts = load_points(tmp_path / "a" / "floors.parquet")
    assert pts.width.tolist() == [8, 32]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "width8")
    assert student.config.hidden_size == 8 and student.config.vocab_size == VOCAB
    assert (tmp_path / "a" / "width8" / "model.safetensors").exists()


def test_micro_batches_match_the_full_batch(tmp_path):
    tc, teacher = tiny_teacher()
    cfg = small_cfg(widths=[16], steps=4, eval_every=2)
    full = distill.run(cfg, teacher_config=tc, teacher=teacher, train_batches=train_batches, eval_batches=eval_batches)
    micro = distill.run(
        small_cfg(widths=[16], steps=4, eval_every=2, micro_batch=1),
        teacher_config=tc,
        teacher=teacher,
        train_batches=train_batches,
        eval_batches=eval_batches,
    )
    assert micro.floors["floor"][0] == pytest.approx(full.floors["floor"][0], rel=1e-4)


def test_wider_student_reaches_a_lower_floor():
    tc, teacher = tiny_teacher("llama")
    cfg = small_cfg(widths=[4, 48], steps=30, eval_every=3, lr=1e-2, heads="head-dim:4")
    r = distill.run(cfg, teacher_config=tc, teacher=teacher, train_batches=train_batches, eval_batches=eval_batches)
    narrow, wide = r.floors["floor"]
    assert wide < narrow
    assert r.floors["params"][0] < r.floors["params"][1]


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    tc, teacher = tiny_teacher()
    cfg = small_cfg(steps=8, save_every=3, eval_every=2)
    whole = distill.run(
        cfg,
        teacher_config=tc,
        teacher=teacher,
        train_batches=train_batches,
        eval_batches=eval_batches,
        out_dir=tmp_path / "whole",
    )

    class Killed(Exception):
        pass

    def kill_at_5(event):
        if event.get("event") == "step" and event["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        distill.run(
            cfg,
            teacher_config=tc,
            teacher=teacher,
            train_batches=train_batches,
            eval_batches=eval_batches,
            out_dir=tmp_path / "cut",
            callback=kill_at_5,
        )
    opened = []

    def tracking(skip):
        opened.append(skip)
        return train_batches(skip)

    resumed = distill.run(
        cfg,
        teacher_config=tc,
        teacher=teacher,
        train_batches=tracking,
        eval_batches=eval_batches,
        out_dir=tmp_path / "cut",
        resume=True,
    )
    assert resumed.resumed_from == 3 and opened == [3]  # data position restored, not replayed from 0
    assert resumed.floors["floor"] == whole.floors["floor"]
    assert resumed.curves["eval_kl"][:2] == whole.curves["eval_kl"][:2]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "width32").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "width32").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BadInput, match="other settings.*temperature"):
        distill.run(
            small_cfg(steps=8, save_every=3, eval_every=2, temperature=3.0),
            teacher_config=tc,
            teacher=teacher,
            train_batches=train_batches,
            eval_batches=eval_batches,
            out_dir=tmp_path / "cut",
            resume=True,
        )


def test_teacher_cache_skips_the_teacher_on_rerun(tmp_path):
    tc, teacher = tiny_teacher()
    k = VOCAB - 1  # the rest bin is a single token: the cached KL is exact, so floors must match a full run
    cfg = small_cfg(steps=6, topk=k)
    key = {"teacher": "tiny", "data": "DATA"}
    cache = TeacherCache(tmp_path / "cache", key=key, topk=k, temperature=2.0, vocab_size=VOCAB)
    cache.save_teacher(tc)
    first = distill.run(
        cfg, teacher_config=tc, teacher=teacher, train_batches=train_batches, eval_batches=eval_batches, cache=cache
    )
    full = distill.run(
        small_cfg(steps=6), teacher_config=tc, teacher=teacher, train_batches=train_batches, eval_batches=eval_batches
    )
    for a, b in zip(first.floors["floor"], full.floors["floor"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    cache2 = TeacherCache(tmp_path / "cache", key=key, topk=k, temperature=2.0)
    assert cache2.covers(cfg.steps, cfg.eval_batches, (0, BATCH))
    assert not cache2.covers(cfg.steps + 1, cfg.eval_batches, (0, BATCH))

    def no_teacher():
        raise AssertionError("the teacher should not be loaded")

    second = distill.run(
        cfg,
        teacher_config=cache2.load_teacher_config(),
        teacher=no_teacher,
        train_batches=None,
        eval_batches=None,
        cache=cache2,
    )
    assert second.floors["floor"] == first.floors["floor"]
    with pytest.raises(BadInput, match="another run.*temperature"):
        TeacherCache(tmp_path / "cache", key=key, topk=k, temperature=1.0)


def test_cached_runs_train_on_topk_but_report_the_full_kl(tmp_path):
    """A small k changes training only: held-out batches are cached in full, so step 0 (same init) matches."""
    tc, teacher = tiny_teacher()
    cache = TeacherCache(tmp_path / "cache", key={"t": 1}, topk=4, temperature=2.0)
    cached = distill.run(
        small_cfg(steps=4, topk=4),
        teacher_config=tc,
        teacher=teacher,
        train_batches=train_batches,
        eval_batches=eval_batches,
        cache=cache,
    )
    full = distill.run(
        small_cfg(steps=4), teacher_config=tc, teacher=teacher, train_batches=train_batches, eval_batches=eval_batches
    )
    at0 = [i for i, s in enumerate(full.curves["step"]) if s == 0]
    assert [cached.curves["eval_kl"][i] for i in at0] == [full.curves["eval_kl"][i] for i in at0]
    assert cached.curves["train_kl"][-1] != full.curves["train_kl"][-1]  # trained on the top-4 bins
    assert cached.floors["topk"] == [4, 4] and full.floors["topk"] == [0, 0]


def test_data_running_out_is_a_runtime_failure():
    tc, teacher = tiny_teacher()
    with pytest.raises(RuntimeFailure, match="ran out after 3 batches"):
        distill.run(
            small_cfg(steps=6),
            teacher_config=tc,
            teacher=teacher,
            train_batches=lambda skip: iter(DATA[skip:3]),
            eval_batches=eval_batches,
        )


def test_full_target_roundtrip_rows():
    t = teacher_target(torch.randn(4, 3, 9), 2.0)
    assert isinstance(t, FullTarget) and t.rows(1, 3).logp.shape == (2, 3, 9)


# ------------------------------------------------------------------------------------------ CLI

WORDS = (
    "the cat sat on a mat and saw one dog run far away from home while rain fell over green hills "
    "where old trees stood near quiet water under grey sky"
).split()


def make_teacher_dir(path, arch: str = "gpt_neox"):
    """A saved tiny teacher (byte-level BPE tokenizer + random model) that `--model PATH` loads."""
    from transformers.utils import logging as hf_logging

    fast = make_tokenizer(path, vocab_size=300, corpus=[" ".join(WORDS)] * 8)
    hf_logging.disable_progress_bar()
    model = tiny_lm(arch, vocab=len(fast), layers=2, width=32, heads=4, kv_heads=2, ffn=64, positions=128, init_std=0.2)
    model.save_pretrained(path)
    return path


def make_text(path, paragraphs: int = 600):
    rng = np.random.default_rng(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(10, 40)))) for _ in range(paragraphs))
    path.write_text(text + "\n")
    return path


TINY_ARGS = (
    "--widths",
    "8,16",
    "--heads",
    "head-dim:8",
    "--steps",
    "6",
    "--warmup",
    "1",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
    "--lr",
    "3e-3",
    "--device",
    "cpu",
)


@pytest.fixture(scope="module")
def teacher_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return make_teacher_dir(root / "model"), make_text(root / "text.txt")


def test_cli_distill_writes_floors_and_reuses_the_teacher_cache(cli, tmp_path, teacher_and_text):
    model, text = teacher_and_text
    out = tmp_path / "students"
    args = ("--model", model, "--dataset", text, *TINY_ARGS, "-o", out)
    r = cli("--json", "distill", *args, "--teacher-cache", tmp_path / "tc", "--topk", "16")
    assert r.exit_code == 0, r.output
    import json

    rows = json.loads(r.stdout)["rows"]
    assert [row["width"] for row in rows] == [8, 16]
    assert all(row["floor"] > 0 and row["raw_kl"] == pytest.approx(row["floor"] * 16 * 4, rel=1e-6) for row in rows)
    meta = formats.parquet_metadata(out / "floors.parquet")
    assert meta["provenance"]["params"]["widths"] == "8,16"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "width8").eos_token == "<|endoftext|>"
    # a rerun with everything cached does not load the teacher (loading it would fail here), and the
    # cache knows the teacher by its content: another spelling of its path is the same teacher
    import kdtool.models

    def no_loading(*a, **k):
        raise AssertionError("the teacher was loaded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kdtool.models, "load_model", no_loading)
        r2 = cli(
            "--json",
            "distill",
            "--model",
            f"{model.parent}/./{model.name}/",
            "--dataset",
            text,
            *TINY_ARGS,
            "--teacher-cache",
            tmp_path / "tc",
            "--topk",
            "16",
            "-o",
            tmp_path / "again",
        )
    assert r2.exit_code == 0, r2.output
    assert "the teacher is not loaded" in r2.stderr
    assert json.loads(r2.stdout)["rows"] == rows
    # an existing checkpoint is not silently overwritten
    r3 = cli("distill", *args)
    assert r3.exit_code == 2 and "--resume" in r3.stderr
    r4 = cli("--json", "distill", *args, "--resume")  # without the cache: other settings (topk)
    assert r4.exit_code == 2 and "topk" in r4.stderr
    # a finished run's --resume: nothing to train, left as it is (not a file rewritten), same floors
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r4 = cli("--json", "distill", *args, "--resume", "--teacher-cache", tmp_path / "tc", "--topk", "16")
    assert r4.exit_code == 0 and "left as it is" in r4.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    assert [row["floor"] for row in json.loads(r4.stdout)["rows"]] == [row["floor"] for row in rows]
    # --overwrite with other widths and losses: the earlier run's students go, folders kdtool did not write stay
    (out / "width99-notes").mkdir()
    r5 = cli("--quiet", "distill", *args, "--widths", "8", "--loss", "tvd", "--overwrite")
    assert r5.exit_code == 0, r5.output
    assert sorted(p.name for p in out.glob("width*")) == ["width8-tvd", "width99-notes"]


def test_cli_distill_bad_options_are_one_line(cli, tmp_path, teacher_and_text):
    model, text = teacher_and_text
    r = cli("distill", "--model", model, "--dataset", text, *TINY_ARGS, "--heads", "head-dim:5", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "multiple of 5" in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line, before any model is loaded
    r = cli("distill", "--widths", "8,x", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--widths" in r.stderr
    r = cli("distill", "--format", "parquet", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "floors.parquet" in r.stderr


# ------------------------------------------------------------------------------------------ pieces of the loop


def test_one_train_step_uses_one_teacher_forward_per_micro_batch_for_all_widths():
    tc, teacher = tiny_teacher()
    counting = CountingTeacher(teacher)
    cfg = small_cfg(micro_batch=2)
    d = Dist()
    students = Students(cfg, tc, torch.device("cpu"))
    teach = Teacher(cfg, counting, None, rank_rows(cfg.batch_size, d), torch.device("cpu"), contextlib.nullcontext)
    before = {k: m.gpt_neox.embed_in.weight.clone() for k, m in students.models.items()}
    values, lrs, norms = train_step(0, students, teach, Cursor(train_batches, cfg), d)
    assert counting.calls == 2  # batch of 4 in micro-batches of 2, shared by both widths
    assert set(values) == set(lrs) == set(norms) == {StudentKey(8, "kl"), StudentKey(32, "kl")}
    assert all(v["tokens"] == BATCH * SEQ and v["kl"] > 0 for v in values.values())
    assert lrs[StudentKey(8, "kl")] == pytest.approx(cfg.lr * lr_factor(0, warmup=2, steps=12, min_lr_ratio=0.0))
    assert all(not torch.equal(before[k], m.gpt_neox.embed_in.weight) for k, m in students.models.items())
    assert rank_rows(8, Dist(rank=1, world=2)) == (4, 8)


def test_repeating_starts_the_next_epoch_and_skips_across_epochs():
    epochs = {e: [f"e{e}b{i}" for i in range(3)] for e in range(4)}
    told = []
    train = repeating(lambda epoch, skip: iter(epochs[epoch][skip:]), lambda e, at: told.append((e, at)))
    assert list(islice(train(0), 7)) == ["e0b0", "e0b1", "e0b2", "e1b0", "e1b1", "e1b2", "e2b0"]
    assert told == [(1, 3), (2, 6)]
    assert list(islice(train(4), 3)) == ["e1b1", "e1b2", "e2b0"]  # a resume lands in epoch 1
    fresh = repeating(lambda epoch, skip: iter(epochs[epoch][skip:]))
    assert next(fresh(7)) == "e2b1"  # skipping past the first epoch before its length is known


def test_text_streams_reshuffle_each_epoch_and_hold_out_eval_documents(tmp_path, teacher_and_text):
    from transformers import AutoTokenizer

    from kdtool.text.tokens import DataSpec, token_batches

    tok = AutoTokenizer.from_pretrained(teacher_and_text[0])
    spec = DataSpec(dataset=str(make_text(tmp_path / "small.txt", paragraphs=40)), seq_len=SEQ, seed=3)
    told = []
    train, held = text_streams(spec, tok, 2, on_new_epoch=lambda e, at: told.append((e, at)))
    epoch0 = list(token_batches(spec, tok, 2, drop_last=True))
    epoch1 = list(token_batches(dataclasses.replace(spec, seed=4), tok, 2, drop_last=True))
    n = len(epoch0)
    got = list(islice(train(0), n + 2))
    assert all(torch.equal(a, b) for a, b in zip(got, epoch0 + epoch1[:2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))  # reshuffled
    assert told == [(1, n)]
    assert torch.equal(next(iter(train(n + 1))), epoch1[1])
    evals = list(token_batches(dataclasses.replace(spec, holdout="eval"), tok, 2, drop_last=True))
    assert all(torch.equal(a, b) for a, b in zip(held(), evals, strict=True)) and evals


def test_few_evaluations_warns_only_below_two():
    cfg = small_cfg(steps=100)
    assert few_evaluations(cfg, {"n_evals": [2, 5]}) is None
    note = few_evaluations(cfg, {"n_evals": [1, 3]})
    assert "averages 1 evaluation(s) (steps >= 90)" in note and "--eval-every <= 5" in note


# ------------------------------------------------------------------------------------------ the job


def test_run_key_and_rank_device(monkeypatch):
    from kdtool.models import ModelSpec
    from kdtool.text.tokens import DataSpec

    key = job.run_key(ModelSpec(dtype="float32"), DataSpec(dataset="x.txt"))
    assert key["teacher"]["source"] == "embedded" and key["teacher_dtype"] == "float32"
    assert key["text"]["dataset"] == "x.txt" and key["text"]["fingerprint"].startswith("sha256:")
    assert {**key["data"], "dataset": "x.txt"} == DataSpec(dataset="x.txt").describe()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert job.rank_device("auto") == "auto"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert job.rank_device("auto") == job.rank_device("cuda") == "cuda:1"
    assert job.rank_device("cpu") == "cpu" and job.rank_device("cuda:0") == "cuda:0"


def test_distill_text_runs_resumes_and_reuses_the_cache(tmp_path, teacher_and_text):
    from kdtool.models import ModelSpec, load_model
    from kdtool.text.tokens import DataSpec

    model, text = teacher_and_text
    spec = DataSpec(dataset=str(text), seq_len=SEQ)
    cfg = small_cfg(widths=[8, 16], steps=6, batch_size=2, eval_every=3, topk=16, run_key={"teacher": "tiny"})
    loads = []

    def load():
        loads.append(1)
        return load_model(ModelSpec(model=str(model), device="cpu"))

    def record(**kw):
        return {"made_by": "test", **kw}

    events = []
    first = job.distill_text(
        cfg, spec, load, tmp_path / "a", cache_dir=tmp_path / "tc", provenance=record, callback=events.append
    )
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds.count("step") == 6 and loads == [1]
    assert events[0]["teacher"] == str(model) and events[0]["world"] == 1
    assert first.provenance["made_by"] == "test" and first.provenance["config"]["distill"]["topk"] == 16
    assert formats.parquet_metadata(tmp_path / "a" / "floors.parquet")["provenance"]["made_by"] == "test"
    with pytest.raises(BadInput, match="checkpoint exists"):
        job.distill_text(cfg, spec, load, tmp_path / "a")
    with pytest.raises(BadInput, match="contradict"):
        job.distill_text(cfg, spec, load, tmp_path / "a", resume=True, overwrite=True)

    def no_teacher():
        raise AssertionError("every batch is cached: the teacher must not be loaded")

    events.clear()
    again = job.distill_text(
        cfg, spec, no_teacher, tmp_path / "a", cache_dir=tmp_path / "tc", overwrite=True, callback=events.append
    )
    assert events[0] == {"event": "teacher-cached", "cache": tmp_path / "tc"}
    assert again.floors["floor"] == first.floors["floor"]
    resumed = job.distill_text(cfg, spec, no_teacher, tmp_path / "a", cache_dir=tmp_path / "tc", resume=True)
    assert resumed.resumed_from == 6 and resumed.floors["floor"] == first.floors["floor"]


# ------------------------------------------------------------------------------------------ figures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "students"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tc, teacher = tiny_teacher()
        distill.run(
            small_cfg(widths=[8, 16, 32], steps=10, eval_every=1),
            teacher_config=tc,
            teacher=teacher,
            train_batches=train_batches,
            eval_batches=eval_batches,
            out_dir=out,
        )
    finally:
        torch.set_num_threads(n)
    return out


@pytest.fixture
def captured(monkeypatch):
    """Keep the figures a plot function would save, so tests can read what was drawn."""
    from kdtool.plots import style

    figures = []
    monkeypatch.setattr(style, "save", lambda fig, output, **kw: figures.append(fig))
    yield figures
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


def test_plot_kinds_render_from_a_run_folder(cli, run_dir, tmp_path):
    from kdtool.plots.style import read_figure_metadata

    for kind in ("distill-curves", "floors", "decomposition"):
        out = tmp_path / f"{kind}.png"
        r = cli("plot", kind, run_dir, "-o", out)
        assert r.exit_code == 0, r.output
        assert read_figure_metadata(out)["kind"] == f"kdtool.figure.{kind}"
    r = cli("plot", "floors", run_dir / "curves.parquet", "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "floors.parquet" in r.stderr


def test_curves_figure_draws_eval_kl_and_floor_lines(run_dir, captured):
    from kdtool.plots import distill as pd

    pd.curves([run_dir], Path("x.png"), style="paper", options={"widths": [8, 32]})
    ax = captured[0].axes[0]
    floors = formats.read_table(run_dir / "floors.parquet")
    curves = formats.read_table(run_dir / "curves.parquet")
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert len(solid) == 2  # only the widths asked for
    ev8 = curves["eval_kl"][(curves["width"] == 8) & np.isfinite(curves["eval_kl"])]
    np.testing.assert_allclose(solid[0].get_ydata(), ev8)
    dashed = sorted(ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--")
    np.testing.assert_allclose(dashed, sorted(floors["floor"][[0, 2]]))


def test_floors_figure_marks_d_star_from_stats(run_dir, tmp_path, captured):
    from kdtool.plots import distill_floors as pd
    from kdtool.theory import theorem as theory

    n, l0 = 400, 8.0
    imp = 1.0 / np.arange(1, n + 1)
    formats.write_parquet(
        tmp_path / "stats.parquet",
        {
            "layer": np.full(n, 1, np.int32),
            "feature": np.arange(n, dtype=np.int32),
            "freq": np.full(n, l0 / n),
            "importance": imp,
            "alive": np.ones(n, bool),
        },
        kind="kdtool.stats",
        summary=None,
    )
    pd.floors([run_dir / "floors.parquet", tmp_path / "stats.parquet"], Path("x.png"), style="paper", options={})
    ax = captured[0].axes[0]
    d_star = n / float(theory.g(1 - l0 / n))
    vlines = [ln.get_xdata()[0] for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1]
    assert any(abs(x - d_star) < 1e-6 for x in vlines)


def test_decomposition_bars_follow_table5(tmp_path, captured):
    from kdtool.plots import distill as pd

    calib = {
        "kind": "kdtool.calibration",
        "decomposition_fit": {"fit": "affine_fixed", "C": 8.97, "B": 0.586},
        "decomposition": [
            {
                "width": w,
                "observed": o,
                "predicted": x,
                "geometric": 8.97 * x,
                "baseline": 0.586,
                "pct_geometric": (o - 0.586) / o,
            }
            for w, o, x in ((128, 1.320, 0.0795), (256, 1.008, 0.04), (1024, 0.586, 0.0001))
        ],
    }
    formats.write_json(tmp_path / "calib.json", calib)
    pd.decomposition([tmp_path / "calib.json"], Path("x.png"), style="paper", options={})
    ax = captured[0].axes[0]
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert heights == [0.586, 0.586, 0.586, 0.734, 0.422, 0.0]  # baseline bars, then observed - B
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["55.6%", "41.9%", "0.0%"]  # Table 5's % geometric
    # from floors alone: B = the widest student's floor
    formats.write_parquet(
        tmp_path / "floors.parquet", {"width": [128, 1024], "floor": [1.32, 0.586]}, kind="kdtool.distill.floors"
    )
    pd.decomposition([tmp_path / "floors.parquet"], Path("y.png"), style="paper", options={})
    assert [round(p.get_height(), 3) for p in captured[1].axes[0].patches] == [0.586, 0.586, 0.734, 0.0]


def test_cli_distill_short_run_defaults_and_manners(cli, tmp_path, teacher_and_text, monkeypatch):
    """--warmup scales with --steps; the table goes to stderr; progress off a TTY is common.progress's plain line."""
    from kdtool.cli import common
    from kdtool.cli.distill import default_warmup

    assert (default_warmup(30_000), default_warmup(20), default_warmup(6)) == (1000, 2, 0)
    monkeypatch.setattr(common, "LOG_EVERY_S", 0.0)
    model, text = teacher_and_text
    args = [a for a in TINY_ARGS if a not in ("--warmup", "1")]  # the README's short run, without --warmup
    assert "--warmup" not in args and "1" not in args
    r = cli("distill", "--model", model, "--dataset", text, *args, "-o", tmp_path / "students")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""  # a folder writer: human tables on stderr
    assert "distillation floors" in r.stderr
    assert "distill: 6/6 (100%)" in r.stderr and "ETA" in r.stderr
    assert "step 1/6" not in r.stderr  # distill's own once-a-minute line is gone
    note = [line for line in r.stderr.splitlines() if "checkpoint/ (" in line]
    assert len(note) == 1 and "--resume" in note[0] and "rm -r" in note[0] and " MB" in note[0], r.stderr
