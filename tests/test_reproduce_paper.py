"""scripts/reproduce-paper: every command of the plan parses against the real CLI and carries the
paper's settings, the disk arithmetic is the sizes' arithmetic, times follow the rates, --measure
times brief real runs of a tiny model, and a run skips finished stages and resumes the others."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from tiny_models import make_model_dir

from kdtool import formats
from kdtool.cli.main import app
from kdtool.parsing import parse_count
from kdtool.reproduce import run as reproduce_run
from kdtool.reproduce import sizes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce-paper"
TRIALS = ["A", "B", "C"]
PAPER_STAGES = [
    *(f"train-sae-{t}" for t in TRIALS),
    *(f"stats-{t}" for t in TRIALS),
    *(f"predict-{t}" for t in TRIALS),
    "distill",
    *(f"calibrate-{t}" for t in TRIALS),
    "concepts",
    "probe",
    "report",
]
SAE = 4 * (2 * 1024 * 32768 + 32768 + 1024)  # W_enc + W_dec + b_enc + b_pre, fp32
ADAM = 2 * SAE + 8 * 32768  # two moments + last_fired int64


@pytest.fixture(scope="module")
def script():
    loader = importlib.machinery.SourceFileLoader("reproduce_paper", str(SCRIPT))
    spec = importlib.util.spec_from_loader("reproduce_paper", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")


def parse(argv: list[str]) -> dict:
    """Parse a plan command with kdtool's own Typer app (option names, types and ranges checked,
    nothing run); returns the command's parsed parameters."""
    if argv[0] == "torchrun":
        assert argv[1:3] == ["--nproc_per_node", argv[2]] and argv[3:5] == ["-m", "kdtool"]
        argv = argv[4:]
    assert argv[0] == "kdtool"
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="kdtool")
    cmd, args = group, argv[1:]
    while hasattr(cmd, "commands"):
        name, args = args[0], args[1:]
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"no command {name!r} in {argv}"
        if hasattr(sub, "commands"):
            ctx = sub.context_class(sub, info_name=name, parent=ctx)
        else:
            ctx = sub.make_context(name, list(args), parent=ctx)
            assert not ctx.args, f"unparsed arguments {ctx.args} in {argv}"
        cmd = sub
    return ctx.params


