"""What a FrozenOptimizer must survive: a malformed backend-timings cache, hyper-parameters and
step counts edited in place between steps, and a save/load of its skipped-step count."""

import json
import logging
import re

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.pretrained import open_artifact
from compiledopt.runtime import autotune, measure
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


def _recorded(artifact, timings, elements=autotune.DEFAULT_ELEMENTS):
    """A well-formed cache holding ``timings`` for ``artifact`` on this CPU and thread count,
    for parameters of ``elements`` elements."""
    key = autotune._key(artifact, torch.device("cpu"), torch.get_num_threads(), elements)
    return {key: timings}


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
    timings = measure.measure_backends(
        artifact, ["eager", "onnx"], [nn.Parameter(torch.ones(4))], reps=1
    )
    assert set(timings) == {"eager", "onnx"}
    assert json.loads(cache.read_text()) == _recorded(artifact, timings, elements=4)
    assert measured_order(artifact, "cpu", elements=4)[0] == "onnx"


def test_size_classes_split_at_powers_of_sixteen():
    assert [autotune.size_class(n) for n in (0, 1, 15, 16, 255, 256, 65_535, 65_536)] == [
        "2^0", "2^0", "2^0", "2^4", "2^4", "2^8", "2^12", "2^16"
    ]  # fmt: skip
    assert autotune.size_class(4_000_000) == "2^20"
    with pytest.raises(ValueError, match="Invalid elements: -1"):
        autotune.size_class(-1)


def test_auto_never_uses_a_timing_from_another_size_class(cache, artifact):
    """Backends timed on a small model (onnx fastest there) order ``auto`` for models of that
    size class only: a model of 4M elements gets the default order, and so does its optimizer."""
    cache.write_text(json.dumps(_recorded(artifact, {"onnx": 0.001, "compiled": 0.5}, 1000)))
    assert measured_order(artifact, "cpu", elements=1000)[0] == "onnx"
    assert measured_order(artifact, "cpu", elements=900)[0] == "onnx"  # same class
    assert measured_order(artifact, "cpu", elements=4_000_000) == DEFAULT
    small = [nn.Parameter(torch.zeros(10, 100))]
    large = [nn.Parameter(torch.zeros(4, 1_000_000))]
    assert co.FrozenOptimizer(small, PACKAGED).backend == "onnx"
    assert co.FrozenOptimizer(large, PACKAGED).backend == DEFAULT[0]


# -- what a step reads, checked every step ----------------------------------------------------


def _model():
    torch.manual_seed(0)
    # Biases of one shape share a bucket (their state is a view of a stacked tensor).
    return nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2))


def _stepped(backend="eager", nonfinite="skip"):
    model = _model()
    optimizer = co.FrozenOptimizer(
        model.named_parameters(), PACKAGED, lr=0.1, backend=backend, nonfinite=nonfinite
    )
    _grads(model, 0)
    optimizer.step()
    _grads(model, 1)
    return model, optimizer


def _grads(model, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def _snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    return params, states


def _assert_unchanged(model, optimizer, snapshot):
    params, states = snapshot
    for p, before, state in zip(model.parameters(), params, states):
        assert torch.equal(p, before)
        for key, value in state.items():
            assert torch.equal(optimizer.state[p][key], value), key


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda s: s["step"].fill_(-1), id="minus-one-in-place"),
        pytest.param(lambda s: s["step"].fill_(2**63 - 1), id="int64-max-in-place"),
        pytest.param(lambda s: s.update(step=torch.tensor(-1)), id="minus-one-replaced"),
        pytest.param(lambda s: s.update(step=torch.tensor(2**63 - 1)), id="int64-max-replaced"),
        pytest.param(lambda s: s.update(step=torch.tensor(2**62 + 1)), id="past-the-limit"),
    ],
)
@pytest.mark.parametrize("which", ["0.bias", "1.weight"])  # bucketed, alone
def test_a_step_count_out_of_range_is_refused_before_anything_is_written(edit, which):
    model, optimizer = _stepped()
    param = dict(model.named_parameters())[which]
    edit(optimizer.state[param])
    value = int(optimizer.state[param]["step"])
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=rf"parameter {which}: state 'step'.* got {value}$"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)


def test_the_largest_accepted_step_count_steps():
    model, optimizer = _stepped()
    param = model[0].bias
    optimizer.state[param]["step"].fill_(2**62)
    optimizer.step()
    assert int(optimizer.state[param]["step"]) == 2**62 + 1


@pytest.mark.parametrize(
    "key, value",
    [
        ("weight_decay", -0.1),
        ("weight_decay", float("nan")),
        ("lr", -0.5),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("lr", "0.1"),
    ],
)
def test_a_hyper_parameter_edited_after_construction_is_refused(key, value):
    model, optimizer = _stepped()
    optimizer.param_groups[0][key] = value
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=rf"Invalid {key}: {value!r} in the group of parameter"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)


