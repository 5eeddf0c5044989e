"""A learned optimizer meta-trained online, against SGD (``compiledopt meta-descent``).

The task needs no downloads. A fixed random *teacher* network (8-32-1, tanh) labels Gaussian inputs;
a *student* of the same architecture learns it by regression (mean squared error) from minibatches.
The inputs the student sees are rescaled per feature from 0.1 to 3.2, so the problem is
ill-conditioned: plain SGD's learning rate is bounded by the large-scale features, and the
small-scale ones learn slowly.

Two copies of the student, from the same initialisation and on the same minibatches, are trained:

* by :class:`~compiledopt.optim.LearnableOptimizer` with a learnable transform (one per parameter),
  whose weights are meta-trained *online* by ``torch.optim.Adam`` in the seed's loop::

      metaopt.zero_grad(); opt.zero_grad()
      loss(model(X), y).backward()   # model gradient, and meta-gradient of the previous step
      opt.step()                     # update the transform
      metaopt.step()                 # update the model with the transform

* by ``torch.optim.SGD`` at the same learning rate.

Every transform starts as the identity map (the Kronecker RNN: close to it, for small gradients),
so the learned optimizer starts as that same SGD and departs from it only as far as the
meta-gradient takes it. :func:`run_demo` prints the held-out loss of both every few steps and
returns the numbers; ``compiledopt meta-descent`` (:mod:`compiledopt.cli.meta_descent`)
calls it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, TextIO, Tuple, cast

from compiledopt._validation import check_lr

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

__all__ = ["DEFAULT_STEPS", "TRANSFORMS", "DemoTransform", "run_demo"]

DEFAULT_STEPS = 500

# The synthetic task: sizes, input scales and label noise.
_INPUTS = 8
_HIDDEN = 32
_TRAIN = 512
_HELD_OUT = 256
_INPUT_SCALES = (-1.0, 0.5)  # log10 of the smallest and the largest feature scale
_LABEL_NOISE = 0.05


@dataclass(frozen=True)
class DemoTransform:
    """A transform the demo can meta-train.

    Attributes:
        label (str): how the output names it.
        build (callable): returns a fresh factory for :class:`LearnableOptimizer`.
        meta_lr (float): the Adam learning rate of its weights that the demo uses by default.
        start (str): how the fresh transform relates to the identity map, for the output.
    """

    label: str
    build: Callable[[], object]
    meta_lr: float
    start: str = "as the identity map"


def _kronecker_linear() -> object:
    from compiledopt.nn import KroneckerLinear
    from compiledopt.optim import KroneckerTransform

    return KroneckerTransform(KroneckerLinear)


def _kronecker_rnn() -> object:
    from compiledopt.nn import KroneckerRNN
    from compiledopt.optim import KroneckerTransform

    return KroneckerTransform(KroneckerRNN)


def _metacurvature() -> object:
    from compiledopt.optim import MetaCurvatureTransform

    return MetaCurvatureTransform


# Meta learning rates chosen over seeds 0-15 at the default lr and steps: no run diverges; with
# either Kronecker transform the learned optimizer ends at or below SGD on every seed (final loss
# 0.14 to 0.97 of SGD's), MetaCurvature (whose factors are not kept psd) about level with it (0.32
# to 1.04). One-step meta-descent is greedy and keeps raising the step size, so larger meta
# learning rates can blow up.
TRANSFORMS: Dict[str, DemoTransform] = {
    "kronecker": DemoTransform("KroneckerTransform(KroneckerLinear)", _kronecker_linear, 0.01),
    "metacurvature": DemoTransform("MetaCurvatureTransform", _metacurvature, 3e-4),
    "kronecker-rnn": DemoTransform(
        "KroneckerTransform(KroneckerRNN)", _kronecker_rnn, 3e-4, start="close to the identity map"
    ),
}


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (needs a positive integer)")
    return value


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run intra-op single-threaded, then restore the setting.

    The demo's tensors are tiny: extra threads only add synchronisation, and on a busy machine
    (more runnable threads than cores) they slow a step down by an order of magnitude.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _architecture() -> nn.Sequential:
    """An uninitialised 8-32-1 tanh MLP, the teacher's and the student's architecture."""
    from torch import nn

    # skip_init: nn.Linear's own initialisation would draw from (and advance) the global RNG.
    return nn.Sequential(
        nn.utils.skip_init(nn.Linear, _INPUTS, _HIDDEN),
        nn.Tanh(),
        nn.utils.skip_init(nn.Linear, _HIDDEN, 1),
    )


def _linears(model: nn.Sequential) -> Tuple[nn.Linear, nn.Linear]:
    """The two ``nn.Linear`` layers of :func:`_architecture`'s MLP."""
    return cast("nn.Linear", model[0]), cast("nn.Linear", model[2])


