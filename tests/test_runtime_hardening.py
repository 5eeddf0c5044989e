"""What a FrozenOptimizer must survive: a malformed backend-timings cache, hyper-parameters and
step counts edited in place between steps, and a save/load of its skipped-step count."""

import json
import logging

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.pretrained import open_artifact
from compiledopt.runtime import autotune
from compiledopt.runtime.autotune import DEFAULT_ORDER, MAX_CACHE_BYTES, measured_order

PACKAGED = "normalized-mlp"

# -- the backend timings cache --------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty cache folder; returns the timings file's path."""
    monkeypatch.setenv("COMPILEDOPT_CACHE", str(tmp_path))
    return autotune.cache_file()


@pytest.fixture(scope="module")
def artifact():
    return open_artifact(PACKAGED, trust_code=False)


def _recorded(artifact, timings):
    """A well-formed cache holding ``timings`` for ``artifact`` on this CPU and thread count."""
    return {autotune._key(artifact, torch.device("cpu"), torch.get_num_threads()): timings}


DEFAULT = (*(b for b in DEFAULT_ORDER if b != "eager"), "eager")
DEEP = "[" * 200_000 + "]" * 200_000


def test_a_well_formed_cache_orders_auto(cache, artifact):
    cache.write_text(json.dumps(_recorded(artifact, {"onnx": 0.001, "compiled": 0.5})))
    assert measured_order(artifact, "cpu")[:2] == ("onnx", "compiled")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(DEEP, id="deep-list"),
        pytest.param('{"a": ' * 100_000 + "1" + "}" * 100_000, id="deep-object"),
        pytest.param(b"\xff\xfe not utf-8", id="bytes"),
        pytest.param("{", id="truncated"),
        pytest.param("[1, 2]", id="list"),
        pytest.param('{"k": "fast"}', id="entry-string"),
        pytest.param('{"k": {"onnx": true}}', id="bool-seconds"),
        pytest.param('{"k": {"onnx": "0.1"}}', id="string-seconds"),
        pytest.param('{"k": {"onnx": NaN}}', id="nan-seconds"),
        pytest.param('{"k": {"onnx": -1.0}}', id="negative-seconds"),
        pytest.param('{"k": {"onnx": 1e999}}', id="infinite-seconds"),
        pytest.param('{"k": {"onnx": ' + "9" * 400 + "}}", id="huge-int-seconds"),
        pytest.param('{"k": {"onnx": ' + "9" * 5000 + "}}", id="int-past-the-digit-limit"),
    ],
)
def test_a_malformed_cache_is_ignored_with_one_log_line(cache, artifact, text, caplog):
    good = json.dumps(_recorded(artifact, {"onnx": 0.001}))
    if isinstance(text, str) and text.startswith('{"k"'):
        # A malformed entry beside a good one: the whole file is refused, not patched up.
        text = good[:-1] + ", " + text[1:]
    cache.write_bytes(text if isinstance(text, bytes) else text.encode())
    with caplog.at_level(logging.DEBUG, logger="compiledopt"):
        assert measured_order(artifact, "cpu") == DEFAULT
        assert measured_order(artifact, "cpu") == DEFAULT  # read again: no second warning
        optimizer = co.FrozenOptimizer([nn.Parameter(torch.zeros(3))], artifact, backend="auto")
    assert optimizer.backend == DEFAULT[0]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert str(cache) in message and "ignored" in message and "\n" not in message


def test_a_cache_over_the_size_cap_is_not_parsed(cache, artifact, caplog, monkeypatch):
    data = _recorded(artifact, {"onnx": 0.001})
    data["padding"] = {"x" * MAX_CACHE_BYTES: 1.0}  # well-formed, and too large
    cache.write_text(json.dumps(data))

    def refuse(*args, **kwargs):
        raise AssertionError("parsed a cache file larger than the cap")

    monkeypatch.setattr(json, "loads", refuse)
    with caplog.at_level(logging.WARNING, logger="compiledopt"):
        assert measured_order(artifact, "cpu") == DEFAULT
    assert f"larger than {MAX_CACHE_BYTES} bytes" in caplog.text


def test_a_folder_in_place_of_the_cache_is_ignored(cache, artifact, caplog):
    cache.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="compiledopt"):
        assert measured_order(artifact, "cpu") == DEFAULT
    assert "not a regular file" in caplog.text


def test_a_recording_replaces_a_malformed_cache(cache, artifact):
    cache.write_text(DEEP)
    timings = autotune.measure_backends(
        artifact, ["eager", "onnx"], [nn.Parameter(torch.ones(4))], reps=1
    )
    assert set(timings) == {"eager", "onnx"}
    assert json.loads(cache.read_text()) == _recorded(artifact, timings)
    assert measured_order(artifact, "cpu")[0] == "onnx"