@pytest.mark.parametrize("key", ["lr", "weight_decay"])
def test_a_hyper_parameter_deleted_after_construction_is_refused_naming_it(key):
    # It was a KeyError (AdamW's too).
    model, optimizer = _stepped()
    del optimizer.param_groups[0][key]
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=rf"^the group of parameter 0.weight has no '{key}'$"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)


def test_a_step_reads_the_host_once_and_ignore_never(host_reads):
    _, optimizer = _stepped()
    _, ignoring = _stepped(nonfinite="ignore")
    host_reads.clear()
    optimizer.step()
    assert len(host_reads) == 1, host_reads
    host_reads.clear()
    ignoring.step()
    assert host_reads == []


# -- the skipped-step count -------------------------------------------------------------------


def _skipping():
    """An optimizer of two param groups that has skipped one step of its second group (a NaN
    gradient) and stepped the first."""
    model = _model()
    optimizer = co.FrozenOptimizer(
        [
            {"params": model[0].parameters()},
            {"params": [*model[1].parameters(), *model[2].parameters()], "lr": 0.05},
        ],
        PACKAGED,
        lr=0.1,
        backend="eager",
    )
    _grads(model, 0)
    model[2].weight.grad[0, 0] = float("nan")
    optimizer.step()
    return model, optimizer


def _fresh(model):
    return co.FrozenOptimizer(
        [
            {"params": model[0].parameters()},
            {"params": [*model[1].parameters(), *model[2].parameters()], "lr": 0.05},
        ],
        PACKAGED,
        lr=0.1,
        backend="eager",
    )


def test_the_skipped_step_count_is_saved_per_group_and_loaded_back(tmp_path):
    model, optimizer = _skipping()
    assert optimizer.skipped_steps == 1
    saved = optimizer.state_dict()
    assert [g["skipped_steps"] for g in saved["param_groups"]] == [0, 1]
    torch.save(saved, tmp_path / "optimizer.pt")
    loaded = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    twin = _fresh(model)
    assert twin.skipped_steps == 0
    twin.load_state_dict(loaded)
    assert twin.skipped_steps == 1
    assert [g["skipped_steps"] for g in twin.param_groups] == [0, 1]
    _grads(model, 1)
    model[0].bias.grad.fill_(float("inf"))
    twin.step()
    assert [g["skipped_steps"] for g in twin.param_groups] == [1, 1]
    assert twin.skipped_steps == 2


def test_a_state_dict_saved_without_skip_counts_loads_with_zero():
    _, optimizer = _skipping()
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["skipped_steps"]
    optimizer.load_state_dict(saved)
    assert optimizer.skipped_steps == 0
    assert [g["skipped_steps"] for g in optimizer.param_groups] == [0, 0]


@pytest.mark.parametrize("value", [-1, True, 1.5, "3", None])
def test_an_invalid_saved_skip_count_is_refused_and_nothing_loaded(value):
    model, optimizer = _skipping()
    saved = optimizer.state_dict()
    saved["param_groups"][1]["skipped_steps"] = value
    twin = _fresh(model)
    message = rf"skipped_steps in the state_dict's param group 1: {re.escape(repr(value))} "
    with pytest.raises(ValueError, match=message):
        twin.load_state_dict(saved)
    assert twin.skipped_steps == 0 and not twin.state


def test_the_skip_count_survives_copies():
    import copy
    import pickle

    _, optimizer = _skipping()
    assert copy.deepcopy(optimizer).skipped_steps == 1
    assert pickle.loads(pickle.dumps(optimizer)).skipped_steps == 1


def test_the_first_skipped_step_is_a_warning_and_later_ones_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="compiledopt"):
        model, optimizer = _skipping()
        _grads(model, 1)
        model[2].bias.grad[0] = float("nan")
        optimizer.step()
    skips = [r for r in caplog.records if "step skipped" in r.getMessage()]
    assert [r.levelno for r in skips] == [logging.WARNING, logging.DEBUG]
    assert "parameter 4: non-finite gradient" in skips[0].getMessage()  # model[2].weight
    assert optimizer.skipped_steps == 2


@pytest.mark.parametrize("value", ["x", -1, 1.5, True])
def test_a_skip_count_edited_by_hand_is_refused_before_any_group_is_written(value):
    # A skipped group adds to its count after the other groups are written: a count that cannot
    # be added to raised a TypeError there, with the first group already stepped.
    first, second = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    optimizer = co.FrozenOptimizer(
        [{"params": [first]}, {"params": [second]}], PACKAGED, backend="eager"
    )
    optimizer.param_groups[1]["skipped_steps"] = value
    first.grad, second.grad = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])
    before = first.detach().clone()
    with pytest.raises(
        ValueError, match=rf"Invalid skipped_steps in the group of parameter 1: {value!r}"
    ):
        optimizer.step()
    assert torch.equal(first.detach(), before) and not optimizer.state[first]
