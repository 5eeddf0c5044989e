"""LearnableOptimizer keeps the model a normal model, composes with optimizers, compiles."""

import copy
import io

import pytest
import torch
from models import ScalarScale, batch, conv_model, mse
from registry import LEARNED, LEARNED_IDS
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import compiledopt as co

KRONECKER_PSD = co.optim.KroneckerTransform(co.nn.KroneckerLinear, psd=True)


def _loop(model, metaopt, opt, iterations, meta_first=False, step=None):
    step = step or metaopt.step
    losses = []
    for t in range(iterations):
        metaopt.zero_grad()
        opt.zero_grad()
        x, y = batch(t)
        loss = mse(model(x), y)
        loss.backward()
        losses.append(loss.item())
        if meta_first:
            step()
            opt.step()
        else:
            opt.step()
            step()
    return losses


@pytest.mark.parametrize("entry", LEARNED, ids=LEARNED_IDS)
def test_model_parameters_stay_leaf_parameters(entry):
    model = conv_model()
    metaopt = co.optim.LearnableOptimizer(model, lambda p: entry.build(p), lr=0.1)
    opt = torch.optim.SGD(metaopt.parameters(), lr=0.01)
    _loop(model, metaopt, opt, 3)
    for name, p in model.named_parameters():
        assert isinstance(p, nn.Parameter) and p.is_leaf, name
    # Everything a normal model supports keeps working.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = conv_model()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    copy.deepcopy(model)
    other = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batch(9)
    mse(model(x), y).backward()
    other.step()
    model.to(torch.float64)


@pytest.mark.parametrize("meta_first", [False, True], ids=["opt-then-meta", "meta-then-opt"])
def test_order_of_steps_does_not_matter(meta_first):
    """No 'modified by an inplace operation' error in either order (learn2learn issue #300), and
    the meta-gradient is taken at the transform weights that produced the update."""
    model = conv_model()
    metaopt = co.optim.LearnableOptimizer(model, KRONECKER_PSD, lr=0.1)
    opt = torch.optim.SGD(metaopt.parameters(), lr=0.05)
    _loop(model, metaopt, opt, 4, meta_first=meta_first)
    assert all(w.grad is not None for w in metaopt.parameters())

    # After metaopt.step() the transform is changed in place; the meta-gradient must still be the
    # one at the weights used by that step (compare with a run that leaves them unchanged).
    grads = []
    for change_weights in (False, True):
        model = conv_model()
        metaopt = co.optim.LearnableOptimizer(model, KRONECKER_PSD, lr=0.1)
        x, y = batch(0)
        mse(model(x), y).backward()
        metaopt.step()
        if change_weights:
            with torch.no_grad():
                for w in metaopt.parameters():
                    w.mul_(3.0)
        metaopt.zero_grad()
        x, y = batch(1)
        mse(model(x), y).backward()
        grads.append([w.grad.clone() for w in metaopt.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_step_compiles_fullgraph_without_recompiles():
    results = []
    for compiled in (False, True):
        model = conv_model()
        metaopt = co.optim.LearnableOptimizer(
            model, co.optim.KroneckerTransform(co.nn.KroneckerRNN), lr=0.1
        )
        opt = torch.optim.SGD(metaopt.parameters(), lr=0.05)
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(metaopt.step, fullgraph=True, backend=counter) if compiled else None
        losses = _loop(model, metaopt, opt, 4, step=step)
        if compiled:
            assert counter.frame_count == 1, "step() recompiled"
        results.append(
            (
                losses,
                [p.detach().clone() for p in model.parameters()],
                [w.grad.clone() for w in metaopt.parameters()],
            )
        )
    (losses_e, params_e, grads_e), (losses_c, params_c, grads_c) = results
    assert losses_e == pytest.approx(losses_c, rel=1e-12)
    for a, b in zip(params_e + grads_e, params_c + grads_c):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.slow
def test_step_compiles_with_inductor():
    model = conv_model(dtype=torch.float32)
    reference = conv_model(dtype=torch.float32)
    metaopts = [
        co.optim.LearnableOptimizer(m, co.optim.MetaCurvatureTransform, lr=0.1)
        for m in (model, reference)
    ]
    step = torch.compile(metaopts[0].step, fullgraph=True)
    for m, s in ((model, step), (reference, metaopts[1].step)):
        for t in range(3):
            x, y = batch(t, dtype=torch.float32)
            m.zero_grad()
            mse(m(x), y).backward()
            s()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_zero_grad_resets_only_the_model():
    model = conv_model()
    metaopt = co.optim.LearnableOptimizer(model, co.optim.MetaCurvatureTransform, lr=0.1)
    opt = torch.optim.SGD(metaopt.parameters(), lr=0.01)
    _loop(model, metaopt, opt, 2)
    x, y = batch(5)
    mse(model(x), y).backward()
    metaopt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert all(w.grad is not None and torch.count_nonzero(w.grad) > 0 for w in metaopt.parameters())
    metaopt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # parameters() are the transforms' weights only.
    model_ids = {id(p) for p in model.parameters()}
    assert not any(id(w) in model_ids for w in metaopt.parameters())


def test_step_closure_and_params_without_grad():
    model = conv_model()
    frozen = model[0].bias
    metaopt = co.optim.LearnableOptimizer(model, co.optim.MetaCurvatureTransform, lr=0.1)
    before = frozen.detach().clone()
    x, y = batch(0)

    def closure():
        metaopt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        frozen.grad = None  # this parameter gets no gradient this step
        return loss

    loss = metaopt.step(closure)
    assert loss is not None and loss.requires_grad
    assert torch.equal(frozen, before)
    assert mse(model(x), y) < loss


def test_shared_transform_module_and_transform_dictionary():
    model = conv_model()
    shared = ScalarScale()  # a user-written shape-agnostic transform, shared by every tensor
    metaopt = co.optim.LearnableOptimizer(model, shared, lr=0.1)
    assert len(list(metaopt.parameters())) == 1
    x, y = batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    mse(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    metaopt.step()
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p, b - 0.1 * g)

    model = conv_model()
    conv, linear = model[0].weight, model[3].weight
    transform = co.optim.TransformDictionary(
        {
            conv: co.optim.KroneckerTransform(co.nn.KroneckerLinear),
            linear: co.optim.ModuleTransform(nn.Linear),
        },
        default=co.optim.MetaCurvatureTransform,
    )
    metaopt = co.optim.LearnableOptimizer(model, transform, lr=0.1)
    kinds = [type(t).__name__ for t in metaopt.transforms]
    assert kinds == [
        "KroneckerUpdate",
        "MetaCurvatureTransform",
        "ReshapedTransform",
        "MetaCurvatureTransform",
    ]
    opt = torch.optim.SGD(metaopt.parameters(), lr=0.01)
    losses = _loop(model, metaopt, opt, 3)
    assert all(w.grad is not None for w in metaopt.parameters())
    assert losses[-1] < losses[0]

    with pytest.raises(KeyError, match=r"\(3, 2, 3, 3\)"):
        co.optim.LearnableOptimizer(conv_model(), co.optim.TransformDictionary({}), lr=0.1)


def test_channels_last_gradients():
    model = conv_model().to(memory_format=torch.channels_last)
    reference = conv_model()
    for m in (model, reference):
        metaopt = co.optim.LearnableOptimizer(m, KRONECKER_PSD, lr=0.1)
        x, y = batch(0)
        mse(m(x), y).backward()
        metaopt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
