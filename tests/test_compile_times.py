"""The compile time of a rule, recorded per machine: the patience of ``auto``'s background compile
in a later process. A changed artifact, rule, torch version or instruction set is another key;
a damaged record is ignored with a log line and never trusted."""

import json
import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import compiledopt as co
from compiledopt.learned import NormalizedMLP
from compiledopt.pretrained import open_artifact
from compiledopt.runtime import timings, warming
from compiledopt.runtime.warming import EagerClock, Warming

PACKAGED = "normalized-mlp"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty cache folder; returns the compile-times file's path."""
    monkeypatch.setenv("COMPILEDOPT_CACHE", str(tmp_path))
    return timings.compile_file()


@pytest.fixture(scope="module")
def artifact():
    return open_artifact(PACKAGED, trust_code=False)


def _key(artifact, transform=None, device="cpu"):
    return timings.compile_key(artifact, transform or NormalizedMLP(), device)


def test_the_key_changes_with_the_artifact_rule_torch_and_instruction_set(artifact, monkeypatch):
    base = _key(artifact)
    assert _key(artifact) == base  # the same rule on the same machine: the same key
    other = SimpleNamespace(manifest={**artifact.manifest, "lr": 0.5})
    changed = {
        "artifact": _key(other),
        "rule": _key(artifact, NormalizedMLP().routed("orthogonal")),
        "another rule": _key(artifact, NormalizedMLP().routed("adam")),
    }
    # The same options reached another way are the same rule.
    same = NormalizedMLP(orthogonalize=True, adam_vectors=True)
    assert _key(artifact, same) == changed["rule"]
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    changed["torch"] = _key(artifact)
    monkeypatch.undo()
    isa = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa + "-other")
    changed["instruction set"] = _key(artifact)
    monkeypatch.undo()
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed
    assert _key(artifact) == base


def test_a_recorded_compile_time_is_the_patience(cache, artifact):
    key = _key(artifact)
    assert EagerClock(key=key).patience == warming.PATIENCE_S  # nothing recorded yet
    timings.record_compile(key, 7.5)
    assert EagerClock(key=key).patience == 7.5
    assert EagerClock(key=_key(artifact, NormalizedMLP().routed("adam"))).patience == 120.0
    timings.record_compile(key, 4 * warming.PATIENCE_S)  # a cold compile: capped
    assert EagerClock(key=key).patience == warming.PATIENCE_S
    assert EagerClock(3.0, key=key).patience == 3.0  # an explicit patience wins


@pytest.mark.parametrize(
    "damage",
    ["not json", "[1, 2]", '{"k": {"compile_s": "fast"}}', '{"k": {"compile_s": -1}}', "\xff"],
)
def test_a_damaged_record_is_ignored_with_a_log_line_and_replaced(cache, artifact, damage, caplog):
    key = _key(artifact)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(damage.encode("utf-8", "surrogateescape") if damage != "\xff" else b"\xff")
    with caplog.at_level(logging.WARNING, logger="compiledopt"):
        assert EagerClock(key=key).patience == warming.PATIENCE_S
    assert "ignored" in caplog.text and str(cache) in caplog.text
    clock = EagerClock(key=key)
    clock.paid(2.0)
    assert json.loads(cache.read_text()) == {key: {"compile_s": 2.0}}


def test_bad_compile_times_are_refused(cache):
    for seconds in (float("nan"), -1.0, float("inf"), True, "3"):
        with pytest.raises(ValueError, match="seconds"):
            timings.record_compile("k", seconds)
    assert not cache.exists()


def test_a_finished_background_compile_records_its_time(cache, artifact):
    """The compiles of a rule's kinds add up to its recorded price, which a later clock of the
    same key waits for."""
    key = _key(artifact)
    clock = EagerClock(0.0, key=key)
    rule = Warming(lambda x: x, lambda x: x + 1, lambda x: x.dim(), "t", clock)
    rule(torch.zeros(3))
    rule(torch.zeros(2, 2))
    assert rule.wait(600)  # its own compiles (another test's may hold the compile lock a while)
    recorded = timings.recorded_compile(key)
    assert recorded is not None and recorded == clock.compile_s > 0
    assert EagerClock(key=key).patience == recorded


def test_compiles_finishing_together_record_the_latest_total(cache, artifact, monkeypatch):
    """Two kinds' compiles finish on two threads: the record ends at their sum, never at the
    first one's total written after the second's (the first write is held back here until the
    second is done, or half a second has passed)."""
    key = _key(artifact)
    record, writes, second_written = warming.record_compile, [], threading.Event()

    def held_back(k, seconds):
        first = not writes
        writes.append(seconds)
        if first:
            second_written.wait(0.5)
        record(k, seconds)
        if not first:
            second_written.set()

    monkeypatch.setattr(warming, "record_compile", held_back)
    clock = EagerClock(0.0, key=key)
    threads = [threading.Thread(target=clock.paid, args=(seconds,)) for seconds in (1.0, 2.0)]
    threads[0].start()
    while not writes:  # the first compile's write has begun
        time.sleep(0.001)
    threads[1].start()
    for thread in threads:
        thread.join(10)
    assert clock.compile_s == 3.0 and timings.recorded_compile(key) == 3.0


def test_auto_asks_for_the_patience_of_each_rule_it_runs(cache, artifact, monkeypatch):
    """Each rule an optimizer runs (here the artifact's, and the Adam-like rule a param group
    is routed to) looks up its own compile time, under the key of its transform."""
    asked = []
    monkeypatch.setattr(warming, "recorded_compile", lambda key: asked.append(key))
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    weight, *others = model.parameters()
    groups = [{"params": [weight]}, {"params": others, "rule": "adam"}]
    optimizer = co.FrozenOptimizer(groups, PACKAGED)
    optimizer.step()
    assert optimizer.background
    base = artifact.transforms()[0]
    assert sorted(asked) == sorted({_key(artifact, base), _key(artifact, base.routed("adam"))})
