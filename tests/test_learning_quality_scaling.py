"""The learning-quality benchmark's matrix-step scaling (``--matrix-scale``), against steps
written out by hand."""

import math

import pytest
import torch

from benchmarks.learning_quality import journal, lr_semantics, runner, scaling


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
    default_init = 1.0 / math.sqrt(3.0 * math.prod(weight.shape[1:]))
    if mode == "fan-in":
        return default_init / 0.1
    source = first if mode in ("initial-rms", "grown") else weight
    root_mean_square = math.sqrt(sum(float(x) ** 2 for x in source.flatten()) / source.numel())
    if mode == "grown":
        return max(1.0, root_mean_square / default_init)
    return max(root_mean_square, 0.01) / 0.1


@pytest.mark.parametrize("mode", ["rms", "initial-rms", "fan-in", "grown"])
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


def test_grown_leaves_a_default_sized_weight_and_an_embedding_group_alone():
    g = torch.Generator().manual_seed(1)
    small = torch.nn.Parameter(torch.randn(8, 16, generator=g, dtype=torch.float64) * 0.01)
    large = torch.nn.Parameter(torch.randn(8, 16, generator=g, dtype=torch.float64))
    table = torch.nn.Parameter(torch.randn(8, 16, generator=g, dtype=torch.float64))
    groups = [{"params": [small, large]}, {"params": [table], "role": "embedding"}]
    optimizer = scaling.attach(torch.optim.SGD(groups, lr=0.1), "grown")
    before = [p.detach().clone() for p in (small, large, table)]
    for p in (small, large, table):
        p.grad = torch.ones_like(p)
    optimizer.step()
    moved = [float((b - p.detach()).mean()) for b, p in zip(before, (small, large, table))]
    grown = math.sqrt(float(before[1].pow(2).mean())) * math.sqrt(3.0 * 16)  # RMS / 1/√(3·16)
    assert moved == pytest.approx([0.1, 0.1 * grown, 0.1]) and grown > 5


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


def _doc(scale, finals, tuned_lrs, spread, beats, diverged):
    """A learning-quality result reduced to what the comparison reads: per task the learned
    kind's loss at its default and tuned lr and tuned AdamW's."""
    tasks = {
        name: {
            "summary_of_runs": {
                "default_lr": {"learned": 0.003},
                "tuned_lr": {"learned": tuned_lrs[name]},
                "final_val_loss": {
                    "learned@default": at_default,
                    "learned@tuned": at_tuned,
                    "adamw@tuned": adamw,
                },
            }
        }
        for name, (at_default, at_tuned, adamw) in finals.items()
    }
    return {
        "settings": {"matrix_scale": scale} if scale != "none" else {},
        "tasks": tasks,
        "lr_spread": {
            "learned": {"max_over_min": spread[0], "log10_std": spread[1]},
            "adamw": {"max_over_min": 10.0, "log10_std": 0.3},
        },
        "aggregates": {
            "learned": {
                "fraction_tuned_beats_or_ties_adamw_tuned": beats,
                "runs": 30,
                "diverged_runs": diverged,
            }
        },
    }


def test_the_lr_semantics_comparison_counts_each_scaling_from_its_file():
    finals = {"a": (1.04, 0.9, 1.0), "b": (2.2, 1.1, 2.0), "c": (0.5, 0.5, 1.0)}
    doc = _doc("initial-rms", finals, {"a": 0.01, "b": 0.003, "c": 0.003}, (3.0, 0.2), 2 / 3, 4)
    figures = lr_semantics.aggregate(doc)
    assert figures["scale"] == "initial-rms" and figures["tasks"] == 3
    assert figures["within"] == 2  # 1.04 and 0.5 are within 5% of tuned AdamW; 1.1 is not
    assert figures["beats_or_ties"] == 2 and figures["diverged"] == "4/30"
    assert figures["tuned_geomean"] == pytest.approx((0.9 * 0.55 * 0.5) ** (1 / 3))
    plain = _doc("none", finals, dict.fromkeys(finals, 0.003), (1, 0), 1, 0)
    text = lr_semantics.render([plain, doc])
    assert "| a | 1.04 / 0.9 (0.003) | 1.04 / 0.9 (0.01) |" in text
    assert "| initial-rms | 0.003 | 3x | 0.200 | 2/3 | 2/3 | 0.628 | 4/30 |" in text
    assert "AdamW's best lr over the same tasks spreads 10x" in text
