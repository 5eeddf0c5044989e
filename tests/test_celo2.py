"""Celo2 and the converter of PyLO's Celo2 checkpoints.

The ground truth is :class:`ReferenceCelo2` below: PyLO's pure-PyTorch Celo2 optimizers
(``Celo2_naive`` with a ``Celo2MLP`` network, ``CELO2_naive`` with a ``CELO2MLP``), written out
here as a readable loop over parameters from the algorithm, reading the checkpoint's own keys
(its MLP is evaluated from the PyLO layout, never through the converter's mapping) and keeping
PyLO's own state layout (the factored statistics by role, row and column, not by axis).
Checkpoints are random weights in each layout, built in tests/celo2_checkpoints.py; nothing is
downloaded.
"""

import json
import math
import warnings
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from celo2_checkpoints import WIDTHS, new_checkpoint, old_checkpoint
from safetensors.torch import save_file
from torch import Tensor, nn

import compiledopt
from compiledopt.cli import main
from compiledopt.export import export_shape_agnostic, load_artifact
from compiledopt.export.convert import ROUTES, convert_celo2, detect_layout, import_celo2
from compiledopt.export.verify import verify_artifact
from compiledopt.learned import Celo2, build_transform
from compiledopt.learned.celo2_ops import factored_axes

MOMENTUM, RMS, ADAFACTOR = (0.9, 0.99, 0.999), (0.95,), (0.9, 0.99, 0.999)
STEPS = 20

# -- checkpoints in PyLO's layouts ---------------------------------------------------------------


def adam_like_checkpoint(hidden: int = 4) -> Dict[str, Tensor]:
    """CELO2MLP weights computing ``d = m·rsqrt(v)`` (decay 0.9): a network that descends."""
    sd = {k: torch.zeros_like(v) for k, v in new_checkpoint(hidden).items()}
    sd["w0.5"][0, 0], sd["w0.5"][0, 1] = 1.0, -1.0  # group 5: m·rsqrt(v), first decay
    sd["dense_w.0"][0, 0], sd["dense_w.0"][1, 1] = 1.0, 1.0
    sd["dense_w.1"][0, 0], sd["dense_w.1"][1, 0] = 1.0, -1.0  # relu(x) − relu(−x) = x
    return sd


# -- the reference: PyLO's Celo2 step, one parameter at a time ----------------------------------


def _two_largest(shape) -> Tuple[int, int]:
    """``(d1, d0)`` as ``numpy.argsort`` (stable on so few items) orders the sizes."""
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    return order[-2], order[-1]


def _normalize(x: Tensor, axes) -> Tensor:
    return x * torch.rsqrt(1e-9 + (x**2).mean(dim=axes, keepdim=True))


def _newton_schulz(x: Tensor) -> Tensor:
    """Five quintic iterations on each matrix of the last two axes, one matrix at a time."""
    a, b, c = 3.4445, -4.7750, 2.0315
    flat = x.reshape(-1, x.shape[-2], x.shape[-1])
    out = []
    for m in flat:
        tall = m.shape[0] > m.shape[1]
        m = m.t() if tall else m
        m = m / (torch.linalg.norm(m) + 1e-8)
        for _ in range(5):
            gram = m @ m.t()
            m = a * m + (b * gram + c * gram @ gram) @ m
        out.append(m.t() if tall else m)
    return torch.stack(out).reshape(x.shape)


