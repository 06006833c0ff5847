"""One writer per output (kdtool/locks.py) and the temporary files killed writers leave (kdtool/formats.py)."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdtool import atomic, formats, locks
from kdtool.errors import BadInput

HOLD = """
import sys, time
from kdtool import locks
with locks.claim(sys.argv[1], command="kdtool test-holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(output: Path) -> subprocess.Popen:
    """Another process holding `output`'s lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    out = tmp_path / "acts"
    proc = hold(out)
    try:
        with pytest.raises(BadInput) as err:
            with locks.claim(out, command="kdtool cache-acts -o acts"):
                pass
        text = str(err.value)
        assert f"pid {proc.pid}" in text and platform.node() in text and "kdtool test-holder" in text
        assert str(out) in text and ".acts.lock" in text
        info = locks.holder(out)
        assert info["pid"] == proc.pid and info["kind"] == "kdtool.lock" and info["command"] == "kdtool test-holder"
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "toy.parquet"
    proc = hold(out)
    proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup, the lock file stays
    proc.wait()
    assert locks.lock_path(out).exists() and locks.holder(out)["pid"] == proc.pid
    with locks.claim(out, command="kdtool toy") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()  # released: the file goes with the lock


def test_claims_nest_within_one_process_and_release_at_the_end(tmp_path):
    out = tmp_path / "acts"
    with locks.claim(out) as outer:
        with locks.claim(out) as inner:  # cache-acts --shuffle: the caching, then the shuffle
            assert inner == outer
        assert outer.exists()
    assert not outer.exists()


def test_without_flock_a_dead_process_lock_is_taken_over_and_a_live_one_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "fcntl", None)
    out = tmp_path / "saes"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"kind": "kdtool.lock", "host": platform.node(), "command": "kdtool train-sae"}
    locks.lock_path(out).write_text(json.dumps({**record, "pid": int(dead.stdout)}))
    with locks.claim(out):
        assert locks.holder(out)["pid"] == os.getpid()
    locks.lock_path(out).write_text(json.dumps({**record, "pid": os.getppid()}))  # alive
    with pytest.raises(BadInput, match="in use by another kdtool"):
        with locks.claim(out):
            pass


def test_claim_clears_stale_temporary_files_and_keeps_the_rest(tmp_path):
    out = tmp_path / "students"
    (out / "width8").mkdir(parents=True)
    stale = [
        out / ".curves.parquet.k3j2_x9a.tmp",
        out / "checkpoint" / ".state.pt.abcdefgh.tmp",
        out / ".width16.q1w2e3r4.tmp",  # a folder being written
    ]
    for p in stale[:2]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("partial")
    stale[2].mkdir()
    (stale[2] / "model.safetensors").write_text("partial")
    kept = [out / "floors.parquet", out / ".hidden-notes", out / "width8" / "kdtool.json"]
    for p in kept:
        p.write_text("mine")
    beside = tmp_path / ".toy.parquet.a1b2c3d4.tmp"  # another output's temp file: not ours
    beside.write_text("x")
    with locks.claim(out):
        pass
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "mine" for p in kept) and beside.exists()


def test_a_folder_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    out = tmp_path / "students"
    with atomic.atomic_dir(out / "checkpoint") as tmp:
        (tmp / "state.pt").write_text("step 10")
    # killed between atomic_dir's two renames: no checkpoint/, the previous one aside, the new one whole
    os.rename(out / "checkpoint", out / ".checkpoint.z9y8x7w6.old")
    (out / ".checkpoint.m1n2b3v4.tmp").mkdir()
    (out / ".checkpoint.m1n2b3v4.tmp" / "state.pt").write_text("step 20")
    with locks.claim(out):
        pass
    assert (out / "checkpoint" / "state.pt").read_text() == "step 10"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "width8"
    for text in ("one", "two"):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "kdtool.json").write_text(text)
    assert (final / "kdtool.json").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["width8"]
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "kdtool.json").write_text("three")
            raise RuntimeError("failed half-way")
    assert (final / "kdtool.json").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["width8"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_is_refused_naming_the_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(BadInput, match=rf"{ro / 'stats.parquet'}: cannot write here"):
            with locks.claim(ro / "stats.parquet"):
                pass
        with pytest.raises(BadInput, match="cannot write here") as err:
            formats.write_text(ro / "out.json", "{}")
        assert ".tmp" not in str(err.value)
    finally:
        ro.chmod(0o755)


def test_a_write_into_a_read_only_file_system_names_the_output():
    with pytest.raises(BadInput) as err:
        formats.write_text("/sys/kdtool-test.json", "{}")  # /sys takes no new files, even from root
    assert str(err.value) == "/sys/kdtool-test.json: cannot write here (Permission denied)"


def test_a_full_disk_is_reported_with_the_path(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats.os, "replace", full)
    with pytest.raises(Exception) as err:
        formats.write_text(tmp_path / "floors.parquet", "x")
    assert type(err.value).__name__ == "RuntimeFailure"
    assert str(err.value) == f"{tmp_path / 'floors.parquet'}: no space left on device while writing it"
    assert os.listdir(tmp_path) == []


def test_kill_hook_logs_and_kills_at_the_nth_rename(tmp_path):
    code = (
        "from kdtool import formats\n"
        "import sys\n"
        "for i in range(5):\n"
        "    formats.write_text(sys.argv[1] + f'/f{i}', 'x')\n"
    )
    env = {**os.environ, "KDTOOL_RENAME_LOG": str(tmp_path / "log"), "KDTOOL_KILL_AT_RENAME": "3"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["f0", "f1", "log"]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".f2.")]) == 1  # complete, never renamed
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 3 and lines[2].endswith(str(tmp_path / "f2"))


def test_sigterm_is_one_line_and_exit_143(tmp_path):
    """Any command: SIGTERM is handled like Ctrl-C (kdtool/cli/signals.py); here the toy mid-sweep."""
    from conftest import REPO

    args = ["toy", "--n", "10", "--d-teacher", "3", "--alpha", "0.9", "--seeds", "2", "--steps", "200000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdtool", *args, "--workers", "1", "-o", str(tmp_path / "toy.parquet")],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    time.sleep(0.5)
    deadline = time.time() + 60
    while not locks.lock_path(tmp_path / "toy.parquet").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert lines[-1] == "kdtool toy: interrupted by SIGTERM; rerun it with --resume to continue"
    assert "Traceback" not in err
    assert not locks.lock_path(tmp_path / "toy.parquet").exists()
