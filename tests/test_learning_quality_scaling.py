"""The learning-quality benchmark's matrix-step scaling (``--matrix-scale``), against steps
written out by hand."""

import math

import pytest
import torch

from benchmarks.learning_quality import journal, runner, scaling


def _params():
    g = torch.Generator().manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64) * 0.3)
    conv = torch.nn.Parameter(torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64))
    vector = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    tiny = torch.nn.Parameter(torch.full((2, 3), 1e-4, dtype=torch.float64))
    return [matrix, conv, vector, tiny]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _expected_scale(mode, weight, first):
    """The factor of ``mode`` from its definition, for a parameter at ``weight`` whose value
    before its first step was ``first``."""
    if weight.dim() < 2:
        return 1.0
    if mode == "fan-in":
        fan_in = math.prod(weight.shape[1:])
        return (1.0 / math.sqrt(3.0 * fan_in)) / 0.1
    source = first if mode == "initial-rms" else weight
    root_mean_square = math.sqrt(sum(float(x) ** 2 for x in source.flatten()) / source.numel())
    return max(root_mean_square, 0.01) / 0.1


@pytest.mark.parametrize("mode", ["rms", "initial-rms", "fan-in"])
def test_each_mode_scales_a_matrix_step_by_its_definition_and_leaves_vectors(mode):
    lr, decay = 0.05, 0.1
    params = _params()
    scaled = scaling.attach(torch.optim.AdamW(params, lr=lr, weight_decay=decay), mode)
    # The reference: AdamW's own step on copies, then each difference scaled by hand.
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.AdamW(copies, lr=lr, weight_decay=decay)
    reference = [p.detach().clone() for p in params]
    first = [p.detach().clone() for p in params]
    for step in range(3):
        grads = _grads(params, step)
        for p, c, g in zip(params, copies, grads):
            p.grad, c.grad = g.clone(), g.clone()
        before = [c.detach().clone() for c in copies]
        plain.step()
        scaled.step()
        for j, (c, b) in enumerate(zip(copies, before)):
            factor = _expected_scale(mode, reference[j], first[j])
            reference[j] = reference[j] + (c.detach() - b) * factor
            # AdamW's next step is taken from the scaled trajectory, as the hooks leave it.
            with torch.no_grad():
                c.copy_(reference[j])
        for p, r in zip(params, reference):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
    assert not torch.equal(params[0].detach(), first[0])


def test_initial_rms_keeps_the_first_steps_scale_as_the_weight_grows():
    weight = torch.nn.Parameter(torch.full((4, 4), 0.5, dtype=torch.float64))
    optimizer = scaling.attach(torch.optim.SGD([weight], lr=1.0), "initial-rms")
    deltas = []
    for _ in range(3):
        before = weight.detach().clone()
        weight.grad = torch.full_like(weight, -1.0)  # SGD's step: +1 everywhere
        optimizer.step()
        deltas.append(float((weight.detach() - before).mean()))
    assert deltas == pytest.approx([5.0, 5.0, 5.0])  # 0.5 / 0.1 each time, not the new RMS


def test_a_parameter_without_a_gradient_is_left_alone():
    a, b = (torch.nn.Parameter(torch.ones(3, 3, dtype=torch.float64)) for _ in range(2))
    optimizer = scaling.attach(torch.optim.SGD([a, b], lr=0.1), "rms")
    a.grad = torch.ones_like(a)
    optimizer.step()
    torch.testing.assert_close(a.detach(), torch.full((3, 3), 1.0 - 0.1 * 10.0, dtype=a.dtype))
    torch.testing.assert_close(b.detach(), torch.ones(3, 3, dtype=b.dtype))


def test_none_attaches_nothing_and_an_unknown_mode_is_refused():
    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    assert scaling.attach(optimizer, "none") is optimizer
    assert not optimizer._optimizer_step_pre_hooks
    with pytest.raises(ValueError, match="'relative'"):
        scaling.attach(optimizer, "relative")


def test_the_journal_key_names_a_scale_for_the_learned_kinds_only():
    paths = {"learned": "x"}
    backends = {"learned": "eager"}
    artifacts = {"learned": "sha256:0"}
    for scale in ("none", "rms"):
        jobs = runner.make_jobs(
            ["regression"],
            {"regression": [0]},
            {"learned": [0.01], "adamw": [0.01]},
            {"regression": 5},
            paths,
            backends,
            matrix_scale=scale,
        )
        keys = {job["optimizer"]: journal.job_key(job, artifacts) for job in jobs}
        # Unscaled keys are those of journals written before the option existed.
        assert ("matrix_scale" in keys["learned"]) == (scale != "none")
        assert "matrix_scale" not in keys["adamw"]
        if scale != "none":
            assert keys["learned"]["matrix_scale"] == scale