class ReferenceCelo2:
    """PyLO's Celo2 optimizer on ``params`` (``(tensor, kind)``, kind ``"learned"`` or
    ``"adam"``), the network read from the checkpoint ``sd`` in its own ``layout``.

    ``Celo2MLP`` (``Celo2_naive``): Adam on raw gradients with its own moments (betas 0.9, 0.95)
    and weight decay before it; the learned step then weight decay on the updated parameter.
    ``CELO2MLP`` (``CELO2_naive``): gradients clipped to ±1000 for both paths; Adam from the
    shared accumulators (first momentum, RMS); ``p ← p − lr·(step + wd·p)``.
    """

    def __init__(self, params, sd, layout, lr, weight_decay=0.0, activation="relu"):
        self.params, self.layout, self.lr, self.wd = params, layout, lr, weight_decay
        dtype = params[0][0].dtype
        self.sd = {k: v.to(dtype) for k, v in sd.items()}
        self.act = torch.relu if activation == "relu" else torch.tanh
        self.state: List[dict] = [{} for _ in params]
        self.t = 0

    def network(self, inputs: List[Tensor]) -> Tensor:
        sd, act = self.sd, self.act
        if self.layout == "Celo2MLP":
            if "first_layer.weight" in sd:
                h = torch.cat(inputs, -1) @ sd["first_layer.weight"].t() + sd["first_layer.bias"]
            else:
                h = sd["first_layer_bias"]
                for i, x in enumerate(inputs):
                    h = h + x @ sd[f"first_layer_weights.{i}"].t()
            h = act(act(h) @ sd["hidden.weight"].t() + sd["hidden.bias"])
            return h @ sd["output.weight"].t() + sd["output.bias"]
        h = sd["b0"]
        for i, x in enumerate(inputs):
            h = h + x @ sd[f"w0.{i}"]
        layers = sum(k.startswith("dense_w.") for k in sd)
        for j in range(layers):
            h = act(h)
            h = h @ sd[f"dense_w.{j}"] + sd[f"dense_b.{j}"]
        return h

    @torch.no_grad()
    def step(self, grads: List[Tensor]) -> None:
        self.t += 1
        for (p, kind), grad, state in zip(self.params, grads, self.state):
            if kind == "adam" and self.layout == "Celo2MLP":
                self._old_adam(p, grad, state)
                continue
            g = grad.clamp(-1000.0, 1000.0)
            self._accumulate(p, g, state)
            if kind == "adam":  # CELO2_naive: Adam from the shared accumulators
                m_hat = state["mom"][..., 0] / (1 - 0.9**self.t)
                v_hat = state["rms"][..., -1] / (1 - 0.95**self.t)
                p.sub_(self.lr * (m_hat / (v_hat.sqrt() + 1e-8) + self.wd * p))
                continue
            direction = self._learned(p, g, state)
            if self.layout == "Celo2MLP":
                p.sub_(self.lr * direction)
                p.sub_(self.lr * self.wd * p)
            else:
                p.sub_(self.lr * (direction + self.wd * p))

    def _old_adam(self, p: Tensor, g: Tensor, state: dict) -> None:
        if not state:
            state.update(m=torch.zeros_like(p), v=torch.zeros_like(p), t=0)
        state["t"] += 1
        p.mul_(1 - self.lr * self.wd)
        state["m"] = 0.9 * state["m"] + 0.1 * g
        state["v"] = 0.95 * state["v"] + 0.05 * g * g
        denom = state["v"].sqrt() / math.sqrt(1 - 0.95 ** state["t"]) + 1e-8
        p.sub_(self.lr / (1 - 0.9 ** state["t"]) * state["m"] / denom)

    def _accumulate(self, p: Tensor, g: Tensor, state: dict) -> None:
        shape, dtype = tuple(p.shape), p.dtype
        mom, rms, fac = (torch.tensor(d, dtype=dtype) for d in (MOMENTUM, RMS, ADAFACTOR))
        if not state:
            state["mom"] = torch.zeros((*shape, 3), dtype=dtype)
            state["rms"] = torch.zeros((*shape, 1), dtype=dtype)
            if p.dim() >= 2:
                d1, d0 = _two_largest(shape)
                full = (*shape, 3)
                state["v_row"] = torch.zeros(
                    [s for i, s in enumerate(full) if i != d0], dtype=dtype
                )
                state["v_col"] = torch.zeros(
                    [s for i, s in enumerate(full) if i != d1], dtype=dtype
                )
        g1 = g.unsqueeze(-1)
        state["mom"] = mom * state["mom"] + (1 - mom) * g1
        state["rms"] = rms * state["rms"] + (1 - rms) * g1**2
        if p.dim() >= 2:
            d1, d0 = _two_largest(shape)
            square = g1.expand((*shape, 3)) ** 2 + 1e-30
            state["v_row"] = fac * state["v_row"] + (1 - fac) * square.mean(d0)
            state["v_col"] = fac * state["v_col"] + (1 - fac) * square.mean(d1)

    def _learned(self, p: Tensor, g: Tensor, state: dict) -> Tensor:
        shape = tuple(p.shape)
        d1, d0 = _two_largest(shape)
        mom, rms, v_row, v_col = state["mom"], state["rms"], state["v_row"], state["v_col"]
        d1_in_row = d1 - 1 if d1 > d0 else d1
        row_factor = torch.rsqrt(torch.clamp(v_row / (v_row.mean(d1_in_row, True) + 1e-9), 1e-9))
        row_factor = row_factor.unsqueeze(d0)
        col_factor = torch.rsqrt(torch.clamp(v_col, min=1e-9)).unsqueeze(d1)
        rs = torch.rsqrt(rms + 1e-8)
        g1 = g.unsqueeze(-1)
        row = v_row.unsqueeze(d0).expand((*shape, 3))
        col = v_col.unsqueeze(d1).expand((*shape, 3))
        inputs = [g1, g1.clamp(-0.1, 0.1), p.unsqueeze(-1), mom, rms, mom * rs, rs,
                  g1 * row_factor * col_factor, g1 * rs, row, col, torch.rsqrt(row + 1e-8),
                  torch.rsqrt(col + 1e-8), mom * row_factor * col_factor]  # fmt: skip
        axes = (p.dim() - 2, p.dim() - 1)
        out = self.network([_normalize(x, axes) for x in inputs])
        direction = out[..., 0] * torch.exp(out[..., 1] * 0.0)
        return _normalize(_newton_schulz(direction), axes)


