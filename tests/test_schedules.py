"""The warm-up + cosine schedule against its formula written out, and as a torch scheduler."""

import itertools
import math

import pytest
import torch

from compiledopt.schedules import warmup_cosine, warmup_cosine_lr


def test_warmup_then_cosine_to_zero() -> None:
    # 100 steps, 5 % warm-up: steps 0..4 ramp (k + 1) / 6, then a half cosine over 95 steps.
    values = [warmup_cosine(k, 100, 0.05) for k in range(101)]
    assert values[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert values[5] == 1.0
    assert values[52] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert values[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert values[100] == 0.0 and min(values) >= 0.0 and max(values) == 1.0
    assert all(a >= b for a, b in itertools.pairwise(values[5:]))  # decays monotonically
    assert warmup_cosine(0, 10, 0.0) == 1.0  # no warm-up: starts at the peak


def test_the_scheduler_applies_it_to_every_group() -> None:
    weight = torch.nn.Parameter(torch.zeros(2))
    bias = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [weight], "lr": 1e-3}, {"params": [bias], "lr": 1.0}])
    scheduler = warmup_cosine_lr(optimizer, total_steps=20, warmup_fraction=0.1)
    seen = []
    for _ in range(20):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for k, (small, large) in enumerate(seen):
        assert small == pytest.approx(1e-3 * warmup_cosine(k, 20, 0.1))
        assert large == pytest.approx(warmup_cosine(k, 20, 0.1))


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 0, 0.05), "total_steps"),
        ((0, 10, 1.0), "warmup_fraction"),
        ((0, 10, -0.1), "warmup_fraction"),
        ((-1, 10, 0.05), "step"),
        ((1.5, 10, 0.05), "step"),
        ((0, True, 0.05), "total_steps"),
    ],
)
def test_bad_arguments_are_named(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        warmup_cosine(*args)
