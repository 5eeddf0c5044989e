"""A meta-training run asked to stop (SIGTERM, Ctrl-C) ends at a meta-step boundary with a
checkpoint that ``--resume`` continues exactly, in one process or several."""

import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from compiledopt import cli
from compiledopt.cli import train
from compiledopt.meta.loop import MetaLoop
from compiledopt.meta.stopping import StopRequest

ARGS = [
    "--transform", "learned-step-size", "--unroll", "2", "--horizon", "4",
    "--tasks-per-step", "2", "--eval-every", "2", "--eval-tasks", "1", "--eval-steps", "3",
    "--checkpoint-every", "100", "--no-progress",
]  # fmt: skip


def test_the_first_signal_asks_the_second_acts():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop() and stop.received is None
        signal.raise_signal(signal.SIGTERM)
        assert stop() and stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # asked twice: Ctrl-C as without the handler
            signal.raise_signal(signal.SIGINT)
        assert stop.received == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_the_process_ignores_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_it_catches_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def work():
        with StopRequest() as stop:
            seen.append((signal.getsignal(signal.SIGTERM) is before, stop()))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [(True, False)]


def _run(argv):
    out = io.StringIO()
    status = train.run(cli.build_parser().parse_args(["train", *argv]), out)
    return status, out.getvalue()


def _sigterm_during(monkeypatch, meta_step):
    """SIGTERM arrives while meta-step ``meta_step`` runs; returns the original ``step``."""
    step = MetaLoop.step

    def step_then_signal(loop):
        record = step(loop)
        if loop.meta_step == meta_step:
            signal.raise_signal(signal.SIGTERM)
        return record

    monkeypatch.setattr(MetaLoop, "step", step_then_signal)
    return step


def test_a_signal_stops_the_run_checkpointed_and_resume_finishes_it_exactly(tmp_path, monkeypatch):
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    assert _run([*ARGS, "--meta-steps", "5", "--output", str(full)])[0] == 0

    step = _sigterm_during(monkeypatch, 2)
    status, text = _run([*ARGS, "--meta-steps", "5", "--output", str(part), "--export",
                         str(tmp_path / "artifact")])  # fmt: skip
    assert status == 128 + signal.SIGTERM
    assert "stopped" in text and "SIGTERM" in text and "2 of 5 meta-steps" in text
    assert not (tmp_path / "artifact").exists()  # nothing exported from a stopped run
    saved = torch.load(part, weights_only=True)
    assert saved["meta_step"] == 2 and saved["metadata"]["training"]["stopped_by"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone

    monkeypatch.setattr(MetaLoop, "step", step)
    assert _run([*ARGS, "--meta-steps", "5", "--output", str(part), "--resume"])[0] == 0
    a, b = torch.load(full, weights_only=True), torch.load(part, weights_only=True)
    assert b["meta_step"] == 5 and "stopped_by" not in b["metadata"]["training"]
    assert a["history"] == b["history"]
    assert torch.equal(a["transform"]["log_lr"], b["transform"]["log_lr"])


def test_a_stop_on_the_last_step_is_a_finished_run(tmp_path, monkeypatch):
    _sigterm_during(monkeypatch, 2)
    status, text = _run([*ARGS, "--meta-steps", "2", "--output", str(tmp_path / "a.pt")])
    assert status == 0 and "stopped" not in text


def _launch_two_ranks(path, stdout):
    """``compiledopt train`` in 2 ranks for ever, returned once its first checkpoint exists
    (both ranks are training)."""
    argv = [*ARGS, "--meta-steps", "100000", "--checkpoint-every", "1", "--eval-every", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "compiledopt", "train", *argv, "--processes", "2",
         "--output", str(path)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not path.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    except BaseException:
        process.kill()
        raise
    return process


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step(tmp_path):
    """Two ranks in their own processes: SIGTERM sent to the command's process reaches both,
    they agree on the step, and both checkpoints stop there."""
    path = tmp_path / "run.pt"
    process = _launch_two_ranks(path, subprocess.PIPE)
    try:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and "stopped" in out
    ranks = [torch.load(f"{path}.rank{r}", weights_only=True) for r in (0, 1)]
    assert 1 <= ranks[0]["meta_step"] == ranks[1]["meta_step"] < 100000
    assert torch.load(path, weights_only=True)["meta_step"] == ranks[0]["meta_step"]


def _stat(pid):
    """The fields of ``/proc/<pid>/stat`` after the command's name (state first, then the
    parent's id), or ``None`` for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid):
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _children(pid):
    """The ids of the live processes whose parent is ``pid``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(entry)
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_a_hangup_of_the_launcher_ends_the_ranks_too(tmp_path):
    """The ranks run in a process group of their own (so that Ctrl-C reaches them once, through
    the launcher): a closed terminal's SIGHUP is forwarded, and no rank outlives the command."""
    process = _launch_two_ranks(tmp_path / "run.pt", subprocess.DEVNULL)
    try:
        ranks = _children(process.pid)
        assert len(ranks) >= 2
        process.send_signal(signal.SIGHUP)
        process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    deadline = time.monotonic() + 30
    while any(map(_alive, ranks)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in ranks if _alive(pid)]
