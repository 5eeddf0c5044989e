"""Learning quality (``benchmarks/learning_quality``): the held-out tasks (deterministic,
trainable, the char-lm spans disjoint), the metrics against hand-computed values, the divergence
rule, and a ``--quick`` end-to-end run writing the documented JSON."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the suite is not installed: it lives in the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.learning_quality import (  # noqa: E402
    analysis,
    charlm,
    metrics,
    optimizers,
    options,
    report,
    run,
    runner,
    tasks,
    text,
    transformer_tasks,
    weight_decay,
)

NAMES = list(tasks.TASKS)
TRANSFORMER_NAMES = tasks.SUITES["transformers"]
LM_NAMES = ["gpt-lm", "gpt-lm-rms", "gpt-lm-trainer", "lm-finetune"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the suite runs (and no oversubscription on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def pretraining_cache(tmp_path_factory):
    """lm-finetune's pre-trained weights go to a temporary folder, not the results folder."""
    folder = transformer_tasks.CACHE_DIR
    transformer_tasks.CACHE_DIR = tmp_path_factory.mktemp("pretrained")
    transformer_tasks.clear_memory()
    yield transformer_tasks.CACHE_DIR
    transformer_tasks.CACHE_DIR = folder
    transformer_tasks.clear_memory()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A fresh (not meta-trained) CoordinateMLP artifact with TorchScript only, lr 1."""
    from compiledopt.export import export_shape_agnostic
    from compiledopt.learned.catalog import build_transform

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("artifact") / "coordinate-mlp"
    spec = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {}}
    export_shape_agnostic(path, spec, build_transform("coordinate-mlp"), ["torchscript"], lr=1.0)
    return str(path)


def _needs(name):
    for module in tasks.TASKS[name].needs:
        pytest.importorskip(module)


# -- tasks ----------------------------------------------------------------------------------------


def test_at_least_eight_tasks_and_a_long_horizon():
    assert len(NAMES) >= 8
    assert {"cnn", "char-lm", "wide-mlp", "regression", "logistic", "finetune"} <= set(NAMES)
    assert tasks.TASKS["long-horizon"].default_steps == 3000
    classic = tasks.SUITES["classic"]
    longest_other = max(tasks.TASKS[n].default_steps for n in classic if n != "long-horizon")
    assert tasks.TASKS["long-horizon"].default_steps >= 10 * longest_other


@pytest.mark.parametrize("name", NAMES)
def test_task_is_deterministic(name):
    _needs(name)
    first, second = tasks.TASKS[name](3, 20), tasks.TASKS[name](3, 20)
    initial = first.model().state_dict()
    tasks._pretrained.cache_clear()  # finetune: pre-train again
    transformer_tasks.clear_memory()  # lm-finetune: from its disk cache
    for a, b in zip(initial.values(), second.model().state_dict().values()):
        assert torch.equal(a, b)
    for step in (0, 7):
        for a, b in zip(first.batch(step), second.batch(step)):
            assert torch.equal(a, b)
    for a, b in zip(first.validation(), second.validation()):
        assert torch.equal(a, b)
    assert not torch.equal(first.batch(0)[0], first.batch(1)[0])  # a stream, not one batch
    # model() does not touch the global generator
    state = torch.random.get_rng_state()
    first.model()
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("name", NAMES)
def test_task_loss_decreases_under_adamw(name):
    _needs(name)
    task = tasks.TASKS[name](0, 30)
    model = task.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    before = run.validation_loss(task, model)
    for step in range(30):
        optimizer.zero_grad()
        inputs, target = task.batch(step)
        task.loss(model(inputs), target).backward()
        optimizer.step()
    after = run.validation_loss(task, model)
    assert math.isfinite(before) and after < before


def test_a_run_is_deterministic_for_adamw_and_the_learned_optimizer(artifact):
    paths, backends = {"learned": artifact}, {"learned": "torchscript"}
    for kind, lr in (("adamw", 1e-2), ("learned", 1.0)):
        job = {"task": "regression", "seed": 1, "steps": 10, "optimizer": kind, "lr": lr}
        job.update(paths=paths, backends=backends)
        first, second = run.run_job(job), run.run_job(job)
        assert first["val_loss"] == second["val_loss"]
        assert first["train_loss"] == second["train_loss"]
        assert first["eval_steps"] == list(range(11))


def test_char_lm_text_is_large_and_spans_disjoint():
    text = charlm.corpus()
    assert len(text) >= 50_000
    assert "def " in text and "class " in text
    (train_begin, cut), (val_begin, end) = charlm.spans()
    assert train_begin == 0 and cut == val_begin and end == len(text)
    assert end - val_begin >= 5_000
    task = charlm.CharLM(0, 10)
    window = task.context + 1
    for step in range(50):
        starts = task.train_starts(step)
        assert int(starts.min()) >= 0 and int(starts.max()) + window <= cut
    val_starts = task.validation_starts()
    assert int(val_starts.min()) >= cut and int(val_starts.max()) + window <= end
    assert len(val_starts) == task.validation_size
    inputs, target = task.batch(0)
    assert torch.equal(inputs[:, 1:], target[:, :-1])  # the target is the next character
    assert inputs.shape == (task.batch_size, task.context)


# -- transformer tasks ----------------------------------------------------------------------------


def test_transformer_suite_has_the_documented_tasks():
    assert TRANSFORMER_NAMES == ["gpt-lm", "gpt-lm-rms", "gpt-lm-trainer", "vit", "lm-finetune"]
    assert set(tasks.SUITES["all"]) == set(NAMES)
    assert not set(tasks.SUITES["classic"]) & set(TRANSFORMER_NAMES)
    for name in TRANSFORMER_NAMES:
        assert tasks.TASKS[name].min_seeds >= 3
    for name in ("gpt-lm", "gpt-lm-rms", "gpt-lm-trainer"):
        assert tasks.TASKS[name].default_steps >= 2000
        assert tasks.TASKS[name].quick_steps <= 12


@pytest.mark.parametrize("name", TRANSFORMER_NAMES)
def test_transformer_task_seeds_differ(name):
    _needs(name)
    zero, one = tasks.TASKS[name](0, 8), tasks.TASKS[name](1, 8)
    assert not torch.equal(zero.batch(0)[0], one.batch(0)[0])
    weights = zip(zero.model().state_dict().values(), one.model().state_dict().values())
    assert any(not torch.equal(a, b) for a, b in weights)


def _shape_of(output):
    return tuple(getattr(output, "logits", output).shape)


@pytest.mark.parametrize("name", TRANSFORMER_NAMES)
def test_transformer_task_shapes_and_sizes(name):
    _needs(name)
    task = tasks.TASKS[name](0, 8)
    model = task.model()
    inputs, target = task.batch(0)
    assert inputs.shape[0] == target.shape[0] == task.batch_size
    with torch.no_grad():
        output = model(inputs)
    params = sum(p.numel() for p in model.parameters())
    if name == "vit":
        assert inputs.shape == (task.batch_size, 1, 16, 16)
        assert _shape_of(output) == (task.batch_size, len(tasks.SHAPES))
        assert model.embed.in_features == 16  # 4x4 patches of one channel
        assert model.position.shape[1] == 1 + 16  # CLS + 16 patches
    else:
        assert inputs.shape == target.shape == (task.batch_size, task.context)
        assert torch.equal(inputs[:, 1:], target[:, :-1])
        assert _shape_of(output) == (task.batch_size, task.context, charlm.VOCAB)
    assert math.isfinite(float(task.loss(output, target)))
    if name == "gpt-lm":
        assert params >= 1_000_000
        assert len(model.blocks) == 4 and model.token.embedding_dim == 128
        assert model.head.weight is not model.token.weight  # untied
        assert isinstance(model.blocks[0].norm1, torch.nn.LayerNorm)
    if name == "gpt-lm-rms":
        assert model.head.weight is model.token.weight  # tied
        assert isinstance(model.blocks[0].norm1, transformer_tasks.RMSNorm)
        assert model.token.embedding_dim != tasks.TASKS["gpt-lm"].width
        assert task.corpus != tasks.TASKS["gpt-lm"].corpus
    if name == "gpt-lm-trainer":  # the same job as gpt-lm
        reference = tasks.TASKS["gpt-lm"](0, 8)
        assert torch.equal(inputs, reference.batch(0)[0])
        gpt = sum(p.numel() for p in reference.model().parameters())
        assert abs(params - gpt) / gpt < 0.01 and params >= 1_000_000
        assert model.config.n_layer == 4 and model.config.n_embd == 128


def test_rms_norm_by_hand():
    norm = transformer_tasks.RMSNorm(4)
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0]])
    expected = x / math.sqrt((9 + 16) / 4 + norm.eps)
    assert torch.allclose(norm(x), expected)


@pytest.mark.parametrize("name", LM_NAMES)
def test_lm_validation_text_is_disjoint_from_training_text(name):
    _needs(name)
    task = tasks.TASKS[name](0, 8)
    (begin, cut), (val_begin, end) = text.spans(task.corpus)
    assert begin == 0 and cut == val_begin and end == len(text.corpus(task.corpus))
    assert end - cut >= 20_000
    window = task.context + 1
    for step in range(40):
        starts = task.train_starts(step)
        assert int(starts.min()) >= 0 and int(starts.max()) + window <= cut
    starts = task.validation_starts()
    assert len(starts) == task.validation_size
    assert int(starts.min()) >= cut and int(starts.max()) + window <= end


def test_lm_corpora_are_local_large_and_distinct():
    texts = {name: text.corpus(name) for name in text.CORPORA}
    assert all(len(t) >= 200_000 for t in texts.values())
    assert len(set(texts.values())) == len(texts)
    assert "def " in texts["stdlib-a"] and "class " in texts["stdlib-b"]
    assert "def " not in texts["pydoc-topics"][:2000] and " the " in texts["pydoc-topics"]
    assert len(texts["stdlib-a"]) > len(charlm.corpus())  # more than char-lm's text
    with pytest.raises(ValueError, match="Unknown corpus"):
        text.corpus("nope")


def test_lm_finetune_pretrains_once_with_adamw_on_another_text(pretraining_cache):
    task = tasks.TASKS["lm-finetune"](2, 6)
    assert task.pretrain_corpus != task.corpus and task.pretrain_corpus in text.CORPORA
    assert task.preparation_steps() == 6
    path = task.cache_path()
    assert not path.exists()
    task.prepare()
    assert path.exists() and path.parent == pretraining_cache
    first = task.model().state_dict()
    fresh = task.timing_model().state_dict()
    assert any(not torch.equal(first[k], fresh[k]) for k in first)  # pre-trained, not fresh
    again = task.pretrain()  # the pre-training itself is deterministic
    assert all(torch.equal(first[k], again[k]) for k in first)
    transformer_tasks.clear_memory()
    loaded = tasks.TASKS["lm-finetune"](2, 6).model().state_dict()  # from the disk cache
    assert all(torch.equal(first[k], loaded[k]) for k in first)
    assert tasks.TASKS["lm-finetune"](2, 7).cache_path() != path  # steps are in the key


def test_trainer_task_records_a_curve_like_the_suite_loop():
    _needs("gpt-lm-trainer")
    job = {"task": "gpt-lm-trainer", "seed": 0, "steps": 4, "optimizer": "adamw", "lr": 3e-3}
    record = run.run_job({**job, "paths": {}, "backends": {}})
    assert record["eval_steps"] == [0, 1, 2, 3, 4]
    assert len(record["val_loss"]) == 5 and len(record["train_loss"]) == 4
    assert record["val_loss"][-1] < record["val_loss"][0] and not record["diverged"]
    assert record["optimizer_ms_median"] > 0
    assert record["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)  # AdamW: 2 floats
    again = run.run_job({**job, "paths": {}, "backends": {}})
    assert again["val_loss"] == record["val_loss"]
    # a diverging lr stops the Trainer at the diverged loss, counted with the initial loss
    diverging = {**job, "steps": 40, "optimizer": "sgd", "lr": 1e3}
    record = run.run_job({**diverging, "paths": {}, "backends": {}})
    assert record["diverged"] and record["steps_done"] < 40
    assert record["counted_final_val_loss"] == record["initial_val_loss"]


# -- options --------------------------------------------------------------------------------------


def _parse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_task_names_and_seed_counts_are_refused_clearly(capsys):
    base = ["--optimizer", "x"]
    assert "unknown task(s) 'nope'" in _parse_error([*base, "--tasks", "gpt-lm,nope"], capsys)
    for bad in ("0", "-1", "two", "1.5"):
        assert "needs a positive integer" in _parse_error([*base, "--seeds", bad], capsys)
    assert "invalid choice" in _parse_error([*base, "--suite", "big"], capsys)
    assert "not allowed with" in _parse_error([*base, "--suite", "all", "--tasks", "vit"], capsys)
    assert "invalid choice" in _parse_error([*base, "--roles", "some"], capsys)
    assert "unknown optimizer kind" in _parse_error([*base, "--kinds", "adam"], capsys)
    # Every result is normalised by tuned AdamW: a run without it failed after all its runs.
    assert "'learned' leaves out adamw" in _parse_error([*base, "--kinds", "learned"], capsys)
    with pytest.raises(ValueError, match="Unknown task: 'nope'"):
        tasks.make("nope", 0, 10)
    with pytest.raises(ValueError, match="seed count must be a positive integer"):
        tasks.seeds_for("gpt-lm", 0, quick=False, default=2)
    with pytest.raises(ValueError, match="Unknown task"):
        tasks.seeds_for("nope", None, quick=False, default=2)


def test_suites_seed_counts_and_roles_in_the_settings():
    settings = options.settings(options.parse(["--optimizer", "x", "--suite", "transformers"]))
    assert settings["tasks"] == TRANSFORMER_NAMES and settings["suite"] == "transformers"
    assert all(seeds == [0, 1, 2] for seeds in settings["task_seeds"].values())
    assert settings["roles"] == "auto" and settings["kinds"] == list(optimizers.KINDS)
    classic = options.settings(options.parse(["--optimizer", "x", "--roles", "none"]))
    assert classic["tasks"] == tasks.SUITES["classic"] and classic["roles"] == "none"
    assert all(seeds == [0, 1] for seeds in classic["task_seeds"].values())
    mixed = options.settings(options.parse(["--optimizer", "x", "--tasks", "cnn,vit"]))
    assert mixed["task_seeds"] == {"cnn": [0, 1], "vit": [0, 1, 2]} and mixed["suite"] is None
    one = options.settings(options.parse(["--optimizer", "x", "--suite", "all", "--seeds", "1"]))
    assert all(seeds == [0] for seeds in one["task_seeds"].values())
    quick = options.settings(options.parse(["--optimizer", "x", "--suite", "all", "--quick"]))
    assert all(seeds == [0] for seeds in quick["task_seeds"].values())


def test_learned_optimizer_gets_parameter_groups_with_roles(artifact, monkeypatch):
    import compiledopt

    model = tasks.TASKS["vit"](0, 8).model()
    names = [n for n, _ in model.named_parameters()]
    called = []

    def param_groups(module):
        called.append(module)
        named = list(module.named_parameters())
        return [
            {
                "params": [p for n, p in named if p.ndim >= 2],
                "param_names": [n for n, p in named if p.ndim >= 2],
                "role": "matrix",
            },
            {
                "params": [p for n, p in named if p.ndim < 2],
                "param_names": [n for n, p in named if p.ndim < 2],
                "role": "vector",
            },
        ]

    monkeypatch.setattr(compiledopt, "param_groups", param_groups, raising=False)
    paths, backends = {"learned": artifact}, {"learned": "torchscript"}
    optimizer = optimizers.build("learned", model, 1.0, paths, backends, roles="auto")
    assert called == [model]
    assert [g["role"] for g in optimizer.param_groups] == ["matrix", "vector"]
    assert sorted(n for g in optimizer.param_groups for n in g["param_names"]) == sorted(names)
    plain = optimizers.build("learned", model, 1.0, paths, backends, roles="none")
    assert len(plain.param_groups) == 1  # one group, no role given (the optimizer's default)
    assert plain.param_groups[0].get("role", "auto") == "auto"
    assert len(called) == 1
    adamw = optimizers.build("adamw", model, 1e-3, paths, backends, roles="auto")
    assert len(adamw.param_groups) == 1 and len(called) == 1  # roles are for learned kinds
    monkeypatch.delattr(compiledopt, "param_groups")
    fallback = optimizers.build("learned", model, 1.0, paths, backends, roles="auto")
    assert len(fallback.param_groups) == 1
    with pytest.raises(ValueError, match="Unknown roles"):
        optimizers.learned_params(model, "some")


def test_weight_decay_reaches_every_optimizer_and_its_runs(artifact, capsys):
    model = tasks.TASKS["logistic"](0, 8).model()
    paths, backends = {"learned": artifact}, {"learned": "torchscript"}
    for kind in ("learned", "adamw", "sgd"):
        plain = optimizers.build(kind, model, 1e-3, paths, backends)
        assert all(g["weight_decay"] == 0.0 for g in plain.param_groups)  # the default
        decayed = optimizers.build(kind, model, 1e-3, paths, backends, weight_decay=0.1)
        assert all(g["weight_decay"] == 0.1 for g in decayed.param_groups)
    job = {"task": "logistic", "seed": 0, "steps": 6, "lr": 0.5, "paths": paths}
    job["backends"] = backends
    for kind in ("learned", "adamw"):
        records = [
            run.run_job({**job, "optimizer": kind, "weight_decay": decay}) for decay in (0.0, 0.5)
        ]
        assert [r["weight_decay"] for r in records] == [0.0, 0.5]
        assert records[0]["final_val_loss"] != records[1]["final_val_loss"]  # it took effect
    assert run.run_job({**job, "optimizer": "adamw"})["weight_decay"] == 0.0  # older jobs
    assert "finite number >= 0" in _parse_error(
        ["--optimizer", "x", "--weight-decay", "-1"], capsys
    )
    for bad in ("nan", "inf", "some"):
        err = _parse_error(["--optimizer", "x", "--weight-decay", bad], capsys)
        assert "finite number >= 0" in err
    default = options.settings(options.parse(["--optimizer", "x"]))
    assert default["weight_decay"] == 0.0 and default["default_lr_only"] is False


def test_default_lr_only_plans_each_kind_at_its_default():
    assert optimizers.plan(3e-3, 10.0, quick=False, default_only=True) == {
        "learned": [3e-3],
        "old": [10.0],
        "adamw": [optimizers.ADAMW_DEFAULT_LR],
    }
    assert optimizers.plan(3e-3, None, quick=True, default_only=True) == {
        "learned": [3e-3],
        "adamw": [optimizers.ADAMW_DEFAULT_LR],
    }


def test_quick_run_at_default_lrs_with_weight_decay_records_it(tmp_path, capsys):
    prefix = tmp_path / "wd"
    argv = ["--optimizer", "normalized-mlp", "--quick", "--tasks", "logistic"]
    argv += ["--kinds", "learned,adamw", "--default-lr-only", "--weight-decay", "0.05"]
    argv += ["--jobs", "1", "--no-plots", "--output", str(prefix)]
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert "weight decay 0.05" in printed
    doc = json.loads((tmp_path / "wd.json").read_text())
    assert doc["settings"]["weight_decay"] == 0.05 and doc["settings"]["default_lr_only"]
    assert doc["sweeps"] == {
        "learned": [doc["default_lrs"]["learned"]],
        "adamw": [optimizers.ADAMW_DEFAULT_LR],
    }
    assert len(doc["runs"]) == 2 and all(r["weight_decay"] == 0.05 for r in doc["runs"])
    assert "--weight-decay 0.05" in doc["command"]
    assert "weight decay 0.05" in (tmp_path / "wd.md").read_text()
    summary = doc["tasks"]["logistic"]["summary_of_runs"]
    assert {"learned@default", "adamw@default"} <= set(summary["final_val_loss"])


def test_weight_decay_summary_and_decision_by_hand():
    def doc(decay, losses):  # losses: task -> kind -> per-seed final loss
        runs = [
            {
                "task": task,
                "optimizer": kind,
                "lr": {"learned": 3e-3, "adamw": 1e-3}[kind],
                "seed": seed,
                "weight_decay": decay,
                "counted_final_val_loss": loss,
            }
            for task, kinds in losses.items()
            for kind, values in kinds.items()
            for seed, loss in enumerate(values)
        ]
        return {
            "tasks": dict.fromkeys(losses),
            "default_lrs": {"learned": 3e-3, "adamw": 1e-3},
            "settings": {"weight_decay": decay},
            "runs": runs,
        }

    base = {"a": {"learned": [1.0, 2.0], "adamw": [2.0, 2.0]}, "b": {"learned": [4.0, 4.0]}}
    half = {"a": {"learned": [0.5, 1.0], "adamw": [2.0, 2.0]}, "b": {"learned": [2.0, 2.0]}}
    names, finals = weight_decay.collect([doc(0.0, base), doc(0.1, half)])
    assert names == ["a", "b"] and finals["a", "learned", 0.1] == {0: 0.5, 1: 1.0}
    rows = weight_decay.summary(names, finals, "learned")
    assert rows[0.0]["geomean_ratio"] == pytest.approx(1.0)
    assert rows[0.1]["geomean_ratio"] == pytest.approx(0.5)
    assert rows[0.1]["se_log_ratio"] == pytest.approx(0.0) and rows[0.1]["better"] == 2
    assert weight_decay.decide(rows)[0] == 0.1  # better on every task by the same factor
    noisy = {"a": {"learned": [0.5, 1.0]}, "b": {"learned": [4.4, 4.4]}}
    names, finals = weight_decay.collect([doc(0.0, base), doc(0.1, noisy)])
    rows = weight_decay.summary(names, finals, "learned")
    assert rows[0.1]["geomean_ratio"] < 1 and rows[0.1]["worse"] == 1
    assert weight_decay.decide(rows)[0] == 0.0  # within noise: keep 0
    with pytest.raises(ValueError, match="measured twice"):
        weight_decay.collect([doc(0.0, base), doc(0.0, base)])


def test_lr_spread_and_costs_by_hand():
    summaries = {
        "a": {"tuned_lr": {"learned": 1e-3, "adamw": 1e-3}},
        "b": {"tuned_lr": {"learned": 1e-1, "adamw": 1e-3}},
    }
    spread = analysis.lr_spread(summaries)
    assert spread["learned"]["max_over_min"] == pytest.approx(100.0)
    assert spread["learned"]["log10_std"] == pytest.approx(1.0)  # log10: -3 and -1
    assert spread["adamw"]["max_over_min"] == 1.0 and spread["adamw"]["log10_std"] == 0.0
    assert spread["learned"]["best_lr"] == {"a": 1e-3, "b": 1e-1}
    table = {
        "adamw": {
            1e-3: {0: {"optimizer_ms_median": 1.0, "state_bytes_per_param": 8.0}},
            3e-3: {0: {"optimizer_ms_median": 3.0, "state_bytes_per_param": 8.0}},
            1e-2: {0: {"optimizer_ms_median": 2.0, "state_bytes_per_param": 8.0}},
        },
        "sgd": {1e-2: {0: {}}},  # an older record without costs
    }
    costs = analysis.costs(table)
    assert costs["adamw"] == {"optimizer_ms_median": 2.0, "state_bytes_per_param": 8.0}
    assert costs["sgd"] == {"optimizer_ms_median": None, "state_bytes_per_param": None}


def test_quick_transformer_task_with_adamw_only(tmp_path, capsys):
    prefix = tmp_path / "tf"
    argv = ["--optimizer", "normalized-mlp", "--quick", "--tasks", "gpt-lm", "--kinds", "adamw"]
    argv += ["--jobs", "1", "--output", str(prefix)]
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert "spread of the best (tuned) lr" in printed and "AdamW 3e-3" in printed
    doc = json.loads((tmp_path / "tf.json").read_text())
    assert doc["settings"]["kinds"] == ["adamw"] and doc["settings"]["roles"] == "auto"
    assert {r["optimizer"] for r in doc["runs"]} == {"adamw"}
    assert sorted(r["lr"] for r in doc["runs"]) == [1e-3, 3e-3]
    summary = doc["tasks"]["gpt-lm"]["summary_of_runs"]
    assert {"adamw@default", "adamw@3e-3", "adamw@tuned"} <= set(summary["final_val_loss"])
    assert summary["cost"]["adamw"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert doc["tasks"]["gpt-lm"]["params"] >= 1_000_000
    assert doc["tasks"]["gpt-lm"]["corpus"] == "stdlib-a"
    assert doc["lr_spread"]["adamw"]["tasks"] == 1
    assert set(doc["stress"]) == {"adamw"}


# -- metrics --------------------------------------------------------------------------------------


def test_iqm_against_hand_computed_values():
    assert metrics.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert metrics.iqm([8, 1, 100, 2, 3]) == pytest.approx(13 / 3)  # cut 1 each end: 2, 3, 8
    assert metrics.iqm([1, 2, 3, math.inf]) == pytest.approx(2.5)  # inf is trimmed
    assert metrics.iqm([7.0]) == 7.0
    assert metrics.iqm([1, 2, math.nan]) == pytest.approx(1.5)  # nan left out
    assert math.isnan(metrics.iqm([]))
    stats = pytest.importorskip("scipy.stats")
    values = [0.3, 1.7, 0.9, 2.5, 1.1, 0.4, 5.0, 0.8, 1.3, 0.2, 0.7]
    assert metrics.iqm(values) == pytest.approx(stats.trim_mean(values, 0.25))


def test_speedup_normalisation_and_steps_to_reach():
    assert metrics.speedup(300, 100) == 3.0
    assert metrics.speedup(100, 300) == pytest.approx(1 / 3)
    assert metrics.speedup(300, None) == 0.0  # never reached
    assert metrics.speedup(0, 0) == 1.0
    assert metrics.speedup(60, 0) == math.inf
    assert math.isnan(metrics.speedup(None, 10))
    assert metrics.normalized(0.5, 2.0) == 0.25
    assert metrics.normalized(0.0, 0.0) == 1.0
    assert metrics.normalized(1.0, 0.0) == math.inf
    steps, losses = [0, 10, 20, 30], [3.0, math.nan, 1.5, 1.0]
    assert metrics.steps_to_reach(steps, losses, 1.5) == 20
    assert metrics.steps_to_reach(steps, losses, 3.0) == 0
    assert metrics.steps_to_reach(steps, losses, 0.5) is None
    assert metrics.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert metrics.geomean([0.0, 4.0]) == 0.0
    assert metrics.beats_or_ties(1.0009, 1.0) and not metrics.beats_or_ties(1.0011, 1.0)
    assert metrics.beats(0.99, 1.0) and not metrics.beats(1.0, 1.0)
    assert metrics.best_lr({1e-3: [1.0, 3.0], 1e-2: [2.0, 2.0], 1e-1: [5.0, 0.5]}) == 1e-3


def test_divergence_rule():
    assert not metrics.is_diverged(10.0, 1.0)  # exactly 10x is not divergence
    assert metrics.is_diverged(10.01, 1.0)
    assert metrics.is_diverged(math.nan, 1.0) and metrics.is_diverged(math.inf, 1.0)
    assert metrics.counted_final(0.1, 2.0, diverged=True) == 2.0
    assert metrics.counted_final(0.1, 2.0, diverged=False) == 0.1
    assert metrics.counted_final(math.nan, 2.0, diverged=False) == 2.0


def test_a_diverging_run_stops_and_counts_its_initial_loss():
    job = {"task": "logistic", "seed": 0, "steps": 40, "optimizer": "sgd", "lr": 1e4}
    record = run.run_job({**job, "paths": {}, "backends": {}})
    assert record["diverged"] and record["diverged_step"] < 40
    assert record["counted_final_val_loss"] == record["initial_val_loss"]
    assert record["steps_done"] == record["diverged_step"]


def test_schedule_warmup_then_cosine_to_zero():
    total = 100  # warm-up: 5 steps
    assert optimizers.warmup_cosine(0, total) == pytest.approx(0.2)
    assert optimizers.warmup_cosine(4, total) == pytest.approx(1.0)
    assert optimizers.warmup_cosine(5, total) == pytest.approx(1.0)
    assert optimizers.warmup_cosine(52.5, total) == pytest.approx(0.5)
    assert optimizers.warmup_cosine(total, total) == pytest.approx(0.0)
    assert run.evaluation_steps(300) == list(range(0, 301, 6))
    assert run.evaluation_steps(12) == list(range(13))


def test_sweeps_include_the_defaults_and_cover_the_ranges():
    sweeps = optimizers.plan(1e-3, 10.0, quick=False)
    assert sweeps["learned"] == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    assert sweeps["old"] == [3.0, 10.0, 30.0]
    assert len(sweeps["adamw"]) >= 7 and sweeps["adamw"][0] == 1e-4 and sweeps["adamw"][-1] == 0.1
    assert len(sweeps["sgd"]) >= 5
    quick = optimizers.plan(0.5, None, quick=True)
    assert set(quick) == {"learned", "adamw", "sgd"}
    assert all(len(lrs) == 2 for lrs in quick.values()) and 0.5 in quick["learned"]


def _record(task, kind, lr, seed, curve, diverged=False):
    steps = list(range(0, 10 * len(curve), 10))
    return {
        "task": task,
        "optimizer": kind,
        "lr": lr,
        "seed": seed,
        "eval_steps": steps,
        "val_loss": curve,
        "initial_val_loss": curve[0],
        "counted_final_val_loss": curve[0] if diverged else curve[-1],
        "diverged": diverged,
    }


def test_task_summary_and_aggregates_by_hand():
    runs = [
        _record("t", "adamw", 1e-3, 0, [4.0, 3.0, 2.0, 2.0, 2.0]),
        _record("t", "adamw", 1e-2, 0, [4.0, 2.0, 1.0, 1.0, 1.0]),  # tuned; reaches 1.0 at 20
        _record("t", "adamw", 1e-1, 0, [4.0, 50.0], diverged=True),
        _record("t", "learned", 1.0, 0, [4.0, 1.0, 0.9, 0.8, 0.5]),  # 1.0 at step 10
        _record("t", "learned", 3.0, 0, [4.0, 0.5, 0.4, 0.3, 0.25]),
    ]
    defaults = {"learned": 1.0, "adamw": 1e-3}
    summary = analysis.summarize(runs, [0], defaults)["t"]
    assert summary["tuned_lr"] == {"adamw": 1e-2, "learned": 3.0}
    assert summary["diverged"]["adamw"] == [1e-1]
    row = summary["per_seed"][0]
    assert row["target"] == 1.0 and row["adamw_steps"] == 20
    assert row["learned@default"]["normalized"] == pytest.approx(0.5)
    assert row["learned@default"]["speedup"] == pytest.approx(2.0)
    assert row["learned@tuned"]["normalized"] == pytest.approx(0.25)
    assert row["learned@tuned"]["speedup"] == pytest.approx(2.0)
    assert summary["wins"]["learned_default_beats_adamw_default"]
    aggregates = analysis.aggregate({"t": summary}, runs)
    assert aggregates["learned"]["normalized_final_iqm"]["tuned"] == pytest.approx(0.25)
    assert aggregates["learned"]["fraction_tuned_beats_or_ties_adamw_tuned"] == 1.0
    assert aggregates["learned"]["diverged_runs"] == 0 and aggregates["count"]["values"] == 1


def test_resolve_artifact(artifact, tmp_path):
    assert optimizers.resolve_artifact(artifact) == artifact
    try:
        import compiledopt.pretrained  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(FileNotFoundError):
            optimizers.resolve_artifact(str(tmp_path / "nothing-here"))


# -- end to end -----------------------------------------------------------------------------------


def test_quick_run_writes_the_documented_json(artifact, tmp_path, capsys):
    prefix = tmp_path / "out" / "lq"
    argv = ["--optimizer", artifact, "--quick", "--tasks", "logistic,regression"]
    argv += ["--jobs", "1", "--output", str(prefix)]
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert "estimated wall time" in printed and "aggregates over 2 tasks" in printed

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    doc = json.loads((tmp_path / "out" / "lq.json").read_text(), parse_constant=refuse)
    assert set(report.TOP_KEYS) <= set(doc)
    assert doc["schema"] == report.SCHEMA
    assert list(doc["tasks"]) == ["regression", "logistic"]
    assert set(doc["sweeps"]) == {"learned", "old", "adamw", "sgd"}
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["environment"]["threads_per_worker"] == 1
    assert doc["command"].endswith("--output " + str(prefix))
    assert doc["wall_time_s"] > 0 and doc["estimated_s"] > 0
    for info in doc["tasks"].values():
        assert {"params", "steps", "validation_size", "summary_of_runs"} <= set(info)
        summary = info["summary_of_runs"]
        assert {
            "learned@default",
            "learned@tuned",
            "adamw@default",
            "adamw@3e-3",
            "adamw@tuned",
        } <= set(summary["final_val_loss"])
        for kind in ("learned", "adamw"):
            assert summary["cost"][kind]["optimizer_ms_median"] > 0
            assert summary["cost"][kind]["state_bytes_per_param"] > 0
    runs = doc["runs"]
    assert len(runs) == 2 * 8  # 2 tasks x 4 kinds x 2 lrs x 1 seed
    for record in runs:
        assert {"eval_steps", "val_loss", "diverged", "counted_final_val_loss"} <= set(record)
        assert {"optimizer_ms_median", "state_bytes_per_param"} <= set(record)
    assert set(doc["lr_spread"]) == {"learned", "old", "adamw", "sgd"}
    assert "spread of the best (tuned) lr" in printed and "AdamW 3e-3" in printed
    learned = doc["aggregates"]["learned"]
    for key in ("normalized_final_iqm", "normalized_final_geomean", "speedup_iqm"):
        assert set(learned[key]) == {"default", "tuned"}
    assert "fraction_default_beats_adamw_default" in learned
    assert "fraction_tuned_beats_or_ties_adamw_tuned" in learned
    assert set(doc["stress"]) == {"learned", "old", "adamw"}
    assert all(check["pass"] for check in doc["stress"]["adamw"])  # the reference passes
    assert (tmp_path / "out" / "lq.md").exists()
    if "matplotlib" in sys.modules or _importable("matplotlib"):
        assert (tmp_path / "out" / "lq_curves.png").stat().st_size > 0
        assert (tmp_path / "out" / "lq_normalized.png").stat().st_size > 0


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_relabel_reproduces_a_result_at_its_own_default_and_refuses_unmeasured_lrs(tmp_path):
    import json
    from pathlib import Path

    from benchmarks.learning_quality import relabel

    result = Path(__file__).parent.parent / "benchmarks/results/learning_quality.json"
    original = json.loads(result.read_text())
    same = original["default_lrs"]["learned"]
    prefix = str(tmp_path / "same")
    assert (
        relabel.main([str(result), "--learned-lr", str(same), "--output", prefix, "--no-plots"])
        == 0
    )
    again = json.loads(Path(prefix + ".json").read_text())
    assert again["aggregates"] == original["aggregates"]
    other = next(lr for lr in original["sweeps"]["learned"] if lr != same)
    prefix = str(tmp_path / "other")
    assert (
        relabel.main([str(result), "--learned-lr", str(other), "--output", prefix, "--no-plots"])
        == 0
    )
    moved = json.loads(Path(prefix + ".json").read_text())
    assert moved["default_lrs"]["learned"] == other
    assert (
        moved["aggregates"]["learned"]["normalized_final_iqm"]["tuned"]
        == (original["aggregates"]["learned"]["normalized_final_iqm"]["tuned"])
    )
    assert moved["aggregates"] != original["aggregates"]
    with pytest.raises(SystemExit) as exit_info:
        relabel.main([str(result), "--learned-lr", "0.123", "--output", prefix, "--no-plots"])
    assert exit_info.value.code == 2