# -- helpers --------------------------------------------------------------------------------------

SHAPES = {"wide": (4, 6), "tall": (7, 3), "conv": (3, 2, 5), "vector": (5,), "embedding": (10, 4)}
ROLE = {"wide": "matrix", "tall": "matrix", "conv": "matrix", "vector": "vector"}


def _params(dtype: torch.dtype, names=("wide", "tall", "vector", "embedding")):
    gen = torch.Generator().manual_seed(7)
    return {n: torch.randn(SHAPES[n], generator=gen).to(dtype) for n in names}


def _grads(params: Dict[str, Tensor], steps: int = STEPS) -> List[Dict[str, Tensor]]:
    """Random gradients of every size, some beyond the ±1000 clip, one row of zeros."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for k in range(steps):
        grads = {}
        for name, p in params.items():
            g = torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(
                -3, 2, (), generator=gen
            )
            if k % 7 == 3:
                g.view(-1)[0] = 3000.0
            grads[name] = g.to(p.dtype)
        if "embedding" in grads:
            grads["embedding"][2] = 0.0  # a row no token used: a zero gradient
        out.append(grads)
    return out


def _kinds(layout: str, names) -> List[str]:
    """Which PyLO path each parameter takes (Celo2MLP also sends the first and last matrices to
    Adam; the tests name those roles ``input``/``head`` only where said)."""
    return ["adam" if n in ("vector", "embedding") else "learned" for n in names]


def _deltas(after: Dict[str, Tensor], before: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {n: after[n] - before[n] for n in before}


def _assert_deltas_close(actual, expected, rtol, atol) -> None:
    for name in expected:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(
            actual[name],
            expected[name],
            rtol=rtol,
            atol=atol * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def _run_reference(params, sd, layout, lr, wd, grads, activation="relu"):
    names = list(params)
    live = {n: p.clone() for n, p in params.items()}
    ref = ReferenceCelo2(
        [(live[n], k) for n, k in zip(names, _kinds(layout, names))], sd, layout, lr, wd, activation
    )
    for step in grads:
        ref.step([step[n] for n in names])
    return live


# -- 1. the transform against the reference, float64 (the mapping is exact) -----------------------


@pytest.mark.parametrize(
    ("layout", "sd"),
    [
        ("Celo2MLP", old_checkpoint()),
        ("Celo2MLP", old_checkpoint(dense=True)),
        ("CELO2MLP", new_checkpoint()),
        ("CELO2MLP", new_checkpoint(hidden=5, layers=3)),
    ],
    ids=["Celo2MLP-grouped", "Celo2MLP-dense", "CELO2MLP", "CELO2MLP-deep"],
)
def test_transform_matches_reference_float64(layout: str, sd) -> None:
    imported = import_celo2(sd)
    assert imported.layout == layout and imported.routes == ROUTES[layout]
    transform = imported.transform.double()
    adam = transform.routed("adam")
    params = _params(torch.float64, ("wide", "tall", "conv", "vector", "embedding"))
    grads = _grads(params)
    lr, wd = 0.01, (0.0 if layout == "Celo2MLP" else 0.1)  # see test_old_weight_decay_order
    live = {n: p.clone() for n, p in params.items()}
    states = {n: transform.init_state(p) for n, p in live.items()}
    for k, step in enumerate(grads):
        for name, p in live.items():
            rule = adam if name == "embedding" else transform
            d, states[name] = rule.update(step[name], p, states[name], torch.tensor(k))
            live[name] = p * (1 - lr * wd) - lr * d
    expected = _run_reference(params, sd, layout, lr, wd, grads)
    _assert_deltas_close(_deltas(live, params), _deltas(expected, params), 1e-9, 1e-10)


def test_old_weight_decay_order() -> None:
    """Celo2_naive decays the already-updated matrix, ``(p − lr·d)(1 − lr·wd)``; compiledopt
    (like CELO2_naive and AdamW) decays first: the steps differ by ``lr²·wd·d`` exactly."""
    sd = old_checkpoint()
    transform = import_celo2(sd).transform.double()
    p = _params(torch.float64, ("wide",))
    g = _grads(p, 1)[0]
    lr, wd = 0.01, 0.1
    d, _ = transform.update(g["wide"], p["wide"], transform.init_state(p["wide"]), torch.tensor(0))
    ours = p["wide"] * (1 - lr * wd) - lr * d
    theirs = _run_reference(p, sd, "Celo2MLP", lr, wd, [g])["wide"]
    torch.testing.assert_close(theirs - ours, lr * lr * wd * d, rtol=1e-9, atol=1e-15)


# -- 2. the converted artifact in FrozenOptimizer against the reference, float32 ----------------


@pytest.mark.parametrize("layout", ["Celo2MLP", "CELO2MLP"])
def test_artifact_steps_match_reference_float32(layout: str, tmp_path) -> None:
    sd = old_checkpoint() if layout == "Celo2MLP" else new_checkpoint()
    path = convert_celo2(sd, tmp_path / "a", backends=["torchscript"])
    params = _params(torch.float32)
    grads = _grads(params)
    lr, wd = 0.01, (0.0 if layout == "Celo2MLP" else 0.1)
    live = {n: nn.Parameter(p.clone()) for n, p in params.items()}
    groups = [{"params": [live[n]], "role": ROLE.get(n, n)} for n in live]
    opt = compiledopt.FrozenOptimizer(groups, path, lr=lr, weight_decay=wd, backend="eager")
    for step in grads:
        for name, p in live.items():
            p.grad = step[name].clone()
        opt.step()
    expected = _run_reference(params, sd, layout, lr, wd, grads)
    actual = {n: p.detach() for n, p in live.items()}
    # float32 rounding: the two sum the first layer in another order, and Newton–Schulz
    # amplifies the difference a little; 20 steps of parameter deltas agree to ~1e-5.
    _assert_deltas_close(_deltas(actual, params), _deltas(expected, params), 1e-4, 2e-5)


def test_frozen_optimizer_trains_a_tiny_model(tmp_path) -> None:
    path = convert_celo2(adam_like_checkpoint(), tmp_path / "a", backends=["torchscript"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = torch.sin(x.sum(1, keepdim=True))
    groups = compiledopt.param_groups(model)
    opt = compiledopt.FrozenOptimizer(groups, path, lr=0.02, backend="eager")
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# -- 3. converter: what it reads, what it refuses ---------------------------------------------


def test_reads_pt_safetensors_and_a_hub_folder(tmp_path) -> None:
    sd = new_checkpoint()
    torch.save(sd, tmp_path / "w.pt")
    save_file(sd, str(tmp_path / "w.safetensors"))
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(sd, str(hub / "model.safetensors"))
    config = {"feature_dims": WIDTHS, "hidden_size": 8, "hidden_layers": 2, "output_size": 3}
    (hub / "config.json").write_text(json.dumps({**config, "activation": "tanh"}))
    reference = import_celo2(sd).transform.state_dict()
    for source in (tmp_path / "w.pt", str(tmp_path / "w.safetensors"), hub):
        imported = import_celo2(source)
        for key, value in imported.transform.state_dict().items():
            assert torch.equal(value, reference[key]), (source, key)
        assert len(imported.provenance["sha256"]) == 64
    assert import_celo2(hub).transform.activation == "tanh"
    assert import_celo2(tmp_path / "w.pt").transform.activation == "relu"
    with pytest.raises(ValueError, match=r"config\.json says 'tanh'"):
        import_celo2(hub, activation="relu")


def _with(sd: Dict[str, Tensor], **changes: Optional[Tensor]) -> Dict[str, Tensor]:
    out = dict(sd)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("sd", "layout", "needle"),
    [
        (_with(new_checkpoint(), extra=torch.zeros(2)), "auto", "unknown key 'extra'"),
        (_with(new_checkpoint(), w0__3=None), "auto", "missing key 'w0.3'"),
        (_with(new_checkpoint(), w0__3=torch.zeros(2, 8)), "auto", "'w0.3' has shape (2, 8)"),
        (_with(new_checkpoint(), w0__14=torch.zeros(3, 8)), "auto", "unknown key 'w0.14'"),
        (_with(new_checkpoint(), dense_b__1=None), "auto", "dense_b"),
        (_with(new_checkpoint(), dense_w__1=torch.zeros(8, 1)), "auto", "'dense_w.1' has shape"),
        (_with(new_checkpoint(), b0=torch.zeros(8, 1)), "auto", "'b0' has shape (8, 1)"),
        (_with(new_checkpoint(), b0=torch.zeros(8, dtype=torch.int64)), "auto", "'b0' is"),
        (_with(new_checkpoint(), b0=torch.full((8,), math.nan)), "auto", "'b0' holds NaN"),
        (_with(old_checkpoint(), w0__0=torch.zeros(1, 8)), "auto", "ambiguous layout"),
        (_with(old_checkpoint(), first_layer__weight=torch.zeros(8, 30)), "auto", "ambiguous"),
        (_with(old_checkpoint(), hidden__weight=torch.zeros(8, 7)), "auto", "'hidden.weight'"),
        (_with(old_checkpoint(), output__bias=None), "auto", "missing key 'output.bias'"),
        (
            _with(old_checkpoint(True), first_layer_bias=torch.zeros(8)),
            "auto",
            "'first_layer_bias'",
        ),
        (new_checkpoint(), "Celo2MLP", "unknown key 'w0.0' for a Celo2MLP"),
        (old_checkpoint(), "CELO2MLP", "for a CELO2MLP"),
        ({"state_dict": {}}, "auto", "not a PyLO Celo2 state_dict"),
        (new_checkpoint(), "VeLO", "Invalid layout: 'VeLO'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_refusals_name_the_offending_key(sd, layout: str, needle: str) -> None:
    with pytest.raises(ValueError) as raised:
        import_celo2(sd, layout)
    assert needle in str(raised.value), str(raised.value)


def test_refused_options_and_ranks(tmp_path) -> None:
    with pytest.raises(ValueError, match="'hidden_size' is decided by the weights"):
        import_celo2(new_checkpoint(), options={"hidden_size": 4})
    with pytest.raises(ValueError, match="Invalid momentum_decays"):
        import_celo2(new_checkpoint(), options={"momentum_decays": "fast"})
    with pytest.raises(ValueError, match=r"'w0.3' has shape \(3, 8\), expected \(2, 8\)"):
        decays = {"momentum_decays": [0.9, 0.99], "adafactor_decays": [0.9, 0.99]}
        import_celo2(new_checkpoint(), options=decays)  # 2 decays: other group widths
    with pytest.raises(ValueError, match="Celo2MLP is always 'relu'"):
        import_celo2(old_checkpoint(), activation="tanh")
    with pytest.raises(ValueError, match="Invalid ranks: \\[1, 3\\]"):
        convert_celo2(new_checkpoint(), tmp_path / "a", ranks=[1, 3])
    with pytest.raises(ValueError, match="cannot be read as a state_dict"):
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        import_celo2(tmp_path / "junk.pt")
    assert not (tmp_path / "a").exists()
    assert detect_layout(old_checkpoint(dense=True)) == "Celo2MLP"


# -- 4. the command line --------------------------------------------------------------------------


def test_cli_convert_then_verify(tmp_path, capsys) -> None:
    torch.save(old_checkpoint(), tmp_path / "celo2.pt")
    out = tmp_path / "artifact"
    argv = [
        "convert",
        str(tmp_path / "celo2.pt"),
        "--output",
        str(out),
        "--backends",
        "torchscript",
    ]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["verify", str(out), "--trust-code", "--steps", "3"]) == 0
    assert "torchscript" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["transform"]["name"] == "celo2"
    assert manifest["routes"] == ROUTES["Celo2MLP"] and manifest["ranks"] == [0, 1, 2]
    assert manifest["training"]["layout"] == "Celo2MLP"


def test_cli_refuses_in_one_line(tmp_path, capsys) -> None:
    torch.save(_with(new_checkpoint(), stray=torch.zeros(1)), tmp_path / "bad.pt")
    out = tmp_path / "artifact"
    assert main(["convert", str(tmp_path / "bad.pt"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compiledopt convert: ") and "'stray'" in err[0]
    assert main(["convert", str(tmp_path / "none.pt"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.pt" in err[0]
    assert not out.exists()


# -- 5. the transform itself ----------------------------------------------------------------------


def test_catalog_rules_state_and_cost() -> None:
    t = build_transform("celo2", {"hidden_size": 4})
    assert isinstance(t, Celo2) and t.shape_agnostic and t.reads_param and not t.view_invariant
    assert t.rules() == ("artifact", "adam") and t.routed("artifact") is t
    adam = t.routed("adam")
    assert adam.input_layer is t.input_layer and adam.routed("adam") is adam
    with pytest.raises(ValueError, match="Invalid rule: 'muon'"):
        t.routed("muon")
    p = torch.randn(4, 6)
    state = t.init_state(p)
    assert [list(s.shape) for s in state] == [[4, 6, 3], [4, 6, 1], [4, 3], [6, 3]]
    d, new = t.update(torch.randn(4, 6), p, state, torch.tensor(0))
    assert torch.allclose(d.square().mean(), torch.tensor(1.0), atol=1e-4)
    assert [s.shape for s in new] == [s.shape for s in state]
    assert t.cost((64, 32)).flops > t.cost((2048,)).flops > 0
    for bad in ({"rms_decays": [0.9, 0.99]}, {"adafactor_decays": [0.9]}, {"activation": "gelu"}):
        with pytest.raises(ValueError, match="Invalid"):
            Celo2(**bad)


@pytest.mark.parametrize("shape", [(3, 3), (2, 5, 5), (5, 2, 5), (4, 4, 2, 7), (1, 1, 1)])
def test_factored_axes_follow_a_stable_sort(shape) -> None:
    assert factored_axes(list(shape)) == _two_largest(shape)


def test_scripted_matches_eager() -> None:
    t = import_celo2(new_checkpoint()).transform.double()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        scripted = torch.jit.script(t)
    for shape in [(), (5,), (4, 6), (7, 3), (3, 2, 5)]:
        p = torch.randn(shape, dtype=torch.float64)
        s1, s2 = t.init_state(p), scripted.init_state(p)
        for k in range(3):
            g = torch.randn(shape, dtype=torch.float64)
            d1, s1 = t.update(g, p, s1, torch.tensor(k))
            d2, s2 = scripted.update(g, p, s2, torch.tensor(k))
            torch.testing.assert_close(d2, d1, rtol=0, atol=1e-12)


# -- 6. exported graphs and the compiled backend (slow) -------------------------------------------


@pytest.mark.slow
def test_torchscript_and_onnx_match_eager(tmp_path) -> None:
    """One dynamic-size ONNX graph per rank 0–2 serves tall, wide, one-row and one-column
    matrices (torch.cond on the orientation); rank 3 is refused for ONNX, served by TorchScript."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = convert_celo2(old_checkpoint(), tmp_path / "a", backends=["torchscript", "onnx"])
    errors = verify_artifact(path, steps=5, trust_code=True)
    assert errors["torchscript"] <= 1e-6 and errors["onnx"] <= 1e-4, errors
    artifact = load_artifact(path, trust_code=True)
    transform = artifact.transforms()[0]
    for backend in ("onnx", "torchscript"):
        run = artifact.runner(backend)
        shapes = [(9, 1), (1, 9), (8, 3), (3, 8), (5,)] + ([(3, 2, 5)] * (backend != "onnx"))
        for shape in shapes:
            p = torch.randn(shape)
            s1, s2 = transform.init_state(p), transform.init_state(p)
            for k in range(3):
                g = torch.randn(shape)
                d1, s1 = transform.update(g, p, s1, torch.tensor(k))
                d2, s2 = run(g, p, list(s2), torch.tensor(k))
                torch.testing.assert_close(d2, d1, rtol=1e-4, atol=1e-4, msg=f"{backend} {shape}")
    spec = {"kind": "shape_agnostic", "name": "celo2", "kwargs": {}}
    with pytest.raises(ValueError, match="rank-3 graph with dynamic sizes"):
        export_shape_agnostic(tmp_path / "b", spec, Celo2(), backends=["onnx"], ranks=[3])


@pytest.mark.slow
def test_compiled_backend_matches_eager(tmp_path) -> None:
    path = convert_celo2(new_checkpoint(), tmp_path / "a", backends=["torchscript"])
    params = _params(torch.float32, ("wide", "tall", "vector"))
    runs = {}
    for backend in ("eager", "compiled"):
        live = {n: nn.Parameter(p.clone()) for n, p in params.items()}
        opt = compiledopt.FrozenOptimizer(list(live.values()), path, lr=0.01, backend=backend)
        for step in _grads(params, 4):
            for name, p in live.items():
                p.grad = step[name].clone()
            opt.step()
        runs[backend] = {n: p.detach() for n, p in live.items()}
    _assert_deltas_close(
        _deltas(runs["compiled"], params), _deltas(runs["eager"], params), 1e-4, 1e-5
    )
