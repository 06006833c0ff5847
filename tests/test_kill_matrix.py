"""Nothing lost, nothing mixed (issue 14): kill each long command, resume it, compare with an uninterrupted run.

Every long command (cache-acts with its on-disk shuffle, train-sae, distill, toy, survival) runs a
small job three ways: uninterrupted (the reference, counting its file renames: kdtool/killpoints.py's
KDTOOL_RENAME_LOG), killed with SIGKILL just before its k-th rename (KDTOOL_KILL_AT_RENAME=k, the
moments a file is published) or at a timed moment, and then resumed with --resume (survival, which
has no --resume, is simply run again: the dead run's lock taken over, its temporary file cleared).
The killed run's output must be complete or absent, the resumed output must equal the reference bit
for bit (CPU; survival's provenance modulo time and output path), no temporary or lock file may be
left, and no process of the killed run may survive (each run's environment carries a tag that
/proc/*/environ shows).

The default run kills each command once (at its middle rename) and checks the lock and identity
refusals; the full matrix, every rename and three timed kills per command, is marked `killmatrix`
(and `slow`): `scripts/test -m killmatrix` runs it (about 20 minutes on 2 shared cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from synthetic_acts import write_random
from tiny_models import make_model_dir

from kdtool import atomic, formats, locks
from kdtool.acts import store as activations
from kdtool.sae.writers import saelens_cfg, save_kdtool

TIMEOUT = 600


# ---- running a command, killing it, finding what it left ------------------------------------------


@dataclass
class Outcome:
    returncode: int
    stderr: str
    seconds: float
    renames: list[str] = field(default_factory=list)


def run(argv: list, *, kill_at: int | None = None, kill_after: float | None = None, sig=signal.SIGKILL) -> Outcome:
    """Run `python -m kdtool ARGV` (quiet, one torch thread); kill it at a rename or after some seconds."""
    tag = uuid.uuid4().hex
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"kdtool-renames-{tag}"
    env = {**os.environ, "KDTOOL_TEST_TAG": tag, "KDTOOL_RENAME_LOG": str(log), "OMP_NUM_THREADS": "1"}
    if kill_at is not None:
        env["KDTOOL_KILL_AT_RENAME"] = str(kill_at)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdtool", "--quiet", *map(str, argv)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    seconds = time.perf_counter() - t0
    renames = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    assert_no_process_left(tag)
    return Outcome(proc.returncode, err, seconds, renames)


def run_here(argv: list) -> Outcome:
    """The same run in this process (warm imports: seconds, not a new interpreter), counting its renames.

    One torch thread, like the subprocesses (OMP_NUM_THREADS=1): the same arithmetic, bit for bit.
    """
    from typer.testing import CliRunner

    from kdtool import killpoints
    from kdtool.cli.common import STATE
    from kdtool.cli.main import app

    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"kdtool-renames-{uuid.uuid4().hex}"
    before, threads = os.environ.get(killpoints.LOG), torch.get_num_threads()
    os.environ[killpoints.LOG] = str(log)
    torch.set_num_threads(1)
    STATE.json = STATE.quiet = STATE.debug = False
    t0 = time.perf_counter()
    try:
        r = CliRunner().invoke(app, ["--quiet", *map(str, argv)], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
        if before is None:
            os.environ.pop(killpoints.LOG, None)
        else:
            os.environ[killpoints.LOG] = before
    renames = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return Outcome(r.exit_code, r.stderr, time.perf_counter() - t0, renames)


def tagged_processes(tag: str) -> list[int]:
    """Processes whose environment carries `tag`: the run, its workers, multiprocessing's resource tracker."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"KDTOOL_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def assert_no_process_left(tag: str, wait: float = 10.0) -> None:
    deadline = time.time() + wait
    while (left := tagged_processes(tag)) and time.time() < deadline:
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of a killed run survived: {left}"


def leftovers(*paths: Path) -> list[Path]:
    """Temporary files and folders (formats' .NAME.*.tmp / .old) anywhere in or beside the outputs."""
    found = []
    for p in paths:
        where = [p, *p.rglob("*")] if p.is_dir() else [p.parent / c.name for c in p.parent.iterdir()]
        found += [q for q in where if atomic._TEMP_NAME.match(q.name)]
    return found


# ---- the four commands: a small job, its resume, and what "the same result" means -------------------


