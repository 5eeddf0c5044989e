"""Every torch.optim.lr_scheduler on FrozenOptimizer: the learning rate it applies at each step
is the one the same scheduler gives torch.optim.SGD and AdamW (the independent reference).

The schedulers are found by introspection, so a scheduler added to torch fails
``test_every_scheduler_has_its_arguments`` until it is listed here with its required arguments.
"""

import copy
import inspect

import pytest
import torch
from torch.optim import lr_scheduler

import compiledopt as co

ARTIFACT = "normalized-mlp"
STEPS = 14  # ReduceLROnPlateau's default patience is 10: its first reduction comes at step 12
MOMENTUM_ERROR = "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"


def _concrete_schedulers():
    """Every public scheduler class of torch.optim.lr_scheduler but the abstract base."""
    found = {}
    for name, cls in vars(lr_scheduler).items():
        if inspect.isclass(cls) and issubclass(cls, lr_scheduler.LRScheduler):
            if not name.startswith("_") and cls is not lr_scheduler.LRScheduler:
                found[name] = cls
    return found


SCHEDULERS = _concrete_schedulers()


def _wrapped(optimizer):
    return [
        lr_scheduler.ConstantLR(optimizer),
        lr_scheduler.ExponentialLR(optimizer, gamma=0.8),
    ]


#: The arguments each scheduler requires (no default in its signature), with small values; a
#: callable builds them for the optimizer (the wrappers take schedulers of the same optimizer).
REQUIRED = {
    "LambdaLR": {"lr_lambda": lambda step: 1.0 / (1 + step)},
    "MultiplicativeLR": {"lr_lambda": lambda step: 0.9},
    "StepLR": {"step_size": 3},
    "MultiStepLR": {"milestones": [2, 5]},
    "ConstantLR": {},
    "LinearLR": {},
    "ExponentialLR": {"gamma": 0.8},
    "SequentialLR": lambda optimizer: {"schedulers": _wrapped(optimizer), "milestones": [3]},
    "PolynomialLR": {},
    "CosineAnnealingLR": {"T_max": 6},
    "ChainedScheduler": lambda optimizer: {"schedulers": _wrapped(optimizer)},
    "ReduceLROnPlateau": {},
    "CyclicLR": {"base_lr": 1e-3, "max_lr": 1e-2},
    "CosineAnnealingWarmRestarts": {"T_0": 4},
    "OneCycleLR": {"max_lr": 1e-2},
}
#: What some schedulers need beyond their required arguments. OneCycleLR needs a length
#: (total_steps, or epochs and steps_per_epoch). OneCycleLR and CyclicLR cycle the optimizer's
#: momentum by default, and FrozenOptimizer has none (the learned rule's own decays are frozen
#: in the artifact): they need cycle_momentum=False (see test_cycle_momentum_default_fails).
EXTRA = {
    "CyclicLR": {"step_size_up": 3, "cycle_momentum": False},
    "OneCycleLR": {"total_steps": STEPS + 1, "cycle_momentum": False},
}
NEEDS_CYCLE_MOMENTUM_OFF = ("CyclicLR", "OneCycleLR")


def _arguments(name, optimizer):
    required = REQUIRED[name]
    required = required(optimizer) if callable(required) else dict(required)
    return {**required, **EXTRA.get(name, {})}


def _make(name, optimizer):
    arguments = _arguments(name, optimizer)
    if name == "ChainedScheduler":  # its signature is (schedulers, optimizer=None)
        return SCHEDULERS[name](**arguments)
    return SCHEDULERS[name](optimizer, **arguments)


def _step(name, scheduler, step):
    if name == "ReduceLROnPlateau":
        scheduler.step(1.0)  # a loss that never improves
    else:
        scheduler.step()


def _params():
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=generator))
    bias = torch.nn.Parameter(torch.randn(3, generator=generator))
    return weight, bias


def _groups(params, lr):
    """Two param groups: the first at ``lr``, the second at its own lr."""
    weight, bias = params
    return [{"params": [weight], "lr": lr}, {"params": [bias], "lr": 0.01}]


def _grads(count):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, generator=generator), torch.randn(3, generator=generator))
        for _ in range(count)
    ]


def test_every_scheduler_has_its_arguments():
    assert {"StepLR", "OneCycleLR", "CyclicLR", "ReduceLROnPlateau", "SequentialLR"} <= set(
        SCHEDULERS
    )
    assert set(SCHEDULERS) == set(REQUIRED), "list the new scheduler's required arguments"
    for name, cls in SCHEDULERS.items():
        required = {
            key
            for key, parameter in inspect.signature(cls).parameters.items()
            if parameter.default is inspect.Parameter.empty and key != "optimizer"
        }
        listed = REQUIRED[name]
        listed = listed(torch.optim.SGD(_params())) if callable(listed) else listed
        assert set(listed) == required, name