def _mlp(generator: torch.Generator) -> nn.Sequential:
    """An 8-32-1 tanh MLP with ``nn.Linear``'s default initialisation, drawn from ``generator``."""
    import torch

    model = _architecture()
    with torch.no_grad():
        for layer in _linears(model):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    return model


def _make_task(seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, nn.Module]:
    """``(x_train, y_train, x_held_out, y_held_out, student)``; leaves the global RNG alone."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    teacher = _architecture()
    with torch.no_grad():
        for layer in _linears(teacher):
            layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features), generator=generator)
            layer.bias.normal_(0.0, 0.5, generator=generator)
        latent = torch.randn(_TRAIN + _HELD_OUT, _INPUTS, generator=generator)
        target = teacher(2.0 * latent)
        target = (target - target.mean()) / target.std()
        inputs = latent * torch.logspace(*_INPUT_SCALES, _INPUTS)
        noise = _LABEL_NOISE * torch.randn(_TRAIN, 1, generator=generator)
    student = _mlp(generator)
    return inputs[:_TRAIN], target[:_TRAIN] + noise, inputs[_TRAIN:], target[_TRAIN:], student


def _clone(model: nn.Module) -> nn.Module:
    clone = _architecture()
    clone.load_state_dict(model.state_dict())
    return clone


def run_demo(
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    transform: str = "kronecker",
    lr: float = 0.05,
    meta_lr: Optional[float] = None,
    batch_size: int = 64,
    log_every: Optional[int] = None,
    out: Optional[TextIO] = None,
) -> Dict[str, object]:
    """Train the student with a learned optimizer and with SGD; print a table; return the numbers.

    Args:
        steps (int, optional): training steps of each optimizer. (default: 500)
        seed (int, optional): seeds the teacher, the data, the student's init and the minibatches.
            (default: 0)
        transform (str, optional): a key of :data:`TRANSFORMS`: ``"kronecker"``,
            ``"metacurvature"`` or ``"kronecker-rnn"``. (default: "kronecker")
        lr (float, optional): learning rate of both the learned optimizer and SGD. (default: 0.05)
        meta_lr (float, optional): Adam learning rate of the transform's weights; ``None`` takes
            the transform's ``meta_lr`` from :data:`TRANSFORMS`. (default: None)
        batch_size (int, optional): minibatch size, at most 512. (default: 64)
        log_every (int, optional): steps between table rows; ``None`` gives about ten rows.
            (default: None)
        out (TextIO, optional): where the table goes; ``None`` is ``sys.stdout``. (default: None)

    The run is single-threaded (``torch.set_num_threads(1)``, restored afterwards): the tensors are
    tiny, and extra threads only slow it down. The global random state is left untouched.

    Returns:
        dict: ``transform``, ``seed``, ``steps``, ``lr``, ``meta_lr``, ``batch_size``,
        ``logged_steps`` (list of int, 0 first), ``learned_loss`` and ``sgd_loss`` (held-out MSE at
        those steps), ``learned_initial``, ``learned_final``, ``sgd_final``, ``diverged`` (names of
        the optimizers whose loss became non-finite; the run stops there) and ``seconds``.

    Raises:
        ValueError: for an unknown transform or a non-positive steps, lr, meta_lr, batch_size or
            log_every.
    """
    steps = _check_positive_int(steps, "steps")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r} (needs an integer)")
    if transform not in TRANSFORMS:
        raise ValueError(f"Unknown transform {transform!r}; choose one of {sorted(TRANSFORMS)}")
    spec = TRANSFORMS[transform]
    lr = check_lr(lr, "run_demo")
    meta_lr = check_lr(spec.meta_lr if meta_lr is None else meta_lr, "run_demo (meta_lr)")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if batch_size > _TRAIN:
        raise ValueError(f"Invalid batch_size: {batch_size} (the task has {_TRAIN} examples)")
    if log_every is None:
        log_every = max(1, steps // 10)
    log_every = _check_positive_int(log_every, "log_every")
    out = sys.stdout if out is None else out
    with _single_threaded():
        return _run(steps, seed, transform, lr, meta_lr, batch_size, log_every, out)


def _run(
    steps: int,
    seed: int,
    transform: str,
    lr: float,
    meta_lr: float,
    batch_size: int,
    log_every: int,
    out: TextIO,
) -> Dict[str, object]:
    import torch
    from torch import nn

    from compiledopt.optim import LearnableOptimizer

    spec = TRANSFORMS[transform]
    start = time.perf_counter()
    x_train, y_train, x_held_out, y_held_out, student = _make_task(seed)
    learned, baseline = _clone(student), _clone(student)
    loss = nn.MSELoss()
    metaopt = LearnableOptimizer(learned, spec.build(), lr=lr)
    opt = torch.optim.Adam(metaopt.parameters(), lr=meta_lr)
    sgd = torch.optim.SGD(baseline.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(seed + 1)

    def held_out_losses() -> Tuple[float, float]:
        with torch.no_grad():
            return (
                loss(learned(x_held_out), y_held_out).item(),
                loss(baseline(x_held_out), y_held_out).item(),
            )

    print(f"compiledopt meta-descent: a synthetic regression task (seed {seed})", file=out)
    print(
        f"  task      8-32-1 tanh MLP fitting a fixed random teacher; {_TRAIN} examples, "
        f"input scales 0.1 to 3.2",
        file=out,
    )
    print(
        f"  learned   LearnableOptimizer(lr={lr:g}) with {spec.label},\n"
        f"            starting {spec.start}, meta-trained online by Adam(lr={meta_lr:g})",
        file=out,
    )
    print(
        f"  baseline  torch.optim.SGD(lr={lr:g}), same initialisation, same minibatches "
        f"of {batch_size}",
        file=out,
    )
    print(file=out)
    print(f"  {'step':>6}  {'learned':>10}  {'SGD':>10}   (held-out MSE)", file=out)

    logged_steps: List[int] = []
    learned_loss: List[float] = []
    sgd_loss: List[float] = []
    diverged: List[str] = []

    def record(step: int) -> None:
        learned_value, sgd_value = held_out_losses()
        logged_steps.append(step)
        learned_loss.append(learned_value)
        sgd_loss.append(sgd_value)
        print(f"  {step:>6}  {learned_value:>10.4f}  {sgd_value:>10.4f}", file=out)
        for name, value in (("learned", learned_value), ("SGD", sgd_value)):
            if not math.isfinite(value):
                diverged.append(name)

    record(0)
    for step in range(1, steps + 1):
        index = torch.randint(0, _TRAIN, (batch_size,), generator=batches)
        x, y = x_train[index], y_train[index]

        metaopt.zero_grad()
        opt.zero_grad()
        loss(learned(x), y).backward()
        opt.step()  # meta-update of the transform
        metaopt.step()  # update of the model by the transform

        sgd.zero_grad()
        loss(baseline(x), y).backward()
        sgd.step()

        if step % log_every == 0 or step == steps:
            record(step)
            if diverged:
                break
    seconds = time.perf_counter() - start

    initial, final, sgd_final = learned_loss[0], learned_loss[-1], sgd_loss[-1]
    print(file=out)
    if diverged:
        print(
            f"diverged at step {logged_steps[-1]}: {' and '.join(diverged)} (try a smaller "
            f"meta learning rate)",
            file=out,
        )
    else:
        print(
            f"learned optimizer: {initial:.4f} -> {final:.4f} ({initial / final:.1f}x lower); "
            f"SGD: {sgd_loss[0]:.4f} -> {sgd_final:.4f} ({sgd_loss[0] / sgd_final:.1f}x lower)",
            file=out,
        )
        print(f"final loss, learned / SGD: {final / sgd_final:.2f}", file=out)
    print(f"{logged_steps[-1]} steps in {seconds:.1f} s", file=out)
    metaopt.remove_hooks()
    return {
        "transform": transform,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "meta_lr": meta_lr,
        "batch_size": batch_size,
        "logged_steps": logged_steps,
        "learned_loss": learned_loss,
        "sgd_loss": sgd_loss,
        "learned_initial": initial,
        "learned_final": final,
        "sgd_final": sgd_final,
        "diverged": diverged,
        "seconds": seconds,
    }
