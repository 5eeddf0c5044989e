"""Apply a compiledopt shape-agnostic ONNX artifact with onnxruntime and numpy only (no torch).

Usage::

    python apply_rule.py ARTIFACT_DIR STEPS [LR] [--init-state STATE.npz]

Runs ``STEPS`` steps of ``p <- p - lr * direction`` on the quadratic ``0.5 * ||p - target||²``
(gradient ``g = p - target``) with ``ARTIFACT_DIR/rule_rank2.onnx`` (the rank-2 graph, every
size dynamic), ``step = 0, 1, …, STEPS-1`` as a 0-d int64 array, and prints the final parameter
values row-major, one per line (``%.9g`` for float32, ``%.17g`` for float64: enough digits to
round-trip). The problem is the one the C++ client (``export/clients/cpp``) solves, built so that
every client starts from bit-identical arrays::

    p0[i]     = (2i - 11) / 11         i = 0..11, in float64, then rounded to the graph's dtype
    target[i] = 0.25 * ((i % 3) - 1)   (exact); both reshaped to (3, 4)

``lr`` is the command-line ``LR`` if given, else the manifest's ``lr``. The graph file's sha256 is
checked against the manifest before it is loaded.

The graph's interface is read from the session, not hard-coded: inputs ``grad``, ``param``,
``state_0``, ``state_1``, … and ``step``; outputs ``direction``, ``new_state_0``, …; each
``new_state_i`` is fed back as ``state_i`` (an input the exporter pruned is simply not fed).

Initial state: zeros (every compiledopt transform starts from zeros), of the dtype and shape that
the graph declares for each ``state_i`` input. Those shapes are symbolic; they are resolved from
the parameter: each symbol of the ``param`` input's shape is bound to the parameter's size there,
and a state dimension is a constant, such a symbol, or an arithmetic expression in them (e.g. a
``CoordinateMLP`` rank-2 graph declares ``state_4: [s0]`` and ``state_5: [s1]``, its factored row
and column accumulators; a ``CoordinateLSTM`` graph ``[s1*s0, 20]``). A state size that depends on
nothing the parameter fixes (e.g. the one-element placeholders of a rank-1 ``CoordinateMLP``
graph) cannot be resolved this way and is an error: pass ``--init-state STATE.npz`` instead, an
``.npz`` file whose arrays are named like the graph's state inputs (``state_0``, …), e.g. written
with ``state = transform.init_state(p)`` by
``numpy.savez(path, **{f"state_{i}": s.numpy() for i, s in enumerate(state)})``.
"""

import argparse
import ast
import hashlib
import json
import operator
import os
import sys
from typing import Dict, List, Sequence, Union

import numpy as np
import onnxruntime as ort

RANK = 2
_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def problem(dtype: type) -> tuple:
    """The fixed starting parameter and target, shape (3, 4), in ``dtype``."""
    index = np.arange(12, dtype=np.float64)
    param = ((2.0 * index - 11.0) / 11.0).astype(dtype).reshape(3, 4)
    target = (0.25 * (np.arange(12) % 3 - 1)).astype(dtype).reshape(3, 4)
    return param, target