def test_the_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        lr_scheduler.LRScheduler(torch.optim.SGD(_params()))


def _replay(probe, probe_params, optimizer, params, grads, lrs):
    """The parameters after one step of ``probe`` at ``lrs`` from ``optimizer``'s parameters,
    state and ``grads`` (``optimizer`` itself untouched)."""
    probe.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for group, lr in zip(probe.param_groups, lrs):
        group["lr"] = lr
    with torch.no_grad():
        for probe_param, param, grad in zip(probe_params, params, grads):
            probe_param.copy_(param)
            probe_param.grad = grad.clone()
    probe.step()
    return [p.detach().clone() for p in probe_params]


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_scheduler_applies_the_reference_lr(name):
    params = _params()
    default_lr = co.FrozenOptimizer(params, ARTIFACT, backend="eager").defaults["lr"]
    assert default_lr == pytest.approx(3e-3)  # the artifact's lr
    optimizer = co.FrozenOptimizer(_groups(params, default_lr), ARTIFACT, backend="eager")
    references = [
        torch.optim.SGD(_groups(_params(), default_lr)),
        torch.optim.AdamW(_groups(_params(), default_lr)),
    ]
    # A second FrozenOptimizer replays each step from the same parameters and state with its lr
    # set by hand: at the scheduled lr it must move the parameters exactly as the scheduled
    # optimizer does, and at lr 1 it gives the direction d, so that the step is lr·d.
    probe_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    probe = co.FrozenOptimizer(_groups(probe_params, default_lr), ARTIFACT, backend="eager")
    scheduler = _make(name, optimizer)
    reference_schedulers = [_make(name, reference) for reference in references]

    seen = set()
    for step, grads in enumerate(_grads(STEPS)):
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        for reference in references:
            assert lrs == [float(group["lr"]) for group in reference.param_groups], (name, step)
        seen.add(tuple(lrs))

        at_lr = _replay(probe, probe_params, optimizer, params, grads, lrs)
        at_one = _replay(probe, probe_params, optimizer, params, grads, [1.0] * len(lrs))
        before = [p.detach().clone() for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
        for param, old, exact, unit, lr in zip(params, before, at_lr, at_one, lrs):
            assert torch.equal(param, exact), (name, step)
            assert torch.equal(param, old) == (lr == 0.0), (name, step)
            direction = old - unit
            assert direction.abs().max() > 0.1, (name, step)
            torch.testing.assert_close(old - param, lr * direction, rtol=1e-3, atol=1e-6)
        for reference in references:
            for group, grad in zip(reference.param_groups, grads):
                group["params"][0].grad = grad.clone()
            reference.step()

        _step(name, scheduler, step)
        for reference_scheduler in reference_schedulers:
            _step(name, reference_scheduler, step)
    assert len(seen) > 1, f"{name} never changed the lr in {STEPS} steps"


@pytest.mark.parametrize("name", NEEDS_CYCLE_MOMENTUM_OFF)
def test_cycle_momentum_default_fails(name):
    """With their defaults (cycle_momentum=True) OneCycleLR and CyclicLR need a 'momentum' or
    'betas' hyperparameter, which FrozenOptimizer does not have; torch says so at construction.
    An optimizer that has one (SGD with momentum, AdamW) accepts the same arguments."""
    arguments = {**_arguments(name, None)}
    del arguments["cycle_momentum"]
    optimizer = co.FrozenOptimizer(_params(), ARTIFACT, backend="eager")
    assert "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults
    with pytest.raises(ValueError, match=MOMENTUM_ERROR.replace("`", ".")):
        SCHEDULERS[name](optimizer, **arguments)
    # torch checks this after it has written the param groups: CyclicLR has set the lr to
    # base_lr, OneCycleLR its own keys. docs/integrations.md says to build a new optimizer.
    group = optimizer.param_groups[0]
    if name == "CyclicLR":
        assert group["lr"] == arguments["base_lr"]
    else:
        assert {"initial_lr", "max_lr", "min_lr"} <= set(group)
    SCHEDULERS[name](torch.optim.SGD(_params(), lr=0.1, momentum=0.9), **arguments)
    SCHEDULERS[name](torch.optim.AdamW(_params()), **arguments)