def dry(script, capsys, *args) -> dict:
    rc = script.main(["--dry-run", "--json", *map(str, args)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


def stages(plan: dict) -> dict[str, dict]:
    return {s["name"]: s for s in plan["stages"]}


def test_paper_plan_parses_and_carries_the_paper_settings(script, capsys, tmp_path):
    out = tmp_path / "run"
    plan = dry(script, capsys, "--out", out)
    assert [s["name"] for s in plan["stages"]] == PAPER_STAGES
    params = {s["name"]: parse(s["argv"]) for s in plan["stages"]}

    for t in TRIALS:
        p = params[f"train-sae-{t}"]
        assert p["model"] == "EleutherAI/pythia-410m" and p["dataset"] == "monology/pile-uncopyrighted"
        assert p["acts"] is None and p["seq_len"] == 1024  # streamed, 32 x 1024 batches
        assert p["layer"] == "8,12,16" and float(p["expansion"]) == 32 and p["batch_tokens"] == "32768"
        assert parse_count(p["tokens"]) == 300_000_000 and parse_count(p["checkpoint_every"]) == 50_000_000
        assert p["output"] == out / f"saes-{t}"
        assert parse_count(params[f"stats-{t}"]["tokens"]) == 10_000_000
    # the authors' three trials (field notes): A dense 3e-4, B paper-exact 8e-5, C adaptive from 5e-4 to L0 150
    assert float(params["train-sae-A"]["l1"]) == 3e-4 and params["train-sae-A"]["target_l0"] is None
    assert float(params["train-sae-B"]["l1"]) == 8e-5 and params["train-sae-B"]["target_l0"] is None
    assert params["train-sae-C"]["target_l0"] == 150 and params["train-sae-C"]["l1_rate"] == 0.01
    assert float(params["train-sae-C"]["l1"]) == 5e-4
    assert "(dense)" in stages(plan)["train-sae-A"]["title"] and "(adaptive)" in stages(plan)["train-sae-C"]["title"]

    d = params["distill"]
    assert d["widths"] == "128,256,512,768,1024" and d["heads"] == "paper" and d["temperature"] == 2
    assert (d["lr"], d["weight_decay"], d["warmup"], d["min_lr_ratio"]) == (3e-4, 0.01, 1000, 0.0)
    assert (d["batch_size"], d["seq_len"], d["steps"], d["eval_every"]) == (32, 512, 30000, 500)
    for t in TRIALS:
        assert params[f"calibrate-{t}"]["layer"] == 12 and params[f"calibrate-{t}"]["baseline_width"] == 1024
    pr = params["probe"]
    assert pr["layer"] == 12 and pr["per_class"] == 2000 and pr["teacher"] == "EleutherAI/pythia-410m"
    assert pr["models"] == ",".join(["teacher", *(str(out / "students" / f"width{w}") for w in (128, 768, 1024))])

    # every file a stage reads was written by an earlier stage (the chain is wired end to end)
    written: list[Path] = []
    for name in PAPER_STAGES:
        p = params[name]
        reads = [v for k, v in p.items() if k != "output" and isinstance(v, Path)]
        reads += [x for v in p.values() if isinstance(v, list) for x in v if isinstance(x, Path)]
        if name == "probe":
            reads += [Path(m) for m in p["models"].split(",")[1:]]
        if name == "report":  # reads the whole run folder, which holds everything written above
            assert reads == [out] and all(out in w.parents for w in written)
            continue
        for r in reads:
            assert any(r == w or w in r.parents for w in written), f"{name} reads {r}, which no earlier stage wrote"
        written.append(p["output"])

    tok = stages(plan)
    assert tok["train-sae-A"]["tokens"] == {
        "teacher_forward": 9155 * 32768,
        "sae_train_per_layer": 9155 * 32768,
        "steps": 9155,
    }
    assert tok["distill"]["tokens"]["train_per_student"] == 30000 * 32 * 512
    assert tok["distill"]["tokens"]["evaluations"] == 61  # step 0 and every 500


def test_disk_arithmetic(script, capsys, tmp_path):
    assert sizes.sae_bytes(1024, 32768) == SAE == 268_570_624
    plan = dry(script, capsys, "--out", tmp_path / "run")
    st = stages(plan)
    # 3 layers x (final + 6 checkpoints) SAEs + the latest checkpoint's Adam state
    assert st["train-sae-A"]["disk_bytes"] == 3 * 7 * SAE + 3 * ADAM
    assert st["train-sae-A"]["peak_extra_bytes"] == 3 * ADAM
    students = plan["teacher"]["students"]
    params = sum(c["params"] for c in students.values())
    for w, paper in zip((128, 256, 512, 768, 1024), (18e6, 45e6, 127e6, 247e6, 405e6), strict=True):
        assert abs(students[str(w)]["params"] - paper) / paper < 0.03  # Table 8
    assert st["distill"]["disk_bytes"] == 4 * params + 12 * params
    assert plan["totals"]["disk_bytes"] == sum(s["disk_bytes"] for s in plan["stages"])
    assert any("1.84 TB" in n for n in plan["notes"])  # what a cache would cost, in streaming mode

    cached = dry(script, capsys, "--out", tmp_path / "run", "--sae-input", "cache", "--teacher-cache")
    st = stages(cached)
    assert st["cache-acts"]["disk_bytes"] == 300_000_000 * 3 * 1024 * 2 == 1_843_200_000_000
    assert parse(st["train-sae-A"]["argv"])["acts"] == tmp_path / "run" / "acts"
    # top-64 of every training token; the held-out batches whole (50,304 log-probs per token)
    cache = 30000 * 32 * 512 * (8 * 64 + 9) + 8 * 32 * 512 * (4 * 50304 + 5)
    assert st["distill"]["disk_bytes"] == 16 * params + cache
    assert parse(st["distill"]["argv"])["topk"] == 64

    assert script.main(["--dry-run", "--out", str(tmp_path / "run"), "--sae-input", "cache"]) == 0
    text = capsys.readouterr().out
    assert "1.84 TB (activation cache: 300,000,000 tokens x 3 layers x 1024 x 2 bytes)" in text
    assert "time    unknown for cache-acts, train-sae-A" in text


def test_all_layers_and_the_extra_trials(script, capsys, tmp_path):
    """--all-layers: every block's output (24 for Pythia-410M), each trial one train-sae run of 24 SAEs;
    the disk, cache and device-memory arithmetic scale with the layers."""
    out = tmp_path / "run"
    plan = dry(script, capsys, "--out", out, "--all-layers")
    st = stages(plan)
    assert [s["name"] for s in plan["stages"]] == PAPER_STAGES
    for t in TRIALS:
        p = parse(st[f"train-sae-{t}"]["argv"])
        assert p["layer"] == ",".join(map(str, range(1, 25)))
        assert parse_count(p["checkpoint_every"]) == 50_000_000  # 50/100/.../300M: 24 x 6 = 144 per trial
        assert st[f"train-sae-{t}"]["tokens"]["sae_train_per_layer"] == 9155 * 32768
        assert st[f"train-sae-{t}"]["disk_bytes"] == 24 * 7 * SAE + 24 * ADAM
        assert st[f"train-sae-{t}"]["peak_extra_bytes"] == 24 * ADAM
        assert st[f"stats-{t}"]["disk_bytes"] == 24 * 32768 * sizes.STATS_ROW_BYTES
    assert parse(st["calibrate-A"]["argv"])["layer"] == 12 and parse(st["probe"]["argv"])["layer"] == 12
    three = dry(script, capsys, "--out", out)
    extra = 3 * (21 * 7 * SAE + 21 * ADAM + 21 * 32768 * sizes.STATS_ROW_BYTES)  # 24 - 3 more layers, 3 trials
    assert plan["totals"]["disk_bytes"] - three["totals"]["disk_bytes"] == extra
    assert any("14.7 TB (300,000,000 tokens x 24 layers x 1024 x 2 bytes)" in n for n in plan["notes"])
    assert any("hidden_states 1..24" in n for n in plan["notes"])
    held, scratch = 24 * (4 * SAE + 8 * 32768), 3 * 4 * 32768 * 32768
    assert sizes.sae_training_memory(1024, 32768, 24, 32768) == (held, scratch)
    assert any(f"{sizes.fmt_bytes(held)} for 24 SAEs" in n for n in plan["notes"])

    plan = dry(script, capsys, "--out", out, "--trials", "stated,code,B")
    params = {s["name"]: parse(s["argv"]) for s in plan["stages"] if s["family"] == "train-sae"}
    assert list(params) == ["train-sae-stated", "train-sae-code", "train-sae-B"]
    assert float(params["train-sae-stated"]["l1"]) == 8e-4 and float(params["train-sae-code"]["l1"]) == 2.5e-5
    assert params["train-sae-code"]["output"] == out / "saes-code"


def test_scaled_down_plan(script, capsys, tmp_path):
    plan = dry(
        script,
        capsys,
        "--out",
        tmp_path,
        "--tokens",
        "30M",
        "--steps",
        3000,
        "--widths",
        "128,512",
        "--layers",
        "8,12",
        "--trials",
        "A,C",
        "--skip",
        "concepts,probe",
    )
    st = stages(plan)
    assert [s["name"] for s in plan["stages"]] == [
        "train-sae-A",
        "train-sae-C",
        "stats-A",
        "stats-C",
        "predict-A",
        "predict-C",
        "distill",
        "calibrate-A",
        "calibrate-C",
        "report",
    ]
    assert parse_count(parse(st["train-sae-C"]["argv"])["checkpoint_every"]) == 5_000_000  # still 6 per run
    d = parse(st["distill"]["argv"])
    assert (d["steps"], d["warmup"], d["eval_every"], d["save_every"]) == (3000, 100, 50, 100)
    c = parse(st["calibrate-A"]["argv"])
    assert c["layer"] == 12 and c["baseline_width"] == 512  # 1024 is not distilled: the widest is the control
    assert any("control width 1024" in n for n in plan["notes"])

    plan = dry(script, capsys, "--out", tmp_path, "--layers", "4,6", "--widths", "256,768")
    p = parse(stages(plan)["probe"]["argv"])
    assert p["layer"] == 6 and p["models"] == f"teacher,{tmp_path / 'students' / 'width768'}"


def test_torchrun_and_bad_options(script, capsys, tmp_path):
    plan = dry(script, capsys, "--out", tmp_path, "--torchrun", 4)
    argv = stages(plan)["distill"]["argv"]
    assert argv[:6] == ["torchrun", "--nproc_per_node", "4", "-m", "kdtool", "distill"]
    parse(argv)
    assert reproduce_run.exec_argv(argv)[:3] == [sys.executable, "-m", "torch.distributed.run"]

    for args, message in (
        (["--torchrun", "3"], "--torchrun 3: --batch-size 32 must be divisible by it"),
        (["--trials", "A,Z"], "--trials: unknown trial(s) Z; known: A, B, C, stated, code"),
        (["--all-layers", "--layers", "8"], "--all-layers and --layers: give one"),
        (["--steps", "500", "--warmup", "600"], "--warmup 600 must be below --steps 500"),
        (["--layers", "8,30"], "--layers 30: EleutherAI/pythia-410m has hidden_states 0..24"),
        (["--skip", "everything"], "--skip: unknown stage(s) everything"),
        (["--rate-distill", "fast"], "--rate-distill: not a rate: 'fast'"),
    ):
        assert script.main(["--dry-run", "--out", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("reproduce-paper: error: ") and message in err[0], err


def test_cli_entry_point_help_and_error():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--measure" in r.stdout
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--trials", "Q"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "reproduce-paper: error: --trials: unknown trial(s) Q; known: A, B, C, stated, code"


def test_time_follows_the_rates(script, capsys, tmp_path):
    plan = dry(
        script, capsys, "--out", tmp_path, "--rate-train-sae", "100K", "--rate-stats", "250000", "--rate-distill", "2"
    )
    st = stages(plan)
    assert st["train-sae-B"]["seconds"] == pytest.approx(9155 * 32768 / 1e5)
    assert st["stats-B"]["seconds"] == pytest.approx(1e7 / 2.5e5)
    # 30,000 steps at 2/s + 59 more evaluations than the brief runs, 8 batches each at a third of a step
    assert st["distill"]["seconds"] == pytest.approx(30000 / 2 + 59 * 8 / 3 / 2)
    assert st["probe"]["seconds"] == pytest.approx(6 * 2 * 2000 * 128 * 4 / 2.5e5)
    assert plan["totals"]["seconds"] == pytest.approx(sum(s["seconds"] or 0 for s in plan["stages"]))
    # with a cache, stats reads disk: the teacher's forward rate is cache-acts'
    cached = stages(dry(script, capsys, "--out", tmp_path, "--sae-input", "cache", "--rate-cache-acts", "50K"))
    assert cached["cache-acts"]["seconds"] == pytest.approx(300e6 / 5e4)
    assert cached["probe"]["seconds"] == pytest.approx(6 * 2 * 2000 * 128 * 4 / 5e4)
    none = dry(script, capsys, "--out", tmp_path)
    assert all(s["seconds"] is None for s in none["stages"]) and none["totals"]["seconds"] is None
    assert stages(none)["distill"]["time_note"] == "unknown (run with --measure or give --rate-distill)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_model_dir(root / "model", "llama")
    words = "the a river stone light garden north winter music paper quiet bright".split()
    text = "\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(20 + i % 9)) for i in range(300))
    (root / "text.txt").write_text(text + "\n")
    return root


def tiny_args(tiny, out) -> list[str]:
    return [
        "--out", str(out), "--model", str(tiny / "model"), "--dataset", str(tiny / "text.txt"), "--device", "cpu",
        "--layers", "1,2", "--trials", "C", "--tokens", "2K", "--batch-tokens", "256", "--expansion", "4",
        "--sae-seq-len", "32", "--teacher-batch", "4", "--shuffle-buffer", "512", "--stats-tokens", "1K",
        "--steps", "4", "--widths", "8,16", "--heads", "head-dim:8", "--batch-size", "2", "--seq-len", "16",
        "--skip", "concepts,probe,report",
    ]  # fmt: skip


def test_measure_times_brief_real_runs(script, capsys, cli, tiny, tmp_path):
    def runner(argv):
        assert argv[0] == "kdtool"
        return cli(*argv[1:]).exit_code

    out = tmp_path / "run"
    rc = script.main(
        [
            "--measure",
            "--json",
            "--keep-measure",
            "--measure-tokens",
            "1K",
            "--measure-steps",
            "2",
            *tiny_args(tiny, out),
        ],
        runner=runner,
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rates = formats.read_json(out / "throughput.json")
    assert rates["kind"] == "kdtool.reproduce.throughput" and rates["provenance"]["seed"] == 0
    assert set(rates["rates"]) == {"train-sae", "stats", "distill"} and rates["disk_write"] > 0
    for fam, t in rates["settings"]["timings"].items():
        diff = t["t_2n"] - t["t_n"]
        expect = t["n"] / diff if diff > 0 else 2 * t["n"] / t["t_2n"]
        assert rates["rates"][fam] == pytest.approx(expect)
    assert rates["settings"]["timings"]["distill"]["n"] == 2 and rates["settings"]["timings"]["stats"]["n"] == 1000
    plan = json.loads(cap.out)
    # the disk formulas match what train-sae wrote in the brief run (d = 32, F = 4 x 32)
    ckpts = sorted((out / ".measure" / "big" / "saes-C" / "layer1" / "checkpoints").iterdir())
    assert len(ckpts) == sizes.sae_checkpoint_count(2000, 256, 2000) == 1
    nbytes = {"F32": 4, "I64": 8}

    def tensor_bytes(path):
        tensors = formats.safetensors_header(path)["tensors"].values()
        return sum(nbytes[t["dtype"]] * int(np.prod(t["shape"])) for t in tensors)

    assert tensor_bytes(out / ".measure" / "big" / "saes-C" / "layer1" / "sae_weights.safetensors") == sizes.sae_bytes(
        32, 128
    )
    assert tensor_bytes(ckpts[0] / "optimizer.safetensors") == sizes.sae_optimizer_bytes(32, 128)
    assert plan["teacher"]["d_model"] == 32 and plan["teacher"]["config_source"].endswith("config.json")
    st = stages(plan)
    assert st["train-sae-C"]["seconds"] > 0 and st["distill"]["seconds"] > 0
    assert plan["totals"]["seconds"] is not None
    # a later dry run reads throughput.json by itself
    again = dry(script, capsys, *tiny_args(tiny, out))
    assert stages(again)["stats-C"]["seconds"] == pytest.approx(st["stats-C"]["seconds"])


def test_run_skips_finished_stages_and_resumes(script, capsys, tiny, tmp_path):
    calls: list[list[str]] = []

    def runner(argv):
        calls.append(argv)
        return 0

    out = tmp_path / "run"
    args = tiny_args(tiny, out)
    assert script.main(args, runner=runner) == 0
    names = [s["name"] for s in formats.read_json(out / "plan.json")["stages"]]
    assert names == ["train-sae-C", "stats-C", "predict-C", "distill", "calibrate-C"]
    assert [c[1] for c in calls] == ["train-sae", "stats", "predict", "distill", "calibrate"]
    assert (out / "commands.sh").read_text().count("kdtool ") == 5
    assert "done: the report is" in capsys.readouterr().err

    calls.clear()
    assert script.main(args, runner=runner) == 0 and calls == []  # everything done before

    (out / ".reproduce" / "distill.done.json").unlink()
    (out / "students" / "checkpoint").mkdir(parents=True)
    (out / "students" / "checkpoint" / "state.pt").write_bytes(b"")
    assert script.main(args, runner=runner) == 0
    assert len(calls) == 1 and calls[0][1] == "distill" and calls[0][-1] == "--resume"

    capsys.readouterr()
    assert script.main([*args, "--steps", "6"], runner=runner) == 2  # distill's command changed
    assert "stage distill already ran with another command" in capsys.readouterr().err

    assert script.main([*args, "--out", str(tmp_path / "other")], runner=lambda argv: 3) == 1
    err = capsys.readouterr().err
    assert "stage train-sae-C failed (exit 3)" in err and "rerun the same command" in err


def test_build_plan_from_python_orders_the_stages_and_leaves_skipped_families_out(tmp_path):
    from kdtool.reproduce import plan as reproduce_plan
    from kdtool.reproduce.protocol import load_protocol
    from kdtool.reproduce.stage import cmd

    p = load_protocol({"out": tmp_path / "run", "skip": "concepts,probe"})
    plan = reproduce_plan.build_plan(p)
    assert [s.name for s in plan.stages] == [n for n in PAPER_STAGES if n not in ("concepts", "probe")]
    assert plan.as_dict()["kind"] == reproduce_plan.PLAN_KIND and plan.totals()["seconds"] is None
    assert plan.stages[-1].command == f"kdtool plot report {tmp_path / 'run'}"
    argv = cmd("kdtool", "stats", sae="x", alive_threshold=1e-5, tokens=2.0, offline=True, seed=None, o="y")
    assert argv == "kdtool stats --sae x --alive-threshold 1e-05 --tokens 2 --offline -o y".split()