def _size(expression: str, symbols: Dict[str, int], where: str) -> int:
    """Evaluate a symbolic ONNX dimension such as ``"s1*s0"`` with the bound ``symbols``."""

    def evaluate(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise ValueError(
                    f"{where}: size {expression!r} is not fixed by the parameter's shape "
                    "(pass the initial state with --init-state)"
                )
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        raise ValueError(f"{where}: cannot evaluate the symbolic size {expression!r}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ValueError(f"{where}: cannot parse the symbolic size {expression!r}") from None
    return int(evaluate(tree))


def zero_state(session: ort.InferenceSession, param: np.ndarray) -> Dict[str, np.ndarray]:
    """Zeros for every ``state_i`` input, shapes resolved from the ``param`` input's symbols."""
    inputs = {i.name: i for i in session.get_inputs()}
    declared: Sequence[Union[int, str, None]] = inputs["param"].shape
    if len(declared) != param.ndim:
        raise ValueError(f"the graph's param is rank {len(declared)}, not {param.ndim}")
    symbols: Dict[str, int] = {}
    for dim, size in zip(declared, param.shape):
        if isinstance(dim, str) and dim.isidentifier():
            symbols[dim] = size
        elif dim is not None and _size(str(dim), {}, "param") != size:
            raise ValueError(f"the graph's param has static shape {declared}, not {param.shape}")
    state = {}
    for name, node in inputs.items():
        if name.startswith("state_"):
            dims: List[int] = []
            for dim in node.shape:
                if dim is None:
                    raise ValueError(f"{name}: a size is unknown (pass --init-state)")
                dims.append(dim if isinstance(dim, int) else _size(dim, symbols, name))
            state[name] = np.zeros(dims, dtype=_DTYPES[node.type])
    return state


def _check_sha256(directory: str, filename: str, manifest: dict) -> None:
    expected = manifest.get("files", {}).get(filename)
    if expected is None:
        raise ValueError(f"{directory}: the manifest lists no checksum for {filename}")
    digest = hashlib.sha256()
    with open(os.path.join(directory, filename), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{directory}: checksum mismatch for {filename}")


def run(directory: str, steps: int, lr: Union[float, None], init_state: Union[str, None]):
    """The parameter after ``steps`` steps of the artifact's rank-2 rule (see the module doc)."""
    with open(os.path.join(directory, "manifest.json")) as handle:
        manifest = json.load(handle)
    if manifest.get("kind") != "shape_agnostic":
        raise ValueError(f"{directory} is a {manifest.get('kind')!r} artifact, not shape_agnostic")
    lr = float(manifest["lr"]) if lr is None else lr
    filename = f"rule_rank{RANK}.onnx"
    _check_sha256(directory, filename, manifest)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        os.path.join(directory, filename), sess_options=options, providers=["CPUExecutionProvider"]
    )
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    unknown = [
        n for n in inputs if n not in ("grad", "param", "step") and not n.startswith("state_")
    ]
    if unknown or "direction" not in outputs:
        raise ValueError(f"{filename} is not a per-tensor rule (inputs {list(inputs)})")
    dtype = _DTYPES[inputs["param" if "param" in inputs else "grad"].type]
    param, target = problem(dtype)

    if init_state is None:
        state = zero_state(session, param)
    else:
        with np.load(init_state) as saved:
            state = {name: saved[name].astype(dtype) for name in inputs if name in saved}
        missing = [n for n in inputs if n.startswith("state_") and n not in state]
        if missing:
            raise ValueError(f"{init_state} lacks {missing}")

    step_size = np.asarray(lr, dtype=dtype)
    for k in range(steps):
        feed = {"grad": param - target, "param": param, "step": np.asarray(k, dtype=np.int64)}
        feed = {name: value for name, value in feed.items() if name in inputs}
        feed.update(state)
        result = dict(zip(outputs, session.run(outputs, feed)))
        for name in outputs:
            if name.startswith("new_state_") and name[4:] in inputs:
                state[name[4:]] = result[name]
        param = param - step_size * result["direction"]
    return param


def main(argv: Union[Sequence[str], None] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", help="a shape-agnostic artifact directory with an ONNX graph")
    parser.add_argument("steps", type=int, help="how many steps to apply")
    parser.add_argument("lr", type=float, nargs="?", help="learning rate (default: the manifest's)")
    parser.add_argument("--init-state", help=".npz of the initial state (default: zeros)")
    args = parser.parse_args(argv)
    if args.steps < 0 or (args.lr is not None and not args.lr > 0):
        parser.error("STEPS must be >= 0 and LR > 0")
    try:
        param = run(args.artifact, args.steps, args.lr, args.init_state)
    except (OSError, ValueError, KeyError) as error:
        print(f"apply_rule.py: {error}", file=sys.stderr)
        return 1
    template = "%.9g" if param.dtype == np.float32 else "%.17g"
    print("\n".join(template % value for value in param.reshape(-1).tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