def _tables_equal(a: Path, b: Path, skip=()) -> None:
    ta, tb = formats.read_table(a), formats.read_table(b)
    assert ta.keys() == tb.keys(), (a, b)
    for c in ta:
        if c not in skip:
            np.testing.assert_array_equal(ta[c], tb[c], err_msg=f"{b}: column {c}")


def _safetensors_equal(a: Path, b: Path) -> None:
    ta, tb = formats.load_safetensors(a), formats.load_safetensors(b)
    assert ta.keys() == tb.keys(), (a, b)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{b}: tensor {k}"


def same_cache(ref: Path, out: Path) -> None:
    assert not (out / ".shuffle-tmp").exists()  # a killed shuffle's work folder is gone too
    ma, mb = activations.read_manifest(ref), activations.read_manifest(out)
    assert ma["shards"] == mb["shards"] and ma["tokens"] == mb["tokens"] and ma["complete"] and mb["complete"]
    assert (ma.get("shuffle") or {}).get("seed") == (mb.get("shuffle") or {}).get("seed")
    for layer in ma["layers"]:
        for s in ma["shards"]:
            _safetensors_equal(ref / f"layer{layer}" / s["file"], out / f"layer{layer}" / s["file"])
        assert sorted(p.name for p in (out / f"layer{layer}").iterdir()) == sorted(s["file"] for s in mb["shards"])


def same_saes(ref: Path, out: Path) -> None:
    pa, pb = (json.loads((p / "checkpoint.json").read_text()) for p in (ref, out))
    assert (pa["step"], pa["tokens"], pa["position"], pa["finished"]) == (
        pb["step"],
        pb["tokens"],
        pb["position"],
        True,
    )
    assert pa["saes"] == pb["saes"] and len(pa["saes"]) > len(pa["layers"])  # side-by-side SAEs (layer3-x1 ...)
    for name in pa["saes"]:
        a, b = ref / name, out / name
        _safetensors_equal(a / "sae_weights.safetensors", b / "sae_weights.safetensors")
        _tables_equal(a / "train_log.parquet", b / "train_log.parquet", skip=("elapsed_s",))
        ka, kb = (json.loads((f / "cfg.json").read_text())["kdtool"] for f in (a, b))
        for k in ka:
            if k not in ("last_log", "config"):
                assert ka[k] == kb[k], (b, k)
        assert {k: v for k, v in ka["last_log"].items() if k != "elapsed_s"} == {
            k: v for k, v in kb["last_log"].items() if k != "elapsed_s"
        }


def same_students(ref: Path, out: Path) -> None:
    _tables_equal(ref / "floors.parquet", out / "floors.parquet")
    _tables_equal(ref / "curves.parquet", out / "curves.parquet")
    folders = sorted(p.name for p in ref.iterdir() if p.is_dir() and p.name.startswith("width"))
    assert len(folders) == 4 and "width8-tvd" in folders  # every (width, loss) student: width{W}[-{loss}]
    assert folders == sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("width"))
    for name in folders:
        _safetensors_equal(ref / name / "model.safetensors", out / name / "model.safetensors")


def same_toy(ref: Path, out: Path) -> None:
    _tables_equal(ref, out)
    _tables_equal(ref.with_name("toy.curves.parquet"), out.with_name("toy.curves.parquet"))
    _tables_equal(ref.with_name("toy.survival.parquet"), out.with_name("toy.survival.parquet"))
    assert not out.with_name(out.name + ".parts").exists()


#: provenance that legitimately differs between two runs of one survival job: when, and where it wrote
#: (the command line names -o); everything else, inputs' fingerprints included, must be the same
RUN_SPECIFIC = ("created", "command", "argv", "params")


def same_survival(ref: Path, out: Path) -> None:
    _tables_equal(ref, out)
    ma, mb = formats.parquet_metadata(ref), formats.parquet_metadata(out)
    assert ma["kind"] == mb["kind"] == "kdtool.survival"
    assert ma["summary"] == mb["summary"]
    pa, pb = ma["provenance"], mb["provenance"]
    assert {k: v for k, v in pa.items() if k not in RUN_SPECIFIC} == {
        k: v for k, v in pb.items() if k not in RUN_SPECIFIC
    }
    assert {k: v for k, v in pa["params"].items() if k != "output"} == {
        k: v for k, v in pb["params"].items() if k != "output"
    }


