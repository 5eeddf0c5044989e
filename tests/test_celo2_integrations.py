"""A converted Celo2 checkpoint in training frameworks: the Hugging Face Trainer and FSDP2.

One checkpoint in PyLO's ``Celo2MLP`` layout (random weights, tests/celo2_checkpoints.py; nothing
is downloaded) is converted once into an artifact the tests share. The references are
independent of the framework under test: a plain training loop with the same FrozenOptimizer
(Trainer), one process stepping the whole tensors (FSDP2, tests/fsdp_worker.py's model, data
and loop).
"""

import os

# Before transformers (huggingface_hub reads these when it is imported): nothing is downloaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest
import torch
import torch.distributed as dist
from celo2_checkpoints import old_checkpoint
from fsdp_worker import CLOSE, LR, ORTHOGONALIZED, STEPS, batches, make_model, train
from spawning import spawn
from torch import nn

import compiledopt as co
from compiledopt.export.convert import convert_celo2

SPAWN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    """The converted ``Celo2MLP`` checkpoint (eager only: no exported graphs)."""
    root = tmp_path_factory.mktemp("celo2")
    return str(convert_celo2(old_checkpoint(), root / "artifact", backends=[]))


def _close(param: torch.Tensor) -> dict:
    """A matrix's direction goes through Newton–Schulz (see tests/fsdp_worker.py)."""
    return ORTHOGONALIZED if param.dim() >= 2 else CLOSE


# -- Hugging Face Trainer -----------------------------------------------------------------------

VOCAB, LENGTH, CLASSES, EXAMPLES, HF_STEPS, HF_LR = 20, 6, 4, 32, 5, 1e-2


class _Classifier(nn.Module):
    """Mean-pooled token embeddings through an MLP: an embedding, two hidden matrices (one
    tall), a head and biases, so every Celo2MLP route runs (embedding and head: Adam; the
    matrices: the learned rule; biases: Adam from the shared accumulators)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, CLASSES)
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.net(self.embed(input_ids).mean(1))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _examples() -> list:
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=generator)
    labels = torch.randint(0, CLASSES, (EXAMPLES,), generator=generator)
    return [{"input_ids": t, "labels": y} for t, y in zip(tokens, labels)]


def _optimizer(model: nn.Module, artifact: str) -> co.FrozenOptimizer:
    groups = co.param_groups(model, weight_decay=0.01)
    return co.FrozenOptimizer(groups, artifact, lr=HF_LR, backend="eager")


def test_hf_trainer_matches_a_plain_loop(artifact, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    examples = _examples()
    model = _Classifier()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = _optimizer(model, artifact)
    assert sorted(set(optimizer.rules_of())) == ["adam", "artifact"]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=HF_STEPS,
        # One batch of every example per step: the Trainer's shuffle only permutes it.
        per_device_train_batch_size=EXAMPLES,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: the plain loop clips nothing
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=examples, optimizers=(optimizer, None)
    )
    trainer.train()
    assert trainer.state.global_step == HF_STEPS
    assert {int(state["step"]) for state in optimizer.state.values()} == {HF_STEPS}

    reference = _Classifier()
    reference_optimizer = _optimizer(reference, artifact)
    inputs = torch.stack([e["input_ids"] for e in examples])
    labels = torch.stack([e["labels"] for e in examples])
    losses = []
    for _ in range(HF_STEPS):
        reference_optimizer.zero_grad()
        loss = reference(inputs, labels)["loss"]
        loss.backward()
        reference_optimizer.step()
        losses.append(loss.item())

    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-4)
    assert losses[-1] < losses[0], losses
    trained = dict(trainer.model.named_parameters())
    for name, param in reference.named_parameters():
        # float32: the Trainer's batch is a permutation of the loop's (sums in another order).
        torch.testing.assert_close(trained[name].detach(), param.detach(), **_close(param))
        assert not torch.allclose(param, initial[name]), f"{name} did not change"


# -- FSDP2 (fully_shard), 2 gloo processes ------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(artifact, tmp_path_factory) -> list:
    """Both ranks' results of tests/fsdp_worker.py's ``train_sharded`` with the artifact."""
    if not dist.is_available():
        pytest.skip("torch without distributed")
    from fsdp_worker import worker

    out = tmp_path_factory.mktemp("celo2_fsdp")
    args = (2, str(out / "init"), str(out), artifact)
    spawn(worker, args, nprocs=2, timeout=SPAWN_TIMEOUT_S)
    return [torch.load(out / f"training{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.slow
def test_fully_shard_celo2_matches_one_process(artifact, sharded) -> None:
    from torch.distributed.tensor import Shard

    model = make_model()
    initial = dict(make_model().named_parameters())
    optimizer = co.FrozenOptimizer(model.named_parameters(), artifact, lr=LR, backend="eager")
    assert set(optimizer.rules_of()) == {"artifact"}  # the learned rule on both matrices
    train(model, optimizer, batches())
    for rank, result in enumerate(sharded):
        assert "error" not in result, result.get("error")
        assert result["backend"] == "eager"
        for name, param in model.named_parameters():
            where = f"rank {rank}: {name}"
            torch.testing.assert_close(
                result["params"][name], param.detach(), **_close(param), msg=where
            )
            assert not torch.equal(result["params"][name], initial[name]), where
            state = optimizer.state[param]
            assert result["state"][name].keys() == state.keys(), where
            for key, value in state.items():
                torch.testing.assert_close(
                    result["state"][name][key], value, **CLOSE, msg=f"{where} {key}"
                )
        # The evenly sharded layer's moments stay sharded as it is (each rank holds its rows).
        placements = result["placements"]["0.weight"]
        assert placements["momentum"] == placements["rms"] == (Shard(0),)
        assert result["reloaded"] and result["reloaded_whole"]
        assert result["skipped"] == 1 and result["unchanged"]
    assert int(optimizer.state[next(model.parameters())]["step"]) == STEPS


@pytest.mark.slow
def test_fully_shard_celo2_state_has_no_partial_placement(sharded) -> None:
    """A factored statistic averaged over the sharded axis is stored as values (Replicate), not
    as a pending Partial(avg) reduction, which torch.distributed.checkpoint refuses to save."""
    for result in sharded:
        assert result["placements"]["0.weight"].get("factored_col") is not None  # it is seen
        partial = {
            (name, key): placement
            for name, state in result["placements"].items()
            for key, placement in state.items()
            if placement is not None and any(p.is_partial() for p in placement)
        }
        assert not partial, partial
