"""FrozenOptimizer inside training frameworks: the Hugging Face Trainer, accelerate and Lightning.

Each framework's checkpoint and resume must continue bit for bit as the uninterrupted run
(parameters, optimizer state and scheduler state compared with ``torch.equal``). A framework
that is not installed skips its tests (``pip install 'compiledopt[integrations]'``). Everything
runs on the CPU, offline, with tiny models and a few steps; see docs/integrations.md.
"""

import os

# Before transformers (huggingface_hub reads these when it is imported): nothing is downloaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest
import torch

import compiledopt as co

ARTIFACT = "normalized-mlp"
ARTIFACT_LR = 3e-3  # the packaged optimizer's suggested lr (its manifest's "lr")


def assert_identical(a, b, where="state"):
    """``a`` and ``b`` are equal, their tensors bit for bit (``torch.equal``, same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_parameters(model, other):
    named = dict(other.named_parameters())
    assert dict(model.named_parameters()).keys() == named.keys()
    for name, param in model.named_parameters():
        assert torch.equal(param, named[name]), name


def _frozen(optimizer):
    """The FrozenOptimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(optimizer, co.FrozenOptimizer)
    return optimizer


def _steps(optimizer):
    """The step counts in a FrozenOptimizer's (or its wrapper's) state."""
    return {int(state["step"]) for state in optimizer.state_dict()["state"].values()}


def _regression_data(count=32):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(count, 8, generator=generator)
    return torch.utils.data.TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


# -- Hugging Face Trainer -----------------------------------------------------------------------


class _Tokens(torch.utils.data.Dataset):
    """16 random sequences of 16 tokens, labels = inputs (causal language modelling)."""

    def __init__(self):
        self.tokens = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


HF_STEPS, HF_SAVE_STEPS = 6, 3


def _hf_trainer(output_dir, route, optimizer_kwargs=None):
    """A Trainer for a tiny random GPT-2 (dropout on: resume must restore the RNG too), with
    FrozenOptimizer given as an instance and a scheduler (``route="optimizers"``) or as a class
    and its kwargs (``route="optimizer_cls_and_kwargs"``)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=HF_STEPS,
        per_device_train_batch_size=4,  # 4 steps an epoch: the checkpoint is mid-epoch
        learning_rate=2e-3,
        weight_decay=0.01,
        save_strategy="steps",
        save_steps=HF_SAVE_STEPS,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if route == "optimizers":
        optimizer = co.FrozenOptimizer(
            model.parameters(),
            ARTIFACT,
            lr=args.learning_rate,
            backend="eager",
            weight_decay=args.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=HF_STEPS + 2)
        extra = {"optimizers": (optimizer, scheduler)}
    else:
        kwargs = {"artifact": ARTIFACT, "backend": "eager", "lr": args.learning_rate}
        kwargs = kwargs if optimizer_kwargs is None else optimizer_kwargs
        extra = {"optimizer_cls_and_kwargs": (co.FrozenOptimizer, kwargs)}
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), **extra)


@pytest.mark.parametrize("route", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_trainer_resumes_bit_exact(tmp_path, route):
    whole = _hf_trainer(tmp_path / "whole", route)
    whole.train()
    checkpoint = tmp_path / "whole" / f"checkpoint-{HF_SAVE_STEPS}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {int(state["step"]) for state in saved["state"].values()} == {HF_SAVE_STEPS}
    optimizer = _frozen(whole.optimizer)
    assert whole.lr_scheduler.base_lrs == [whole.args.learning_rate] * len(optimizer.param_groups)

    resumed = _hf_trainer(tmp_path / "resumed", route)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == whole.state.global_step == HF_STEPS
    assert _steps(optimizer) == {HF_STEPS}
    assert_same_parameters(whole.model, resumed.model)
    assert_identical(optimizer.state_dict(), _frozen(resumed.optimizer).state_dict())
    assert_identical(whole.lr_scheduler.state_dict(), resumed.lr_scheduler.state_dict())


def test_hf_trainer_optimizer_cls_and_kwargs_takes_args_learning_rate(tmp_path):
    trainer = _hf_trainer(tmp_path, "optimizer_cls_and_kwargs")
    trainer.create_optimizer_and_scheduler(num_training_steps=HF_STEPS)
    optimizer = _frozen(trainer.optimizer)
    lr = trainer.args.learning_rate
    assert lr != ARTIFACT_LR
    assert [group["lr"] for group in optimizer.param_groups] == [lr, lr]
    assert trainer.lr_scheduler.base_lrs == [lr, lr]
    # The Trainer's two groups: weight decay for weights, none for biases and LayerNorms.
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]


def test_hf_trainer_does_not_pass_its_learning_rate(tmp_path):
    """The Trainer gives optimizer_cls only the param groups and the kwargs as written: without
    "lr" in them FrozenOptimizer takes the artifact's lr, not args.learning_rate (as torch.optim
    classes take their own default). If this changes, update docs/integrations.md."""
    kwargs = {"artifact": ARTIFACT, "backend": "eager"}
    trainer = _hf_trainer(tmp_path, "optimizer_cls_and_kwargs", optimizer_kwargs=kwargs)
    trainer.create_optimizer_and_scheduler(num_training_steps=HF_STEPS)
    assert trainer.lr_scheduler.base_lrs == [ARTIFACT_LR, ARTIFACT_LR]
    assert trainer.args.learning_rate not in trainer.lr_scheduler.base_lrs


def test_hf_trainer_scheduler_for_an_optimizer_instance_keeps_its_lr(tmp_path):
    """``optimizers=(optimizer, None)``: the Trainer's scheduler (args.lr_scheduler_type) starts
    from the optimizer's own lr; args.learning_rate plays no part."""
    transformers = pytest.importorskip("transformers")
    model = torch.nn.Linear(4, 4)
    optimizer = co.FrozenOptimizer(model.parameters(), ARTIFACT, lr=1e-3, backend="eager")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=2e-3, report_to="none", use_cpu=True
    )
    trainer = transformers.Trainer(model=model, args=args, optimizers=(optimizer, None))
    trainer.create_optimizer_and_scheduler(num_training_steps=HF_STEPS)
    assert _frozen(trainer.optimizer) is optimizer
    assert trainer.lr_scheduler.base_lrs == [1e-3]


