"""One run at a time per output location (`orchestration.runlock`): a second run stops naming the first, or
waits for it; the lock of a killed run is taken over."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, paths, write_params

from flows.pipeline import main
from orchestration.runlock import lock_file, run_lock
from proxytune.params import ProxytuneError
from testbed.demo import write_demo_subject

# Takes the lock of the place argv[1] names, says so, and holds it until its stdin closes or has a line.
HOLDER = ("import sys; from orchestration.runlock import run_lock\n"
          "with run_lock([sys.argv[1]]):\n"
          "    print('held', flush=True)\n"
          "    sys.stdin.readline()\n")


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A run folder with params.yaml and the demo photos: enough for the prepare stage."""
    root = tmp_path / "run"
    write_params(root)
    write_demo_subject(root / "data" / "demo_subject")
    monkeypatch.setenv("PROXYTUNE_CACHE", str(root / ".proxytune" / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("PROXYTUNE_RUN_WAIT", raising=False)
    return root


def hold(place: Path) -> subprocess.Popen:
    """Another process (in the project, as every run is) holding the lock of `place`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(place)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(holder: subprocess.Popen) -> None:
    """Let the holder finish as a run does (a killed one would leave its lock file in the project)."""
    if holder.poll() is None:
        holder.communicate("done\n", timeout=60)


def prepare_args(root: Path) -> list[str]:
    return ["--params", str(root / "params.yaml"), "--under", str(root), "--stage", "prepare"]


def test_second_run_stops_naming_the_first_and_a_killed_holder_is_taken_over(folder, capsys, caplog):
    out = paths(folder, "prepare")["out"]
    holder = hold(out)
    try:
        assert main(prepare_args(folder)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"error: another proxytune run (pid {holder.pid}, started ")
        assert err[0].endswith(f"is writing {out}; wait for it or stop it")
        assert " -c " in err[0], "the message names the holder's command"
        assert not out.exists(), "the second run wrote nothing"
    finally:
        holder.kill()
        holder.wait()
    assert lock_file(out).is_file(), "a killed run leaves its lock file behind"

    with caplog.at_level("WARNING", logger="orchestration.runlock"):
        assert main(prepare_args(folder)) == 0
    assert (out / "captions.jsonl").is_file()
    taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(taken) == 1 and f"pid {holder.pid}" in taken[0] and str(out) in taken[0], taken
    assert not lock_file(out).exists(), "a finished run removes its lock file"


def test_a_run_waits_for_the_holder_when_told(folder, caplog):
    place = folder / "outputs" / "prepare"
    holder = hold(place)

    def release_once_waiting():
        while not any("waiting up to" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
        holder.stdin.write("done\n")
        holder.stdin.flush()

    releaser = threading.Thread(target=release_once_waiting, daemon=True)
    try:
        with caplog.at_level("WARNING", logger="orchestration.runlock"):
            releaser.start()
            with run_lock([place], wait=120):
                assert holder.wait(timeout=60) == 0
    finally:
        release(holder)
    waited = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waited) == 1 and f"pid {holder.pid}" in waited[0] and str(place) in waited[0], waited


def test_waiting_runs_out_with_the_same_message(folder):
    place = folder / "outputs" / "prepare"
    holder = hold(place)
    try:
        with pytest.raises(ProxytuneError, match=rf"^another proxytune run \(pid {holder.pid}, .* is writing "
                                                 rf".*prepare; wait for it or stop it \(waited 0.2 s\)$"):
            with run_lock([place], wait=0.2):
                pass
    finally:
        release(holder)


def test_locks_are_per_output_and_held_once_per_process(folder, tmp_path):
    here, there = folder / "outputs" / "prepare", tmp_path / "elsewhere" / "outputs" / "prepare"
    with run_lock([here]):
        with run_lock([here, there]):  # the CLI's lock, then its flow's: the same process holds it once
            assert lock_file(here).is_file() and lock_file(there).is_file()
        assert lock_file(here).is_file() and not lock_file(there).exists()
        release(hold(there))  # another output place is free for another run
    assert not lock_file(here).exists()


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_wait_is_one_line(folder, monkeypatch, value):
    monkeypatch.setenv("PROXYTUNE_RUN_WAIT", value)
    with pytest.raises(ProxytuneError, match=r"PROXYTUNE_RUN_WAIT|wait must be") as err:
        with run_lock([folder / "outputs" / "prepare"]):
            pass
    assert "\n" not in str(err.value)


def test_two_pipeline_processes_at_once_only_one_runs(folder):
    """Two real `python -m flows.pipeline` runs of one folder: the second stops on the first's lock. (The first
    is paused while it holds the lock, so the two surely overlap.)"""
    cmd = [sys.executable, "-m", "flows.pipeline", *prepare_args(folder)]
    out = paths(folder, "prepare")["out"]
    first = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not lock_file(out).is_file() or not lock_file(out).read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=300)
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()  # a no-op once it has finished; SIGKILL also ends a stopped process
    assert first.returncode == 0, stderr
    assert stdout.split() == ["prepare", "ran"]
    assert second.returncode == 2 and second.stdout == ""
    err = second.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: another proxytune run (pid {first.pid}, started "), err
    assert err.endswith(f": python -m flows.pipeline {' '.join(prepare_args(folder))}) is writing {out}; "
                        "wait for it or stop it"), err
    assert (out / "captions.jsonl").is_file() and not lock_file(out).exists()