@dataclass
class Job:
    """A small run of one long command: argv(output) -> arguments, the output's name, and its check.

    resume: the command has --resume (the run after a kill adds it); without it, the same command
    line runs again. prepare: builds inputs only this job reads, once, before its first run.
    """

    name: str
    argv: object  # Callable[[Path], list]
    output: str  # a folder, or a file for the toy and survival
    same: object  # Callable[[Path, Path], None]
    resume: bool = True
    prepare: object = None  # Callable[[], None] | None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kill-inputs")
    make_model_dir(d / "tiny")
    (d / "docs.txt").write_text(
        "\n\n".join(f"Paragraph {i}: the fox jumps over {i % 7} lazy dogs." for i in range(500))
    )
    write_random(d / "acts", d=16, n=6_000, layers=(3, 5), shard=1_500)
    return d


SURVIVAL_WORDS = "the a river stone light garden north winter music paper quiet bright slowly window market".split()


def survival_inputs(d: Path) -> None:
    """What `kdtool survival` reads, beside the tiny teacher: text with enough held-out documents, a random
    SAE at layer 2, a distill-shaped students folder (width8/ kl and width8-tvd/) and a stats file.
    Built once per module (run_here: warm imports), the first time a survival job runs."""
    from transformers import AutoConfig, AutoTokenizer

    from kdtool.distill.students import StudentPolicy, build_student

    s = d / "survival"
    if (s / "stats.parquet").exists():
        return
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(SURVIVAL_WORDS, size=int(rng.integers(20, 40)))) + "." for _ in range(1500)]
    (s / "text.txt").parent.mkdir(parents=True)
    (s / "text.txt").write_text("\n\n".join(docs) + "\n")
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(64, 32, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    t = {"W_enc": w_dec.t().contiguous(), "b_enc": torch.zeros(64), "W_dec": w_dec, "b_dec": torch.zeros(32)}
    save_kdtool(s / "saes" / "layer2", t, cfg=saelens_cfg(32, 64, layer=2), kdtool={"layer": 2}, provenance=None)
    tok, config = AutoTokenizer.from_pretrained(d / "tiny"), AutoConfig.from_pretrained(d / "tiny")
    torch.manual_seed(0)
    for folder, loss in (("width8", "kl"), ("width8-tvd", "tvd")):
        build_student(config, 8, StudentPolicy(heads="head-dim:4")).save_pretrained(s / "students" / folder)
        tok.save_pretrained(s / "students" / folder)
        info = {"kind": "kdtool.distill.student", "floor": {"width": 8, "loss": loss, "seed": 0}}
        formats.write_json(s / "students" / folder / "kdtool.json", info)
    made = run_here(["stats", "--sae", s / "saes", *survival_data(d), "--tokens", "1K", "-o", s / "stats.parquet"])
    assert made.returncode == 0, made.stderr


def survival_data(d: Path) -> list:
    return ["--model", d / "tiny", "--device", "cpu", "--dataset", d / "survival" / "text.txt", "--seq-len", "32"]


def jobs(d: Path) -> dict[str, Job]:
    model = ["--model", d / "tiny", "--dataset", d / "docs.txt"]
    return {
        "cache-acts": Job(
            "cache-acts",
            lambda o: [
                "cache-acts",
                *model,
                "--layers",
                "1,2",
                "--tokens",
                "600",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--shard-size",
                "128",
                "--acts-dtype",
                "float32",
                "--shuffle",
                "--shuffle-bucket",
                "256",
                "-o",
                o,
            ],  # fmt: skip
            "acts",
            same_cache,
        ),
        "train-sae": Job(
            "train-sae",
            lambda o: [
                "train-sae",
                "--acts",
                d / "acts",
                "--features",
                "16,32",
                "--l1",
                "0.05",
                "--lr",
                "3e-3",
                "--batch-tokens",
                "512",
                "--tokens",
                "5000",
                "--checkpoint-every",
                "2560",
                "--log-every",
                "3",
                "--seed",
                "7",
                "-o",
                o,
            ],  # fmt: skip
            "saes",
            same_saes,
        ),
        "distill": Job(
            "distill",
            lambda o: [
                "distill",
                *model,
                "--widths",
                "8,16",
                "--loss",
                "kl,tvd",
                "--heads",
                "head-dim:8",
                "--steps",
                "4",
                "--warmup",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--eval-every",
                "2",
                "--eval-batches",
                "1",
                "--save-every",
                "2",
                "-o",
                o,
            ],  # fmt: skip
            "students",
            same_students,
        ),
        "toy": Job(
            "toy",
            lambda o: [
                "toy",
                "--n",
                "10",
                "--d-teacher",
                "3",
                "--alpha",
                "0.9,0.99",
                "--seeds",
                "2",
                "--steps",
                "300",
                "--workers",
                "2",
                "--log-curves",
                "--curve-points",
                "5",
                "-o",
                o,
            ],  # fmt: skip
            "toy.parquet",
            same_toy,
        ),
        "survival": Job(
            "survival",
            lambda o: [
                "survival",
                *survival_data(d),
                "--sae",
                d / "survival" / "saes",
                "--students",
                d / "survival" / "students",
                "--stats",
                d / "survival" / "stats.parquet",
                "--tokens",
                "1K",
                "-o",
                o,
            ],  # fmt: skip
            "survival.parquet",
            same_survival,
            resume=False,
            prepare=lambda: survival_inputs(d),
        ),
    }


#: the commands with --resume (the finished-run rule applies to them)
COMMANDS = ["cache-acts", "train-sae", "distill", "toy"]
#: every command the matrix kills
KILLED = [*COMMANDS, "survival"]


class References(dict):
    """Each job run once, uninterrupted, the first time a test asks for it: its output and its renames."""

    def __init__(self, inputs: Path, tmp_path_factory):
        super().__init__()
        self.inputs, self.tmp = inputs, tmp_path_factory

    def __missing__(self, name: str) -> tuple[Path, Outcome]:
        job = jobs(self.inputs)[name]
        if job.prepare is not None:
            job.prepare()
        path = self.tmp.mktemp(f"ref-{name}") / job.output
        done = run_here(job.argv(path))
        assert done.returncode == 0, done.stderr
        self[name] = (path, done)
        return self[name]


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> References:
    """Each job's uninterrupted run (made on first use: `-k survival` runs only survival's)."""
    return References(inputs, tmp_path_factory)


def kill_and_resume(job: Job, ref: Path, where: Path, **kill) -> Outcome:
    """Kill a run into `where` (a subprocess), resume it, check: same result, no temporary file, no process.

    The resume runs in this process (run_here: warm imports halve the matrix's time; a subprocess gives
    the same bytes, as the references, made here too, show every time a killed run's files are reused).
    """
    out = where / job.output
    killed = run(job.argv(out), **kill)
    if not job.resume:  # killed, the output is complete (the reference's) or absent; a plain rerun follows
        if out.exists():
            job.same(ref, out)
        else:
            assert killed.returncode != 0, killed.stderr
        if kill.get("kill_at"):  # killed at a rename: its finished temporary file and its lock are left behind
            assert leftovers(out) and locks.lock_path(out).exists(), (leftovers(out), killed.stderr)
    resumed = run_here([*job.argv(out), *(["--resume"] if job.resume else [])])
    assert resumed.returncode == 0, (killed.returncode, killed.stderr, resumed.stderr)
    job.same(ref, out)
    toy = [
        out.with_name(out.name + ".parts"),
        out.with_name("toy.curves.parquet"),
        out.with_name("toy.survival.parquet"),
    ]
    companions = toy if job.name == "toy" else []
    assert not leftovers(out, *companions), leftovers(out, *companions)
    assert not locks.lock_path(out).exists()
    return killed


# ---- the default run: one kill per command ---------------------------------------------------------


@pytest.mark.parametrize("name", KILLED)
def test_a_kill_at_the_middle_rename_resumes_bit_for_bit(name, inputs, references, tmp_path):
    ref, done = references[name]
    k = max(1, len(done.renames) // 2)
    killed = kill_and_resume(jobs(inputs)[name], ref, tmp_path, kill_at=k)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it was killed, at rename k


@pytest.mark.parametrize("name", COMMANDS)
def test_resume_of_a_finished_run_leaves_it_as_it_is(name, inputs, references, tmp_path, cli):
    """One rule for every command: --resume on a finished run changes nothing, says so, exits 0."""
    import shutil

    ref, _ = references[name]
    job = jobs(inputs)[name]
    out = tmp_path / job.output
    companions = [ref.with_name("toy.curves.parquet"), ref.with_name("toy.survival.parquet")]
    for p in [ref, *companions] if name == "toy" else [ref]:
        (shutil.copy2 if p.is_file() else shutil.copytree)(p, out.with_name(p.name))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    r = cli(*job.argv(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "left as it is" in r.stderr, r.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(files)  # nothing added


def test_two_writers_on_one_output_the_second_is_refused(inputs, tmp_path):
    """Two real toy sweeps into one toy.parquet: the second is refused, the first runs on."""
    out = tmp_path / "toy.parquet"
    argv = [sys.executable, "-m", "kdtool", "--quiet", "toy", "--n", "10", "--d-teacher", "3", "--alpha", "0.9",
            "--seeds", "2", "--steps", "100000", "--workers", "1", "-o", out]  # fmt: skip
    first = subprocess.Popen(list(map(str, argv)), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (locks.holder(out) or {}).get("pid") == first.pid and time.time() < deadline:
            time.sleep(0.2)
        second = run(jobs(inputs)["toy"].argv(out))
        assert second.returncode == 2
        line = second.stderr.strip()
        assert line.startswith("kdtool toy: error: ") and f"in use by another kdtool (pid {first.pid} on" in line
        assert "toy --n 10 --d-teacher 3 --alpha 0.9 --seeds 2 --steps 100000" in line  # the holder's command
        assert not list(out.parent.glob(".toy.parquet.*.tmp")) and first.poll() is None  # the first runs on
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("name", ["cache-acts", "train-sae", "distill"])
def test_a_second_writer_of_a_folder_is_refused(name, inputs, tmp_path, cli):
    out = tmp_path / jobs(inputs)[name].output
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kdtool import locks\n"
         "with locks.claim(sys.argv[1], command='kdtool holder'):\n    print('held', flush=True)\n    time.sleep(300)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        second = cli(*jobs(inputs)[name].argv(out))  # in this process: the holder is another one
        assert second.exit_code == 2, second.stderr
        assert f"in use by another kdtool (pid {holder.pid}" in second.stderr and "`kdtool holder`" in second.stderr
        assert sorted(os.listdir(tmp_path)) == [f".{out.name}.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_distill_resume_refuses_another_teacher(inputs, references, tmp_path):
    ref, _ = references["distill"]
    other = make_model_dir(tmp_path / "other", seed=3)
    argv = jobs(inputs)["distill"].argv(ref)
    argv[argv.index("--model") + 1] = other
    r = run_here([*argv, "--resume"])
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "teacher: checkpoint sha256:" in line and " vs now sha256:" in line and "(folder)" in line


# ---- the full matrix: every rename, three timed moments -----------------------------------------------


@pytest.mark.slow
@pytest.mark.killmatrix
@pytest.mark.parametrize("name", KILLED)
def test_kill_matrix_every_rename(name, inputs, references, tmp_path):
    ref, done = references[name]
    job = jobs(inputs)[name]
    # survival publishes one file, once; the others a series of files (shards, checkpoints, parts)
    assert len(done.renames) >= (1 if name == "survival" else 3), done.renames
    for k in range(1, len(done.renames) + 1):
        killed = kill_and_resume(job, ref, tmp_path / f"k{k}", kill_at=k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)


@pytest.mark.slow
@pytest.mark.killmatrix
@pytest.mark.parametrize("name", KILLED)
def test_kill_matrix_timed(name, inputs, references, tmp_path):
    """SIGKILL at 30%, 60% and 90% of an uninterrupted run's time, and SIGTERM (handled: exit 143) at 50%.

    The time is a subprocess's, start-up included (the in-process reference is several times faster),
    and that uninterrupted subprocess must give the reference's bytes too.
    """
    ref, _ = references[name]
    job = jobs(inputs)[name]
    whole = run(job.argv(tmp_path / "whole" / job.output))
    assert whole.returncode == 0, whole.stderr
    job.same(ref, tmp_path / "whole" / job.output)
    for i, fraction in enumerate((0.3, 0.6, 0.9)):
        kill_and_resume(job, ref, tmp_path / f"t{i}", kill_after=fraction * whole.seconds)
    killed = kill_and_resume(job, ref, tmp_path / "term", kill_after=0.5 * whole.seconds, sig=signal.SIGTERM)
    if killed.returncode != 0:  # it may have finished first
        assert killed.returncode == 143 and "interrupted by SIGTERM" in killed.stderr, killed.stderr
        assert "Traceback" not in killed.stderr