# -- accelerate ---------------------------------------------------------------------------------


def _accelerated():
    accelerate = pytest.importorskip("accelerate")
    model = _mlp()
    optimizer = co.FrozenOptimizer(model.parameters(), ARTIFACT, backend="eager")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=12)
    loader = torch.utils.data.DataLoader(_regression_data(), batch_size=8, shuffle=True)
    accelerator = accelerate.Accelerator(cpu=True)
    return accelerator, *accelerator.prepare(model, optimizer, loader, scheduler)


def _accelerate_epochs(accelerator, model, optimizer, loader, scheduler, epochs, save_to=None):
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
        if epoch == 0 and save_to is not None:
            accelerator.save_state(str(save_to))


def test_accelerate_save_state_load_state_bit_exact(tmp_path):
    whole = _accelerated()
    _accelerate_epochs(*whole, epochs=2, save_to=tmp_path)
    resumed = _accelerated()
    resumed[0].load_state(str(tmp_path))
    assert _steps(resumed[2]) == {4}  # one epoch of 4 batches
    _accelerate_epochs(*resumed, epochs=1)  # the next epoch: the shuffle's RNG was restored
    assert _steps(whole[2]) == {8}
    assert_same_parameters(whole[1], resumed[1])
    assert_identical(whole[2].state_dict(), resumed[2].state_dict())
    assert_identical(whole[4].state_dict(), resumed[4].state_dict())


# -- Lightning ----------------------------------------------------------------------------------

PL_STEPS, PL_SAVE_STEPS = 8, 4


def _lightning_module(lightning):
    class Regression(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, batch_index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            optimizer = co.FrozenOptimizer(self.parameters(), ARTIFACT, backend="eager")
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

    return Regression()


def _lightning_fit(lightning, root, ckpt_path=None):
    module = _lightning_module(lightning)
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=root, every_n_train_steps=PL_SAVE_STEPS, save_top_k=-1
    )
    trainer = lightning.Trainer(
        max_steps=PL_STEPS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=True,
        callbacks=[checkpoints],
        default_root_dir=root,
    )
    # Full batch: Lightning replays the batch a checkpoint was saved after (its loop counts
    # that batch as unfinished), so only a one-batch epoch makes the data identical on resume.
    loader = torch.utils.data.DataLoader(_regression_data(), batch_size=32)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module


def test_lightning_resume_from_checkpoint_bit_exact(tmp_path):
    lightning = pytest.importorskip("lightning")
    whole, whole_module = _lightning_fit(lightning, tmp_path / "whole")
    (checkpoint,) = (tmp_path / "whole").glob(f"*step={PL_SAVE_STEPS}.ckpt")
    resumed, resumed_module = _lightning_fit(lightning, tmp_path / "resumed", checkpoint)
    assert resumed.global_step == whole.global_step == PL_STEPS
    optimizer = _frozen(whole.optimizers[0])
    assert _steps(optimizer) == {PL_STEPS}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(ARTIFACT_LR / 4)  # StepLR ran
    assert_same_parameters(whole_module, resumed_module)
    assert_identical(optimizer.state_dict(), _frozen(resumed.optimizers[0]).state_dict())
    assert_identical(
        whole.lr_scheduler_configs[0].scheduler.state_dict(),
        resumed.lr_scheduler_configs[0].scheduler.state_dict(),
    )
