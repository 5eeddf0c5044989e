"""``gpt-lm-trainer``: the ``gpt-lm`` job trained through Hugging Face's ``transformers.Trainer``.

The model is a ``GPT2LMHeadModel`` of a small ``GPT2Config`` shaped as ``gpt-lm``'s
:class:`~benchmarks.learning_quality.transformer_tasks.GPT`: 4 blocks, n_embd 128, 4 heads, an MLP
of 768 (``n_inner``) with exact GELU, 64 positions, the char-lm alphabet as vocabulary, the head
untied from the embedding, no dropout (1.09M parameters). Its data are ``gpt-lm``'s: the same
corpus, windows, batches for a seed and validation windows.

The run goes through ``Trainer.train()`` with the optimizer under test and the suite's warm-up +
cosine schedule passed in (``optimizers=(optimizer, scheduler)``), so the Trainer builds neither;
``max_steps`` is the run's steps, gradient clipping is off (``max_grad_norm=0``, as in every
other task), one process on the CPU, no logging, saving, evaluation or reporting
(``report_to=[]``), nothing downloaded. The training set is an ``IterableDataset`` yielding the
rows of batch 0, 1, 2, ... in order, so the Trainer's step ``k`` sees exactly ``task.batch(k)``.

What differs from the suite's own loop (:func:`~benchmarks.learning_quality.run.train`), and how
the record is kept compatible: the loss is computed by a ``compute_loss_func`` (cross-entropy of
the logits against the next characters, as ``gpt-lm``), which also hands each step's training
loss to the run's :class:`~benchmarks.learning_quality.run.Recorder` before the backward pass (a
diverged loss stops the Trainer there, the step not taken, as in the suite's loop); a
``TrainerCallback`` reports each finished step at ``on_step_end``, where the validation loss is
measured on the held-out windows at the suite's evaluation steps (every 2%) and a diverged
validation loss stops training. The curve, the flags and the costs are therefore recorded exactly
as for other tasks. Step times run from the end of one step to the end of the next, so they
include the Trainer's own work (data loading, gradient-norm bookkeeping, callbacks); the
optimizer's own time is measured by the same step hooks as elsewhere. The up-front time estimate
times this task's steps in the suite's plain loop, so it leaves out the Trainer's overhead.
"""

import os
import tempfile
import time
from typing import Any, Dict, Iterator

import torch
from torch import Tensor, nn

from benchmarks.learning_quality.transformer_tasks import GPTLM


def _offline() -> None:
    """Keep Hugging Face libraries off the network (this process never downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class _DivergedError(Exception):
    """Raised inside the Trainer's step when the training loss diverged: stops the run."""


class GPTLMTrainer(GPTLM):
    """``gpt-lm`` as a ``GPT2LMHeadModel`` trained by ``transformers.Trainer``."""

    name = "gpt-lm-trainer"
    summary = (
        "gpt-lm through transformers.Trainer: GPT2LMHeadModel, 4 layers, n_embd 128, 4 heads, "
        "n_inner 768, context 64, untied head, same text and batches as gpt-lm"
    )
    needs = ("transformers", "accelerate")
    custom_loop = True
    #: Windows are drawn as ``gpt-lm``'s for the same seed (the name salts the streams).
    stream_name = "gpt-lm"

    def stream_seed(self, stream: int) -> int:
        import zlib

        salt = zlib.crc32(self.stream_name.encode())
        return ((salt * 1_000_003 + self.seed) * 1_000_033 + stream) % 2**63

    def build_model(self) -> nn.Module:
        _offline()
        from transformers import GPT2Config, GPT2LMHeadModel

        from benchmarks.learning_quality.charlm import VOCAB

        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=self.context,
            n_embd=self.width,
            n_layer=self.layers,
            n_head=self.heads,
            n_inner=self.hidden,
            activation_function="gelu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
        )
        return GPT2LMHeadModel(config)

    def fit(self, model: nn.Module, optimizer: Any, scheduler: Any, recorder: Any) -> None:
        _offline()
        from transformers import Trainer, TrainerCallback, TrainingArguments
        from transformers.trainer_callback import PrinterCallback

        task = self
        steps = recorder.steps
        counter = {"step": 0, "mark": 0.0}

        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self) -> Iterator[Dict[str, Tensor]]:
                for step in range(steps):
                    inputs, target = task.batch(step)
                    for row in range(inputs.shape[0]):
                        yield {"input_ids": inputs[row], "labels": target[row]}

        def compute_loss(outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
            loss = task.loss(outputs, labels)
            if recorder.loss(counter["step"], loss.item()):
                raise _DivergedError
            return loss

        class Report(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                counter["mark"] = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                step = counter["step"]
                if recorder.stepped(step, time.perf_counter() - counter["mark"]):
                    control.should_training_stop = True
                counter["step"] = step + 1
                counter["mark"] = time.perf_counter()

        with tempfile.TemporaryDirectory() as folder, torch.random.fork_rng(devices=[]):
            arguments = TrainingArguments(
                output_dir=folder,
                max_steps=steps,
                per_device_train_batch_size=self.batch_size,
                gradient_accumulation_steps=1,
                max_grad_norm=0.0,
                use_cpu=True,
                report_to=[],
                logging_strategy="no",
                save_strategy="no",
                eval_strategy="no",
                disable_tqdm=True,
                dataloader_num_workers=0,
                remove_unused_columns=False,
                push_to_hub=False,
                seed=self.seed,
            )
            trainer = Trainer(
                model=model,
                args=arguments,
                train_dataset=Stream(),
                optimizers=(optimizer, scheduler),
                compute_loss_func=compute_loss,
                callbacks=[Report()],
            )
            trainer.remove_callback(PrinterCallback)  # no printed metrics: the record has them
            try:
                trainer.train()
            except _DivergedError:
                pass
