"""SGD, Adam and AdamW transforms step for step against torch.optim (float64, 20 steps).

The transform is driven by the readable loop ``p -= lr * direction``; torch.optim (single-tensor
``foreach=False`` path) gets the same gradient sequence through ``p.grad``. Parameter deltas must
agree to atol 1e-10, rtol 1e-8.
"""

import math
import re
from typing import Dict, List, Type

import pytest
import torch
from registry import SHAPES
from torch import Tensor, nn

from compiledopt.transforms.baselines import SGD, Adam, AdamW

DTYPE = torch.float64
STEPS = 20
RANKS = (0, 1, 2, 4)
TOLERANCE = {"atol": 1e-10, "rtol": 1e-8}

# (transform class, torch.optim class, lr, keyword arguments shared by both)
CASES = {
    "sgd": (SGD, torch.optim.SGD, 0.1, {}),
    "sgd_momentum": (SGD, torch.optim.SGD, 0.1, {"momentum": 0.9}),
    "sgd_nesterov": (SGD, torch.optim.SGD, 0.1, {"momentum": 0.9, "nesterov": True}),
    "sgd_dampening": (SGD, torch.optim.SGD, 0.1, {"momentum": 0.8, "dampening": 0.3}),
    "sgd_weight_decay": (SGD, torch.optim.SGD, 0.1, {"weight_decay": 0.1}),
    "sgd_all": (
        SGD,
        torch.optim.SGD,
        0.1,
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
    ),
    "adam": (Adam, torch.optim.Adam, 0.01, {}),
    "adam_betas_eps": (Adam, torch.optim.Adam, 0.01, {"betas": (0.8, 0.99), "eps": 1e-3}),
    "adam_weight_decay": (Adam, torch.optim.Adam, 0.01, {"weight_decay": 0.1}),
    "adam_amsgrad": (Adam, torch.optim.Adam, 0.01, {"amsgrad": True}),
    "adam_amsgrad_weight_decay": (
        Adam,
        torch.optim.Adam,
        0.01,
        {"amsgrad": True, "weight_decay": 0.1},
    ),
    "adamw": (AdamW, torch.optim.AdamW, 0.01, {}),
    "adamw_amsgrad": (
        AdamW,
        torch.optim.AdamW,
        0.01,
        {"weight_decay": 0.1, "amsgrad": True, "betas": (0.5, 0.9)},
    ),
}


def _grads(shape, seed: int = 0) -> List[Tensor]:
    """Gradients that shrink over time, so AMSGrad's running maximum differs from Adam's."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=DTYPE) * 0.8**t for t in range(STEPS)]


def _start(shape) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(99), dtype=DTYPE)


def transform_deltas(transform, param: Tensor, grads: List[Tensor], lr: float) -> List[Tensor]:
    """The readable loop: ``p -= lr * direction``, the step count a 0-d int64 tensor."""
    p = param.clone()
    state = transform.init_state(p)
    deltas = []
    for t, grad in enumerate(grads):
        before = p.clone()
        direction, state = transform.update(grad, p, state, torch.tensor(t))
        p -= lr * direction
        deltas.append(p - before)
    return deltas


def torch_optim_deltas(
    optimizer: Type[torch.optim.Optimizer], kwargs: Dict, param: Tensor, grads, lr: float
) -> List[Tensor]:
    p = nn.Parameter(param.clone())
    opt = optimizer([p], lr=lr, foreach=False, **kwargs)
    deltas = []
    for grad in grads:
        before = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
        deltas.append(p.detach() - before)
    return deltas


@pytest.mark.parametrize("rank", RANKS, ids=[f"rank{r}" for r in RANKS])
@pytest.mark.parametrize("case", CASES)
def test_matches_torch_optim(case: str, rank: int) -> None:
    transform_cls, optimizer, lr, kwargs = CASES[case]
    shape = SHAPES[rank]
    param, grads = _start(shape), _grads(shape)
    expected = torch_optim_deltas(optimizer, kwargs, param, grads, lr)
    actual = transform_deltas(transform_cls(**kwargs), param, grads, lr)
    for t, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOLERANCE, msg=lambda m, t=t: f"step {t}: {m}")


def test_cases_are_distinct() -> None:
    """Each option changes the trajectory here, so the comparisons above are not vacuous."""
    shape = SHAPES[2]
    param, grads = _start(shape), _grads(shape)
    finals = {
        name: torch.stack(transform_deltas(cls(**kwargs), param, grads, lr)).sum(0)
        for name, (cls, _, lr, kwargs) in CASES.items()
    }
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(finals[a], finals[b], atol=1e-8, rtol=0), (a, b)


@pytest.mark.parametrize("case", CASES)
def test_state_schema_and_reads_param(case: str) -> None:
    transform_cls, _, _, kwargs = CASES[case]
    transform = transform_cls(**kwargs)
    param = _start((4, 3))
    state = transform.init_state(param)
    assert len(transform.state_names()) == len(state)
    assert all(s.shape == param.shape and s.dtype == param.dtype for s in state)
    assert transform.reads_param == (transform.weight_decay != 0.0)
    assert list(transform.parameters()) == []
    # The seed call is the first step from the initial state.
    grad = _grads((4, 3))[0]
    torch.testing.assert_close(
        transform(grad), transform.update(grad, grad, state, torch.tensor(0))[0]
    )


@pytest.mark.parametrize("transform", [SGD(0.9), Adam(), AdamW()], ids=["sgd", "adam", "adamw"])
def test_gradient_of_wrong_shape(transform) -> None:
    param = torch.zeros(4, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=re.escape("gradient of shape [3, 4]")):
        transform.update(torch.zeros(3, 4), param, transform.init_state(param), torch.tensor(0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SGD(momentum=-0.1), "Invalid momentum value: -0.1"),
        (lambda: SGD(momentum=math.nan), "Invalid momentum value: nan"),
        (lambda: SGD(momentum="0.9"), "Invalid momentum value: '0.9'"),
        (lambda: SGD(weight_decay=-1e-4), "Invalid weight_decay value: -0.0001"),
        (lambda: SGD(dampening=math.inf), "Invalid dampening value: inf"),
        (lambda: SGD(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
        (
            lambda: SGD(momentum=0.9, dampening=0.1, nesterov=True),
            "Nesterov momentum requires a momentum and zero dampening",
        ),
        (lambda: SGD(nesterov=1), "Invalid nesterov: 1"),
        (lambda: Adam(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (lambda: Adam(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
        (lambda: Adam(betas=(0.9, 1.5)), "Invalid beta parameter at index 1: 1.5"),
        (lambda: Adam(betas=(0.9,)), "Invalid betas: (0.9,)"),
        (lambda: Adam(betas=0.9), "Invalid betas: 0.9"),
        (lambda: Adam(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        (lambda: Adam(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (lambda: Adam(amsgrad="yes"), "Invalid amsgrad: 'yes'"),
        (lambda: AdamW(weight_decay=math.nan), "Invalid weight_decay value: nan"),
        (lambda: AdamW(betas=(0.9, True)), "Invalid beta parameter at index 1: True"),
    ],
)
def test_bad_hyper_parameters(make, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()
